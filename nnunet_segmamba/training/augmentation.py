"""Training augmentation of the SegMamba trainers: nnU-Net's pipeline with elastic deformation switched on.

nnU-Net's `get_training_transforms` builds batchgeneratorsv2's `SpatialTransform` with `p_elastic_deform=0`
(and a default magnitude of at most 0.2 voxel, which would be invisible anyway). We keep every other
transform and probability of nnU-Net unchanged (rotation and scaling p 0.2 each, noise, blur, brightness,
contrast, low resolution, gamma, mirroring) and set on that one SpatialTransform:

* `p_elastic_deform = ELASTIC_P = 0.2` per sample, the same probability nnU-Net uses for rotation and scaling.
* `elastic_deform_scale = ELASTIC_SCALE = (0.1, 0.2)`: the smoothing sigma of the random displacement field as
  a fraction of the patch edge, per axis (a 128-voxel edge gets sigma 13-26 voxels: a few smooth bumps per
  patch, not noise).
* `elastic_deform_magnitude`: the largest displacement, drawn per axis uniformly from
  `ELASTIC_MAGNITUDE = (0.03, 0.06)` times the patch edge (4-8 voxels on a 128-voxel edge, 1.4-2.9 on the
  48-voxel hippocampus patch). batchgeneratorsv2 takes the magnitude in voxels, so a fraction of the edge keeps
  the deformation equally visible on any patch size. The magnitude stays below ~0.6 of the smoothing sigma,
  which keeps the deformation free of folds.
"""
from __future__ import annotations

import numpy as np
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

ELASTIC_P = 0.2
ELASTIC_SCALE = (0.1, 0.2)
ELASTIC_MAGNITUDE = (0.03, 0.06)


class FractionOfPatchEdge:
    """A random scalar for batchgeneratorsv2: uniform(low, high) times the patch edge along axis `dim`.

    A class rather than a lambda so that the transforms pickle into nnU-Net's data-augmentation workers.
    """

    def __init__(self, low: float, high: float):
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)

    def __call__(self, *args, patch_size, dim, **kwargs) -> float:
        return float(np.random.uniform(self.low, self.high) * patch_size[dim])

    def __repr__(self) -> str:
        return f"FractionOfPatchEdge({self.low}, {self.high})"


def find_spatial_transforms(transform) -> list[SpatialTransform]:
    """Every SpatialTransform inside a (possibly nested) ComposeTransforms / RandomTransform."""
    if isinstance(transform, SpatialTransform):
        return [transform]
    found = []
    for child in getattr(transform, "transforms", None) or []:
        found += find_spatial_transforms(child)
    inner = getattr(transform, "transform", None)
    if inner is not None:
        found += find_spatial_transforms(inner)
    return found


def enable_elastic_deformation(transforms, p: float = ELASTIC_P, scale: tuple[float, float] = ELASTIC_SCALE,
                               magnitude: tuple[float, float] = ELASTIC_MAGNITUDE):
    """Switch elastic deformation on in the SpatialTransform of nnU-Net's training pipeline (in place).

    Args:
        transforms: what `nnUNetTrainer.get_training_transforms` returns.
        p: probability per sample.
        scale: smoothing sigma range, fraction of the patch edge.
        magnitude: largest displacement range, fraction of the patch edge.

    Returns:
        `transforms`, modified.

    Raises:
        RuntimeError: the pipeline holds no SpatialTransform (nnU-Net changed its pipeline; update this module).
    """
    spatial = find_spatial_transforms(transforms)
    if not spatial:
        raise RuntimeError(
            "nnU-Net's training pipeline contains no batchgeneratorsv2 SpatialTransform, so elastic deformation "
            "cannot be switched on. nnU-Net changed get_training_transforms: update "
            "nnunet_segmamba/training/augmentation.py."
        )
    for t in spatial:
        t.p_elastic_deform = p
        t.elastic_deform_scale = tuple(scale)
        t.elastic_deform_magnitude = FractionOfPatchEdge(*magnitude)
    return transforms
