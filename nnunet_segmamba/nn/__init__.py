"""Mamba mixers on flattened image sequences, shared by the networks: SegMamba's tri-orientated Mamba (3D and
2D), VMamba's SS2D (MedMamba), stochastic depth, and the activation recomputation (`recompute`)."""
from .drop_path import DropPath
from .mamba import DIRECTIONS, TriOrientedMamba, slice_order
from .ss2d import SS2D, merge_scan_orders, scan_orders

__all__ = ["DIRECTIONS", "DropPath", "SS2D", "TriOrientedMamba", "mamba_mixers", "merge_scan_orders",
           "scan_orders", "set_scan_backend", "slice_order"]


def mamba_mixers(model):
    """The Mamba mixers inside `model` (TriOrientedMamba, SS2D): the modules whose `scan_backend` picks the
    selective-scan implementation."""
    return [module for module in model.modules() if isinstance(module, (TriOrientedMamba, SS2D))]


def set_scan_backend(model, scan_backend: str):
    """Switch every Mamba mixer inside `model` (TriOrientedMamba, SS2D) to `scan_backend`; returns `model`.

    For a network built or loaded with one implementation and run with another (e.g. comparing them on the
    same weights). Networks take `scan_backend=` at construction for the usual case.
    """
    from ..ssm.dispatch import BACKENDS

    if scan_backend not in BACKENDS:
        raise ValueError(f"scan_backend must be one of {BACKENDS}, got {scan_backend!r}")
    for module in mamba_mixers(model):
        module.scan_backend = scan_backend
    return model
