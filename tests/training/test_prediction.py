"""The argument checks of `predict_test_split` (what `nnunet-segmamba predict-test` runs)."""
import pytest

from nnunet_segmamba.training.prediction import predict_test_split


@pytest.mark.parametrize("kwargs, match", [({"device": "tpu"}, "device"), ({"convention": "x", "device": "cpu"},
                                                                            "convention")])
def test_predict_test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_test_split(4, "3d_fullres", 0, "nnUNetTrainerSegMamba", **kwargs)


@pytest.mark.parametrize("device, setting, compiled", [("cpu", None, False), ("cpu", "t", False),
                                                      ("cuda", None, True), ("cuda", "t", True),
                                                      ("cuda", "f", False)])
def test_predictor_is_compiled_by_the_trainers_rule(monkeypatch, device, setting, compiled):
    """As the trainers: compiled on CUDA unless nnUNet_compile=f, never on the CPU (where nnU-Net's own compile
    with nnUNet_compile=t is undone), with nothing written to the environment."""
    import os

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from torch._dynamo import OptimizedModule

    from nnunet_segmamba.training import prediction

    def initialize(self, *args, **kwargs):  # what nnU-Net's does, without a model folder
        self.network = torch.nn.Conv3d(1, 1, 1)
        if os.environ.get("nnUNet_compile") == "t":
            self.network = torch.compile(self.network)

    def init(self, device, **kwargs):  # no CUDA needed for "cuda"
        self.device = device

    if setting is None:
        monkeypatch.delenv("nnUNet_compile", raising=False)
    else:
        monkeypatch.setenv("nnUNet_compile", setting)
    monkeypatch.setenv("nnUNet_extTrainer", "")  # trained_predictor adds our folder; restored after the test
    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder", initialize)
    monkeypatch.setattr(nnUNetPredictor, "__init__", init)
    if device == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve_device accepts "cuda"
    predictor = prediction.trained_predictor("unused", 0, "nnUNetTrainerSegMamba", device=device)
    assert isinstance(predictor.network, OptimizedModule) is compiled
    assert predictor.tile_forward.cuda_graphs is compiled and predictor.tile_forward.batched is (device == "cuda")
    assert os.environ.get("nnUNet_compile") == setting
