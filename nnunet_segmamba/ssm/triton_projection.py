"""The weight gradient of the Mamba layers' per-position projections, in Triton: one kernel for every shape.

A projection applies one (out, in) weight to every position of a (batch, in, L) sequence (`nn/mamba.py`,
`_Projection`); its weight's gradient is

    dW[o, i] = sum over b and l of G[b, o, l] X[b, i, l]

a product with a tiny output (at most 192 x 96 in SegMamba) and the whole batch of sequences as its inner
dimension (7 x 18432 positions at the hippocampus patch's first stage, 2 x 262144 at 128^3's). cuBLAS runs it as
a batched GEMM on a handful of thread blocks, each walking a whole sequence. Here the (batch, position) range is
cut into `splits` contiguous pieces, one program per (output tile, piece), each summing its piece with tensor-core
dots into float32; torch adds the pieces' partial products up. G and X may have any strides (G is often the
transposed view of a (batch, L, out) gradient); Triton specialises unit strides, so each layout gets its own
coalesced loads.
"""
from __future__ import annotations

import torch

from torch import Tensor

from .triton_common import cdiv, jit, next_power_of_2, on_device_of, tl

__all__ = ["projection_weight_grad", "projection_weight_grad_triton"]

# positions per dot step and programs per multiprocessor aimed at by the split
BLOCK_K = 64
PROGRAMS_PER_SM = 4


@jit
def _weight_grad(G_ptr, X_ptr, P_ptr, O, I, L, blocks_per_row, blocks_per_split, total_blocks,
                 sgb, sgo, sgl, sxb, sxi, sxl,
                 BO: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    split = tl.program_id(2)
    o = pid_o * BO + tl.arange(0, BO)
    i = pid_i * BI + tl.arange(0, BI)
    k = tl.arange(0, BK)
    omask = o < O
    imask = i < I
    acc = tl.zeros([BO, BI], dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, total_blocks)
    for q in range(first, last):
        b = q // blocks_per_row
        pos = (q % blocks_per_row) * BK + k
        kmask = pos < L
        g = tl.load(G_ptr + b.to(tl.int64) * sgb + o[:, None] * sgo + pos[None, :] * sgl,
                    mask=omask[:, None] & kmask[None, :], other=0.0)
        x = tl.load(X_ptr + b.to(tl.int64) * sxb + i[None, :] * sxi + pos[:, None] * sxl,
                    mask=kmask[:, None] & imask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(g, x, input_precision="ieee")
        else:
            acc += tl.dot(g, x)
    tl.store(P_ptr + split.to(tl.int64) * O * I + o[:, None] * I + i[None, :], acc,
             mask=omask[:, None] & imask[None, :])


def _tile(size: int) -> int:
    return min(64, max(16, next_power_of_2(size)))


def projection_weight_grad_triton(grad: torch.Tensor, x: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """sum over batch and positions of grad (batch, out, L) x (batch, in, L)^T -> (out, in) float32.

    grad and x are in one dtype (float16, bfloat16 or float32; float32 is summed without TF32), with any strides.
    `splits`: how many pieces the (batch, position) range is cut into; None aims at a few programs per
    multiprocessor.
    """
    if grad.dtype != x.dtype or grad.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"grad and x must share a dtype among float16, bfloat16, float32; got {grad.dtype}, "
                         f"{x.dtype}")
    batch, out, length = grad.shape
    inner = x.shape[1]
    if x.shape[0] != batch or x.shape[2] != length:
        raise ValueError(f"grad {tuple(grad.shape)} and x {tuple(x.shape)} must agree on batch and length")
    BO, BI = _tile(out), _tile(inner)
    tiles = cdiv(out, BO) * cdiv(inner, BI)
    blocks_per_row = cdiv(length, BLOCK_K)
    total = batch * blocks_per_row
    if splits is None:
        sms = torch.cuda.get_device_properties(grad.device).multi_processor_count if grad.is_cuda else 4
        splits = max(1, min(total, cdiv(PROGRAMS_PER_SM * sms, tiles)))
    per_split = cdiv(total, splits)
    splits = cdiv(total, per_split)
    partial = torch.empty(splits, out, inner, device=grad.device, dtype=torch.float32)
    with on_device_of(grad):
        _weight_grad[(cdiv(out, BO), cdiv(inner, BI), splits)](
            grad, x, partial, out, inner, length, blocks_per_row, per_split, total,
            *grad.stride(), *x.stride(), BO=BO, BI=BI, BK=BLOCK_K, IEEE=grad.dtype == torch.float32, num_warps=4)
    return partial.sum(0)


@torch.library.custom_op("nnunet_segmamba::projection_weight_grad", mutates_args=())
def projection_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """`projection_weight_grad_triton` as one opaque op, so that torch.compile puts the kernel into the traced
    backward as it is (inductor would lower a batched GEMM to cuBLAS's)."""
    return projection_weight_grad_triton(grad, x)


@projection_weight_grad.register_fake
def _(grad, x):
    return grad.new_empty((grad.shape[1], x.shape[1]), dtype=torch.float32)
