"""Train and evaluate MedMamba on a MedMNIST .npz file with the paper's protocol (`recipe="paper"`, the default)
or the `strong` recipe (`recipe.py`: augmentation, label smoothing, warm-up + cosine, EMA, class-balanced
sampling; docs/medmamba.md); `train_seeds` runs several seeds and writes summary.json beside them.

Paper protocol (Yue & Li, arXiv:2403.03849): AdamW, lr 1e-3, batch 128, 100 epochs, lr x0.1 at 50 % and 75 % of the
epochs (MultiStepLR; epochs 50 and 75 of 100), cross-entropy. The weights with the best validation AUC are kept
and scored on the test split: overall accuracy, AUC (binary, or macro one-vs-rest), macro precision,
sensitivity (recall), specificity and F1.

Files written to the output folder:
    config.json                   everything needed to rebuild the network and the preprocessing
    checkpoint_best.pth           state_dict with the best validation AUC (MedMamba names, loads strict)
    checkpoint_final.pth          state_dict after the last epoch
    history.json                  per epoch: train loss, lr, validation accuracy and AUC
    metrics_test.json             test metrics of the best checkpoint (also per class, with the confusion matrix)
    confusion_matrix_test.png     counts per (true, predicted) class
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data.medmnist import MEAN, STD, MedMNISTSplit, class_names_for, load_split
from ..devices import resolve_device

__all__ = ["train", "train_seeds", "summarize_seeds", "evaluate", "predict", "classification_metrics",
           "save_confusion_matrix", "build_model", "load_checkpoint"]

CONFIG_NAME = "config.json"
BEST_NAME = "checkpoint_best.pth"
FINAL_NAME = "checkpoint_final.pth"


# ---------------------------------------------------------------------------------------------------------------
# metrics


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, AUC and macro precision / sensitivity / specificity / F1 from class probabilities.

    Args:
        labels: (N,) true class indices.
        probs: (N, K) class probabilities (softmax outputs).
    Returns:
        a JSON-ready dict: "accuracy", "auc" (binary AUC of class 1 for K = 2, macro one-vs-rest for K > 2; NaN
        when a class is missing from `labels`), "precision", "sensitivity", "specificity", "f1" (macro means),
        "per_class" lists, "confusion_matrix" (rows true, columns predicted) and "num_samples".
    """
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N={labels.shape[0]}, K), got shape {probs.shape}")
    k = probs.shape[1]
    classes = list(range(k))
    preds = probs.argmax(1)
    try:
        with warnings.catch_warnings():  # a class absent from `labels`: AUC undefined, reported as NaN
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            if k == 2:
                auc = float(roc_auc_score(labels, probs[:, 1]))
            else:
                auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes))
    except ValueError:
        auc = float("nan")
    cm = confusion_matrix(labels, preds, labels=classes)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, labels=classes, average=None,
                                                               zero_division=0)
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
    fp = cm.sum(0) - np.diag(cm)
    specificity = np.divide(tn, tn + fp, out=np.zeros(k), where=(tn + fp) > 0)
    return {
        "num_samples": int(labels.shape[0]),
        "accuracy": float((preds == labels).mean()) if len(labels) else float("nan"),
        "auc": auc,
        "precision": float(precision.mean()),
        "sensitivity": float(recall.mean()),
        "specificity": float(specificity.mean()),
        "f1": float(f1.mean()),
        "per_class": {"precision": precision.tolist(), "sensitivity": recall.tolist(),
                      "specificity": specificity.tolist(), "f1": f1.tolist()},
        "confusion_matrix": cm.tolist(),
    }


