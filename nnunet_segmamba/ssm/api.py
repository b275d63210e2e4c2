"""The functions the networks call, `selective_scan` (or `selective_scan_packed`) and `causal_conv1d`: in eager
mode the dispatcher's implementation directly (`dispatch.py`), under torch.compile the custom ops (`ops.py`), which
run the same code inside one opaque graph node. A module of their own so that the imports run one way: dispatch <-
ops <- api."""
from __future__ import annotations

import torch

from . import ops
from .dispatch import causal_conv1d_eager, selective_scan_eager
from .torch_scan import check_scan_shapes

__all__ = ["causal_conv1d", "selective_scan", "selective_scan_packed"]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto", order: str = "forward",
                   num_slices: int | None = None, as_op: bool = False):
    """Selective scan with the semantics of mamba-ssm's `selective_scan_fn`, on the best available implementation.

    Args:
        u: (batch, d, L) input.
        delta: (batch, d, L) step sizes (before `delta_bias` and softplus).
        A: (d, n) state matrix (negative for a stable scan; Mamba uses -exp(A_log)); or parameter sets (sets, d, n),
            set i serving the i-th block of batch / sets consecutive batch elements, with D and delta_bias then
            (sets, d): several scans with their own parameters as one call (the Triton kernels run them in one
            launch; the other implementations set by set).
        B, C: (batch, n, L) or (batch, groups, n, L) input-dependent projections.
        D: optional (d,) skip connection.
        z: optional (batch, d, L) gate: out = y * silu(z).
        delta_bias: optional (d,) added to delta before the softplus.
        delta_softplus: apply softplus to delta.
        return_last_state: also return the final state (batch, d, n) (no gradient flows through it on the
            CUDA and Triton backends, as in mamba-ssm).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (see the module docstring).
        order: the order in which the scan visits the L axis: "forward", "reverse" or "slice"
            (`nnunet_segmamba.ssm.orders`); the output comes back in the inputs' order. The triton and cpu
            backends read through index maps; the others work on permuted copies.
        num_slices: for order="slice".
        as_op: call the custom op in eager mode too, as one dispatcher operation whose outputs selective
            activation checkpointing can keep (`TriOrientedMamba(recompute_branches=True)`). Its backward is the
            eager one on the Triton kernels; on the others it runs the forward again (see `ops.py`).

    Returns:
        out (batch, d, L) in u's dtype, or (out, last_state) with `return_last_state`.

    Under torch.compile the call goes through the custom op `nnunet_segmamba::selective_scan_fwd` (`ops.py`), which
    runs `selective_scan_eager` inside, so that dynamo traces the layer without a graph break; in eager mode it
    calls `selective_scan_eager` directly, which costs nothing extra.
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    if as_op or torch.compiler.is_compiling():
        out, last_state, *_residuals = ops.selective_scan(u, delta, A, B, C, D, z, delta_bias,
                                                          bool(delta_softplus), backend, order, num_slices)
        return (out, last_state) if return_last_state else out
    return selective_scan_eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend,
                                order, num_slices)


def selective_scan_packed(u, delta_B_C, A, D=None, z=None, delta_bias=None, delta_softplus=False,
                          backend: str = "auto", order: str = "forward", num_slices: int | None = None,
                          as_op: bool = False):
    """`selective_scan` with delta, B and C given as the rows of one tensor: delta_B_C (batch, d + 2 n, L), delta
    in the first d rows, then B, then C (ungrouped), for n = A.shape[-1]. Returns out (batch, d, L).

    The output of one projection that gives all three (`TriOrientedMamba.delta_B_C`): under torch.compile (or
    with `as_op`) the custom op `nnunet_segmamba::selective_scan_packed_fwd` takes it whole, and its backward
    returns the gradient of delta_B_C as one tensor, which the Triton kernel writes in place, where three separate
    gradients would be concatenated again for the projection's backward. In eager mode, the same as
    `selective_scan` on the three row slices.
    """
    rows = u.shape[1] + 2 * A.shape[-1] if u.dim() == 3 and A.dim() in (2, 3) else None
    if rows is None or delta_B_C.dim() != 3 or delta_B_C.shape[1] != rows:
        raise ValueError(f"delta_B_C must be (batch, d + 2 n, L) for u (batch, d, L) and A (d, n) or (sets, d, n), "
                         f"got delta_B_C {tuple(delta_B_C.shape)}, u {tuple(u.shape)} and A {tuple(A.shape)}")
    delta, B, C = ops.split_delta_B_C(delta_B_C, A.shape[-1])
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    if as_op or torch.compiler.is_compiling():
        return ops.selective_scan_packed(u, delta_B_C, A, D, z, delta_bias, bool(delta_softplus), backend, order,
                                         num_slices)[0]
    return selective_scan_eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, backend, order,
                                num_slices)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  silu: bool = True, backend: str = "auto", order: str = "forward",
                  num_slices: int | None = None) -> torch.Tensor:
    """Depthwise causal 1D convolution (+ SiLU), the first step of every Mamba branch.

    out[t] = sum_k weight[k] * x[t - (K-1) + k] (left zero padding), then SiLU.

    Args:
        x: (batch, d, L).
        weight: (d, 1, K) as stored by nn.Conv1d(d, d, K, groups=d), or (d, K); or parameter sets (sets, d, 1, K)
            / (sets, d, K), set i serving the i-th block of batch / sets consecutive batch elements.
        bias: optional (d,), or (sets, d) with sets of weights.
        silu: apply SiLU to the result.
        backend: as for `selective_scan`; "cuda" uses causal-conv1d's fused kernel where it imports (else our
            Triton kernel), "triton" our Triton kernel, "cpu" our fused CPU kernel.
        order: the order in which the convolution runs along L ("forward", "reverse" or "slice", as for
            `selective_scan`); the output comes back in x's order. The triton and cpu backends read the order
            in place, the others work on copies.
        num_slices: for order="slice".
    Returns:
        (batch, d, L) in x's dtype.

    Under torch.compile the call goes through the custom op `nnunet_segmamba::causal_conv1d` (`ops.py`), as
    `selective_scan` does.
    """
    if torch.compiler.is_compiling():
        return ops.causal_conv1d(x, weight, bias, bool(silu), backend, order, num_slices)
    return causal_conv1d_eager(x, weight, bias, silu, backend, order, num_slices)
