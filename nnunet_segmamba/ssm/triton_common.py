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
           "interpreting", "jit", "memory_position", "next_power_of_2", "on_device_of", "rows", "tl", "triton"]

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


def on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's (cuda:1 under cuda:0 current).
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