def save_confusion_matrix(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "") -> Path:
    """A PNG of the confusion matrix (rows true, columns predicted) with the count written on every cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = cm.shape[0]
    size = max(4.0, 0.7 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), labels=class_names, rotation=45 if k > 2 else 0, ha="right" if k > 2 else "center")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# model and device


def build_model(model_kwargs: dict[str, Any]) -> nn.Module:
    """MedMamba from the JSON-storable keyword arguments saved in config.json."""
    from ..networks.medmamba import MedMamba

    return MedMamba(**model_kwargs)


def load_checkpoint(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any], Path]:
    """A training output folder, or a .pth file with config.json beside it -> (model on CPU, config, weights path)."""
    checkpoint = Path(checkpoint)
    weights = checkpoint / BEST_NAME if checkpoint.is_dir() else checkpoint
    config_path = weights.parent / CONFIG_NAME
    if not weights.is_file() or not config_path.is_file():
        raise FileNotFoundError(f"need {weights} and {config_path}; pass the folder written by `classify train` "
                                "or a .pth file with its config.json beside it")
    config = json.loads(config_path.read_text())
    model = build_model(config["model"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model, config, weights


@torch.no_grad()
def predict(model: nn.Module, split: MedMNISTSplit, image_size: int, batch_size: int = 256,
            device: torch.device | str = "cpu", progress: bool = False,
            logit_bias: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, K) and labels (N,) of a split, in eval mode, fp32, without augmentation.

    `logit_bias` (K,) is added to the logits first (the `strong` recipe's prior correction after class-balanced
    sampling, stored in config.json as "logit_bias").
    """
    from tqdm import tqdm

    model.eval()
    bias = torch.tensor(logit_bias, dtype=torch.float32, device=device) if logit_bias is not None else None
    probs, labels = [], []
    batches = split.batches(batch_size, image_size, device)
    for x, y in tqdm(batches, total=math.ceil(len(split) / batch_size), desc="predict", leave=False,
                     disable=not progress):
        logits = model(x).float()
        probs.append(torch.softmax(logits + bias if bias is not None else logits, dim=1).cpu())
        labels.append(y.cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def _score(model: nn.Module, split: MedMNISTSplit, image_size: int, device: torch.device,
           batch_size: int, logit_bias: Sequence[float] | None = None) -> dict[str, Any]:
    probs, labels = predict(model, split, image_size, batch_size, device, logit_bias=logit_bias)
    metrics = classification_metrics(labels, probs)
    # mean negative log-likelihood (unsmoothed): the tie-break between checkpoints of equal validation AUC
    metrics["nll"] = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return metrics


def _json_safe(value: Any) -> Any:
    """NaN and infinities -> None (strict JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """torch.use_deterministic_algorithms for the duration (warn only where an op has no deterministic kernel)."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def _write_report(metrics: dict[str, Any], class_names: list[str], out_dir: Path, split: str, title: str) -> None:
    (out_dir / f"metrics_{split}.json").write_text(json.dumps(_json_safe(metrics), indent=2))
    save_confusion_matrix(metrics["confusion_matrix"], class_names, out_dir / f"confusion_matrix_{split}.png",
                          title=f"{title} {split}: ACC {metrics['accuracy']:.3f}, AUC {metrics['auc']:.3f}")


# ---------------------------------------------------------------------------------------------------------------
# training


def _resolve_recipe(recipe: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from .recipe import RECIPES

    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    settings = dict(RECIPES[recipe])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["schedule"] not in ("multistep", "cosine"):
        raise ValueError(f"schedule must be 'multistep' or 'cosine', got {settings['schedule']!r}")
    if settings["precision"] not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {settings['precision']!r}")
    if not 0 <= settings["label_smoothing"] < 1 or settings["ema_epochs"] < 0 or settings["warmup_epochs"] < 0:
        raise ValueError("need 0 <= label_smoothing < 1, ema_epochs >= 0 and warmup_epochs >= 0, got "
                         f"{settings['label_smoothing']}, {settings['ema_epochs']}, {settings['warmup_epochs']}")
    return settings


def _train_batches(tr: MedMNISTSplit, batch_size: int, image_size: int, dev: torch.device, balanced: bool,
                   aug, generator: torch.Generator):
    """The `strong` recipe's batches: epoch order from `recipe.epoch_indices`, `augment.augment` (or the paper's
    flips when `aug` is None)."""
    from .augment import augment
    from .recipe import epoch_indices

    order = epoch_indices(tr.labels, tr.num_classes, balanced, generator)
    if aug is None:
        yield from tr.batches(batch_size, image_size, dev, train=True, generator=generator, order=order)
        return
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield augment(tr.images[idx].to(dev), image_size, aug, generator), tr.labels[idx].to(dev)


def train(data: str | Path, out_dir: str | Path, variant: str = "t", epochs: int = 100, batch_size: int = 128,
          lr: float = 1e-3, weight_decay: float | None = None, lr_milestones: Sequence[float] = (0.5, 0.75),
          lr_gamma: float = 0.1, image_size: int = 64, device: str = "auto", seed: int = 0,
          depths: Sequence[int] | None = None, dims: int | None = None, d_state: int = 16,
          drop_path_rate: float = 0.1, micro_batch_size: int | None = None, deterministic: bool = True,
          progress: bool = True, recipe: str = "paper", label_smoothing: float | None = None,
          warmup_epochs: float | None = None, ema_epochs: float | None = None, balance: bool | None = None,
          augment: bool | None = None, precision: str | None = None) -> dict[str, Any]:
    """Train MedMamba on a MedMNIST .npz file, keep the best-validation-AUC weights, score them on the test split.

    Args:
        data: MedMNIST v2 .npz file (e.g. breastmnist.npz).
        out_dir: output folder (created; files listed in the module docstring).
        variant: "t", "s" or "b" (published depths and widths); `depths` / `dims` override it.
        epochs: training epochs (100).
        batch_size: mini-batch size (128).
        lr: AdamW (peak) learning rate (1e-3).
        weight_decay: AdamW weight decay (None: the recipe's, paper 0.01 = PyTorch's default, strong 0.05).
        lr_milestones: fractions of `epochs` at which the lr is multiplied by `lr_gamma` ((0.5, 0.75): epochs
            50 and 75 of 100); the "multistep" schedule (paper recipe) only.
        lr_gamma: lr factor at each milestone (0.1).
        image_size: side the 28 x 28 images are resized to, a multiple of 32 (64; the paper used 224).
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        seed: seeds initialisation, batch order, augmentation and stochastic depth.
        depths, dims: override the variant's blocks per stage and first-stage width.
        d_state: SS2D state size (16).
        drop_path_rate: stochastic depth of the last block (0.1).
        micro_batch_size: split each batch into chunks of this size for forward and backward, accumulating the
            gradients of one optimizer step (memory; BatchNorm then normalises over the chunks). None: whole batch.
        deterministic: torch.use_deterministic_algorithms while training (warn only).
        progress: tqdm progress bars (the test summary is printed either way).
        recipe: "paper" (the paper's protocol) or "strong" (`recipe.RECIPES`, docs/medmamba.md).
        label_smoothing, warmup_epochs, ema_epochs, balance, augment, precision: override the recipe's value
            (None: keep it). ema_epochs 0 turns the EMA off; balance: class-balanced sampling when the training
            split is imbalanced (`recipe.IMBALANCE_RATIO`), with the prior put back at prediction; precision
            "bf16" is autocast on CUDA (fp32 on the CPU).

    Returns:
        {"test": test metrics, "best_epoch", "best_val_auc", "out_dir", "seconds"}.
    """
    from tqdm import tqdm

    from ..networks.medmamba import VARIANTS
    from .augment import AugmentConfig
    from .recipe import ModelEMA, ema_decay_for, is_imbalanced, logit_bias, param_groups, warmup_cosine

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be positive and lr > 0, got {epochs}, {batch_size}, {lr}")
    if micro_batch_size is not None and not 1 <= micro_batch_size <= batch_size:
        raise ValueError(f"micro_batch_size must be in [1, batch_size={batch_size}], got {micro_batch_size}")
    if image_size < 32 or image_size % 32:
        raise ValueError(f"image_size must be a positive multiple of 32 (MedMamba downsamples 32x), got "
                         f"{image_size}; use e.g. 32, 64 or 224")
    settings = _resolve_recipe(recipe, {"weight_decay": weight_decay, "label_smoothing": label_smoothing,
                                        "warmup_epochs": warmup_epochs, "ema_epochs": ema_epochs,
                                        "balance": balance, "augment": augment, "precision": precision})
    weight_decay = settings["weight_decay"]
    dev = resolve_device(device)
    splits = {s: load_split(data, s) for s in ("train", "val", "test")}  # bad data fails before out_dir exists
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tr = splits["train"]
    class_names = class_names_for(tr.name, tr.num_classes)
    v_depths, v_dims = VARIANTS[variant]
    model_kwargs = {"in_chans": tr.in_chans, "num_classes": tr.num_classes,
                    "depths": list(depths if depths is not None else v_depths),
                    "dims": int(dims if dims is not None else v_dims), "d_state": d_state,
                    "drop_path_rate": drop_path_rate}
    milestones = sorted({max(1, int(round(f * epochs))) for f in lr_milestones})
    steps = math.ceil(len(tr) / batch_size)
    balanced = bool(settings["balance"]) and is_imbalanced(tr.labels, tr.num_classes)
    bias = logit_bias(tr.labels, tr.num_classes) if balanced else None
    aug = AugmentConfig() if settings["augment"] else None
    warmup_steps = int(round(settings["warmup_epochs"] * steps))
    ema_decay = ema_decay_for(settings["ema_epochs"], steps) if settings["ema_epochs"] > 0 else None
    amp = settings["precision"] == "bf16" and dev.type == "cuda"
    custom_batches = balanced or aug is not None
    if settings["schedule"] == "multistep":
        lr_schedule = {"name": "MultiStepLR", "milestones": milestones, "gamma": lr_gamma}
    else:
        lr_schedule = {"name": "linear warm-up + cosine, per step", "warmup_steps": warmup_steps,
                       "total_steps": epochs * steps, "min_factor": 0.0}
    config = {
        "data": str(Path(data).resolve()), "dataset": tr.name, "class_names": class_names, "variant": variant,
        "model": model_kwargs, "image_size": image_size, "normalisation": {"mean": MEAN, "std": STD},
        "epochs": epochs, "batch_size": batch_size, "micro_batch_size": micro_batch_size,
        "recipe": recipe, "recipe_settings": settings,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay,
                      "no_decay_on_norms_biases_A_D": bool(settings["wd_groups"])},
        "lr_schedule": lr_schedule, "label_smoothing": settings["label_smoothing"],
        "ema": {"decay": ema_decay, "time_constant_epochs": settings["ema_epochs"]} if ema_decay else None,
        "sampling": "class-balanced (with replacement)" if balanced else "uniform (each image once per epoch)",
        "logit_bias": bias,
        "augmentation": aug.to_dict() if aug is not None else ["random horizontal flip"],
        "precision": "bf16 autocast" if amp else "fp32", "seed": seed, "device": str(dev),
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    start = time.time()
    with _deterministic(deterministic):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = build_model(model_kwargs).to(dev)
        params = param_groups(model, weight_decay) if settings["wd_groups"] else model.parameters()
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        if settings["schedule"] == "multistep":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=lr_gamma)
            step_scheduler = None
        else:
            scheduler = None
            step_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda i: warmup_cosine(i, epochs * steps, warmup_steps))
        ema = ModelEMA(model, ema_decay) if ema_decay is not None else None
        loss_fn = nn.CrossEntropyLoss(label_smoothing=settings["label_smoothing"])
        history, best_auc, best_nll, best_epoch = [], -math.inf, math.inf, 0
        eval_batch = 2 * (micro_batch_size or batch_size)  # no activations kept for backward: twice fits
        bar = tqdm(range(1, epochs + 1), desc=f"MedMamba-{variant} {tr.name}", disable=not progress)
        for epoch in bar:
            model.train()
            total, seen = 0.0, 0
            current_lr = optimizer.param_groups[0]["lr"]
            if custom_batches:
                batches = _train_batches(tr, batch_size, image_size, dev, balanced, aug, generator)
            else:
                batches = tr.batches(batch_size, image_size, dev, train=True, generator=generator)
            for x, y in tqdm(batches, total=steps, desc=f"epoch {epoch}", leave=False, disable=not progress):
                optimizer.zero_grad(set_to_none=True)
                for xc, yc in zip(x.split(micro_batch_size or len(y)), y.split(micro_batch_size or len(y))):
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                        logits = model(xc)
                    loss = loss_fn(logits.float(), yc) * (len(yc) / len(y))  # chunk losses sum to the batch mean
                    loss.backward()
                    total += loss.item() * len(y)
                optimizer.step()
                if step_scheduler is not None:
                    step_scheduler.step()
                if ema is not None:
                    ema.update(model)
                seen += len(y)
            if scheduler is not None:
                scheduler.step()
            eval_model = ema.module if ema is not None else model
            val = _score(eval_model, splits["val"], image_size, dev, eval_batch, bias)
            entry = {"epoch": epoch, "train_loss": total / seen, "lr": current_lr,
                     "val_accuracy": val["accuracy"], "val_auc": val["auc"], "val_nll": val["nll"]}
            if ema is not None:  # the raw weights too, for the record (selection uses the EMA)
                raw = _score(model, splits["val"], image_size, dev, eval_batch, bias)
                entry.update(val_accuracy_raw=raw["accuracy"], val_auc_raw=raw["auc"])
            history.append(entry)
            score = val["auc"] if not math.isnan(val["auc"]) else -math.inf
            better = score > best_auc or best_epoch == 0
            if settings["tie_break"] and score == best_auc and val["nll"] < best_nll:
                better = True  # equal validation AUC (common on a small split): the lower validation NLL
            if better:
                best_auc, best_nll, best_epoch = score, val["nll"], epoch
                torch.save(eval_model.state_dict(), out_dir / BEST_NAME)
            bar.set_postfix(loss=f"{total / seen:.4f}", val_acc=f"{val['accuracy']:.3f}",
                            val_auc=f"{val['auc']:.3f}", best=best_epoch)
            (out_dir / "history.json").write_text(json.dumps(_json_safe(history), indent=2))
        torch.save((ema.module if ema is not None else model).state_dict(), out_dir / FINAL_NAME)

        model.load_state_dict(torch.load(out_dir / BEST_NAME, map_location=dev, weights_only=True))
        val = _score(model, splits["val"], image_size, dev, eval_batch, bias)
        if bias is not None:  # the validation accuracy without the prior correction, for the record
            val["accuracy_without_prior_correction"] = _score(model, splits["val"], image_size, dev,
                                                              eval_batch)["accuracy"]
        test = _score(model, splits["test"], image_size, dev, eval_batch, bias)  # the only look at test
    seconds = time.time() - start
    test.update(best_epoch=best_epoch, best_val_auc=best_auc, train_seconds=seconds,
                val={k: v for k, v in val.items() if k not in ("per_class",)})
    _write_report(test, class_names, out_dir, "test", f"MedMamba-{variant} {tr.name}")
    print(f"{tr.name} test (best val AUC {best_auc:.4f} at epoch {best_epoch}/{epochs}): "
              f"ACC {test['accuracy']:.4f}  AUC {test['auc']:.4f}  precision {test['precision']:.4f}  "
              f"sensitivity {test['sensitivity']:.4f}  specificity {test['specificity']:.4f}  F1 {test['f1']:.4f}"
              f"  ({seconds:.0f} s) -> {out_dir / 'metrics_test.json'}")
    return {"test": test, "best_epoch": best_epoch, "best_val_auc": best_auc, "out_dir": str(out_dir),
            "seconds": seconds}


