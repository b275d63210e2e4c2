"""The selective scan and the causal conv as registered custom ops, so that torch.compile traces the Mamba layers
without a graph break.

dynamo cannot look inside mamba-ssm's CUDA extension, nor, in general, into our Triton autograd functions with
their host-side launch logic; and tracing the chunked PyTorch scan would unroll its 2 sqrt(L) Python steps into
one huge graph. As custom ops, all of them are one opaque node each, with

    nnunet_segmamba::selective_scan       (u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, backend, order,
                                           num_slices?) -> (out, last_state)
    nnunet_segmamba::selective_scan_bwd   (dout, dlast?, <the forward's arguments>) -> gradients of the 8 tensors
    nnunet_segmamba::causal_conv1d        (x, weight, bias?, silu, backend, order, num_slices?) -> out
    nnunet_segmamba::causal_conv1d_bwd    (dout, <the forward's arguments>) -> gradients of x, weight, bias

a fake (shape) function for each, and the backward registered as the forward's autograd formula.

Both forwards call `dispatch.selective_scan_eager` / `dispatch.causal_conv1d_eager`, the code eager mode runs:
the backend is resolved (and falls back, with its warning) at run time inside the op, exactly as in eager mode,
and a new implementation added there needs nothing here. `backend` is the name the caller asked for ("auto",
"cuda", ...), not the resolved one, so the environment variable and the failure policy keep their meaning.

The backwards recompute: they run the eager forward again with gradients on and take `torch.autograd.grad` of it
(each implementation's own backward: mamba-ssm's, our Triton one, or autograd through the torch scan). That
keeps one backward per implementation, at the cost of one more forward of the scan in a compiled training step.
A gradient absent from the inputs (D, z or delta_bias given as None) comes back as an empty tensor and is turned
into None by the autograd formula; one not reached (e.g. an input that the forward ignores) as zeros.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import dispatch

__all__ = ["causal_conv1d", "causal_conv1d_bwd", "selective_scan", "selective_scan_bwd"]

_NS = "nnunet_segmamba"


def _state_dtype(u: Tensor) -> torch.dtype:
    # every implementation keeps the state in float32, in float64 for float64 inputs (the torch scan)
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _fresh(outputs: Sequence[Tensor], inputs: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """`outputs`, each copied where it shares memory with an input or an earlier output: custom ops may return no
    aliases (e.g. the Triton backward's dB and dC are two halves of one buffer)."""
    taken = {i.untyped_storage().data_ptr() for i in inputs if i is not None}
    result = []
    for t in outputs:
        storage = t.untyped_storage().data_ptr()
        if storage in taken and t.numel():
            t = t.clone()
            storage = t.untyped_storage().data_ptr()
        taken.add(storage)
        result.append(t)
    return result


def _contiguous_like(t: Tensor) -> Tensor:
    # the backwards return contiguous gradients whatever the inputs' strides (B and C are often row slices)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _gradients(outputs: list[Tensor], grad_outputs: list[Optional[Tensor]],
               inputs: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """d(outputs)/d(inputs) against `grad_outputs`: zeros where not reached, an empty tensor for a None input."""
    wanted = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad([o for o, _ in wanted], leaves, [g for _, g in wanted], allow_unused=True) \
        if wanted else [None] * len(leaves)
    it = iter(grads)
    result = []
    for t in inputs:
        if t is None:
            result.append(outputs[0].new_empty(0))
        else:
            g = next(it)
            result.append(torch.zeros_like(t) if g is None else g)
    return result


_AUTOGRAD_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor))


@contextlib.contextmanager
def _recording():
    """Autograd on inside an op's implementation, for the recompute of the backwards.

    A custom op's implementation runs below the autograd dispatch key (the dispatcher excludes it), so even with
    grad mode on nothing would be recorded there. Only the autograd keys are let back in; autocast stays off, as
    in the forward's implementation, so that the recompute repeats the forward exactly.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude - _AUTOGRAD_KEYS), \
            torch.enable_grad():
        yield


def _leaves(tensors: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
    return [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]


# ---- selective scan ------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, backend: str,
                   order: str, num_slices: Optional[int]) -> tuple[Tensor, Tensor]:
    """`api.selective_scan(..., return_last_state=True)` as one op: (out in u's dtype, last state (batch, d,
    n) in float32, float64 for float64 inputs)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    with torch.no_grad():
        out, last = dispatch.selective_scan_eager(*inputs, delta_softplus, True, backend, order, num_slices)
    # contiguous as the fake function promises (a no-op for every implementation's usual output)
    out, last = _fresh([out.contiguous(), last.to(_state_dtype(u)).contiguous()], inputs)
    return out, last


@selective_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, order, num_slices):
    return torch.empty_like(u, memory_format=torch.contiguous_format), \
        u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=_state_dtype(u))


@torch.library.custom_op(f"{_NS}::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                       C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool, backend: str, order: str, num_slices: Optional[int]) -> list[Tensor]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias), by recomputing the forward (see the module docstring)."""
    leaves = _leaves((u, delta, A, B, C, D, z, delta_bias))
    with _recording():
        out, last = dispatch.selective_scan_eager(*leaves, delta_softplus, True, backend, order, num_slices)
        # the state carries a gradient on the torch scan only (as in eager mode); the kernels mark it constant
        grads = _gradients([out, last], [dout, dlast], leaves)
    return _fresh([g.contiguous() for g in grads], (dout, dlast, u, delta, A, B, C, D, z, delta_bias))


@selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, order, num_slices):
    return [_contiguous_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias)]


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, *settings = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.present = [t is not None for t in (D, z, delta_bias)]
    ctx.settings = settings


def _scan_backward(ctx, dout, dlast):
    grads = selective_scan_bwd(dout, dlast, *ctx.saved_tensors, *ctx.settings)
    grads = grads[:5] + [g if present else None for g, present in zip(grads[5:], ctx.present)]
    return (*grads, None, None, None, None)


selective_scan.register_autograd(_scan_backward, setup_context=_scan_setup_context)


# ---- causal conv ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, backend: str, order: str,
                  num_slices: Optional[int]) -> Tensor:
    """`api.causal_conv1d` as one op: (batch, d, L) in x's dtype."""
    with torch.no_grad():
        out = dispatch.causal_conv1d_eager(x, weight, bias, silu, backend, order, num_slices)
    return _fresh([out.contiguous()], (x, weight, bias))[0]


@causal_conv1d.register_fake
def _(x, weight, bias, silu, backend, order, num_slices):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{_NS}::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, backend: str,
                      order: str, num_slices: Optional[int]) -> list[Tensor]:
    """Gradients of (x, weight, bias), by recomputing the forward."""
    leaves = _leaves((x, weight, bias))
    with _recording():
        out = dispatch.causal_conv1d_eager(*leaves, silu, backend, order, num_slices)
        grads = _gradients([out], [dout], leaves)
    return _fresh([g.contiguous() for g in grads], (dout, x, weight, bias))


@causal_conv1d_bwd.register_fake
def _(dout, x, weight, bias, silu, backend, order, num_slices):
    return [_contiguous_like(t) if t is not None else x.new_empty(0) for t in (x, weight, bias)]


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, *settings = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.has_bias = bias is not None
    ctx.settings = settings


def _conv_backward(ctx, dout):
    dx, dweight, dbias = causal_conv1d_bwd(dout, *ctx.saved_tensors, *ctx.settings)
    return dx, dweight, dbias if ctx.has_bias else None, None, None, None, None


causal_conv1d.register_autograd(_conv_backward, setup_context=_conv_setup_context)
