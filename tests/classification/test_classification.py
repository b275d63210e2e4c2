"""MedMNIST classification: metrics, the `classify` command line, and a short real training run
on BreastMNIST that must beat the majority class (skipped without ../shared/data/medmnist/breastmnist.npz)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_segmamba.classification import commands
from nnunet_segmamba.classification.train import classification_metrics, evaluate, save_confusion_matrix, train
from nnunet_segmamba.data.medmnist import load_split

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
BREAST = REPO.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-segmamba")
    commands.register(parser.add_subparsers(dest="command"))
    return parser


# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.3])  # predicted: 0 1 0 1 1 0 1 0
    m = classification_metrics(labels, np.stack([1 - p1, p1], 1))
    # confusion matrix rows true: class 0 -> [2, 1], class 1 -> [2, 3]
    assert m["confusion_matrix"] == [[2, 1], [2, 3]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    # AUC = fraction of (positive, negative) pairs ranked right: positives 0.9 0.8 0.4 0.7 0.3 vs 0.1 0.6 0.2
    assert m["auc"] == pytest.approx(13 / 15)
    sens = [2 / 3, 3 / 5]  # recall per class
    prec = [2 / 4, 3 / 4]
    spec = [3 / 5, 2 / 3]  # specificity of class c = recall of the other class
    assert m["sensitivity"] == pytest.approx(np.mean(sens))
    assert m["precision"] == pytest.approx(np.mean(prec))
    assert m["specificity"] == pytest.approx(np.mean(spec))
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, sens)]
    assert m["f1"] == pytest.approx(np.mean(f1))


def test_multiclass_metrics_and_missing_class():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.2, 0.3]])
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(1.0)  # every one-vs-rest ranking is perfect
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # class 0: TN 2, FP 1; class 1: TN 3, FP 0; class 2: TN 2, FP 0
    assert m["specificity"] == pytest.approx(np.mean([2 / 3, 1, 1]))
    m = classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0]]))
    assert np.isnan(m["auc"]) and m["accuracy"] == 1.0


def test_confusion_matrix_png(tmp_path):
    path = save_confusion_matrix([[5, 1], [2, 9]], ["malignant", "normal, benign"], tmp_path / "cm.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_parses_and_has_help_everywhere():
    parser = _parser()
    args = parser.parse_args(["classify", "train", "--data", "d.npz", "--out", "o"])
    assert args.func is commands._run_train
    assert (args.variant, args.epochs, args.batch_size, args.lr, args.image_size, args.device, args.seed) == \
        ("t", 100, 128, 1e-3, 64, "auto", 0)
    args = parser.parse_args(["classify", "train", "--data", "d", "--out", "o", "--depths", "1,1,1,1", "--dims", "8"])
    assert args.depths == [1, 1, 1, 1] and args.dims == 8
    args = parser.parse_args(["classify", "eval", "--data", "d.npz", "--checkpoint", "run"])
    assert args.func is commands._run_eval and args.split == "test"
    classify = parser._subparsers._group_actions[0].choices["classify"]
    for sub in classify._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{sub.prog} {action.option_strings} has no help"


def test_train_and_eval_synthetic_rgb(tmp_path, write_medmnist_npz):
    data = write_medmnist_npz(tmp_path / "rgbmnist.npz", rgb=True, num_classes=3, n=6)
    out = tmp_path / "run"
    result = train(data, out, epochs=2, batch_size=4, image_size=32, depths=(1, 1, 1, 1), dims=8, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"in_chans": 3, "num_classes": 3, "depths": [1, 1, 1, 1], "dims": 8, "d_state": 16,
                               "drop_path_rate": 0.1}
    assert config["lr_schedule"]["milestones"] == [1, 2]
    assert len(json.loads((out / "history.json").read_text())) == 2
    metrics = evaluate(out / "checkpoint_best.pth", split="test", out_dir=tmp_path / "ev", progress=False)
    assert metrics["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert (tmp_path / "ev" / "metrics_test.json").is_file()
    assert (tmp_path / "ev" / "confusion_matrix_test.png").is_file()
    with pytest.raises(ValueError, match="multiple of 32"):
        train(data, out, image_size=48, progress=False)
    with pytest.raises(ValueError, match="micro_batch_size"):
        train(data, out, batch_size=4, micro_batch_size=8, progress=False)


def test_micro_batches(tmp_path, write_medmnist_npz):
    # chunks of 2 of a batch of 4: one optimizer step per batch, the chunk losses weighted to the batch mean
    data = write_medmnist_npz(tmp_path / "d.npz", num_classes=2, n=4)
    result = train(data, tmp_path / "b", epochs=2, batch_size=4, micro_batch_size=2, image_size=32,
                   depths=(1, 1, 1, 1), dims=8, progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["micro_batch_size"] == 2
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert result["test"]["num_samples"] == 4


# ---------------------------------------------------------------------------------------------------------------
# a short real training run


def test_breastmnist_short_run_beats_majority_class(tmp_path):
    """A tiny MedMamba (~0.24 M parameters) at 32 x 32 for 10 epochs, about 40 s on one CPU core. Seeds 0, 1 and 2
    gave test accuracies 0.814, 0.782 and 0.814 (AUC 0.81, 0.75, 0.79); the majority class is 0.731."""
    if not BREAST.is_file():
        pytest.skip(f"BreastMNIST not found at {BREAST} (expected ../shared/data/medmnist/ next to the repository)")
    out = tmp_path / "breast"
    args = _parser().parse_args([
        "classify", "train", "--data", str(BREAST), "--out", str(out), "--depths", "1,1,1,1", "--dims", "16",
        "--image-size", "32", "--epochs", "10", "--batch-size", "32", "--lr", "2e-3", "--seed", "0",
        "--device", "cpu", "--quiet",
    ])
    assert args.func(args) == 0
    metrics = json.loads((out / "metrics_test.json").read_text())
    test_labels = load_split(BREAST, "test").labels.numpy()
    majority = np.bincount(test_labels).max() / len(test_labels)  # 114 / 156 = 0.731
    assert metrics["num_samples"] == 156
    assert metrics["accuracy"] > majority + 0.02, metrics
    assert 0.5 < metrics["auc"] <= 1.0
    assert np.sum(metrics["confusion_matrix"]) == 156
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("precision", "sensitivity", "specificity", "f1"))
    png = out / "confusion_matrix_test.png"
    assert png.is_file() and png.stat().st_size > 1000
    for name in ("config.json", "checkpoint_best.pth", "checkpoint_final.pth", "history.json"):
        assert (out / name).is_file(), name
    # the eval command reproduces the training run's test numbers from the saved checkpoint
    ev = _parser().parse_args(["classify", "eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev"),
                               "--device", "cpu", "--quiet"])
    assert ev.func(ev) == 0
    again = json.loads((tmp_path / "ev" / "metrics_test.json").read_text())
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert again["auc"] == pytest.approx(metrics["auc"])
