"""Building blocks shared by the 2D and 3D networks.

Module and attribute names mirror the SegMamba reference (which builds its conv blocks from MONAI's
UnetrBasicBlock / UnetrUpBlock / UnetOutBlock), so that the reference state_dict keys come out unchanged:
a conv wrapped as `<name>.conv`, InstanceNorm without affine parameters, no BatchNorm.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import TriOrientedMamba
from ..nn.recompute import CheckpointPolicy, recomputes, selective_checkpoint, selective_checkpoint_contexts
from . import triton_input_conv
from .cpu_conv import conv3d as cpu_conv3d
from .cpu_conv import takes_cpu_path

# Both U-Nets (SegMamba, MedMambaUNet) halve the size in each of four encoder stages: inputs are padded to, and
# nnU-Net's patch sizes rounded to, multiples of this.
TOTAL_STRIDE = 16
# The strides of the logits returned with deep supervision, full resolution first (nnU-Net's loss order).
DEEP_SUPERVISION_STRIDES = (1, 2, 4, 8)
# the channels-last memory format of a tensor of this many dimensions (2D and 3D feature maps)
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same arguments and parameters) whose float32 passes on the CPU take the fastest way measured
    there (`cpu_conv.conv3d`: oneDNN for every forward, the input's gradient as oneDNN's forward convolution with the
    mirrored kernel, 1 x 1 x 1 convolutions as matrix products), with torch's values and gradients; and whose
    convolutions of few-channel inputs on a GPU in half precision, in a channels-last network, run partly on Triton
    kernels (`triton_input_conv.conv3d`). torch.compile, autocast, training in channels-last and other devices take
    torch's path otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_cpu_path(x, self.padding_mode, self.padding):
            return cpu_conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if triton_input_conv.takes_triton_path(x, self):
            return triton_input_conv.conv3d(x, self.weight, self.bias, self.stride[0], self.padding[0])
        return super().forward(x)


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: Conv3d}[spatial_dims]


class _KeepsChannelsLast:
    """InstanceNorm whose output keeps a channels-last input's layout.

    torch's instance_norm normalises a contiguous (channels-first) copy of its input and returns a channels-first
    result. In a network run in channels_last, every norm would then flip the layout and the next convolution
    would copy it back, since cuDNN runs its half-precision convolutions channels-last (docs/performance.md,
    "Where the compiled step's time goes"). A channels-last input is normalised here in place of that: the same
    statistics (biased variance over the spatial dims, in float32), as one reduction and one pointwise pass that
    torch.compile fuses, with a backward written out (`_InstanceNormChannelsLast`) that keeps float32 copies of
    full-size gradients out of memory. Other inputs, and norms with running statistics, take torch's path
    unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = CHANNELS_LAST.get(x.dim())
        if (self.track_running_stats or channels_last is None or x.is_contiguous()
                or not x.is_contiguous(memory_format=channels_last)):
            return super().forward(x)
        return _InstanceNormChannelsLast.apply(x, self.weight if self.affine else None,
                                               self.bias if self.affine else None, self.eps)


class _InstanceNormChannelsLast(torch.autograd.Function):
    """Instance normalisation of a channels-last input (biased variance over the spatial dims, in float32, or
    float64 for a float64 input; the output in the input's dtype), with its backward written out.

    Autograd's backward of the float32 formula converts the incoming gradient to float32 and scales it by 1/std
    first; that full-size float32 product feeds both the backward's reductions and its pointwise, and
    torch.compile stores it in memory, in float32, where the gradient comes from a large fused expression (the
    residual blocks, whose gradient is shared by the main and the shortcut norm). Here every full-size term is
    read straight from the 16-bit gradient and input, converted inside the one expression that uses it:
    two reductions (sum(g) and sum(g * (x - mean))) and one pointwise pass with per-channel coefficients. The
    arithmetic is the same (float32); saved for the backward are the input and two float32 values per channel.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = tuple(range(2, x.dim()))
        precision = torch.promote_types(x.dtype, torch.float32)
        x_wide = x.to(precision)
        var, mean = torch.var_mean(x_wide, dim=dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        y = (x_wide - mean) * rstd
        if weight is not None:
            shape = (1, -1) + (1,) * len(dims)
            y = y * weight.to(precision).view(shape) + bias.to(precision).view(shape)
        ctx.save_for_backward(x, mean, rstd, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        n = math.prod(x.shape[2:])
        centred = x - mean  # in mean's precision by type promotion, computed where it is read
        sum_g = grad.sum(dims, keepdim=True, dtype=mean.dtype)
        sum_gc = (grad * centred).sum(dims, keepdim=True)  # = sum(g * xhat) / rstd
        scale = rstd if weight is None else rstd * weight.to(mean.dtype).view((1, -1) + (1,) * len(dims))
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)), xhat = centred * rstd
        grad_x = grad * scale - centred * (scale * rstd * rstd * sum_gc / n) - scale * sum_g / n
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = (sum_gc * rstd).sum(0).flatten().to(weight.dtype)
            grad_bias = sum_g.sum(0).flatten().to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, grad_bias, None


class InstanceNorm2dKeepingLayout(_KeepsChannelsLast, nn.InstanceNorm2d):
    """nn.InstanceNorm2d (same arguments, no state of its own) whose output keeps a channels-last input's layout."""


