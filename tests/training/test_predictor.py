"""`SegMambaPredictor` against nnU-Net's own predictor on the same weights: equal on the CPU (with batched
mirroring forced on); on a GPU (compiled with CUDA graphs, channels-last, float16 convolution weights, batched
mirroring) as close to the float32 logits as nnU-Net's GPU predictor. Uses a tiny dataset planned by nnU-Net
(conftest.py)."""
from __future__ import annotations


import pytest
import torch

from nnunet_segmamba.training import trainers

DATASET_ID = 983
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SegMambaPredictor"
CONFIGURATIONS = ("2d", "3d_fullres")  # for the nnunet_dirs fixture (conftest.py)
TINY = trainers.nnUNetTrainerSegMamba_tiny


def _predictors(make_trainer, configuration: str, devices: tuple[str, str], folds: int = 2):
    """nnU-Net's predictor on devices[0] and ours on devices[1], each with its own copy of the tiny network and
    the same `folds` sets of random weights, as nnU-Net's trainer sets a predictor up for its final validation."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_segmamba.training.predictor import SegMambaPredictor

    trainer = make_trainer(TINY, configuration)  # rounds the patch as in training
    torch.manual_seed(0)
    weights = [TINY.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                               enable_deep_supervision=False).state_dict() for _ in range(folds)]
    dims = len(trainer.configuration_manager.patch_size)
    predictors = []
    for cls, device in zip((nnUNetPredictor, SegMambaPredictor), devices):
        network = TINY.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                  enable_deep_supervision=False)
        network.load_state_dict(weights[0])
        predictor = cls(device=torch.device(device), allow_tqdm=False)
        predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, weights,
                                        trainer.dataset_json, TINY.__name__, tuple(range(dims)))
        predictors.append(predictor)
    return predictors, trainer.configuration_manager.patch_size


def _image(patch, generator):
    """One channel, the patch with its first axis half as long again and a bit: three overlapping tiles (a 2D
    patch: in each of two slices)."""
    slices = [2] if len(patch) == 2 else []
    return torch.randn(1, *slices, patch[0] + patch[0] // 2 + 3, *patch[1:], generator=generator)


def test_cpu_predictor_gives_nnunets_logits_with_batched_mirroring(make_trainer, monkeypatch):
    monkeypatch.delenv("nnUNet_compile", raising=False)  # on the CPU nothing is compiled either way
    (stock, ours), patch = _predictors(make_trainer, "3d_fullres", ("cpu", "cpu"))
    assert ours.tile_forward.batched is False and ours.tile_forward.cuda_graphs is False
    ours.tile_forward.batched = True  # the CUDA path's mirroring, checked here on the CPU
    batch_sizes = []
    ours.network.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    generator = torch.Generator().manual_seed(1)
    tile = torch.randn(1, 1, *patch, generator=generator)
    with torch.inference_mode():  # one tile: the 8 flips' float32 mean, up to the summation order
        torch.testing.assert_close(ours._internal_maybe_mirror_and_predict(tile),
                                   stock._internal_maybe_mirror_and_predict(tile), rtol=1e-5, atol=1e-5)
    image = _image(patch, generator)
    expected = stock.predict_logits_from_preprocessed_data(image).float()  # both folds, their mean
    got = ours.predict_logits_from_preprocessed_data(image).float()
    _assert_same_logits(got, expected)
    assert batch_sizes and set(batch_sizes) == {8}  # every tile: its 8 flips in one pass


def _assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to nnU-Net's float16 accumulation: it sums the tiles' Gaussian-weighted logits (weights up to
    10) in float16, whose rounding at the sums' size (a few units in the last place) shows after the division."""
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3 * float(expected.abs().max()))
    assert (got.argmax(0) == expected.argmax(0)).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_gpu_predictor_is_as_close_to_float32_as_nnunets(make_trainer, monkeypatch, configuration):
    """On a GPU both predictors run under fp16 autocast; ours (compiled with CUDA graphs, channels-last, float16
    convolution weights, batched mirroring) must be as close to the float32 logits (nnU-Net's predictor on the
    CPU) as nnU-Net's own GPU predictor is."""
    from torch._dynamo import OptimizedModule
    from torch._dynamo.utils import counters

    monkeypatch.delenv("nnUNet_compile", raising=False)  # nnU-Net's trainers' rule: compiled on CUDA
    (stock, ours), patch = _predictors(make_trainer, configuration, ("cuda", "cuda"))
    (reference, _), _ = _predictors(make_trainer, configuration, ("cpu", "cpu"))
    assert isinstance(ours.network, OptimizedModule) and not isinstance(stock.network, OptimizedModule)
    assert ours.tile_forward.cuda_graphs and ours.tile_forward.batched
    image = _image(patch, torch.Generator().manual_seed(1))
    counters.clear()
    float32 = reference.predict_logits_from_preprocessed_data(image).float()
    stock_error = (stock.predict_logits_from_preprocessed_data(image).float() - float32).abs()
    our_error = (ours.predict_logits_from_preprocessed_data(image).float() - float32).abs()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert ours.tile_forward.batched  # no fallback to one pass per flip
    errors = {name: (float(e.max()), float(e.mean())) for name, e in (("nnunet", stock_error), ("ours", our_error))}
    print(f"{configuration}: |logits - float32| max, mean: {errors}; float32 max {float(float32.abs().max()):.3g}")
    assert errors["ours"][0] <= 2 * errors["nnunet"][0] and errors["ours"][1] <= 2 * errors["nnunet"][1], errors
