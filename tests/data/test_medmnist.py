"""MedMNIST loading: splits, channels, batches with resizing, normalisation and seeded flips, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_segmamba.data.medmnist import class_names_for, load_split, preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rgb", [False, True])
def test_load_split_and_batches(tmp_path, write_medmnist_npz, rgb):
    ds = load_split(write_medmnist_npz(tmp_path / "demomnist.npz", rgb=rgb), "train")
    channels = 3 if rgb else 1
    assert ds.images.shape == (12, channels, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 1, 2] * 4 and ds.num_classes == 3 and ds.in_chans == channels
    batches = list(ds.batches(5, 64))
    assert [b[0].shape for b in batches] == [(5, channels, 64, 64)] * 2 + [(2, channels, 64, 64)]
    x = torch.cat([b[0] for b in batches])
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, preprocess(ds.images, 64))  # eval order and no augmentation
    # training batches: seeded shuffle and flips, each image either as is or flipped left-right
    a = list(ds.batches(12, 32, train=True, generator=torch.Generator().manual_seed(1)))
    b = list(ds.batches(12, 32, train=True, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    clean = preprocess(ds.images, 32)
    for img in a[0][0]:
        assert any(torch.equal(img, c) or torch.equal(img, c.flip(-1)) for c in clean)


def test_load_split_errors(tmp_path, write_medmnist_npz):
    path = write_medmnist_npz(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="split"):
        load_split(path, "validation")
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "missing.npz", "train")
    (tmp_path / "notes.txt").write_text("not an array file\n")
    with pytest.raises(ValueError, match="is not a MedMNIST .npz file") as info:
        load_split(tmp_path / "notes.txt", "train")
    assert "allow_pickle" not in str(info.value)  # numpy's hint would suggest an unsafe fix
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match="is not a MedMNIST .npz file"):
        load_split(tmp_path / "array.npy", "train")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"is not a MedMNIST .npz file: it has no \['train_images'"):
        load_split(tmp_path / "other.npz", "train")
    np.savez(tmp_path / "multi.npz",
             **{f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in ("train", "val", "test")},
             **{f"{s}_labels": np.zeros((2, 14), np.uint8) for s in ("train", "val", "test")})
    with pytest.raises(ValueError, match="multi-label"):
        load_split(tmp_path / "multi.npz", "train")
    assert class_names_for("breastmnist", 2) == ["malignant", "normal, benign"]
    assert class_names_for("bloodmnist", 3) == ["0", "1", "2"]
