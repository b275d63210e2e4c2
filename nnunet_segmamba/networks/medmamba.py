"""MedMamba: the SS-Conv-SSM classifier for 2D medical images.

Yue & Li, "MedMamba: Vision Mamba for Medical Image Classification", arXiv:2403.03849 (2024). The network is
VMamba's hierarchy (patch embedding, four stages of blocks joined by patch merging, average pool, linear head)
with the SS-Conv-SSM block: half of the channels go through a conv branch, the other half through VMamba's
2D selective scan (SS2D), and the halves are interleaved by a channel shuffle.

Module and parameter names follow the authors' code (`patch_embed.proj`, `layers.i.blocks.j.self_attention.
x_proj_weight`, `conv33conv33conv11.7`, `layers.i.downsample.reduction`, `head`, ...), so their released
checkpoints load with `strict=True`. Inside the network tensors are channels-last, (B, H, W, C).

The mixer, SS2D, and DropPath live in `nnunet_segmamba.nn` beside SegMamba's tri-orientated Mamba.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..nn import SS2D, DropPath

__all__ = [
    "channel_shuffle", "SSConvSSM", "PatchEmbed2D",
    "PatchMerging2D", "MedMamba", "medmamba_t", "medmamba_s", "medmamba_b", "VARIANTS",
]

# name -> (depths, dims of the first stage); the published sizes (paper, Table 1), not the code's own S and B lines
VARIANTS: dict[str, tuple[tuple[int, ...], int]] = {
    "t": ((2, 2, 4, 2), 96),
    "s": ((2, 2, 12, 2), 96),
    "b": ((2, 2, 16, 2), 128),
}


def channel_shuffle(x: torch.Tensor, groups: int, dim: int = -1) -> torch.Tensor:
    """ShuffleNet's channel shuffle along `dim`: split into `groups` groups and interleave them.

    With groups=2 and channels [a0, a1, ..., b0, b1, ...] the result is [a0, b0, a1, b1, ...]; output channel
    i comes from input channel (i % groups) * (C / groups) + i // groups.
    """
    dim = dim % x.dim()
    channels = x.shape[dim]
    if groups < 1 or channels % groups != 0:
        raise ValueError(f"groups={groups} must be a positive divisor of the channel count {channels}")
    shape = x.shape
    x = x.reshape(*shape[:dim], groups, channels // groups, *shape[dim + 1:])
    return x.transpose(dim, dim + 1).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# MedMamba blocks


class SSConvSSM(nn.Module):
    """MedMamba's SS-Conv-SSM block on (B, H, W, C), C even.

    left, right = channel halves; conv = conv33conv33conv11(left); ssm = DropPath(SS2D(ln_1(right)));
    return channel_shuffle(cat[conv, ssm], groups=2) + input, i.e. channels conv0, ssm0, conv1, ssm1, ...

    Args:
        hidden_dim: channels C (even).
        drop_path: stochastic-depth rate of the SSM branch.
        d_state: SS2D state size.
        attn_drop_rate: dropout after SS2D's out_proj.
        scan_backend: selective-scan implementation (`nnunet_segmamba.ssm.dispatch`).
    """

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, d_state: int = 16, attn_drop_rate: float = 0.0,
                 scan_backend: str = "auto") -> None:
        super().__init__()
        if hidden_dim < 2 or hidden_dim % 2 != 0:
            raise ValueError(f"hidden_dim must be even (it is split in two halves), got {hidden_dim}")
        half = hidden_dim // 2
        self.ln_1 = nn.LayerNorm(half)
        self.self_attention = SS2D(half, d_state=d_state, dropout=attn_drop_rate, scan_backend=scan_backend)
        self.drop_path = DropPath(drop_path)
        # indices 0..8 are state_dict names: BN 0, conv 1, BN 2, ReLU 3, conv 4, BN 5, ReLU 6, conv 7, ReLU 8
        self.conv33conv33conv11 = nn.Sequential(
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 3, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=-1)
        ssm = self.drop_path(self.self_attention(self.ln_1(right)))
        conv = self.conv33conv33conv11(left.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        return channel_shuffle(torch.cat([conv, ssm], dim=-1), groups=2) + x


class PatchEmbed2D(nn.Module):
    """Non-overlapping patches: Conv2d(k = s = patch_size) then LayerNorm. (B, C_in, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging2D(nn.Module):
    """Swin's patch merging: each 2x2 neighbourhood -> 4C channels -> LayerNorm -> Linear to 2C (no bias).
    (B, H, W, C) -> (B, H/2, W/2, 2C), H and W even."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class MedMambaLayer(nn.Module):
    """One stage: `depth` SS-Conv-SSM blocks (`blocks.j`), then an optional `downsample` patch merging."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], d_state: int, downsample: bool,
                 attn_drop_rate: float = 0.0, scan_backend: str = "auto") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SSConvSSM(dim, drop_path=drop_path[j], d_state=d_state, attn_drop_rate=attn_drop_rate,
                      scan_backend=scan_backend)
            for j in range(depth)
        )
        self.downsample = PatchMerging2D(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


# ---------------------------------------------------------------------------------------------------------------
# the classifier


class MedMamba(nn.Module):
    """MedMamba (Yue & Li, arXiv:2403.03849): a hierarchical SS-Conv-SSM image classifier.

    patch_embed (4x4 patches) -> stages of SS-Conv-SSM blocks, patch merging between stages (C, 2C, 4C, 8C)
    -> global average pool -> head. No final norm, no dropout before the head (as the reference).

    Args:
        in_chans: input channels (any; 1 for grayscale MedMNIST, 3 for RGB).
        num_classes: classes of the linear head (1000 for the published parameter counts).
        depths: blocks per stage ((2, 2, 4, 2) = MedMamba-T).
        dims: channels of the first stage (doubled at each stage), or one value per stage (each even).
        d_state: SS2D state size (16).
        drop_path_rate: stochastic depth of the SSM branches, rising linearly from 0 over all blocks to this (0.1).
        attn_drop_rate: dropout after each SS2D's out_proj (0).
        patch_size: side of the patch embedding (4).
        scan_backend: selective-scan implementation ("auto", "cuda", "triton", "torch"), see
            `nnunet_segmamba.ssm.dispatch`.

    Shapes:
        forward(x (B, in_chans, H, W)) -> logits (B, num_classes); H and W multiples of
        patch_size * 2 ** (len(depths) - 1) (32 for four stages).

    Example:
        >>> model = MedMamba(in_chans=1, num_classes=2, depths=(1, 1, 1, 1), dims=16)
        >>> model(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 2])
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (2, 2, 4, 2),
                 dims: int | Sequence[int] = 96, d_state: int = 16, drop_path_rate: float = 0.1,
                 attn_drop_rate: float = 0.0, patch_size: int = 4, scan_backend: str = "auto") -> None:
        super().__init__()
        depths = tuple(int(d) for d in depths)
        if not depths or min(depths) < 1:
            raise ValueError(f"depths must be a non-empty list of positive block counts, got {depths}")
        dims = [int(dims) * 2 ** i for i in range(len(depths))] if isinstance(dims, int) else [int(d) for d in dims]
        if len(dims) != len(depths) or any(d < 2 or d % 2 for d in dims):
            raise ValueError(f"dims must be one even int or one even int per stage ({len(depths)}), got {dims}")
        if in_chans < 1 or num_classes < 1 or patch_size < 1:
            raise ValueError(f"in_chans, num_classes and patch_size must be positive, got "
                             f"{in_chans}, {num_classes}, {patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        for i in range(len(dims) - 1):
            if dims[i + 1] != 2 * dims[i]:
                raise ValueError(f"patch merging doubles the channels, so dims[{i + 1}] must be 2 * dims[{i}]; "
                                 f"got {dims}")
        self.in_chans, self.num_classes, self.depths, self.dims = in_chans, num_classes, depths, dims
        self.size_multiple = patch_size * 2 ** (len(depths) - 1)

        self.patch_embed = PatchEmbed2D(patch_size, in_chans, dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(MedMambaLayer(dims[i], depth, rates[start:start + depth], d_state,
                                             downsample=i < len(depths) - 1, attn_drop_rate=attn_drop_rate,
                                             scan_backend=scan_backend))
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(_init_weights)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            fix_h, fix_w = max(m, round(h / m) * m), max(m, round(w / m) * m)
            raise ValueError(f"MedMamba needs an input side that is a multiple of {m}, got {h}x{w}; resize the "
                             f"images, e.g. to {fix_h}x{fix_w} (MedMNIST's 28x28 images: 32, 64 or 224)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> last-stage features (B, H/32, W/32, dims[-1]), channels-last."""
        self.check_input(x)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """The reference's init: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0), every Conv2d
    kaiming-normal (fan_out, relu) with the default bias. SS2D's stacked x_proj/dt/A/D are not modules and keep
    their own init."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _variant(name: str, **kwargs) -> MedMamba:
    depths, dims = VARIANTS[name]
    kwargs.setdefault("depths", depths)
    kwargs.setdefault("dims", dims)
    return MedMamba(**kwargs)


def medmamba_t(**kwargs) -> MedMamba:
    """MedMamba-T: depths (2, 2, 4, 2), dims 96 (15.2 M parameters with a 1000-class head)."""
    return _variant("t", **kwargs)


def medmamba_s(**kwargs) -> MedMamba:
    """MedMamba-S: depths (2, 2, 12, 2), dims 96 (23.5 M parameters with a 1000-class head)."""
    return _variant("s", **kwargs)


def medmamba_b(**kwargs) -> MedMamba:
    """MedMamba-B: depths (2, 2, 16, 2), dims 128 (48.1 M parameters with a 1000-class head)."""
    return _variant("b", **kwargs)
