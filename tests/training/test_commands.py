"""The `env` sub-command through the CLI parser."""


def test_env_through_the_cli(capsys):
    from nnunet_segmamba.training import commands
    import argparse

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["env"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("export nnUNet_extTrainer=")
