"""SegMamba: a U-shaped network with a tri-orientated Mamba encoder and a CNN decoder.

Xing, Ye, Yang, Ning, Xing, Zhu: "SegMamba: Long-range Sequential Modeling Mamba For 3D Medical Image
Segmentation", MICCAI 2024 (arXiv:2401.13560). The modules, their math and their state_dict keys follow the
authors' code (see `shared/spec/segmamba.md`), so their checkpoints load with strict=True. Additions, all off
by default or equal to the reference where the reference is defined: any input size, a 2D form, deep
supervision heads, the mixer and block ablations, gradient checkpointing; and recomputed Mamba branches, on by
default on CUDA (the same values and gradients as the reference from less memory).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..ssm.dispatch import BACKENDS
from .blocks import (
    DEEP_SUPERVISION_STRIDES, GSC, TOTAL_STRIDE, MambaLayer, MambaLayerV1, MlpChannel, OutBlock, ResidualConvBlock,
    UpBlock, check_unet_input, conv_nd, crop_to, deep_supervision_heads, deep_supervision_outputs, instance_norm_nd,
    one_channel_in_layout_of, pad_to_multiple,
)

__all__ = ["SegMamba", "MambaEncoder", "MIXERS", "BLOCKS"]

MIXERS = {"tom": ("forward", "backward", "slice"), "forward": ("forward",), "none": ()}
BLOCKS = ("published", "v1")


class MambaEncoder(nn.Module):
    """The reference's `vit`: stem/downsampling, GSC, Mamba stages, and an MLP on each skip output.

    Returns four feature maps at strides 2, 4, 8, 16 with `dims` channels.
    """

    def __init__(self, spatial_dims: int, in_chans: int, depths: Sequence[int], dims: Sequence[int],
                 num_slices: Sequence[int | None], mixer: str, block: str, dt_init_all_branches: bool,
                 gradient_checkpointing: bool, scan_backend: str,
                 recompute_mamba_branches: bool | None = False, stack_mamba_directions: bool | None = None) -> None:
        super().__init__()
        Conv, Norm = conv_nd(spatial_dims), instance_norm_nd(spatial_dims)
        self.downsample_layers = nn.ModuleList([nn.Sequential(Conv(in_chans, dims[0], 7, stride=2, padding=3))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(Norm(dims[i]), Conv(dims[i], dims[i + 1], 2, stride=2)))
        Layer = MambaLayer if block == "published" else MambaLayerV1
        self.stages = nn.ModuleList()
        for i in range(4):
            if MIXERS[mixer]:
                self.stages.append(nn.Sequential(*[
                    Layer(dims[i], MIXERS[mixer], num_slices[i], dt_init_all_branches, scan_backend,
                          recompute_mamba_branches, stack_mamba_directions)
                    for _ in range(depths[i])
                ]))
            else:  # the ablation: identity in place of every Mamba layer
                self.stages.append(nn.Identity())
        self.gscs = nn.ModuleList([GSC(spatial_dims, dims[i]) for i in range(4)])
        self.mlps = nn.ModuleList([MlpChannel(spatial_dims, dims[i], 2 * dims[i]) for i in range(4)])
        for i in range(4):
            self.add_module(f"norm{i}", Norm(dims[i]))
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(4):
            x = self.gscs[i](self.downsample_layers[i](x))
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the Mamba stage in backward: its activations are the largest of the network
                x = checkpoint(self.stages[i], x, use_reentrant=False)
            else:
                x = self.stages[i](x)
            outs.append(self.mlps[i](getattr(self, f"norm{i}")(x)))
        return outs


class SegMamba(nn.Module):
    """SegMamba for 3D (the paper) or 2D inputs.

    Args:
        in_chans: input channels (4 for BraTS).
        out_chans: output channels (classes or regions); logits are returned.
        spatial_dims: 3 (the reference) or 2 (2D convolutions; the inter-slice direction becomes the
            column-major order of each feature map).
        depths: Mamba layers per encoder stage.
        feat_size: channels of the four encoder stages.
        hidden_size: channels of the bottleneck block `encoder5`.
        num_slices: per-stage slice count of the inter-slice direction. None (default): the true first spatial
            size of each stage's feature map. The reference hard-codes (64, 32, 16, 8), right only for a 128-voxel
            first axis; pass it to reproduce the reference exactly.
        deep_supervision: build 1x1 heads on the decoder outputs at strides 2, 4, 8 (`ds_heads`) and return a
            list of logits at strides `deep_supervision_strides` (full resolution first), as nnU-Net's loss
            expects. The attribute `deep_supervision` can be switched off later (validation, inference); the
            heads stay so that checkpoints keep loading strictly. Off in the reference.
        mixer: "tom" (tri-orientated Mamba, the reference), "forward" (plain Mamba) or "none" (identity in place
            of every Mamba layer: the ablation).
        block: "published" (x + ToM(LN(x)), the authors' code) or "v1" (the seed paper's
            z = Mamba(LN(z)) + z; z = MLP(LN(z)) + z).
        dt_init_all_branches: give the backward and inter-slice branches Mamba's dt initialisation too (the
            reference initialises only the forward branch's dt_proj specially).
        gradient_checkpointing: recompute the Mamba stages in the backward pass to save training memory.
        recompute_mamba_branches: keep only the scans' outputs of every Mamba layer for the backward pass and
            recompute the rest of each branch there (`TriOrientedMamba(recompute_branches=True)`): about 2.2 GiB
            less memory at the same step time on a GPU (batch 2, 128^3, docs/performance.md), less time than
            `gradient_checkpointing`, which also runs the scans again. One of the two at most; None (default):
            on for CUDA inputs unless `gradient_checkpointing` is (on the CPU it costs time). The same values and
            gradients either way.
        recompute_conv_blocks: keep only the 3x3 convolutions' outputs (and the norms' statistics) of every residual
            conv block for the backward pass and recompute the rest there (the norm + LeakyReLU outputs, the 1x1
            shortcut convolutions): 2.6 GiB less at the peak of a training step on a GPU (batch 2, 128^3), for
            about 1 ms (docs/performance.md). None (default): on for CUDA inputs. The same values and gradients
            either way.
        stack_mamba_directions: run each Mamba layer's directions as one batch of one scan
            (`TriOrientedMamba(stack_directions=...)`): None (default) in training on CUDA where the branches are
            kept. The same values and gradients either way.
        pad_input: zero-pad inputs whose spatial size is not a multiple of 16 and crop the logits back. With
            False such inputs raise a ValueError.
        scan_backend: the selective-scan implementation of every Mamba layer: "auto" (the fastest that runs on
            the input's device; the environment variable NNUNET_SEGMAMBA_SCAN_BACKEND sets what "auto" means),
            "cuda" (mamba-ssm's kernels), "triton" (ours) or "torch" (`nnunet_segmamba.ssm.dispatch`).

    Shapes:
        x (B, in_chans, D, H, W) or (B, in_chans, H, W) -> logits of the same spatial size, (B, out_chans, ...).

    Example:
        >>> net = SegMamba(in_chans=4, out_chans=4)                  # the reference, 67,416,196 parameters
        >>> net(torch.randn(1, 4, 128, 128, 128)).shape
        torch.Size([1, 4, 128, 128, 128])
        >>> net2d = SegMamba(1, 3, spatial_dims=2, feat_size=(16, 32, 64, 128), hidden_size=256)
        >>> net2d(torch.randn(2, 1, 56, 40)).shape
        torch.Size([2, 3, 56, 40])
    """

    deep_supervision_strides = DEEP_SUPERVISION_STRIDES

    def __init__(self, in_chans: int, out_chans: int, spatial_dims: int = 3, depths: Sequence[int] = (2, 2, 2, 2),
                 feat_size: Sequence[int] = (48, 96, 192, 384), hidden_size: int = 768,
                 num_slices: Sequence[int | None] | None = None, deep_supervision: bool = False, mixer: str = "tom",
                 block: str = "published", dt_init_all_branches: bool = False,
                 gradient_checkpointing: bool = False, pad_input: bool = True, scan_backend: str = "auto",
                 recompute_mamba_branches: bool | None = None, recompute_conv_blocks: bool | None = None,
                 stack_mamba_directions: bool | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_chans < 1 or out_chans < 1:
            raise ValueError(f"in_chans and out_chans must be positive, got {in_chans} and {out_chans}")
        if len(depths) != 4 or len(feat_size) != 4 or min(depths) < 1 or min(feat_size) < 1:
            raise ValueError(f"depths and feat_size need four positive entries, got {depths} and {feat_size}")
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {tuple(MIXERS)}, got {mixer!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS}, got {scan_backend!r}")
        if gradient_checkpointing and recompute_mamba_branches:
            raise ValueError("gradient_checkpointing already recomputes the whole Mamba stages; set "
                             "recompute_mamba_branches=False with it (or use recompute_mamba_branches alone)")
        if recompute_mamba_branches is None and gradient_checkpointing:
            recompute_mamba_branches = False
        num_slices = tuple(num_slices) if num_slices is not None else (None,) * 4
        if len(num_slices) != 4:
            raise ValueError(f"num_slices needs one entry per stage (4) or None, got {num_slices}")
        self.in_chans, self.out_chans, self.spatial_dims = in_chans, out_chans, spatial_dims
        self.num_slices, self.pad_input = num_slices, pad_input
        self.deep_supervision = deep_supervision

        dims = list(feat_size)
        self.vit = MambaEncoder(spatial_dims, in_chans, depths, dims, num_slices, mixer, block,
                                dt_init_all_branches, gradient_checkpointing, scan_backend, recompute_mamba_branches,
                                stack_mamba_directions)
        self.encoder1 = ResidualConvBlock(spatial_dims, in_chans, dims[0], recompute_conv_blocks)
        self.encoder2 = ResidualConvBlock(spatial_dims, dims[0], dims[1], recompute_conv_blocks)
        self.encoder3 = ResidualConvBlock(spatial_dims, dims[1], dims[2], recompute_conv_blocks)
        self.encoder4 = ResidualConvBlock(spatial_dims, dims[2], dims[3], recompute_conv_blocks)
        self.encoder5 = ResidualConvBlock(spatial_dims, dims[3], hidden_size, recompute_conv_blocks)
        self.decoder5 = UpBlock(spatial_dims, hidden_size, dims[3], recompute_conv_blocks)
        self.decoder4 = UpBlock(spatial_dims, dims[3], dims[2], recompute_conv_blocks)
        self.decoder3 = UpBlock(spatial_dims, dims[2], dims[1], recompute_conv_blocks)
        self.decoder2 = UpBlock(spatial_dims, dims[1], dims[0], recompute_conv_blocks)
        self.decoder1 = ResidualConvBlock(spatial_dims, dims[0], dims[0], recompute_conv_blocks)
        self.out = OutBlock(spatial_dims, dims[0], out_chans)
        if deep_supervision:
            self.ds_heads = deep_supervision_heads(spatial_dims, dims[1:], out_chans)

    def _check_input(self, x: torch.Tensor) -> None:
        size = check_unet_input(x, "SegMamba", self.spatial_dims, self.in_chans, self.pad_input,
                                "on which instance normalisation is undefined")
        padded = [s + (-s) % TOTAL_STRIDE for s in size]
        for stage, stride in enumerate((2, 4, 8, 16)):
            n, stage_size = self.num_slices[stage], [p // stride for p in padded]
            if n is not None and math.prod(stage_size) % n:
                raise ValueError(
                    f"num_slices[{stage}]={n} does not divide the sequence length {math.prod(stage_size)} of stage "
                    f"{stage} ({'x'.join(map(str, stage_size))}) for input size {size}; use num_slices=None "
                    f"(the true depth of each stage) or a divisor"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        x, size = pad_to_multiple(x, TOTAL_STRIDE) if self.pad_input else (x, tuple(x.shape[2:]))
        # the layout of the network's weights, read off a convolution with more than one input channel
        x = one_channel_in_layout_of(x, self.encoder2.layer.conv1.conv.weight)
        outs = self.vit(x)
        enc1 = self.encoder1(x)
        enc2 = self.encoder2(outs[0])
        enc3 = self.encoder3(outs[1])
        enc4 = self.encoder4(outs[2])
        hidden = self.encoder5(outs[3])
        d3 = self.decoder5(hidden, enc4)
        d2 = self.decoder4(d3, enc3)
        d1 = self.decoder3(d2, enc2)
        d0 = self.decoder2(d1, enc1)
        logits = crop_to(self.out(self.decoder1(d0)), size)
        if not (self.deep_supervision and hasattr(self, "ds_heads")):
            return logits
        return deep_supervision_outputs(logits, self.ds_heads, (d1, d2, d3), size)
