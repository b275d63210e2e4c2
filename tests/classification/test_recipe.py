"""The `strong` recipe's pieces (augmentation, EMA, class-balanced sampling, prior correction, warm-up + cosine,
weight-decay groups) and `--seeds` with its summary. Tiny networks, 32 px, 1-2 epochs: a few seconds on the CPU."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from nnunet_segmamba.classification import commands
from nnunet_segmamba.classification.augment import AugmentConfig, augment
from nnunet_segmamba.data.medmnist import preprocess
from nnunet_segmamba.classification.recipe import (RECIPES, ModelEMA, ema_decay_for, epoch_indices, is_imbalanced,
                                                   logit_bias, param_groups, warmup_cosine)
from nnunet_segmamba.classification.train import SUMMARY_METRICS, evaluate, train, train_seeds

pytestmark = pytest.mark.usefixtures("one_thread")

IDENTITY = AugmentConfig(scale_min=1.0, max_ratio=1.0, hflip=False, degrees=0.0, brightness=0.0, contrast=0.0)
TINY = dict(image_size=32, depths=(1, 1, 1, 1), dims=8, progress=False, batch_size=4)


def _images(n=6, c=1, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, 28, 28), dtype=np.uint8))


def _imbalanced_npz(path: Path, n_major=9, n_minor=3) -> Path:
    rng = np.random.default_rng(0)
    labels = np.array([1] * n_major + [0] * n_minor, dtype=np.uint8).reshape(-1, 1)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------------------------
# augmentation


@pytest.mark.parametrize("size", [64, 224])
def test_identity_augmentation_is_preprocess(size):
    x = _images(4, 3)
    out = augment(x, size, IDENTITY, torch.Generator().manual_seed(0))
    ref = preprocess(x, size)
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32
    # the rim too: sampling points outside the outermost pixel centres (i < size / 56 - 0.5) repeat the edge
    # pixel as F.interpolate does, instead of blending in black
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_rotation_pads_with_the_edge_not_black():
    x = torch.full((8, 1, 28, 28), 200, dtype=torch.uint8)
    cfg = AugmentConfig(scale_min=1.0, max_ratio=1.0, hflip=False, degrees=30.0, brightness=0.0, contrast=0.0)
    out = augment(x, 64, cfg, torch.Generator().manual_seed(0)) * 0.5 + 0.5
    # a rotated constant image stays constant (its corners would be black with zero padding)
    torch.testing.assert_close(out, torch.full_like(out, 200 / 255), atol=1e-5, rtol=0)


def test_flip_only_gives_the_image_or_its_mirror():
    x = _images(16)
    cfg = AugmentConfig(scale_min=1.0, max_ratio=1.0, hflip=True, degrees=0.0, brightness=0.0, contrast=0.0)
    out = augment(x, 32, cfg, torch.Generator().manual_seed(1))
    ref = augment(x, 32, IDENTITY)
    flipped = [bool(torch.allclose(o, r.flip(-1), atol=1e-5)) for o, r in zip(out, ref)]
    same = [bool(torch.allclose(o, r, atol=1e-5)) for o, r in zip(out, ref)]
    assert all(f != s for f, s in zip(flipped, same))  # each image exactly one of the two
    assert 0 < sum(flipped) < 16


def test_augmentation_seeded_and_in_range():
    x = _images(8)
    cfg = AugmentConfig()
    a = augment(x, 32, cfg, torch.Generator().manual_seed(3))
    b = augment(x, 32, cfg, torch.Generator().manual_seed(3))
    c = augment(x, 32, cfg, torch.Generator().manual_seed(4))
    assert a.shape == (8, 1, 32, 32)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, preprocess(x, 32), atol=1e-3)  # the default config does change the images
    assert a.min() >= -1.0 and a.max() <= 1.0  # clipped to [0, 1] before the (x - 0.5) / 0.5 normalisation


def test_brightness_scales_a_constant_image():
    x = torch.full((64, 1, 28, 28), 100, dtype=torch.uint8)
    cfg = AugmentConfig(scale_min=1.0, max_ratio=1.0, hflip=False, degrees=0.0, brightness=0.2, contrast=0.5)
    out = augment(x, 32, cfg, torch.Generator().manual_seed(0)) * 0.5 + 0.5  # back to [0, 1]
    levels = out.mean(dim=(1, 2, 3)) / (100 / 255)
    # contrast leaves a constant image alone; brightness multiplies by a factor in [0.8, 1.2]
    assert torch.allclose(out.std(dim=(1, 2, 3)), torch.zeros(64), atol=1e-5)
    assert levels.min() >= 0.8 - 1e-4 and levels.max() <= 1.2 + 1e-4 and levels.max() - levels.min() > 0.2


# ---------------------------------------------------------------------------------------------------------------
# EMA, sampling, prior correction, schedule, weight-decay groups


def test_ema_update_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # warm-up: min(0.9, 1 / 10)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 3))  # moves the BatchNorm statistics, num_batches_tracked -> 1
    ema.update(model)
    src = model.state_dict()
    for k, e in ema.module.state_dict().items():
        if e.dtype.is_floating_point:
            torch.testing.assert_close(e, 0.1 * before[k] + 0.9 * src[k])
        else:
            assert torch.equal(e, src[k])
    ema.updates = 1000  # past the warm-up: the configured decay
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model)
    w = "0.weight"
    torch.testing.assert_close(ema.module.state_dict()[w], 0.9 * before[w] + 0.1 * src[w])
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema_decay_for(5, 5) == pytest.approx(1 - 1 / 25) and ema_decay_for(5, 700) == pytest.approx(1 - 1 / 3500)


def test_balanced_sampler_frequencies():
    labels = torch.tensor([0] * 90 + [1] * 10)
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([epoch_indices(labels, 2, True, g) for _ in range(200)])
    assert len(drawn) == 200 * 100
    assert labels[drawn].float().mean().item() == pytest.approx(0.5, abs=0.01)
    uniform = epoch_indices(labels, 2, False, g)
    assert sorted(uniform.tolist()) == list(range(100))  # a permutation: each image once
    assert is_imbalanced(labels, 2) and not is_imbalanced(torch.tensor([0, 0, 0, 0, 1, 1, 1]), 2)


def test_logit_bias_restores_the_training_prior():
    labels = torch.tensor([0] * 25 + [1] * 75)
    bias = torch.tensor(logit_bias(labels, 2))
    # a balanced-trained model that cannot tell the classes apart says 50/50; the bias makes that the prior
    torch.testing.assert_close(torch.softmax(bias, 0), torch.tensor([0.25, 0.75]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias, torch.tensor([math.log(0.5), math.log(1.5)]))


def test_warmup_cosine_values():
    total, warm = 100, 10
    assert warmup_cosine(0, total, warm) == pytest.approx(0.1)
    assert warmup_cosine(4, total, warm) == pytest.approx(0.5)
    assert warmup_cosine(9, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warm) == pytest.approx(1.0)
    assert warmup_cosine(55, total, warm) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(100, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(100, total, warm, min_factor=0.01) == pytest.approx(0.01)
    values = [warmup_cosine(i, total, warm) for i in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_param_groups_no_decay_on_norms_biases_and_ssm_params():
    from nnunet_segmamba.networks.medmamba import MedMamba

    model = MedMamba(in_chans=1, num_classes=2, depths=[1, 1, 1, 1], dims=8)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("A_logs") for n in no_decay_names) and any(n.endswith("Ds") for n in no_decay_names)
    assert "head.bias" in no_decay_names and "head.weight" not in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# the recipe end to end, and --seeds


def test_strong_recipe_run(tmp_path):
    data = _imbalanced_npz(tmp_path / "imb.npz")
    out = tmp_path / "strong"
    result = train(data, out, epochs=2, recipe="strong", **TINY)
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"] == "strong" and config["recipe_settings"] == RECIPES["strong"]
    assert config["sampling"].startswith("class-balanced")
    assert config["logit_bias"] == pytest.approx([math.log(0.5), math.log(1.5)])  # 3 vs 9 images
    assert config["ema"]["decay"] == pytest.approx(1 - 1 / (5 * 3))  # 5 epochs of 3 steps
    assert config["lr_schedule"]["total_steps"] == 6 and config["label_smoothing"] == 0.1
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and {"val_auc_raw", "val_nll"} <= set(history[0])
    assert history[0]["lr"] == pytest.approx(1e-3 / 15)  # first step of the 15-step warm-up
    metrics = json.loads((out / "metrics_test.json").read_text())
    assert "accuracy_without_prior_correction" in metrics["val"]
    # the saved best weights are the EMA's, and `evaluate` applies the stored prior correction
    again = evaluate(out, split="test", out_dir=tmp_path / "ev", progress=False)
    assert again["confusion_matrix"] == result["test"]["confusion_matrix"]
    assert again["auc"] == pytest.approx(result["test"]["auc"])
    # overrides: no balancing, no EMA -> uniform sampling, no bias, no raw/EMA split in the history
    train(data, tmp_path / "plain", epochs=1, recipe="strong", balance=False, ema_epochs=0, **TINY)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["logit_bias"] is None and config["ema"] is None and config["sampling"].startswith("uniform")
    with pytest.raises(ValueError, match="recipe"):
        train(data, tmp_path / "x", recipe="nope", **TINY)


def test_paper_recipe_config_unchanged(tmp_path):
    data = _imbalanced_npz(tmp_path / "imb.npz")
    train(data, tmp_path / "paper", epochs=1, **TINY)
    config = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert config["recipe"] == "paper" and config["optimizer"]["weight_decay"] == 0.01
    assert config["lr_schedule"]["name"] == "MultiStepLR" and config["label_smoothing"] == 0.0
    assert config["ema"] is None and config["logit_bias"] is None
    assert config["augmentation"] == ["random horizontal flip"]
    assert config["precision"] == "fp32"


def test_seeds_summary(tmp_path):
    data = _imbalanced_npz(tmp_path / "imb.npz")
    out = tmp_path / "seeds"
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["classify", "train", "--data", str(data), "--out", str(out), "--recipe", "strong",
                              "--seeds", "0,1", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
                              "--depths", "1,1,1,1", "--dims", "8", "--device", "cpu", "--quiet"])
    assert args.seeds == [0, 1] and args.recipe == "strong"
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    per_seed = [json.loads((out / f"seed_{s}" / "metrics_test.json").read_text()) for s in (0, 1)]
    assert summary["seeds"] == [0, 1] and summary["recipe"] == "strong" and set(summary["mean"]) == set(SUMMARY_METRICS)
    for k in SUMMARY_METRICS:
        values = [m[k] for m in per_seed]
        assert summary["per_seed"]["0"][k] == values[0] and summary["per_seed"]["1"][k] == values[1]
        assert summary["mean"][k] == pytest.approx(np.mean(values))
        assert summary["std_dev"][k] == pytest.approx(np.std(values, ddof=1))
    # the seeds really differ (different initialisation, order and augmentation)
    h0, h1 = (json.loads((out / f"seed_{s}" / "history.json").read_text()) for s in (0, 1))
    assert h0[0]["train_loss"] != h1[0]["train_loss"]
    assert "auc" in (out / "summary.txt").read_text()
    with pytest.raises(ValueError, match="distinct"):
        train_seeds(data, tmp_path / "dup", [1, 1], epochs=1, **TINY)
