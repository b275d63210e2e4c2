"""Depthwise causal 1D convolution (+ SiLU) in Triton, read through an index map.

Mamba's convolution runs along the order in which the selective scan visits the tokens. The tri-orientated
layer scans one flattened volume three ways: forwards, backwards, and "inter-slice" (the n slices of length M
taken in turn, i.e. the transpose of the (n, M) view). Rather than materialising a flipped or permuted copy of
x for each direction and permuting the result back, the kernel walks scan-order steps t and reads and writes
memory position p(t):

    mode "forward":  p(t) = t
    mode "reverse":  p(t) = L - 1 - t
    mode "slice":    p(t) = (t % n) * M + t // n,   n = num_slices, M = L // n

    out[b, c, p(t)] = act(bias[c] + sum_k weight[c, k] * x[b, c, p(t - (K-1) + k)]),  x[p(t')] = 0 for t' < 0

so input and output both stay in the raster layout. Accumulation is in float32; the output has x's dtype.

A program takes a tile of scan-order steps as rows of ROW_STEPS consecutive steps, one row per thread, which
reads its row and the row before whole (in the forward order, aligned vector accesses): the taps of every step are
then registers of its own thread. Reading each tap shifted from memory instead costs one two-byte access per step
and tap, which bounded the kernels by their cache accesses rather than by memory (docs/performance.md, "The causal
conv's rows").

The backward recomputes the pre-activation from x instead of saving it (one tensor of x's size less to keep
alive per direction and layer), in one pass: each thread computes the gradient at the pre-activation g at its row's
steps and at the next row's first K-1, and dx(s) = sum_j weight[K-1-j] g(s + j) from those registers. The weight
and bias gradients are sums over batch and length: each program writes its partial sums to a float32 buffer and
`triton_common.sum_parts_into_columns` adds them up, so the result does not depend on the order in which programs
finish (no atomics).

Triton is imported defensively: this module imports on machines without it (`TRITON_AVAILABLE` is False and
`TRITON_IMPORT_ERROR` says why), and `causal_conv1d_triton` then raises a RuntimeError. The kernels run on CUDA
tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported).
"""
from __future__ import annotations

import torch

from .orders import slice_geometry
from .triton_common import (MODES, TRITON_AVAILABLE, TRITON_IMPORT_ERROR, cdiv, columns, interpreting, jit,
                            memory_position, next_power_of_2, on_device_of, rows, sum_parts_into_columns, tl)

__all__ = ["causal_conv1d_triton", "causal_conv1d_triton_bwd", "conv_weight_rows", "MAX_WIDTH"]

