"""The orders in which a scan visits a raster-ordered sequence, and the one check of `num_slices`.

SegMamba's tri-orientated layer scans one flattened volume (batch, d, L) three ways. Step t of the scan reads
memory position p(t):

    "forward":  p(t) = t
    "reverse":  p(t) = L - 1 - t
    "slice":    p(t) = (t mod n) * M + t div n,   n = num_slices, M = L / n

"slice" is the transpose of the (n, M) view: with n = D of a (D, H, W) raster it visits the D slices of one
in-plane position, then the next position. The Triton kernels read through p (`MODES` numbers the orders for
them); the other backends work on the copies that `visit` makes.
"""
from __future__ import annotations

import torch

__all__ = ["ORDERS", "ORDER_IDS", "check_num_slices", "slice_geometry", "visit"]

ORDERS = ("forward", "reverse", "slice")
# how the compiled kernels (Triton's constexpr MODE, the CPU extension's mode argument) number the orders
ORDER_IDS = {"forward": 0, "reverse": 1, "slice": 2}


def check_num_slices(num_slices, length: int) -> int:
    """`num_slices` as an int, or a ValueError that names it: it must be a positive divisor of L."""
    if num_slices is None:
        raise ValueError(f"the 'slice' order needs num_slices, a positive divisor of the sequence length "
                         f"L={length}; pass the feature map's first spatial size")
    if isinstance(num_slices, bool) or int(num_slices) != num_slices or num_slices < 1 or length % num_slices:
        raise ValueError(f"num_slices={num_slices!r} must be a positive divisor of the sequence length L={length}; "
                         f"pass the feature map's first spatial size")
    return int(num_slices)


def slice_geometry(order: str, length: int, num_slices, argument: str = "order") -> tuple[int, int]:
    """(n, M) of the index map p(t) for `order`: (num_slices, L / num_slices) for "slice", (1, L) otherwise.
    `argument` is the caller's name for `order`, for the error message."""
    if order not in ORDERS:
        raise ValueError(f"{argument} must be one of {ORDERS}, got {order!r}")
    if order != "slice":
        return 1, length
    n = check_num_slices(num_slices, length)
    return n, length // n


def visit(x: torch.Tensor, order: str, num_slices: int | None = None, inverse: bool = False) -> torch.Tensor:
    """x with its last axis in the visiting order `order` (a copy unless "forward"), or back with `inverse`."""
    n, m = slice_geometry(order, x.shape[-1], num_slices)
    if order == "forward":
        return x
    if order == "reverse":
        return x.flip(-1)
    lead = x.shape[:-1]
    shape = (m, n) if inverse else (n, m)
    return x.reshape(*lead, *shape).transpose(-1, -2).reshape(*lead, x.shape[-1])