class InstanceNorm3dKeepingLayout(_KeepsChannelsLast, nn.InstanceNorm3d):
    """nn.InstanceNorm3d (same arguments, no state of its own) whose output keeps a channels-last input's layout."""


def instance_norm_nd(spatial_dims: int) -> type[nn.Module]:
    return {2: InstanceNorm2dKeepingLayout, 3: InstanceNorm3dKeepingLayout}[spatial_dims]


class _Wrapped(nn.Sequential):
    """A single conv stored under the name `conv` (MONAI's `Convolution`), for the reference key names."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.add_module("conv", conv)


class ResidualConvBlock(nn.Module):
    """conv3 -> IN -> LeakyReLU -> conv3 -> IN, plus (1-conv -> IN) shortcut when channels change; add, LeakyReLU.

    The reference's `UnetrBasicBlock(res_block=True)`; its state_dict prefix is `layer`. `recompute_activations`:
    see `_ResBlockLayer`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 recompute_activations: bool | None = False) -> None:
        super().__init__()
        self.layer = _ResBlockLayer(spatial_dims, in_channels, out_channels, recompute_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


_ATEN = torch.ops.aten
# what a recomputed residual block keeps: the outputs of its 3x3 convolutions and the norms' statistics
_KEPT_BY_RECOMPUTED_BLOCKS = (_ATEN.var_mean.correction, _ATEN.rsqrt.default)
# the operators that compute a Conv3d's output (each with the weight as its second argument): torch's, the CPU
# path's forward (`cpu_conv.forward`, oneDNN's) and the GPU's op for a few-channel input (`triton_input_conv`)
_CONVOLUTIONS = (_ATEN.convolution.default, _ATEN.mkldnn_convolution.default,
                 torch.ops.nnunet_segmamba.input_conv3d.default)


def _keep_3x3_convolutions(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    # A 3x3 convolution is the costly part of a residual block, and its output is needed for its norm's backward
    # anyway. Recomputed: the norm + LeakyReLU outputs (the next convolution's input, kept otherwise next to the
    # convolution output it is made from, pointwise) and the 1x1 shortcut convolution with its norm (cheap).
    if func in _CONVOLUTIONS and any(k > 1 for k in args[1].shape[2:]):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.MUST_SAVE if func in _KEPT_BY_RECOMPUTED_BLOCKS else CheckpointPolicy.PREFER_RECOMPUTE


_RECOMPUTE_ALL_BUT_3X3_CONVOLUTIONS = selective_checkpoint_contexts(_keep_3x3_convolutions)


class _ResBlockLayer(nn.Module):
    """The residual block's layers.

    recompute_activations: when gradients are recorded, keep only the 3x3 convolutions' outputs (and the norms'
        statistics) for the backward pass and recompute the rest there, by selective activation checkpointing:
        at full resolution, half of the block's activations for pointwise work and a 1x1 convolution.
        None: on for CUDA inputs. The same values and gradients either way.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 recompute_activations: bool | None = False) -> None:
        super().__init__()
        Conv, Norm = conv_nd(spatial_dims), instance_norm_nd(spatial_dims)
        self.conv1 = _Wrapped(Conv(in_channels, out_channels, 3, padding=1, bias=False))
        self.conv2 = _Wrapped(Conv(out_channels, out_channels, 3, padding=1, bias=False))
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)
        self.norm1, self.norm2 = Norm(out_channels), Norm(out_channels)
        if in_channels != out_channels:
            self.conv3 = _Wrapped(Conv(in_channels, out_channels, 1, bias=False))
            self.norm3 = Norm(out_channels)
        self.recompute_activations = recompute_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recomputes(self.recompute_activations, x):  # no in-place ops in a checkpointed region
            return selective_checkpoint(self._layers, x, False, context_fn=_RECOMPUTE_ALL_BUT_3X3_CONVOLUTIONS)
        return self._layers(x, self.lrelu.inplace)

    def _layers(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        def lrelu(t: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(t, self.lrelu.negative_slope, inplace=inplace)

        out = lrelu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        residual = self.norm3(self.conv3(x)) if hasattr(self, "conv3") else x
        return lrelu(out + residual)


class UpBlock(nn.Module):
    """Transposed conv (k2 s2, no bias) -> concat [upsampled, skip] -> ResidualConvBlock (2C -> C).

    The reference's `UnetrUpBlock`; keys `transp_conv.conv.weight` and `conv_block.*`.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 recompute_activations: bool | None = False) -> None:
        super().__init__()
        ConvT = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
        self.transp_conv = _Wrapped(ConvT(in_channels, out_channels, 2, stride=2, bias=False))
        self.conv_block = _ResBlockLayer(spatial_dims, 2 * out_channels, out_channels, recompute_activations)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.transp_conv(x), skip], dim=1))