MAX_WIDTH = 8
# Largest tile of scan-order steps per program. Module-level so tests can shrink it to cover tile boundaries
# on short sequences.
MAX_BLOCK_L = 2048
_MIN_BLOCK_L = 16
# Scan-order steps per row of a tile, which one thread computes: at least MAX_WIDTH - 1, so that the taps before a
# row's first step lie in the row before it (and the gradients' steps after its last in the row after)
ROW_STEPS = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if TRITON_AVAILABLE:
    ROW = tl.constexpr(ROW_STEPS)  # as the kernels read it

    @jit
    def _position(t, valid, L, n, M, MODE: tl.constexpr):
        """p(t) for the steps t that are valid. The other orders clamp the masked-off steps first: p() of a negative
        step can land anywhere, and the interpreter may still form the address. In the forward order p(t) = t
        needs no clamp (a masked-off address is formed, never read), and without one the compiler still knows that
        each row of a tile is contiguous and aligned, so it loads and stores it as one vector (one 16-byte access
        for 8 bf16 steps instead of 8 two-byte ones); it is the order of every branch under torch.compile."""
        if MODE == 0:
            return t
        return memory_position(tl.where(valid, t, 0), L, n, M, MODE)

    @jit
    def _load_scan(row_ptr, t, valid, L, n, M, MODE: tl.constexpr):
        """x at scan-order steps t as float32, zero where not valid (before the start or past the end)."""
        return tl.load(row_ptr + _position(t, valid, L, n, M, MODE), mask=valid, other=0.0).to(tl.float32)

    @jit
    def _tile_steps(tile, BLOCK_L: tl.constexpr):
        """The tile's scan-order steps as (BLOCK_L / ROW, ROW): consecutive steps along a row."""
        r = tile * (BLOCK_L // ROW) + tl.arange(0, BLOCK_L // ROW)
        return r[:, None] * ROW + tl.arange(0, ROW)[None, :]

    @jit
    def _row_before(x_row, t, L, n, M, MODE: tl.constexpr):
        """The columns of x at the steps one row before t (zero before the start): the taps of a row's first steps."""
        return columns(_load_scan(x_row, t - ROW, (t >= ROW) & (t - ROW < L), L, n, M, MODE))

    @jit
    def _step(row, before, m: tl.constexpr):
        """Column m of the rows, m from -ROW (the previous row's first) to ROW - 1."""
        if m >= 0:
            return row[m]
        else:
            return before[ROW + m]

    @jit
    def _weights(w_row, K: tl.constexpr):
        """The channel's K weights as float32 scalars."""
        ws = ()
        for k in tl.static_range(K):
            ws = ws + (tl.load(w_row + k).to(tl.float32),)
        return ws

    @jit
    def _pre_activation(x, x_before, ws, bias, m: tl.constexpr, K: tl.constexpr):
        """The pre-activation at column m of the rows: bias + sum_k weight[k] x at step m - (K-1) + k."""
        acc = bias + ws[K - 1] * x[m]
        for k in tl.static_range(K - 1):
            acc += ws[k] * _step(x, x_before, m - (K - 1) + k)
        return acc

    @jit
    def _pre_activation_gradients(dy, x, x_before, ws, bias, COUNT: tl.constexpr, K: tl.constexpr,
                                  SILU: tl.constexpr):
        """g, the gradient at the pre-activation, at the rows' first COUNT columns."""
        g = ()
        for m in tl.static_range(COUNT):
            gm = dy[m]
            if SILU:
                pre = _pre_activation(x, x_before, ws, bias, m, K)
                sig = tl.sigmoid(pre)
                gm = gm * sig * (1.0 + pre * (1.0 - sig))
            g = g + (gm,)
        return g

    @jit
    def _tile_start(x_ptr, w_ptr, b_ptr, D, SET_BATCH, stride_xb, stride_xd, K: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
        """A (batch * channel, tile) program's batch, channel, x row, weights and bias (those of its channel in its
        batch element's parameter set: each set serves SET_BATCH consecutive batch elements)."""
        row = tl.program_id(0)
        # 64-bit row offsets: batch * d * L can pass 2**31 for large volumes.
        b = (row // D).to(tl.int64)
        c = (row % D).to(tl.int64)
        param = (b // SET_BATCH) * D + c
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(b_ptr + param).to(tl.float32)
        return b, c, x_ptr + b * stride_xb + c * stride_xd, _weights(w_ptr + param * K, K), bias

    @jit
    def _causal_conv1d_fwd_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        D, L, n, M, SET_BATCH,
        stride_xb, stride_xd, stride_ob, stride_od,
        K: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """out at the tile's steps. Each thread computes a row of ROW steps from that row and the row before, both
        loaded whole: the K taps of a step are registers of its thread."""
        b, c, x_row, ws, bias = _tile_start(x_ptr, w_ptr, b_ptr, D, SET_BATCH, stride_xb, stride_xd, K, HAS_BIAS)
        t = _tile_steps(tl.program_id(1), BLOCK_L)
        in_seq = t < L
        x = columns(_load_scan(x_row, t, in_seq, L, n, M, MODE))
        x_before = _row_before(x_row, t, L, n, M, MODE)
        out = ()
        for m in tl.static_range(ROW):
            v = _pre_activation(x, x_before, ws, bias, m, K)
            if SILU:
                v = v * tl.sigmoid(v)
            out = out + (v,)
        tl.store(out_ptr + b * stride_ob + c * stride_od + _position(t, in_seq, L, n, M, MODE),
                 rows(out).to(out_ptr.dtype.element_ty), mask=in_seq)

    @jit
    def _causal_conv1d_bwd_kernel(
        x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr, part_ptr,
        D, L, n, M, n_tiles, SET_BATCH,
        stride_xb, stride_xd, stride_gb, stride_gd, stride_dxb, stride_dxd,
        K: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """dx at the tile's steps and the tile's shares of the weight and bias gradients, in one pass.

        x at step s feeds the outputs at steps s .. s + K-1, the one at s + j through weight[K-1-j], so dx(s) =
        sum_j weight[K-1-j] g(s + j), and weight[K-1-j]'s gradient is sum_s x(s) g(s + j) (the sum over the
        outputs' steps regrouped by input step: g is zero past the end, x before the start). Each thread computes
        g at its row's steps and at the next row's first K-1, from x of the row before, its own and the next, and
        takes every shifted g(s + j) from its registers."""
        tile = tl.program_id(1)
        b, c, x_row, ws, bias = _tile_start(x_ptr, w_ptr, b_ptr, D, SET_BATCH, stride_xb, stride_xd, K, HAS_BIAS)
        dout_row = dout_ptr + b * stride_gb + c * stride_gd
        t = _tile_steps(tile, BLOCK_L)
        in_seq = t < L
        after = t + ROW < L
        x = columns(_load_scan(x_row, t, in_seq, L, n, M, MODE))
        x_before = _row_before(x_row, t, L, n, M, MODE)
        x_after = columns(_load_scan(x_row, t + ROW, after, L, n, M, MODE))
        g = _pre_activation_gradients(columns(_load_scan(dout_row, t, in_seq, L, n, M, MODE)), x, x_before, ws,
                                      bias, ROW, K, SILU)
        g_after = _pre_activation_gradients(columns(_load_scan(dout_row, t + ROW, after, L, n, M, MODE)), x_after,
                                            x, ws, bias, K - 1, K, SILU)
        # g(s + j) for the step in column m: column m + j of the row's g, or past its end of the next row's
        dx = ()
        for m in tl.static_range(ROW):
            acc = ws[K - 1] * g[m]
            for j in tl.static_range(1, K):
                acc += ws[K - 1 - j] * _step(g_after, g, m + j - ROW)
            dx = dx + (acc,)
        tl.store(dx_ptr + b * stride_dxb + c * stride_dxd + _position(t, in_seq, L, n, M, MODE),
                 rows(dx).to(dx_ptr.dtype.element_ty), mask=in_seq)
        # the partial sums as the row (batch, tile) of a (batch * tiles, channels, taps [+ 1 for the bias]) buffer,
        # which `sum_parts_into_columns` adds up into the weight's and the bias's gradients
        W: tl.constexpr = K + 1 if HAS_BIAS else K
        part = ((b * n_tiles + tile) * D + c) * W
        for j in tl.static_range(K):
            acc = x[0] * _step(g_after, g, j - ROW)
            for m in tl.static_range(1, ROW):
                acc += x[m] * _step(g_after, g, m + j - ROW)
            tl.store(part_ptr + part + K - 1 - j, tl.sum(acc, axis=0))
        if HAS_BIAS:
            acc = g[0]
            for m in tl.static_range(1, ROW):
                acc += g[m]
            tl.store(part_ptr + part + K, tl.sum(acc, axis=0))


def _block_size(length: int) -> int:
    # Short sequences get a small tile so that few lanes are masked off.
    return max(_MIN_BLOCK_L, min(MAX_BLOCK_L, next_power_of_2(length)))


def _warps(block: int) -> int:
    # one row of ROW_STEPS steps per thread, up to 4 warps (then 2 rows a thread at the largest tile): a short
    # sequence's tile would otherwise leave most of 4 warps without a row
    return max(1, min(4, block // (ROW_STEPS * 32)))


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def conv_weight_rows(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The weight as the kernels read it, (d, K) or (sets, d, K): without nn.Conv1d's size-1 axis of (d, 1, K)."""
    if weight.dim() >= 3 and weight.shape[-2] == 1 and weight.shape[-3] == dim:
        return weight.squeeze(-2)
    return weight


def _contiguous_along_l(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, mode_id, num_slices, slice_len):
        x = _contiguous_along_l(x)
        batch, dim, length = x.shape
        width = weight.shape[-1]
        w = weight.contiguous()  # (d, K), or (sets, d, K)
        b = bias.contiguous() if bias is not None else None
        set_batch = batch // (w.shape[0] if w.dim() == 3 else 1)
        out = torch.empty((batch, dim, length), dtype=x.dtype, device=x.device)
        block = _block_size(length)
        if out.numel():
            grid = (batch * dim, cdiv(length, block))
            with on_device_of(x):
                _causal_conv1d_fwd_kernel[grid](
                    x, w, b if b is not None else w, out,
                    dim, length, num_slices, slice_len, set_batch,
                    *_row_strides(x), *_row_strides(out),
                    K=width, MODE=mode_id, HAS_BIAS=b is not None, SILU=silu, BLOCK_L=block,
                    num_warps=_warps(block),
                )
        ctx.save_for_backward(x, w, b)
        ctx.config = (silu, mode_id, num_slices, slice_len, block)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, b = ctx.saved_tensors
        silu, mode_id, num_slices, slice_len, block = ctx.config
        dx, dweight, dbias = _backward(dout, x, w, b, silu, mode_id, num_slices, slice_len, block)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (dx if need_x else None, dweight if need_w else None, dbias if need_b else None,
                None, None, None, None)


def _backward(dout, x, w, b, silu, mode_id, num_slices, slice_len, block):
    """Gradients of x, the (d, K) or (sets, d, K) weight and the bias (None without one), in one pass over x and
    dout (`_causal_conv1d_bwd_kernel`)."""
    dout = _contiguous_along_l(dout)
    x = _contiguous_along_l(x)
    batch, dim, length = x.shape
    width = w.shape[-1]
    sets = w.shape[0] if w.dim() == 3 else 1
    n_tiles = cdiv(length, block)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    # every program writes its row; an empty x has no rows, and sums to zero gradients
    parts = torch.empty((batch * n_tiles, dim, width + (b is not None)), dtype=torch.float32, device=x.device)
    if x.numel():
        with on_device_of(x):
            _causal_conv1d_bwd_kernel[(batch * dim, n_tiles)](
                x, w, b if b is not None else w, dout, dx, parts,
                dim, length, num_slices, slice_len, n_tiles, batch // sets,
                *_row_strides(x), *_row_strides(dout), *_row_strides(dx),
                K=width, MODE=mode_id, HAS_BIAS=b is not None, SILU=silu, BLOCK_L=block,
                num_warps=_warps(block),
            )
    dweight = torch.empty(w.shape, dtype=w.dtype, device=x.device)
    dbias = torch.empty(b.shape, dtype=b.dtype, device=x.device) if b is not None else None
    # each parameter set's (batch, tile) rows follow the set before's
    sum_parts_into_columns(parts.view(sets, batch // sets * n_tiles, dim, parts.shape[-1]),
                           [dweight.view(sets, dim, width)] + ([dbias.view(sets, dim)] if b is not None else []))
    return dx, dweight, dbias


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         silu: bool = True, mode: str = "forward", num_slices: int | None = None) -> torch.Tensor:
    """Depthwise causal convolution (+ SiLU) along the scan order `mode`, in x's raster layout.

    Args:
        x: (batch, d, L), float16 / bfloat16 / float32, on CUDA (or CPU under TRITON_INTERPRET=1).
        weight: (d, K) or (d, 1, K) as stored by nn.Conv1d(d, d, K, groups=d); K <= 8. Or parameter sets
            (sets, d, K) / (sets, d, 1, K): set i serves the i-th block of batch / sets consecutive batch elements.
        bias: optional (d,), or (sets, d) with sets of weights.
        silu: apply SiLU to the result.
        mode: "forward", "reverse" or "slice" (see the module docstring for the index maps).
        num_slices: for mode "slice", the number n of slices; it must divide L. Ignored by the other modes.
    Returns:
        (batch, d, L) in x's dtype; differentiable in x, weight and bias.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (batch, d, L) tensor, got shape {tuple(getattr(x, 'shape', ()))}; "
                         "reshape it to three dimensions")
    batch, dim, length = x.shape
    if x.dtype not in _DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; the Triton causal conv takes float16, bfloat16 or float32 "
                         "(use causal_conv1d(..., backend='torch') for other dtypes)")
    weight = conv_weight_rows(weight, dim)
    sets = weight.shape[0] if weight.dim() == 3 else 1
    if weight.dim() not in (2, 3) or weight.shape[-2] != dim or batch % sets:
        raise ValueError(f"weight must be (d, K) or (d, 1, K) with d = {dim} (x's channels), or (sets, d, K) with "
                         f"sets dividing the batch ({batch}), got shape {tuple(weight.shape)}")
    width = weight.shape[-1]
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"weight has kernel width K = {width}; the Triton causal conv supports 1 <= K <= "
                         f"{MAX_WIDTH} (use causal_conv1d(..., backend='torch') for wider kernels)")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:-1]):
        raise ValueError(f"bias must be {'(d,)' if sets == 1 else '(sets, d)'} = {tuple(weight.shape[:-1])} "
                         f"(the weight's sets and x's channels), got shape {tuple(bias.shape)}; pass bias=None for no "
                         "bias")
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"bias must be floating point, got {bias.dtype}")
    num_slices, slice_len = slice_geometry(mode, length, num_slices, "mode")

    if not TRITON_AVAILABLE:
        raise RuntimeError(f"causal_conv1d_triton needs triton, which failed to import ({TRITON_IMPORT_ERROR}); "
                           "install triton or use causal_conv1d(..., backend='torch')")
    devices = {t.device for t in (x, weight, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, weight and bias must be on one device, got {sorted(str(d) for d in devices)}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"x is on {x.device}; the Triton causal conv needs CUDA tensors (or TRITON_INTERPRET=1 "
                         "set before importing this module, for the CPU interpreter)")
    return _CausalConv1dTriton.apply(x, weight, bias, bool(silu), MODES[mode], num_slices, slice_len)


def causal_conv1d_triton_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None, silu: bool = True, mode: str = "forward",
                             num_slices: int | None = None):
    """Gradients (dx, dweight, dbias or None) of `causal_conv1d_triton(x, weight, bias, silu, mode, num_slices)`
    against `dout`, without running the forward: for the custom op's backward (`ops.py`), whose forward took
    the same, already checked, arguments. Each gradient has its input's shape and dtype."""
    num_slices, slice_len = slice_geometry(mode, x.shape[-1], num_slices, "mode")
    w = conv_weight_rows(weight, x.shape[1]).contiguous()
    dx, dweight, dbias = _backward(dout, x, w, bias.contiguous() if bias is not None else None, bool(silu),
                                   MODES[mode], num_slices, slice_len, _block_size(x.shape[-1]))
    return dx, dweight.reshape(weight.shape), dbias
