"""Depthwise causal 1D convolution (+ SiLU), the first step of every Mamba branch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .selective_scan import visit


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  silu: bool = True, backend: str = "auto", order: str = "forward",
                  num_slices: int | None = None) -> torch.Tensor:
    """out[t] = sum_k weight[k] * x[t - (K-1) + k] (left zero padding), then SiLU.

    Args:
        x: (batch, d, L).
        weight: (d, 1, K) as stored by nn.Conv1d(d, d, K, groups=d), or (d, K).
        bias: optional (d,).
        silu: apply SiLU to the result.
        backend: as for `selective_scan`; "cuda" uses causal-conv1d's fused kernel where it imports (else our
            Triton kernel), "triton" our Triton kernel.
        order: the order in which the convolution runs along L ("forward", "reverse" or "slice", as for
            `selective_scan`); the output comes back in x's order. Only the triton backend avoids copies.
        num_slices: for order="slice".
    Returns:
        (batch, d, L) in x's dtype.
    """
    weight = weight if weight.dim() == 2 else weight.squeeze(1)
    name = backends.resolve(backend, x.device)
    if name == "triton":
        from .triton_conv import causal_conv1d_triton

        return backends.run_triton(
            lambda: causal_conv1d_triton(x, weight, bias, silu=silu, mode=order, num_slices=num_slices),
            lambda: causal_conv1d(x, weight, bias, silu, backend="torch", order=order, num_slices=num_slices),
            explicit=backend == "triton")
    if order != "forward":
        out = causal_conv1d(visit(x, order, num_slices), weight, bias, silu, backend=name)
        return visit(out, order, num_slices, inverse=True)
    if name == "cuda":
        fused, _ = backends.causal_conv1d_function()
        if fused is not None:
            return fused(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                         activation="silu" if silu else None)
        if backends.triton_scan_status()[0]:
            # without causal-conv1d, our Triton kernel: measured faster than cuDNN's depthwise conv1d + SiLU
            from .triton_conv import causal_conv1d_triton

            return backends.run_triton(lambda: causal_conv1d_triton(x, weight, bias, silu=silu),
                                       lambda: causal_conv1d(x, weight, bias, silu, backend="torch"),
                                       explicit=False)
    length, width = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                   padding=width - 1, groups=x.shape[1])[..., :length]
    return F.silu(out) if silu else out
