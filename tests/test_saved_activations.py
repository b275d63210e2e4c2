"""The saved-activation breakdown (benchmarks/saved_activations.py): attribution to the innermost module,
one count per storage, weights left out."""
from __future__ import annotations

import torch

from benchmarks.saved_activations import group, saved_for_backward


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 1)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        y = self.act(self.conv(x))
        return y * y  # saves y twice (both factors): one storage, counted once, for the block itself


def test_saved_bytes_per_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block())
    x = torch.randn(2, 1, 4, 4, 4)
    saved = saved_for_backward(model, x, "cpu", torch.bfloat16)
    voxels = 2 * 4 ** 3
    assert saved["0.conv"] == {"bytes": voxels * 1 * 2, "tensors": 1}  # its bf16 input, not its weight
    assert saved["0.act"] == {"bytes": voxels * 4 * 2, "tensors": 1}  # its output
    assert "0" not in saved  # y * y saved the ReLU's output again: already counted
    assert group(saved, 1) == {"0": voxels * 5 * 2}
