"""Networks: SegMamba (3D and 2D), MedMamba (the classifier, T/S/B) and MedMambaUNet (its 2D segmentation form)."""
from .medmamba import MedMamba, medmamba_b, medmamba_s, medmamba_t
from .medmamba_unet import MedMambaUNet
from .segmamba import SegMamba

__all__ = ["MedMamba", "MedMambaUNet", "SegMamba", "medmamba_b", "medmamba_s", "medmamba_t"]
