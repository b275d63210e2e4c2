"""`SegMambaPredictor`: nnU-Net's `nnUNetPredictor` with the network run fast on CUDA (`inference.py`).

Everything nnU-Net's predictor does is kept: preprocessing, the sliding window (overlap, Gaussian weighting),
the mirror axes the trainer allowed, fp16 autocast on CUDA, one `load_state_dict` per fold, export. What changes
on CUDA: the flips of each tile in one forward pass (out of memory: one pass per flip, as nnU-Net does), and with
nnU-Net's trainers' compile rule (compiled unless `nnUNet_compile=f`) the network's layout, its convolution
weights' storage type and CUDA graphs. On the CPU it predicts exactly as `nnUNetPredictor` does, uncompiled.

`nnunet-segmamba predict` and `predict-test` predict with it; `nnUNetv2_predict` builds nnU-Net's own predictor,
which runs the same network the plain way (eager unless `nnUNet_compile=t`, one pass per flip).
"""
from __future__ import annotations

import os

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch._dynamo import OptimizedModule

from nnunet_segmamba.training.inference import MirroredTileForward, prepare_for_cuda_inference


def compiles_by_nnunets_rule(device: torch.device) -> bool:
    """nnU-Net's trainers' rule (`nnUNetTrainer._do_i_compile`): on CUDA, not on Windows (no Triton there), unless
    nnUNet_compile is false."""
    setting = os.environ.get("nnUNet_compile")
    return (device.type == "cuda" and os.name != "nt"
            and (setting is None or setting.lower() in ("true", "1", "t")))


class SegMambaPredictor(nnUNetPredictor):
    """nnU-Net's predictor, with the tile forward of `MirroredTileForward` (see the module docstring).

    Args:
        batched_mirroring: on CUDA, each tile's mirror flips in one forward pass where memory allows.
        *args, **kwargs: nnUNetPredictor's (tile_step_size, use_gaussian, use_mirroring, device, ...).
    """

    def __init__(self, *args, batched_mirroring: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched_mirroring = batched_mirroring
        self.tile_forward: MirroredTileForward | None = None

    def initialize_from_trained_model_folder(self, *args, **kwargs):
        super().initialize_from_trained_model_folder(*args, **kwargs)
        self._prepare_network()

    def manual_initialization(self, *args, **kwargs):
        super().manual_initialization(*args, **kwargs)
        self._prepare_network()

    def _prepare_network(self) -> None:
        # nnU-Net's initialisation compiled the network with nnUNet_compile=t: start again from the module itself
        network = self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network
        memory_format = None
        fast = compiles_by_nnunets_rule(self.device)
        if fast:
            network, memory_format = prepare_for_cuda_inference(network)
        self.network = network
        self.tile_forward = MirroredTileForward(network, cuda_graphs=fast,
                                                batched=self.batched_mirroring and self.device.type == "cuda",
                                                memory_format=memory_format)

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if axes and max(axes) > x.ndim - 3:
            raise ValueError(f"mirror axes {tuple(axes)} do not fit a {x.ndim - 2}D tile of shape {tuple(x.shape)}")
        return self.tile_forward(x, [a + 2 for a in axes] if axes else None)
