"""What the Triton scan and conv share: the guarded import of triton, the index maps p(t), host-side sizes.

Triton is imported defensively: this module imports on machines without it (`TRITON_AVAILABLE` is False and
`TRITON_IMPORT_ERROR` says why). The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before triton is imported), which is how CI checks their math.
"""
from __future__ import annotations

import contextlib

import torch

from .orders import ORDER_IDS

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    # the kernels gather within a tile (tl.gather, Triton 3.3, which torch 2.7 brings; 3.2.0 lacks it)
    if not hasattr(tl, "gather"):
        raise ImportError(f"triton {triton.__version__} lacks tl.gather; the kernels need triton >= 3.3 "
                          f"(pip install 'torch>=2.7')")
except Exception as exc:  # noqa: BLE001 - a broken install can fail with more than ImportError
    triton = None
    tl = None
    libdevice = None
    TRITON_AVAILABLE = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    TRITON_AVAILABLE = True
    TRITON_IMPORT_ERROR = ""

__all__ = ["MODES", "TRITON_AVAILABLE", "TRITON_IMPORT_ERROR", "cdiv", "columns", "fast_divide", "fast_log2",
           "interpreting", "jit", "memory_position", "next_power_of_2", "on_device_of", "rows", "sum_parts",
           "sum_parts_into_columns", "tl", "triton"]

# the visiting orders of `orders.py`, as the kernels' constexpr MODE
MODES = ORDER_IDS


def jit(fn):
    """triton.jit where triton imports; the plain function elsewhere (so the kernel modules still import)."""
    return triton.jit(fn) if TRITON_AVAILABLE else fn


@jit
def memory_position(t, L, n, M, MODE: tl.constexpr):
    """p(t): where scan-order step t lives along L (`orders.py`)."""
    if MODE == 1:
        return L - 1 - t
    elif MODE == 2:
        return (t % n) * M + t // n
    else:
        return t


@jit
def columns(X):
    """A (rows, 8) tile -> its 8 columns, (rows,) each. Where the compiler gives each thread whole rows (a tile
    loaded 8 contiguous 16-bit steps a thread, or computed from one), the splits are register renames: no
    shuffles, no shared memory."""
    R: tl.constexpr = X.shape[0]
    even, odd = tl.split(tl.reshape(X, (R, 4, 2)))
    c04, c26 = tl.split(tl.reshape(even, (R, 2, 2)))
    c15, c37 = tl.split(tl.reshape(odd, (R, 2, 2)))
    c0, c4 = tl.split(c04)
    c2, c6 = tl.split(c26)
    c1, c5 = tl.split(c15)
    c3, c7 = tl.split(c37)
    return (c0, c1, c2, c3, c4, c5, c6, c7)


@jit
def rows(cols):
    """The (rows, 8) tile of 8 columns: the inverse of `columns`."""
    R: tl.constexpr = cols[0].shape[0]
    even = tl.reshape(tl.join(tl.join(cols[0], cols[4]), tl.join(cols[2], cols[6])), (R, 4))
    odd = tl.reshape(tl.join(tl.join(cols[1], cols[5]), tl.join(cols[3], cols[7])), (R, 4))
    return tl.reshape(tl.join(even, odd), (R, 8))


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (on CPU tensors): TRITON_INTERPRET=1 was set when triton
    decorated them, which is what counts, not the variable's value now."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # noqa: BLE001 - no triton, or one without an interpreter
        return False
    return isinstance(memory_position, InterpretedFunction)


@jit
def _log2_approx(x):
    # lg2.approx.f32, one special-function op; tl.log / tl.log2 compile to a libdevice routine of about 25
    # instructions per value (the backward's loop: 1729 -> 1476 instructions with it in the softplus;
    # docs/performance.md)
    return libdevice.fast_log2f(x)


@jit
def _log2_interpreted(x):
    # the interpreter has no libdevice
    return tl.log2(x)


# log2(x) for float32 x, to about 2^-22 absolute: what the kernels call
fast_log2 = _log2_interpreted if interpreting() else _log2_approx


@jit
def _divide_approx(x, y):
    # div.approx.f32: the hardware's reciprocal and a multiply (2 ulp), without the IEEE division's range fix-ups
    return libdevice.fast_dividef(x, y)


@jit
def _divide_interpreted(x, y):
    return x / y


# x / y for float32, to about 2 ulp (for |y| below 2^126): what the kernels call
fast_divide = _divide_interpreted if interpreting() else _divide_approx


