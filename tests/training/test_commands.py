"""`nnunet-segmamba env` and the argument checks of `predict-test`."""
from pathlib import Path

import pytest

from nnunet_segmamba.training.commands import environment_lines
from nnunet_segmamba.training.predict_test import predict_test_split

REPO = Path(__file__).resolve().parents[2]


def test_env_prints_the_ext_trainer_folder_and_the_paths(monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/data/raw")
    monkeypatch.delenv("nnUNet_results", raising=False)
    lines = environment_lines()
    folder = Path(lines[0].removeprefix("export nnUNet_extTrainer="))
    assert (folder / "segmamba_trainers.py").is_file()
    assert "# nnUNet_raw=/data/raw" in lines
    assert any(line.startswith("# nnUNet_results is not set") for line in lines)


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


@pytest.mark.parametrize("device, compiled", [("cpu", False), ("cuda", True)])
def test_predictor_is_compiled_as_nnunet_decides_except_on_cpu(monkeypatch, device, compiled):
    """nnU-Net's predictor compiles with nnUNet_compile=t; on the CPU the network is handed back uncompiled, with
    nothing written to the environment."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from torch._dynamo import OptimizedModule

    from nnunet_segmamba.training import predict_test

    def initialize(self, *args, **kwargs):  # what nnU-Net's does with nnUNet_compile=t, without a model folder
        self.network = torch.compile(torch.nn.Linear(1, 1))

    monkeypatch.setenv("nnUNet_compile", "t")
    monkeypatch.setenv("nnUNet_extTrainer", "")  # trained_predictor adds our folder; restored after the test
    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder", initialize)
    monkeypatch.setattr(nnUNetPredictor, "__init__", lambda self, **kwargs: None)  # no CUDA needed for "cuda"
    predictor = predict_test.trained_predictor("unused", 0, "nnUNetTrainerSegMamba", device=device)
    assert isinstance(predictor.network, OptimizedModule) is compiled
    assert isinstance(predictor.network, torch.nn.Module)
    assert predict_test.os.environ["nnUNet_compile"] == "t"
