"""Stochastic depth, as MedMamba (and timm) apply it to residual branches."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DropPath"]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) per sample: zero the whole branch of a sample with probability
    `drop_prob` while training, and scale the kept ones by 1 / (1 - drop_prob). The identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
