"""Mamba mixers shared by the 2D and 3D networks."""
from .mamba import DIRECTIONS, TriOrientedMamba, slice_order

__all__ = ["DIRECTIONS", "TriOrientedMamba", "slice_order"]