def next_power_of_2(x: int) -> int:
    """triton.next_power_of_2 for x >= 1, without the call overhead of a constexpr function (as Triton 3.8 wraps
    it), which counts on the host side of every launch."""
    return 1 << max(x - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- partial sums added up --------------------------------------------------------------------------------------
# The backward kernels never add into one place from several programs (atomics would make the result depend on the
# order in which programs finish): each program writes its float32 partial sums, and these add them up, in one pass
# straight into the gradients' own tensors, layouts and dtypes. torch's sum over leading dimensions took 10-15 us a
# call at the scan's sizes (an outer reduction, latency-bound), and slicing its result into the gradients cost a
# copy each (a custom op's outputs may not share memory; docs/performance.md).
_SUM_TILE = 4096  # partial sums a program holds per step of its loop over rows (32 a thread at 4 warps)
_SUM_MAX_PROGRAMS = 512  # enough to spread the columns over every multiprocessor


@jit
def _column_sums(part_ptr, R, COLS, BR: tl.constexpr, BC: tl.constexpr):
    """The sums over the R rows of a contiguous (R, COLS) float32 buffer, at this program's BC columns, in a fixed
    order (the same on every run)."""
    col = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = col < COLS
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        acc += tl.load(part_ptr + r[:, None].to(tl.int64) * COLS + col[None, :],
                       mask=(r < R)[:, None] & cmask[None, :], other=0.0)
    return col, cmask, tl.sum(acc, 0)


@jit
def _sum_parts_kernel(part_ptr, out_ptr, R, COLS, INNER, s_out, BR: tl.constexpr, BC: tl.constexpr):
    col, cmask, total = _column_sums(part_ptr, R, COLS, BR, BC)
    dest = (col // INNER).to(tl.int64) * s_out + col % INNER
    tl.store(out_ptr + dest, total.to(out_ptr.dtype.element_ty), mask=cmask)


@jit
def _sum_parts_into_columns_kernel(part_ptr, out0_ptr, out1_ptr, out2_ptr, R, D, W, E1, E2,
                                   NUM_OUT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # the second grid axis walks the sets: set s's rows and outputs follow set s - 1's
    s = tl.program_id(1).to(tl.int64)
    part_ptr += s * R * D * W
    out0_ptr += s * D * E1
    out1_ptr += s * D * (E2 - E1)
    out2_ptr += s * D * (W - E2)
    col, cmask, total = _column_sums(part_ptr, R, D * W, BR, BC)
    d = col // W
    w = col % W
    tl.store(out0_ptr + d * E1 + w, total.to(out0_ptr.dtype.element_ty), mask=cmask & (w < E1))
    if NUM_OUT > 1:
        tl.store(out1_ptr + d * (E2 - E1) + w - E1, total.to(out1_ptr.dtype.element_ty),
                 mask=cmask & (w >= E1) & (w < E2))
    if NUM_OUT > 2:
        tl.store(out2_ptr + d * (W - E2) + w - E2, total.to(out2_ptr.dtype.element_ty), mask=cmask & (w >= E2))


def _sum_launch(rows: int, cols: int) -> tuple[int, int, int]:
    """(programs, BR, BC): columns per program so that there are at most _SUM_MAX_PROGRAMS, rows per loop step."""
    bc = min(512, max(16, next_power_of_2(cdiv(cols, _SUM_MAX_PROGRAMS))))
    return cdiv(cols, bc), min(next_power_of_2(max(rows, 1)), max(1, _SUM_TILE // bc)), bc


def sum_parts(parts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (rows, inner), any row stride, contiguous along inner, any dtype = `parts` (R, rows, inner), contiguous
    float32, summed over R in float32 and rounded once."""
    rows, inner = out.shape
    if parts.shape[1:] != out.shape or not parts.is_contiguous() or out.stride(1) != 1:
        raise ValueError(f"sum_parts takes contiguous parts (R, {rows}, {inner}) and out ({rows}, {inner}) "
                         f"contiguous along its last axis, got parts {tuple(parts.shape)} and out of strides "
                         f"{out.stride()}")
    if out.numel():
        programs, br, bc = _sum_launch(parts.shape[0], out.numel())
        with on_device_of(out):
            _sum_parts_kernel[(programs,)](parts, out, parts.shape[0], out.numel(), inner, out.stride(0), BR=br,
                                           BC=bc)
    return out


def sum_parts_into_columns(parts: torch.Tensor, outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`parts` (R, D, W), contiguous float32, summed over R into up to three contiguous tensors of any dtype, which
    take its columns in turn: (D, k) or (D,) (k = 1) each, their k adding up to W. E.g. the scan's dA (D, n), dD
    (D,) and dbias (D,) from per-chunk partial sums (R, D, n + 2). With parameter sets, parts (S, R, D, W) and
    outputs (S, D, k) / (S, D): each set's rows summed into its own outputs, all in one launch."""
    if parts.dim() not in (3, 4):
        raise ValueError(f"sum_parts_into_columns takes parts (R, D, W) or (S, R, D, W), got {tuple(parts.shape)}")
    lead = tuple(parts.shape[:-3])  # () or (S,)
    rows, dim, width = parts.shape[-3:]
    ends = [0]
    for out in outs:
        ends.append(ends[-1] + (out.shape[-1] if out.dim() == len(lead) + 2 else 1))
    if not 1 <= len(outs) <= 3 or ends[-1] != width or not parts.is_contiguous() \
            or any(tuple(out.shape[:len(lead) + 1]) != (*lead, dim) or not out.is_contiguous() for out in outs):
        raise ValueError(f"sum_parts_into_columns takes contiguous parts ([S,] R, D, W) and one to three contiguous "
                         f"([S,] D, k) / ([S,] D) outputs whose k add up to W, got parts {tuple(parts.shape)} and "
                         f"outputs {[tuple(o.shape) for o in outs]}")
    if dim * width:  # with no rows (nothing to add up) the kernel writes zeros
        programs, br, bc = _sum_launch(rows, dim * width)
        padded = outs + [outs[0]] * (3 - len(outs))
        with on_device_of(parts):
            _sum_parts_into_columns_kernel[(programs, lead[0] if lead else 1)](
                parts, *padded, rows, dim, width, ends[1], ends[min(2, len(outs))], NUM_OUT=len(outs), BR=br, BC=bc)
    return outs


def on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's (cuda:1 under cuda:0 current).
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
