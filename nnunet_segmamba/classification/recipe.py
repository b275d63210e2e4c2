"""Training recipes for `classify train --recipe paper|strong`, and the pieces the `strong` recipe is made of.

* `RECIPES`: the settings of each recipe. `paper` is the MedMamba paper's protocol exactly as before (AdamW
  lr 1e-3 wd 0.01, MultiStepLR x0.1 at 50 % / 75 %, cross-entropy, flips only, fp32, the raw weights
  validated). `strong`: augmentation (`augment.py`), label smoothing, AdamW with per-step linear warm-up and
  cosine decay, an EMA of the weights (validated and saved), class-balanced sampling for imbalanced sets (with
  the training prior put back at prediction), bf16 autocast on CUDA. Why each value: docs/medmamba.md.
* `ModelEMA`: exponential moving average of every floating-point state_dict entry (BatchNorm statistics too).
* `epoch_indices`: the sample order of one epoch, uniform or class-balanced.
* `warmup_cosine`: the lr factor of a step.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

__all__ = ["RECIPES", "IMBALANCE_RATIO", "ModelEMA", "ema_decay_for", "epoch_indices", "class_weights",
           "warmup_cosine", "param_groups", "logit_bias", "is_imbalanced"]

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"weight_decay": 0.01, "schedule": "multistep", "warmup_epochs": 0, "label_smoothing": 0.0,
              "ema_epochs": 0.0, "balance": False, "augment": False, "precision": "fp32", "tie_break": False,
              "wd_groups": False},
    "strong": {"weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 5, "label_smoothing": 0.1,
               "ema_epochs": 5.0, "balance": True, "augment": True, "precision": "bf16", "tie_break": True,
               "wd_groups": True},
}

# "imbalanced": the largest class of the training split has at least this many times the smallest's images
IMBALANCE_RATIO = 1.5


def ema_decay_for(ema_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay whose averaging time constant is `ema_epochs` epochs: 1 - 1 / (ema_epochs * steps)."""
    return 1.0 - 1.0 / max(ema_epochs * steps_per_epoch, 1.0)


class ModelEMA:
    """An exponential moving average of a model's weights and buffers.

    After update n (counting from 0) every floating-point entry e of the state_dict becomes
    e <- d_n e + (1 - d_n) v, with d_n = min(decay, (1 + n) / (10 + n)) (the usual warm-up, so that the first
    updates do not keep much of the random initialisation); integer entries (BatchNorm's num_batches_tracked)
    are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = model.state_dict()
        for name, e in self.module.state_dict().items():
            v = src[name].detach()
            if e.dtype.is_floating_point:
                e.mul_(d).add_(v.to(e.dtype), alpha=1 - d)
            else:
                e.copy_(v)
        self.updates += 1


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample sampling weights 1 / (images of its class): every class drawn equally often on average."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    return 1.0 / counts[labels]


def epoch_indices(labels: torch.Tensor, num_classes: int, balanced: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The sample indices of one epoch (len(labels) of them).

    balanced=False: a random permutation (each image once). balanced=True: drawn with replacement with
    probability proportional to 1 / (size of the image's class), so each class makes 1 / num_classes of the
    epoch in expectation.
    """
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=generator)
    return torch.multinomial(class_weights(labels, num_classes), n, replacement=True, generator=generator)


def is_imbalanced(labels: torch.Tensor, num_classes: int) -> bool:
    counts = torch.bincount(labels, minlength=num_classes)
    counts = counts[counts > 0]
    return bool(counts.max() >= IMBALANCE_RATIO * counts.min())


def logit_bias(labels: torch.Tensor, num_classes: int) -> list[float]:
    """log(training prior) - log(uniform): added to the logits of a model trained on class-balanced batches, it
    turns its softmax back into an estimate of p(class | image) under the training split's class frequencies."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    prior = counts / counts.sum()
    return (torch.log(prior) - math.log(1.0 / num_classes)).tolist()


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """lr factor at optimizer step `step` (0-based): (step + 1) / warmup_steps during the warm-up, then half a
    cosine from 1 (step warmup_steps) down to `min_factor` (step total_steps, i.e. just after the last step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights (every tensor with < 2 dims) and the SSM's A_logs
    and Ds (as VMamba's `no_weight_decay`); `weight_decay` on the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(("A_logs", "Ds")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