class OutBlock(nn.Module):
    """1-conv with bias to the output channels (the reference's `UnetOutBlock`; keys `conv.conv.*`)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _Wrapped(conv_nd(spatial_dims)(in_channels, out_channels, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GSC(nn.Module):
    """Gated spatial convolution: two 3-conv paths and a 1-conv path, merged by a 1-conv, plus the input.

    The paper's figure multiplies the two paths; the published code (and so this module) adds them.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        Conv, Norm = conv_nd(spatial_dims), instance_norm_nd(spatial_dims)
        self.proj, self.norm = Conv(channels, channels, 3, 1, 1), Norm(channels)
        self.nonliner = nn.ReLU()
        self.proj2, self.norm2 = Conv(channels, channels, 3, 1, 1), Norm(channels)
        self.nonliner2 = nn.ReLU()
        self.proj3, self.norm3 = Conv(channels, channels, 1, 1, 0), Norm(channels)
        self.nonliner3 = nn.ReLU()
        self.proj4, self.norm4 = Conv(channels, channels, 1, 1, 0), Norm(channels)
        self.nonliner4 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.nonliner(self.norm(self.proj(x)))
        x1 = self.nonliner2(self.norm2(self.proj2(x1)))
        x2 = self.nonliner3(self.norm3(self.proj3(x)))
        return self.nonliner4(self.norm4(self.proj4(x1 + x2))) + x


