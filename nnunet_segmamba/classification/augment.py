"""Training augmentation of the `strong` recipe for 2D MedMNIST images, applied on the training device.

One random affine warp per image, sampled straight from the stored uint8 image to the training size (so the
crop, rotation, flip and the resize to `image_size` are a single bilinear resampling):

* random resized crop: a window covering `scale` of the image's area (uniform in [scale_min, 1]) with aspect
  ratio log-uniform in [1/max_ratio, max_ratio], placed uniformly inside the image;
* horizontal flip with probability 1/2 (no vertical flips: ultrasound, X-ray and fundus images have an up);
* rotation uniform in +-`degrees` about the window's centre (points outside the image take the nearest edge
  pixel's value, as F.interpolate does at the border);
* brightness: intensities times a factor uniform in [1 - brightness, 1 + brightness];
* contrast: the deviation from each image's mean times a factor uniform in [1 - contrast, 1 + contrast];
  the result is clipped to [0, 1] and normalised as `data.preprocess` does ((x - 0.5) / 0.5).

With every range at its identity (scale_min 1, max_ratio 1, no flip, 0 degrees, 0 brightness and contrast) the
output equals `data.preprocess` (bilinear resize, align_corners=False) to float rounding, rim included: both
repeat the edge pixel where a sampling point falls outside the outermost input pixel centres (grid_sample's
padding_mode="border"). Zero padding would blend black into a rim of ceil(image_size / 56 - 0.5) pixels (4 at
224 px, up to 44 % darker) of every training image that validation and test images never have. All random numbers
come from the CPU `generator`, so a seed gives the same batches on any device.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..data.medmnist import MEAN, STD

__all__ = ["AugmentConfig", "augment"]


@dataclass(frozen=True)
class AugmentConfig:
    scale_min: float = 0.7  # smallest crop area, as a fraction of the image
    max_ratio: float = 4 / 3  # crop aspect ratio in [1/max_ratio, max_ratio]
    hflip: bool = True
    degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def augment(images: torch.Tensor, image_size: int, config: AugmentConfig,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (b, C, h, w) on any device -> augmented, normalised float32 (b, C, image_size, image_size)."""
    if not 0 < config.scale_min <= 1 or config.max_ratio < 1 or config.degrees < 0:
        raise ValueError(f"need 0 < scale_min <= 1, max_ratio >= 1, degrees >= 0; got {config}")
    b = images.shape[0]
    area = _uniform(b, config.scale_min, 1.0, generator)
    log_r = math.log(config.max_ratio)
    ratio = torch.exp(_uniform(b, -log_r, log_r, generator))
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # window side as a fraction of the image side
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform(b, -1.0, 1.0, generator) * (1 - w)  # window centre, normalised coordinates in [-1, 1]
    cy = _uniform(b, -1.0, 1.0, generator) * (1 - h)
    flip = (torch.rand(b, generator=generator) < 0.5) if config.hflip else torch.zeros(b, dtype=torch.bool)
    angle = _uniform(b, -config.degrees, config.degrees, generator) * (math.pi / 180)
    bright = _uniform(b, 1 - config.brightness, 1 + config.brightness, generator)
    contrast = _uniform(b, 1 - config.contrast, 1 + config.contrast, generator)

    # output (x, y) in [-1, 1] -> input coordinates: R(angle) @ diag(+-w, h) @ (x, y) + (cx, cy)
    sx = torch.where(flip, -w, w)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * h, cx], 1),
                         torch.stack([sin * sx, cos * h, cy], 1)], 1)  # (b, 2, 3)
    x = images.float() / 255.0
    grid = F.affine_grid(theta.to(x.device, torch.float32), [b, x.shape[1], image_size, image_size],
                         align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * bright.to(x.device, torch.float32)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast.to(x.device, torch.float32)[:, None, None, None] + mean).clamp(0.0, 1.0)
    return (x - MEAN) / STD