SUMMARY_METRICS = ("accuracy", "auc", "precision", "sensitivity", "specificity", "f1", "best_val_auc",
                   "best_epoch", "train_seconds")


def summarize_seeds(out_dir: str | Path, seeds: Sequence[int]) -> dict[str, Any]:
    """summary.json (and summary.txt) in `out_dir` from the seed_{s}/metrics_test.json of every seed: per seed,
    mean and standard deviation (sample, ddof = 1; 0 for one seed) of every metric in `SUMMARY_METRICS`."""
    out_dir = Path(out_dir)
    per_seed = {}
    for s in seeds:
        m = json.loads((out_dir / f"seed_{s}" / "metrics_test.json").read_text())
        per_seed[str(s)] = {k: m[k] for k in SUMMARY_METRICS}
    mean, std = {}, {}
    for k in SUMMARY_METRICS:
        values = np.array([np.nan if per_seed[str(s)][k] is None else per_seed[str(s)][k] for s in seeds], float)
        mean[k] = float(values.mean())
        std[k] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    config = json.loads((out_dir / f"seed_{seeds[0]}" / CONFIG_NAME).read_text())
    summary = {"dataset": config["dataset"], "variant": config["variant"], "recipe": config.get("recipe", "paper"),
               "image_size": config["image_size"], "seeds": list(seeds), "split": "test",
               "selection": "best validation AUC (validation split only)", "std": "sample (ddof=1)",
               "mean": mean, "std_dev": std, "per_seed": per_seed}
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2))
    lines = [f"{summary['dataset']} MedMamba-{summary['variant']} recipe {summary['recipe']} "
             f"{summary['image_size']} px, seeds {','.join(map(str, seeds))} (test split, mean +- sample std)"]
    lines += [f"{k:>14}: {mean[k]:.4f} +- {std[k]:.4f}   per seed "
              + " ".join(f"{per_seed[str(s)][k]:.4f}" for s in seeds) for k in SUMMARY_METRICS]
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def train_seeds(data: str | Path, out_dir: str | Path, seeds: Sequence[int], **kwargs: Any) -> dict[str, Any]:
    """`train` once per seed into out_dir/seed_{s}, one after the other, then `summarize_seeds`."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    kwargs.pop("seed", None)
    for s in seeds:
        train(data, Path(out_dir) / f"seed_{s}", seed=s, **kwargs)
    return summarize_seeds(out_dir, seeds)


def evaluate(checkpoint: str | Path, data: str | Path | None = None, split: str = "test", device: str = "auto",
             out_dir: str | Path | None = None, batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Score a trained MedMamba on one split; writes metrics_{split}.json and confusion_matrix_{split}.png.

    Args:
        checkpoint: the folder written by `train` (its checkpoint_best.pth) or a .pth file with config.json beside it.
        data: MedMNIST .npz file (default: the file recorded in config.json).
        split: "train", "val" or "test".
        device: "auto", "cpu", "cuda", ...
        out_dir: where to write the files (default: the checkpoint's folder).
        batch_size: inference batch size.
        progress: progress bar and a printed summary.
    Returns:
        the metrics dict of `classification_metrics`.
    """
    model, config, weights = load_checkpoint(checkpoint)
    data = Path(data) if data is not None else Path(config["data"])
    ds = load_split(data, split)
    if ds.num_classes != config["model"]["num_classes"] or ds.in_chans != config["model"]["in_chans"]:
        raise ValueError(f"{data} has {ds.num_classes} classes and {ds.in_chans} channels, the checkpoint expects "
                         f"{config['model']['num_classes']} and {config['model']['in_chans']}")
    dev = resolve_device(device)
    probs, labels = predict(model.to(dev), ds, config["image_size"], batch_size, dev, progress,
                            logit_bias=config.get("logit_bias"))
    metrics = classification_metrics(labels, probs)
    out_dir = Path(out_dir) if out_dir is not None else weights.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = config.get("class_names") or class_names_for(ds.name, ds.num_classes)
    _write_report(metrics, class_names, out_dir, split, f"MedMamba-{config.get('variant', '?')} {ds.name}")
    if progress:
        print(f"{ds.name} {split} ({weights}): ACC {metrics['accuracy']:.4f}  AUC {metrics['auc']:.4f}  "
              f"precision {metrics['precision']:.4f}  sensitivity {metrics['sensitivity']:.4f}  "
              f"specificity {metrics['specificity']:.4f}  F1 {metrics['f1']:.4f} -> {out_dir}")
    return metrics
