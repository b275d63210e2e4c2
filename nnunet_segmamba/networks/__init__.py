"""Networks: SegMamba (3D and 2D) and MedMamba."""
from .segmamba import SegMamba

__all__ = ["SegMamba"]
