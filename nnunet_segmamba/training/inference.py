"""How a trained network predicts a tile fast on CUDA, with the same arithmetic as nnU-Net's predictor.

nnU-Net's `nnUNetPredictor` runs the network as the checkpoint stores it: weights in float32 and channels-first,
cast to float16 by autocast on every call, eager unless `nnUNet_compile=t`, and one forward pass per mirror flip
(8 per 3D tile). `prepare_for_cuda_inference` and `MirroredTileForward` change how that runs, not what it computes:

* a 3D network's weights in channels_last_3d, the layout cuDNN runs half-precision convolutions in, and its 3D
  convolutions' weights and biases stored in float16, the values autocast casts them to anyway (for inference
  under fp16 autocast only); together they remove cuDNN's layout copies around each convolution (2D networks
  keep their layout and types: not measured);
* compiled with `mode="reduce-overhead"` (CUDA graphs; the tile's shape is fixed, so one graph per batch size);
* the flips of a tile in one forward pass of 8 tiles, summed in nnU-Net's order (`mirror_mean`).

Measured on the BraTS-size volume in docs/performance.md ("Inference through the predictor").
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn as nn

CONV_3D_TYPES = (nn.Conv3d, nn.ConvTranspose3d)


def mirror_mean(network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, axes: Sequence[int],
                batched: bool = False) -> torch.Tensor:
    """nnU-Net's `_internal_maybe_mirror_and_predict`: the mean of the network over x and its 2^k - 1 flips
    along `axes` (tensor axes, e.g. (2, 3, 4) for a 3D tile).

    x: (B, C, *spatial); returns (B, out, *spatial). One forward pass per flip, or with `batched` one pass over the
    flipped copies stacked along the batch (2^k B tiles); the same sum in the same order either way.
    """
    combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    if batched:
        outputs = network(torch.cat([x] + [torch.flip(x, c) for c in combos])).split(x.shape[0])
    else:  # one pass at a time, each made when the sum needs it
        outputs = itertools.chain([network(x)], (network(torch.flip(x, c)) for c in combos))
    outputs = iter(outputs)
    prediction = next(outputs)
    for c, out in zip(combos, outputs):
        prediction = prediction + torch.flip(out, c)
    return prediction / (len(combos) + 1)


def half_precision_convs(network: nn.Module) -> nn.Module:
    """`network` with its 3D convolutions' weights and biases in float16, in place: what fp16 autocast casts them
    to for every call, so under autocast the arithmetic is unchanged (and float32 inference is no longer
    possible). Loading a float32 state_dict afterwards casts into them."""
    for module in network.modules():
        if isinstance(module, CONV_3D_TYPES):
            module.half()
    return network


def prepare_for_cuda_inference(network: nn.Module) -> tuple[nn.Module, torch.memory_format | None]:
    """The network as `MirroredTileForward` runs it on CUDA under fp16 autocast: in eval mode; a 3D network (one
    with 3D convolutions) with its weights in channels_last_3d and its 3D convolutions' weights in float16 (in
    place: state_dict names unchanged, so nnU-Net's per-fold `load_state_dict` still loads into it); compiled with
    CUDA graphs (static shapes). Returns the compiled network and the memory format its input should have."""
    network.eval()
    memory_format = None
    if any(isinstance(m, CONV_3D_TYPES) for m in network.modules()):
        memory_format = torch.channels_last_3d
        half_precision_convs(network.to(memory_format=memory_format))
    return torch.compile(network, mode="reduce-overhead", dynamic=False), memory_format


class MirroredTileForward:
    """The prediction for one tile: the network's output, or its mean over the mirror flips (`mirror_mean`).

    Args:
        network: the network, possibly compiled.
        cuda_graphs: the network replays CUDA graphs (`prepare_for_cuda_inference`): each call starts a new
            step and its output is copied out, since the next replay overwrites it.
        batched: the flips of a tile in one forward pass where memory allows; after an out-of-memory error, one
            pass per flip for the rest of this object's life.
        memory_format: the layout the input is put in (the network's weights' channels-last format), or None.
        log: called with one line when batched mirroring falls back to one pass per flip.
    """

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], cuda_graphs: bool = False,
                 batched: bool = True, memory_format: torch.memory_format | None = None,
                 log: Callable[[str], None] = print):
        self.network = network
        self.cuda_graphs = cuda_graphs
        self.batched = batched
        self.memory_format = memory_format
        self.log = log

    def forward_once(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        if not self.cuda_graphs:
            return self.network(x)
        torch.compiler.cudagraph_mark_step_begin()
        return self.network(x).clone()

    def __call__(self, x: torch.Tensor, mirror_axes: Sequence[int] | None) -> torch.Tensor:
        """x: (B, C, *spatial); mirror_axes: tensor axes to flip (nnU-Net's allowed axes + 2), or None."""
        if not mirror_axes:
            return self.forward_once(x)
        if self.batched:
            try:
                return mirror_mean(self.forward_once, x, mirror_axes, batched=True)
            except torch.OutOfMemoryError:
                self.batched = False
                torch.cuda.empty_cache()
                self.log(f"not enough GPU memory for the {2 ** len(mirror_axes)} mirrorings of a tile in one "
                         f"forward pass: one pass per mirroring from here on")
        return mirror_mean(self.forward_once, x, mirror_axes)
