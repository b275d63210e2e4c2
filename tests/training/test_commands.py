"""`nnunet-segmamba env` and the argument checks of `predict-test`."""
from pathlib import Path

import pytest

from nnunet_segmamba.training.predict_test import predict_test_split

REPO = Path(__file__).resolve().parents[2]


def test_env_through_the_cli(capsys):
    from nnunet_segmamba.training import commands
    import argparse

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["env"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("export nnUNet_extTrainer=")


@pytest.mark.parametrize("kwargs, match", [({"device": "tpu"}, "device"), ({"convention": "x", "device": "cpu"},
                                                                            "convention")])
def test_predict_test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_test_split(4, "3d_fullres", 0, "nnUNetTrainerSegMamba", **kwargs)
