"""MedMambaUNet: a 2D U-Net whose encoder stages are MedMamba's SS-Conv-SSM blocks.

MedMamba (Yue & Li, "MedMamba: Vision Mamba for Medical Image Classification", arXiv:2403.03849, 2024) is an
image classifier. This segmentation network is our own construction, not the authors': MedMamba's encoder
hierarchy (patch embedding, stages of `SSConvSSM` blocks joined by `PatchMerging2D`) with a first patch of 2
instead of 4, a full-resolution conv stem for the first skip, and SegMamba's convolutional decoder
(`UpBlock`s, `OutBlock`, deep-supervision heads) so that the same nnU-Net trainer logic drives both networks.

Encoder module names are the classifier's (`patch_embed.proj`, `layers.i.blocks.j.*`, `layers.i.downsample.*`),
so a MedMamba classifier's stage weights of the same widths load into `layers` (its 4x4 `patch_embed.proj`
does not fit the 2x2 one here).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ssm.dispatch import BACKENDS
from .blocks import (DEEP_SUPERVISION_STRIDES, TOTAL_STRIDE, OutBlock, ResidualConvBlock, UpBlock, check_unet_input,
                     crop_to, deep_supervision_heads, deep_supervision_outputs, pad_to_multiple)
from .medmamba import MedMambaLayer, PatchEmbed2D, _init_weights

__all__ = ["MedMambaUNet"]

NUM_STAGES = 4  # a 2x2 patch embedding, then three 2x2 patch mergings: TOTAL_STRIDE = 2 ** NUM_STAGES


class MedMambaUNet(nn.Module):
    """A U-shaped 2D segmentation network with a MedMamba encoder and a convolutional decoder.

    MedMamba itself is a classifier (Yue & Li, arXiv:2403.03849); this U-Net form is our construction.

        x (B, C_in, H, W), zero-padded to multiples of 16
        stem     `encoder1` ResidualConvBlock(C_in -> dims[0])                 skip at stride 1
        encoder  `patch_embed` Conv2d(k2, s2) + LayerNorm (channels-last)     -> stride 2
                 `layers.i` for i = 0..3: depths[i] SS-Conv-SSM blocks (width dims[i]) give the feature at stride
                 2^(i+1); between stages `layers.i.downsample` = PatchMerging2D (2x2 -> LayerNorm -> Linear,
                 C -> 2C); each stage output -> `skip_norms.i` LayerNorm -> channels-first
        decoder  `decoder4..1` UpBlock (transposed conv k2 s2, concat skip, ResidualConvBlock):
                 stride 16 -> 8 -> 4 -> 2 -> 1, channels dims[3] -> dims[2] -> dims[1] -> dims[0] -> dims[0]
        `out`    OutBlock 1x1 conv -> logits, cropped back to (H, W)

    Downsampling uses MedMamba's own patch merging rather than a strided conv: the encoder stays MedMamba's
    hierarchy module for module (and checkpoint key for key), it works channels-last like the blocks (no layout
    changes between stages), and it normalises before reducing. The price is that widths double per stage
    (checked). The LayerNorm on each skip (as VMamba's dense-prediction backbones add one per stage output) puts
    the un-normalised residual stream of the blocks on the scale of the decoder's features.

    Args:
        in_chans: input channels.
        out_chans: output channels (classes or regions); logits are returned.
        depths: SS-Conv-SSM blocks in each of the four stages ((2, 2, 2, 2)).
        dims: widths of the four stages, each even and twice the previous ((32, 64, 128, 256)); an int C means
            (C, 2C, 4C, 8C).
        d_state: SS2D state size (16, MedMamba's).
        drop_path_rate: stochastic depth of the SSM branches, rising linearly from 0 over all blocks to this
            (0.1, MedMamba's).
        deep_supervision: build 1x1 heads on the decoder outputs at strides 2, 4, 8 (`ds_heads`) and return a
            list of logits at strides `deep_supervision_strides` (full resolution first), as nnU-Net's loss
            expects; the attribute can be switched off later, the heads stay (strict checkpoint loading).
        pad_input: zero-pad inputs whose size is not a multiple of 16 and crop the logits back. With False such
            inputs raise a ValueError.
        scan_backend: selective-scan implementation ("auto", "cuda", "triton", "torch"), see
            `nnunet_segmamba.ssm.dispatch`.

    Shapes:
        x (B, in_chans, H, W) -> logits (B, out_chans, H, W); with deep supervision a list of four logits of
        sizes round(H / s) x round(W / s) for s in (1, 2, 4, 8) (nnU-Net's target sizes).

    Example:
        >>> net = MedMambaUNet(1, 3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
        >>> net(torch.randn(2, 1, 56, 40)).shape
        torch.Size([2, 3, 56, 40])
    """

    deep_supervision_strides = DEEP_SUPERVISION_STRIDES

    def __init__(self, in_chans: int, out_chans: int, depths: Sequence[int] = (2, 2, 2, 2),
                 dims: int | Sequence[int] = (32, 64, 128, 256), d_state: int = 16, drop_path_rate: float = 0.1,
                 deep_supervision: bool = False, pad_input: bool = True, scan_backend: str = "auto") -> None:
        super().__init__()
        if in_chans < 1 or out_chans < 1:
            raise ValueError(f"in_chans and out_chans must be positive, got {in_chans} and {out_chans}")
        depths = tuple(int(d) for d in depths)
        if len(depths) != NUM_STAGES or min(depths) < 1:
            raise ValueError(f"depths needs {NUM_STAGES} positive block counts, got {depths}")
        dims = [int(dims) * 2 ** i for i in range(NUM_STAGES)] if isinstance(dims, int) else [int(d) for d in dims]
        if len(dims) != NUM_STAGES or any(d < 2 or d % 2 for d in dims):
            raise ValueError(f"dims needs {NUM_STAGES} even widths (SS-Conv-SSM splits channels in halves), "
                             f"got {dims}")
        if any(dims[i + 1] != 2 * dims[i] for i in range(NUM_STAGES - 1)):
            raise ValueError(f"patch merging doubles the width at each stage, so dims must be (C, 2C, 4C, 8C); "
                             f"got {dims}")
        if d_state < 1:
            raise ValueError(f"d_state must be positive, got {d_state}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS}, got {scan_backend!r}")
        self.in_chans, self.out_chans, self.depths, self.dims = in_chans, out_chans, depths, dims
        self.pad_input = pad_input
        self.deep_supervision = deep_supervision

        # encoder: MedMamba's hierarchy with a 2x2 first patch
        self.encoder1 = ResidualConvBlock(2, in_chans, dims[0])
        self.patch_embed = PatchEmbed2D(patch_size=2, in_chans=in_chans, embed_dim=dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList(
            MedMambaLayer(dims[i], depths[i], rates[sum(depths[:i]):sum(depths[:i + 1])], d_state,
                          downsample=i < NUM_STAGES - 1, scan_backend=scan_backend)
            for i in range(NUM_STAGES)
        )
        self.skip_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        # MedMamba's init for its own modules; the conv decoder keeps PyTorch's defaults, as SegMamba's does
        for module in (self.patch_embed, self.layers, self.skip_norms):
            module.apply(_init_weights)

        # decoder: SegMamba's blocks in 2D
        self.decoder4 = UpBlock(2, dims[3], dims[2])
        self.decoder3 = UpBlock(2, dims[2], dims[1])
        self.decoder2 = UpBlock(2, dims[1], dims[0])
        self.decoder1 = UpBlock(2, dims[0], dims[0])
        self.out = OutBlock(2, dims[0], out_chans)
        if deep_supervision:  # on the decoder outputs at strides 2, 4, 8
            self.ds_heads = deep_supervision_heads(2, dims[:3], out_chans)

    def _check_input(self, x: torch.Tensor) -> None:
        check_unet_input(x, "MedMambaUNet", 2, self.in_chans, self.pad_input,
                         "on which the SS-Conv-SSM block's batch norm cannot train and the scan has nothing to scan")

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder. (B, in_chans, H, W), H and W multiples of 16 -> the skips at strides 1, 2, 4, 8, 16, each
        (B, C, H / s, W / s) channels-first, with C = dims[0], dims[0], dims[1], dims[2], dims[3]."""
        skips = [self.encoder1(x)]
        h = self.patch_embed(x)  # (B, H/2, W/2, dims[0])
        for layer, norm in zip(self.layers, self.skip_norms):
            for block in layer.blocks:
                h = block(h)
            skips.append(norm(h).permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None:
                h = layer.downsample(h)  # (B, H', W', C) -> (B, H'/2, W'/2, 2C)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        x, size = pad_to_multiple(x, TOTAL_STRIDE) if self.pad_input else (x, tuple(x.shape[2:]))
        s1, s2, s4, s8, s16 = self.forward_features(x)
        d8 = self.decoder4(s16, s8)
        d4 = self.decoder3(d8, s4)
        d2 = self.decoder2(d4, s2)
        d1 = self.decoder1(d2, s1)
        logits = crop_to(self.out(d1), size)
        if not (self.deep_supervision and hasattr(self, "ds_heads")):
            return logits
        return deep_supervision_outputs(logits, self.ds_heads, (d2, d4, d8), size)
