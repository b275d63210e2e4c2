"""The argument checks of `predict_test_split` (what `nnunet-segmamba predict-test` runs)."""
import pytest

from nnunet_segmamba.training.prediction import predict_test_split


@pytest.mark.parametrize("kwargs, match", [({"device": "tpu"}, "device"), ({"convention": "x", "device": "cpu"},
                                                                            "convention")])
def test_predict_test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_test_split(4, "3d_fullres", 0, "nnUNetTrainerSegMamba", **kwargs)


@pytest.mark.parametrize("device, compiled", [("cpu", False), ("cuda", True)])
def test_predictor_is_compiled_as_nnunet_decides_except_on_cpu(monkeypatch, device, compiled):
    """nnU-Net's predictor compiles with nnUNet_compile=t; on the CPU the network is handed back uncompiled, with
    nothing written to the environment."""
    import os

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from torch._dynamo import OptimizedModule

    from nnunet_segmamba.training import prediction

    def initialize(self, *args, **kwargs):  # what nnU-Net's does with nnUNet_compile=t, without a model folder
        self.network = torch.compile(torch.nn.Linear(1, 1))

    monkeypatch.setenv("nnUNet_compile", "t")
    monkeypatch.setenv("nnUNet_extTrainer", "")  # trained_predictor adds our folder; restored after the test
    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder", initialize)
    monkeypatch.setattr(nnUNetPredictor, "__init__", lambda self, **kwargs: None)  # no CUDA needed for "cuda"
    if device == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve_device accepts "cuda"
    predictor = prediction.trained_predictor("unused", 0, "nnUNetTrainerSegMamba", device=device)
    assert isinstance(predictor.network, OptimizedModule) is compiled
    assert isinstance(predictor.network, torch.nn.Module)
    assert os.environ["nnUNet_compile"] == "t"
