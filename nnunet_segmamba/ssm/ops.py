"""The selective scan and the causal conv as registered custom ops, so that torch.compile traces the Mamba layers
without a graph break.

dynamo cannot look inside mamba-ssm's CUDA extension, nor, in general, into our Triton autograd functions with
their host-side launch logic; and tracing the chunked PyTorch scan would unroll its 2 sqrt(L) Python steps into
one huge graph. As custom ops, all of them are one opaque node each, with

    nnunet_segmamba::selective_scan_fwd   (u, delta, A, B, C, D?, z?, delta_bias?, delta_softplus, backend, order,
                                           num_slices?) -> (out, last_state, states, chunk_sum)
    nnunet_segmamba::selective_scan_bwd   (dout, dlast?, <the forward's arguments>, states, chunk_sum)
                                           -> gradients of the 8 tensors
    nnunet_segmamba::selective_scan_packed_fwd, selective_scan_packed_bwd
                                          the same with delta | B | C as the rows of one tensor (batch, d + 2 n, L),
                                          and its gradient as one (`api.selective_scan_packed`)
    nnunet_segmamba::causal_conv1d        (x, weight, bias?, silu, backend, order, num_slices?) -> out
    nnunet_segmamba::causal_conv1d_bwd    (dout, <the forward's arguments>) -> gradients of x, weight, bias

a fake (shape) function for each, and the backward registered as the forward's autograd formula.

Changing an op's schema needs a new op name (as `selective_scan_fwd` replaced `selective_scan`, which had no
residual outputs): torch.compile's on-disk caches are keyed on the traced graph, which names the op but does not
hold its schema, so a cached backward written for the old schema would otherwise be loaded and fail.

Both forwards call `dispatch.selective_scan_eager` / `dispatch.causal_conv1d_eager`, the code eager mode runs
(the scan on the Triton kernels `dispatch.selective_scan_keeping_residuals`, the same kernels with their residuals):
the backend is resolved (and falls back, with its warning) at run time inside the op, exactly as in eager mode,
and a new implementation added there needs nothing here. `backend` is the name the caller asked for ("auto",
"cuda", ...), not the resolved one, so the environment variable and the failure policy keep their meaning.

What the backwards need. On the Triton kernels the scan's forward returns its residuals (`states`, the
chunk-entering states, and `chunk_sum`, the chunks' summed step sizes, as the eager autograd function keeps them)
and the backward runs only the backward kernels (`dispatch.scan_keeps_residuals` says when; the two are empty
tensors otherwise). Every other case recomputes: the backward runs the eager forward again with gradients on and
takes `torch.autograd.grad` of it (each implementation's own backward: mamba-ssm's, the CPU kernel's, or autograd
through the torch scan), which keeps one backward per implementation at the cost of one more forward in a
compiled training step; so does the causal conv, except on the Triton kernels, whose backward needs only the
forward's inputs and runs alone (`triton_conv.causal_conv1d_triton_bwd`). Measured on an H200
(docs/performance.md): keeping the Triton residuals took SegMamba's compiled training step from 198.8 to 187.8 ms.
A gradient absent from the inputs (D, z or delta_bias given as None) comes back as an empty tensor and is turned
into None by the autograd formula; one not reached (e.g. an input that the forward ignores) as zeros.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import dispatch

__all__ = ["SELECTIVE_SCAN_OPS", "causal_conv1d", "causal_conv1d_bwd", "selective_scan", "selective_scan_bwd",
           "selective_scan_packed", "selective_scan_packed_bwd", "split_delta_B_C"]

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
def _scan_forward(inputs: Sequence[Optional[Tensor]], delta_softplus: bool, backend: str, order: str,
                  num_slices: Optional[int], op_inputs: Sequence[Optional[Tensor]]) -> tuple[Tensor, ...]:
    """The scan ops' forward on the 8 tensors (u, delta, A, B, C, D, z, delta_bias); `op_inputs` are the op's own,
    which its outputs may not alias."""
    u, A = inputs[0], inputs[2]
    with torch.no_grad():
        if dispatch.scan_keeps_residuals(backend, u.device):
            out, last, states, chunk_sum = dispatch.selective_scan_keeping_residuals(
                *inputs, delta_softplus, backend, order, num_slices)
        else:
            out, last = dispatch.selective_scan_eager(*inputs, delta_softplus, True, backend, order, num_slices)
            states, chunk_sum = u.new_empty(0, dtype=torch.float32), u.new_empty(0, dtype=torch.float32)
    # contiguous as the fake function promises (a no-op for every implementation's usual output); the last state
    # is a view of `states` on the Triton kernels, and an op's outputs may not share memory
    return tuple(_fresh([out.contiguous(), last.to(_state_dtype(u)).contiguous(), states, chunk_sum], op_inputs))


def _scan_forward_fake(u: Tensor, A: Tensor, backend: str) -> tuple[Tensor, ...]:
    if dispatch.scan_keeps_residuals(backend, u.device):
        from .triton_scan import residual_shapes

        shapes = residual_shapes(u.shape, A.shape[-1])
    else:
        shapes = ((0,), (0,))
    return (torch.empty_like(u, memory_format=torch.contiguous_format),
            u.new_empty((u.shape[0], u.shape[1], A.shape[-1]), dtype=_state_dtype(u)),
            *(u.new_empty(shape, dtype=torch.float32) for shape in shapes))


def _scan_gradients(dout: Tensor, dlast: Optional[Tensor], op_inputs: Sequence[Optional[Tensor]], unpack,
                    states: Tensor, chunk_sum: Tensor, delta_softplus: bool, backend: str, order: str,
                    num_slices: Optional[int], packed: bool) -> list[Tensor]:
    """Gradients of the op's tensor inputs, whose `unpack` gives the scan's 8: from the residuals where the forward
    kept them and the Triton kernels still run, else by recomputing the forward (see the module docstring)."""
    if states.numel() and dispatch.triton_scan_status()[0]:
        from .triton_scan import selective_scan_triton_bwd

        grads = selective_scan_triton_bwd(dout, *unpack(op_inputs), delta_softplus, states, chunk_sum, mode=order,
                                          num_slices=num_slices, packed=packed)
        grads = [g if g is not None else op_inputs[0].new_empty(0) for g in grads]
    else:
        leaves = _leaves(op_inputs)
        with _recording():
            out, last = dispatch.selective_scan_eager(*unpack(leaves), delta_softplus, True, backend, order,
                                                      num_slices)
            # the state carries a gradient on the torch scan only (as in eager mode); the kernels mark it constant
            grads = _gradients([out, last], [dout, dlast], leaves)
    return _fresh([g.contiguous() for g in grads], (dout, dlast, *op_inputs, states, chunk_sum))


def _as_given(inputs):
    return inputs


@torch.library.custom_op(f"{_NS}::selective_scan_fwd", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, backend: str,
                   order: str, num_slices: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`api.selective_scan(..., return_last_state=True)` as one op: (out in u's dtype, last state (batch, d,
    n) in float32, float64 for float64 inputs, and the residuals for the backward: see the module docstring)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return _scan_forward(inputs, delta_softplus, backend, order, num_slices, inputs)


@selective_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend, order, num_slices):
    return _scan_forward_fake(u, A, backend)


@torch.library.custom_op(f"{_NS}::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                       C: Tensor, D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       states: Tensor, chunk_sum: Tensor, delta_softplus: bool, backend: str, order: str,
                       num_slices: Optional[int]) -> list[Tensor]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias) (see `_scan_gradients`)."""
    return _scan_gradients(dout, dlast, (u, delta, A, B, C, D, z, delta_bias), _as_given, states, chunk_sum,
                           delta_softplus, backend, order, num_slices, packed=False)


@selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, states, chunk_sum, delta_softplus, backend, order,
      num_slices):
    return [_contiguous_like(t) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias)]


def _scan_setup_context(ctx, inputs, output):
    *tensors, delta_softplus, backend, order, num_slices = inputs
    ctx.save_for_backward(*tensors, output[2], output[3])
    ctx.present = [t is not None for t in tensors]
    ctx.settings = (delta_softplus, backend, order, num_slices)


def _scan_backward(backward_op, ctx, dout, dlast, _dstates, _dchunk_sum):
    """The autograd formula of both scan ops, `backward_op` the op's own backward (bound by `functools.partial`)."""
    grads = backward_op(dout, dlast, *ctx.saved_tensors, *ctx.settings)
    return (*[g if present else None for g, present in zip(grads, ctx.present)], None, None, None, None)


selective_scan.register_autograd(functools.partial(_scan_backward, selective_scan_bwd),
                                 setup_context=_scan_setup_context)


# delta | B | C as the rows of one (batch, d + 2 n, L) tensor: the output of the one projection that gives all three
# (`TriOrientedMamba.delta_B_C`), whose backward then takes the gradient as the kernel writes it, instead of three
# concatenated again (0.7-0.9 ms less at the 128^3 step on an H100, docs/performance.md)
def split_delta_B_C(delta_B_C: Tensor, d_state: int) -> tuple[Tensor, Tensor, Tensor]:
    """delta (batch, d, L), B and C (batch, d_state, L) as row slices of delta_B_C (batch, d + 2 d_state, L)."""
    return torch.split(delta_B_C, [delta_B_C.shape[1] - 2 * d_state, d_state, d_state], dim=1)


