"""MedMNIST v2 classification data (Yang et al., "MedMNIST v2", Scientific Data 10:41, 2023), read from the
official .npz files.

A file holds `{split}_images` (N, 28, 28) uint8 grayscale or (N, 28, 28, 3) RGB and `{split}_labels` (N, 1) for
the splits train, val and test. The whole split stays in memory as uint8 (a few MB); batches are resized,
normalised and augmented on the training device, so no DataLoader workers are needed and 224 x 224 training
does not hold a float copy of the data set.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SPLITS", "CLASS_NAMES", "MedMNISTSplit", "load_split", "class_names_for", "preprocess"]

SPLITS = ("train", "val", "test")

# label names of the MedMNIST 2D sets used here (from the MedMNIST v2 release); others are numbered
CLASS_NAMES: dict[str, list[str]] = {
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
}

# MedMamba's training script: ToTensor then Normalize(0.5, 0.5), i.e. intensities in [-1, 1]
MEAN, STD = 0.5, 0.5


@dataclass
class MedMNISTSplit:
    """One split of a MedMNIST file.

    Attributes:
        images: (N, C, h, w) uint8, C = 1 (grayscale) or 3 (RGB), h = w = 28 (or the release's size).
        labels: (N,) int64 class indices.
        num_classes: classes of the data set (the largest label over all splits + 1).
        name: the data set's name (the file stem, e.g. "breastmnist").
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    def batches(self, batch_size: int, image_size: int, device: torch.device | str = "cpu", train: bool = False,
                generator: torch.Generator | None = None,
                order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches (images (b, C, image_size, image_size) float32 normalised, labels (b,) int64) on `device`.

        With `train=True` the order is shuffled (by `generator`) and each image is flipped left-right with
        probability 1/2; otherwise the split is visited in order without augmentation. `order`: the image indices
        to visit instead (e.g. a class-balanced draw), in that order.
        """
        if order is None:
            order = torch.randperm(len(self), generator=generator) if train else torch.arange(len(self))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            flip = torch.rand(len(idx), generator=generator) < 0.5 if train else None
            x = preprocess(self.images[idx].to(device), image_size)
            if flip is not None:
                flip = flip.to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x, self.labels[idx].to(device)


def preprocess(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (b, C, h, w) -> float32 (b, C, image_size, image_size): [0, 1], bilinear resize, (x - 0.5) / 0.5."""
    x = images.float() / 255.0
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file {path} not found; pass the path of e.g. breastmnist.npz")
    # an .npz is a zip archive; anything else makes np.load try pickle and fail with an "allow_pickle" hint,
    # which is both misleading and an unsafe fix
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a MedMNIST .npz file (not a NumPy .npz archive); pass a MedMNIST v2 "
                         "file such as breastmnist.npz")


def load_split(path: str | Path, split: str) -> MedMNISTSplit:
    """Read one split ("train", "val" or "test") of a MedMNIST .npz file.

    Raises ValueError for an unknown split, a file without that split's arrays, or multi-label data
    (ChestMNIST's (N, 14) labels are not a single-label classification task).
    """
    path = Path(path)
    _check_file(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in npz.files]
        if missing:
            raise ValueError(f"{path} is not a MedMNIST .npz file: it has no {missing} (keys: "
                             f"{sorted(npz.files)}); pass a MedMNIST v2 file such as breastmnist.npz")
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
        label_max = max(int(npz[f"{s}_labels"].max()) for s in SPLITS if f"{s}_labels" in npz.files)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise ValueError(f"{path} has multi-label targets of shape {labels.shape}; only single-label "
                         "(N, 1) MedMNIST sets are supported")
    if images.ndim == 3:
        images = images[:, None]  # grayscale (N, h, w) -> (N, 1, h, w)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # (N, h, w, C) -> (N, C, h, w)
    else:
        raise ValueError(f"{path}: expected {split}_images of shape (N, h, w) or (N, h, w, 3), got {images.shape}")
    return MedMNISTSplit(
        images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        labels=torch.from_numpy(labels.reshape(-1).astype(np.int64)),
        num_classes=label_max + 1,
        name=path.stem,
    )


def class_names_for(name: str, num_classes: int) -> list[str]:
    """Label names of a known MedMNIST set (by file stem), else "0", "1", ..."""
    names = CLASS_NAMES.get(name.lower())
    return list(names) if names is not None and len(names) == num_classes else [str(i) for i in range(num_classes)]