class MlpChannel(nn.Module):
    """1-conv C -> 2C, GELU, 1-conv 2C -> C (the skip-path MLP of the reference)."""

    def __init__(self, spatial_dims: int, channels: int, hidden: int) -> None:
        super().__init__()
        Conv = conv_nd(spatial_dims)
        self.fc1, self.act, self.fc2 = Conv(channels, hidden, 1), nn.GELU(), Conv(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, L, C), raster order with the last axis fastest."""
    return x.flatten(2).transpose(1, 2)


class MambaLayer(nn.Module):
    """The published SegMamba layer: x + ToM(LayerNorm(flatten(x))), on the whole feature map as one sequence.

    The inter-slice direction uses `num_slices` when given, else the first spatial size of the input (the depth
    D in 3D; in 2D the height H, which makes it the column-major order).
    """

    def __init__(self, dim: int, directions: tuple[str, ...], num_slices: int | None = None,
                 dt_init_all_branches: bool = False, scan_backend: str = "auto",
                 recompute_branches: bool | None = False, stack_directions: bool | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = TriOrientedMamba(dim, d_state=16, d_conv=4, expand=2, directions=directions,
                                      dt_init_all_branches=dt_init_all_branches, scan_backend=scan_backend,
                                      recompute_branches=recompute_branches, stack_directions=stack_directions)
        self.num_slices = num_slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_slices = self.num_slices if self.num_slices is not None else x.shape[2]
        y = self.mamba(self.norm(_flatten_tokens(x)), num_slices=num_slices)
        return y.transpose(1, 2).reshape(x.shape) + x


class MambaLayerV1(nn.Module):
    """The seed paper's (arXiv v1) block: z = Mamba(LN(z)) + z; z = MLP(LN(z)) + z, MLP ratio 4, GELU.

    Not in the published code; offered for the ablation (`SegMamba(block="v1")`).
    """

    def __init__(self, dim: int, directions: tuple[str, ...], num_slices: int | None = None,
                 dt_init_all_branches: bool = False, scan_backend: str = "auto",
                 recompute_branches: bool | None = False, stack_directions: bool | None = None,
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = TriOrientedMamba(dim, directions=directions, dt_init_all_branches=dt_init_all_branches,
                                      scan_backend=scan_backend, recompute_branches=recompute_branches,
                                      stack_directions=stack_directions)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.num_slices = num_slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_slices = self.num_slices if self.num_slices is not None else x.shape[2]
        z = _flatten_tokens(x)
        z = self.mamba(self.norm(z), num_slices=num_slices) + z
        z = self.mlp(self.norm2(z)) + z
        return z.transpose(1, 2).reshape(x.shape)


def one_channel_in_layout_of(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, C, *spatial) as a channels-last view if it has one channel and `weight` (a convolution's, with more
    than one input channel) is channels-last; otherwise x itself.

    One channel lies in memory the same way channels-first and channels-last, and torch reads such strides as
    channels-first. In a network whose weights are channels-last, a convolution on x then runs channels-first
    wherever its own weight is ambiguous too (a 1x1x1 kernel from one channel, SegMamba's first shortcut): its
    output comes out channels-first, and so do its norm and the norm's sum with the channels-last main path; under
    torch.compile cuDNN also converts the first block's full-resolution outputs and gradients between the layouts
    (docs/performance.md, "One input channel"). The view changes only the stride of the size-1 channel axis: no copy.
    """
    memory_format = CHANNELS_LAST.get(x.dim())
    if (memory_format is None or x.shape[1] != 1 or weight.dim() != x.dim() or weight.shape[1] < 2
            or weight.is_contiguous() or not weight.is_contiguous(memory_format=memory_format)):
        return x
    return x.squeeze(1).unsqueeze(-1).movedim(-1, 1)  # strides (S, 1, *spatial strides): channels-last


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of (B, C, *spatial) at their ends up to a multiple; returns the original size."""
    size = tuple(x.shape[2:])
    pad = []
    for s in reversed(size):  # F.pad lists the last axis first
        pad += [0, (-s) % multiple]
    return (F.pad(x, pad) if any(pad) else x), size


def crop_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


def check_unet_input(x: torch.Tensor, network: str, spatial_dims: int, in_chans: int, pad_input: bool,
                     deepest_stage_needs: str) -> tuple[int, ...]:
    """The input checks both U-Nets share; returns the spatial size. Each error names the input and the fix.

    `deepest_stage_needs` says, for the too-small error, what a single voxel at stride 16 breaks.
    """
    axes = "D, H, W" if spatial_dims == 3 else "H, W"
    if x.dim() != spatial_dims + 2:
        raise ValueError(f"{network} ({spatial_dims}D) expects a (B, C, {axes}) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"input has {x.shape[1]} channels but the network was built with in_chans={in_chans}")
    size = tuple(x.shape[2:])
    if min(size) < 1:
        raise ValueError(f"empty spatial size {size}")
    if not pad_input and any(s % TOTAL_STRIDE for s in size):
        raise ValueError(f"spatial size {size} is not a multiple of the total stride {TOTAL_STRIDE}; every one of "
                         f"the four stages halves it. Use a patch size divisible by {TOTAL_STRIDE} or pad_input=True")
    padded = [s + (-s) % TOTAL_STRIDE for s in size]
    if math.prod(padded) // TOTAL_STRIDE ** spatial_dims < 2:
        unit = "voxel" if spatial_dims == 3 else "pixel"
        raise ValueError(f"spatial size {size} is too small: the deepest stage (stride {TOTAL_STRIDE}) would hold a "
                         f"single {unit}, {deepest_stage_needs}. Use at least {2 * TOTAL_STRIDE} {unit}s along "
                         f"one axis")
    return size


def deep_supervision_heads(spatial_dims: int, channels: Sequence[int], out_chans: int) -> nn.ModuleList:
    """1x1 output heads on the decoder features at strides 2, 4, 8 (`channels` in that order)."""
    return nn.ModuleList(OutBlock(spatial_dims, c, out_chans) for c in channels)


def deep_supervision_outputs(logits: torch.Tensor, heads: nn.ModuleList, features: Sequence[torch.Tensor],
                             size: Sequence[int]) -> list[torch.Tensor]:
    """[logits] + each head on its decoder feature (strides 2, 4, 8), cropped to the target sizes nnU-Net makes:
    round(size / stride) (batchgeneratorsv2's downsampling of the segmentation)."""
    return [logits] + [crop_to(head(d), tuple(round(s / stride) for s in size))
                       for head, d, stride in zip(heads, features, DEEP_SUPERVISION_STRIDES[1:])]