def _unpack(inputs):
    u, delta_B_C, A, D, z, delta_bias = inputs
    delta, B, C = split_delta_B_C(delta_B_C, A.shape[-1])
    return u, delta, A, B, C, D, z, delta_bias


@torch.library.custom_op(f"{_NS}::selective_scan_packed_fwd", mutates_args=())
def selective_scan_packed(u: Tensor, delta_B_C: Tensor, A: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                          delta_bias: Optional[Tensor], delta_softplus: bool, backend: str, order: str,
                          num_slices: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`selective_scan` with delta, B and C given as the rows of one tensor (batch, d + 2 n, L)."""
    inputs = (u, delta_B_C, A, D, z, delta_bias)
    return _scan_forward(_unpack(inputs), delta_softplus, backend, order, num_slices, inputs)


@selective_scan_packed.register_fake
def _(u, delta_B_C, A, D, z, delta_bias, delta_softplus, backend, order, num_slices):
    return _scan_forward_fake(u, A, backend)


@torch.library.custom_op(f"{_NS}::selective_scan_packed_bwd", mutates_args=())
def selective_scan_packed_bwd(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta_B_C: Tensor, A: Tensor,
                              D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                              states: Tensor, chunk_sum: Tensor, delta_softplus: bool, backend: str, order: str,
                              num_slices: Optional[int]) -> list[Tensor]:
    """Gradients of (u, delta_B_C, A, D, z, delta_bias), delta_B_C's written by the Triton kernel in place."""
    return _scan_gradients(dout, dlast, (u, delta_B_C, A, D, z, delta_bias), _unpack, states, chunk_sum,
                           delta_softplus, backend, order, num_slices, packed=True)


@selective_scan_packed_bwd.register_fake
def _(dout, dlast, u, delta_B_C, A, D, z, delta_bias, states, chunk_sum, delta_softplus, backend, order,
      num_slices):
    return [_contiguous_like(t) if t is not None else u.new_empty(0) for t in (u, delta_B_C, A, D, z, delta_bias)]


selective_scan_packed.register_autograd(functools.partial(_scan_backward, selective_scan_packed_bwd),
                                        setup_context=_scan_setup_context)
# the ops as the dispatcher sees them (what a selective activation checkpointing policy is called with)
SELECTIVE_SCAN_OPS = (torch.ops.nnunet_segmamba.selective_scan_fwd.default,
                      torch.ops.nnunet_segmamba.selective_scan_packed_fwd.default)


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
    """Gradients of (x, weight, bias): on the Triton kernels from the backward kernels alone, elsewhere by
    recomputing the forward (see the module docstring)."""
    if dispatch.resolve(backend, x.device) == "triton":  # only while the Triton kernels are usable
        from .triton_conv import causal_conv1d_triton_bwd

        dx, dweight, dbias = causal_conv1d_triton_bwd(dout, x, weight, bias, silu, order, num_slices)
        grads = [dx, dweight, dbias if dbias is not None else x.new_empty(0)]
    else:
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
