"""Settings and fixtures for the whole test suite."""
from pathlib import Path

import pytest


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the scan's many small operations gain nothing from a second thread on
    a busy 2-core machine, and lose a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_medmnist_npz():
    """Writes a small MedMNIST-style .npz (train/val/test images and labels, labels cycling over the classes)."""
    import numpy as np

    def _write(path: Path, rgb: bool = False, num_classes: int = 3, n: int = 12) -> Path:
        rng = np.random.default_rng(0)
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays = {}
        for split in ("train", "val", "test"):
            arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
            arrays[f"{split}_labels"] = (np.arange(n) % num_classes).reshape(n, 1).astype(np.uint8)
        np.savez(path, **arrays)
        return path

    return _write
