"""Recomputing activations in the backward pass, as the Mamba layers and the residual conv blocks do it.

Both take a setting `True` / `False` / `None` (None: recompute for CUDA inputs, where activation memory bounds the
batch and patch, not on the CPU, where the time would be lost for nothing) and keep, by selective activation
checkpointing, what a policy marks as costly to make again.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["CheckpointPolicy", "recomputes", "selective_checkpoint", "selective_checkpoint_contexts"]


def recomputes(setting: bool | None, x: torch.Tensor) -> bool:
    """Whether a module with this recompute setting recomputes for input x: only while gradients are recorded;
    None means for CUDA inputs."""
    return torch.is_grad_enabled() and (x.is_cuda if setting is None else setting)


def selective_checkpoint_contexts(policy: Callable[..., CheckpointPolicy]) -> Callable:
    """The `context_fn` of torch's selective activation checkpointing for `policy(ctx, func, *args, **kwargs)`."""
    return functools.partial(create_selective_checkpoint_contexts, policy)


def selective_checkpoint(function: Callable, *args, context_fn: Callable):
    """function(*args), keeping for the backward only what `context_fn`'s policy saves. The checkpointed functions
    draw no random numbers, so no RNG state is kept; non-reentrant, as torch.compile needs."""
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context_fn)
