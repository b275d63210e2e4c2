"""3D convolutions of an input with few channels (MRI's 1 to 4), on the GPU in Triton: the forward and the weight's
gradient as implicit GEMMs on the tensor cores.

cuDNN's fast channels-last half-precision kernels need the input channels in multiples of 8; below that it falls
back to kernels without shared memory, which take several times the convolutions' memory traffic (SegMamba's stem,
first residual block and its shortcut: about 4 ms of the 128^3 training step on an H100, docs/performance.md).
Padding the channels with zeros does not help: cuDNN's kernels for 8 channels take longer still. Here each program
multiplies a tile of the im2col matrix (output positions x (tap, channel)), gathered straight from the input (small
enough to stay in the L2 cache), with the weight on the tensor cores, accumulating in float32:

    y[m, f] = bias[f] + sum_k patch[m, k] w[k, f]        m: output position, k = ((kd * KS + kh) * KS + kw) * C + c
    dw[k, f] = sum_m patch[m, k] dy[m, f]                (per program over its run of positions; torch adds the
                                                          programs' float32 partial sums, so no atomics)

The forward walks the kernel's tap rows (kd, kh): in a channels-last input a row's KS x C columns lie next to each
other, so a position's row is one contiguous load (whole taps at 4 channels). The weight gradient instead gathers
tiles of BLOCK_K columns over all taps: its programs each own a tile of dw and sum over a run of positions, and
walking tap rows there made them read dy once per row (9x for a 3^3 kernel), which measured slower than cuDNN's.

The output is written channels-last, the layout of the network around it. The input's gradient is not computed
here (the network's input needs none); the op's backward hands it to torch.

`conv3d` runs one such convolution as the custom op `nnunet_segmamba::input_conv3d` (opaque to torch.compile, with
its backward registered): both passes on these kernels up to four input channels, where they measured faster than
cuDNN's on an H100 (docs/performance.md, "Triton kernels for the convolutions on the few-channel input"), the
input's gradient (when asked for) on cuDNN's. `blocks.Conv3d` sends a convolution there when
`takes_triton_path` says so: on CUDA in half precision (autocast's or the input's), in a channels-last network.

Triton is imported defensively (`triton_common`); the kernels run on CUDA tensors, or on CPU tensors under Triton's
interpreter, which is how CI checks their arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ssm.triton_common import TRITON_AVAILABLE, cdiv, jit, next_power_of_2, tl

__all__ = ["TUNING", "WEIGHT_GRADIENT_MAX_CHANNELS", "FORWARD_MAX_CHANNELS", "conv3d", "in_channels_last_network",
           "input_conv3d", "input_conv3d_forward", "input_conv3d_weight_gradient", "takes_triton_path"]

#: input channels up to which each pass runs on these kernels, the rest on cuDNN's (measured on one H100,
#: docs/performance.md: both passes faster at one and at four channels)
FORWARD_MAX_CHANNELS = 4
WEIGHT_GRADIENT_MAX_CHANNELS = 4
_NS = "nnunet_segmamba"

#: launch settings: output positions per program (per loop step of the weight gradient's programs), the weight
#: gradient's patch columns per program, warps, and the weight gradient's programs per multiprocessor (each sums over
#: a run of positions); the best or within 5 % of it in each case of the sweep on one H100 (bench_input_convs --tune)
TUNING = {"fwd_block_m": 128, "fwd_warps": 4, "wgrad_block_m": 64, "wgrad_block_k": 64, "wgrad_warps": 4,
          "wgrad_programs_per_sm": 4}

CL = torch.channels_last_3d


@jit
def _taps_inside(first, size, KS: tl.constexpr):
    """Bit t set where first + t lies in [0, size), for the kernel's taps t < KS along one axis."""
    lo = tl.maximum(-first, 0)
    hi = tl.minimum(size - first, KS)
    return tl.where(hi > lo, ((1 << hi) - 1) & ~((1 << lo) - 1), 0)


@jit
def _rows(m, M, D, H, W, Do, Ho, Wo, sxb, sxd, sxh, C: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
          PAD: tl.constexpr):
    """Per output position m: the input offset of its kernel's first tap, and per axis the bits of its taps inside
    the input (none past the last position)."""
    wo = m % Wo
    t = m // Wo
    ho = t % Ho
    t = t // Ho
    do = t % Do
    b = t // Do
    zi, yi, xi = do * STRIDE - PAD, ho * STRIDE - PAD, wo * STRIDE - PAD
    base = b * sxb + zi * sxd + yi * sxh + xi * C
    if (C & (C - 1)) == 0:  # a tap's C channels lie aligned to C elements: loads of whole taps
        base = tl.multiple_of(base, C)
    inside_z = tl.where(m < M, _taps_inside(zi, D, KS), 0)
    return base, inside_z, _taps_inside(yi, H, KS), _taps_inside(xi, W, KS)


@jit
def _row_columns(inside_x, C: tl.constexpr, KS: tl.constexpr, BLOCK_J: tl.constexpr):
    """The columns j = kw * C + c of one (kd, kh) tap row, which lie next to each other in a channels-last input,
    and where each position's are inside the input along the last axis (the same for every tap row)."""
    j = tl.arange(0, BLOCK_J)
    kw = tl.where(j < KS * C, j // C, 31)  # past the row: a bit no position has
    return j, ((inside_x[:, None] >> kw[None, :]) & 1) != 0


@jit
def _input_conv_fwd(x_ptr, w_ptr, bias_ptr, y_ptr, M, F, D, H, W, Do, Ho, Wo, sxb, sxd, sxh,
                    C: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
                    BLOCK_F: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    base, inside_z, inside_y, inside_x = _rows(m, M, D, H, W, Do, Ho, Wo, sxb, sxd, sxh, C, KS, STRIDE, PAD)
    j, inside_row = _row_columns(inside_x, C, KS, BLOCK_J)
    f = tl.arange(0, BLOCK_F)
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    for kd in range(KS):
        for kh in range(KS):
            inside = inside_row & ((((inside_z >> kd) & (inside_y >> kh) & 1) != 0)[:, None])
            a = tl.load(x_ptr + (base[:, None] + (kd * sxd + kh * sxh) + j[None, :]), mask=inside, other=0.0)
            # the weight's rows of this tap row, zero-padded to BLOCK_J x BLOCK_F on the host
            w = tl.load(w_ptr + ((kd * KS + kh) * BLOCK_J + j)[:, None] * BLOCK_F + f[None, :])
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + f, mask=f < F, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * F + f[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m < M)[:, None] & (f < F)[None, :])


@jit
def _patch_columns(x_ptr, base, inside_z, inside_y, inside_x, k, K, sxd, sxh, C: tl.constexpr, KS: tl.constexpr):
    """Columns k = ((kd * KS + kh) * KS + kw) * C + c of the positions' patches, gathered from a channels-last
    input (zero outside it and past K)."""
    c = k % C
    tap = k // C
    kw = tap % KS
    kh = (tap // KS) % KS
    kd = tl.where(k < K, tap // (KS * KS), 31)  # past K: a bit no position has
    column = kd * sxd + kh * sxh + kw * C + c
    inside = ((inside_z[:, None] >> kd[None, :]) & (inside_y[:, None] >> kh[None, :])
              & (inside_x[:, None] >> kw[None, :]) & 1) != 0
    return tl.load(x_ptr + (base[:, None] + column[None, :]), mask=inside, other=0.0)


@jit
def _input_conv_wgrad(x_ptr, dy_ptr, dw_ptr, dbias_ptr, M, K, F, D, H, W, Do, Ho, Wo, sxb, sxd, sxh,
                      BLOCKS_PER_PROGRAM, C: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
                      PAD: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    pk = tl.program_id(0)  # the tile of patch columns
    pm = tl.program_id(1)
    k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    f = tl.arange(0, BLOCK_F)
    acc = tl.zeros([BLOCK_K, BLOCK_F], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for i in range(0, BLOCKS_PER_PROGRAM):
        m = (pm * BLOCKS_PER_PROGRAM + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        base, inside_z, inside_y, inside_x = _rows(m, M, D, H, W, Do, Ho, Wo, sxb, sxd, sxh, C, KS, STRIDE, PAD)
        a = _patch_columns(x_ptr, base, inside_z, inside_y, inside_x, k, K, sxd, sxh, C, KS)
        g = tl.load(dy_ptr + m[:, None] * F + f[None, :], mask=(m < M)[:, None] & (f < F)[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), 0)
    tl.store(dw_ptr + (pm * K + k[:, None]) * F + f[None, :], acc, mask=(k < K)[:, None] & (f < F)[None, :])
    if HAS_BIAS:
        tl.store(dbias_ptr + pm * F + f, bias_acc, mask=(f < F) & (pk == 0))


def _geometry(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int):
    batch, channels, *spatial = x.shape
    size = weight.shape[2]
    out_spatial = [(s + 2 * padding - size) // stride + 1 for s in spatial]
    return batch, channels, spatial, size, out_spatial


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs (the interpreter's tests) exactly; half precision as cuDNN does, on the tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(channels: int, size: int, features: int) -> tuple[int, int]:
    """The forward's BLOCK_J (one tap row's columns, padded) and BLOCK_F (the output channels, padded), at least 16
    for tl.dot."""
    return max(16, next_power_of_2(size * channels)), max(16, next_power_of_2(features))


def input_conv3d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                         padding: int) -> torch.Tensor:
    """conv3d(x, weight, bias, stride, padding) (cubic kernel, same stride and padding on every axis, no groups or
    dilation) in x's dtype, laid out channels-last."""
    x = x.contiguous(memory_format=CL)
    batch, channels, (D, H, W), size, (Do, Ho, Wo) = _geometry(x, weight, stride, padding)
    features = weight.shape[0]
    block_j, block_f = _blocks(channels, size, features)
    # rows (kd, kh, kw * C + c), columns f, zero-padded to (size^2 x BLOCK_J) x BLOCK_F: the kernel loads it unmasked
    w = torch.zeros((size, size, block_j, block_f), device=x.device, dtype=x.dtype)
    w[:, :, :size * channels, :features] = weight.permute(2, 3, 4, 1, 0).reshape(size, size, size * channels, features)
    y = torch.empty((batch, features, Do, Ho, Wo), device=x.device, dtype=x.dtype, memory_format=CL)
    M = batch * Do * Ho * Wo
    block_m = TUNING["fwd_block_m"]
    _input_conv_fwd[(cdiv(M, block_m),)](
        x, w, bias if bias is not None else w, y, M, features, D, H, W, Do, Ho, Wo, x.stride(0), x.stride(2),
        x.stride(3), C=channels, KS=size, STRIDE=stride, PAD=padding, HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_F=block_f,
        num_warps=TUNING["fwd_warps"])
    return y


def weight_gradient_tiles(channels: int, size: int, block_k: int) -> tuple[int, int]:
    """The weight gradient's tile of patch columns for a cubic kernel of `size` over `channels` input channels, at
    most `block_k` (at least 16, for tl.dot), and how many tiles cover the size^3 x channels columns: one program
    each per run of positions."""
    columns = size ** 3 * channels
    block_k = min(block_k, max(16, next_power_of_2(columns)))
    return block_k, cdiv(columns, block_k)


def input_conv3d_weight_gradient(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                                 with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of `input_conv3d_forward`'s weight (in the weight's dtype and layout) and bias (None without)."""
    x = x.contiguous(memory_format=CL)
    dy = dy.contiguous(memory_format=CL)
    batch, channels, (D, H, W), size, (Do, Ho, Wo) = _geometry(x, weight, stride, padding)
    features = weight.shape[0]
    K = size ** 3 * channels
    M = batch * Do * Ho * Wo
    block_m = TUNING["wgrad_block_m"]
    block_k, k_tiles = weight_gradient_tiles(channels, size, TUNING["wgrad_block_k"])
    blocks = cdiv(M, block_m)
    if x.device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = max(1, TUNING["wgrad_programs_per_sm"] * sm_count // k_tiles)
    else:
        programs = 2
    per_program = cdiv(blocks, programs)
    programs = cdiv(blocks, per_program)
    parts = torch.empty((programs, K, features), device=x.device, dtype=torch.float32)
    bias_parts = torch.empty((programs, features), device=x.device, dtype=torch.float32) if with_bias else parts
    _input_conv_wgrad[(k_tiles, programs)](
        x, dy, parts, bias_parts, M, K, features, D, H, W, Do, Ho, Wo, x.stride(0), x.stride(2), x.stride(3),
        per_program, C=channels, KS=size, STRIDE=stride, PAD=padding, HAS_BIAS=with_bias,
        PRECISION=_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_F=_blocks(channels, size, features)[1],
        num_warps=TUNING["wgrad_warps"])
    dw = parts.sum(0).reshape(size, size, size, channels, features)
    dw = torch.empty_like(weight).copy_(dw.permute(4, 3, 0, 1, 2))  # in the weight's dtype and layout
    return dw, (bias_parts.sum(0).to(weight.dtype) if with_bias else None)


# ---- the op ------------------------------------------------------------------------------------------------------
def _output_shape(x: Tensor, weight: Tensor, stride: int, padding: int) -> tuple:
    batch, _, _, _, out_spatial = _geometry(x, weight, stride, padding)
    return (batch, weight.shape[0], *out_spatial)


def in_channels_last_network(x: Tensor, weight: Tensor) -> bool:
    """Whether a convolution of x with `weight` runs in a channels-last network: the weight channels-last and, for one
    input channel, x as such a network views it (`blocks.one_channel_in_layout_of`: the channel's stride 1). One
    channel lies in memory the same way in both layouts, so the weight alone would take a channels-first network's
    first convolutions for channels-last ones, whose outputs `conv3d` lays out channels-last."""
    return weight.is_contiguous(memory_format=CL) and (x.shape[1] > 1 or x.stride(1) == 1)


def takes_triton_path(x: Tensor, conv: nn.Conv3d) -> bool:
    """Whether `conv(x)` runs as `conv3d` below: x on CUDA in float16 / bfloat16 (autocast's or its own), at most
    FORWARD_MAX_CHANNELS or WEIGHT_GRADIENT_MAX_CHANNELS input channels, a cubic kernel with the same stride and
    padding on every axis, no groups or dilation, in a channels-last network (`in_channels_last_network`; the trainers'
    layout on one GPU), and offsets within int32."""
    most = max(FORWARD_MAX_CHANNELS, WEIGHT_GRADIENT_MAX_CHANNELS)
    if not (TRITON_AVAILABLE and x.is_cuda and x.dim() == 5 and conv.in_channels <= most):
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    size, stride, padding = conv.kernel_size, conv.stride, conv.padding
    return (dtype in (torch.float16, torch.bfloat16) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(padding, str) and tuple(conv.dilation) == (1, 1, 1) and len(set(size)) == 1
            and len(set(stride)) == 1 and len(set(padding)) == 1
            and in_channels_last_network(x, conv.weight)
            and x.numel() < 2 ** 31 and conv.out_channels * x.numel() // conv.in_channels < 2 ** 31)


def conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """F.conv3d(x, weight, bias, stride, padding) through `input_conv3d`, in autocast's dtype where it is on (as
    F.conv3d would cast), channels-last."""
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return input_conv3d(x, weight, bias, stride, padding)


@torch.library.custom_op(f"{_NS}::input_conv3d", mutates_args=())
def input_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """The convolution, channels-last: on the Triton kernel up to FORWARD_MAX_CHANNELS input channels, else cuDNN's."""
    if x.shape[1] <= FORWARD_MAX_CHANNELS:
        return input_conv3d_forward(x, weight, bias, stride, padding)
    with torch.no_grad():
        y = F.conv3d(x, weight, bias, stride, padding)
    return torch.empty_like(y, memory_format=CL).copy_(y) if not y.is_contiguous(memory_format=CL) else y


@input_conv3d.register_fake
def _(x, weight, bias, stride, padding):
    return torch.empty(_output_shape(x, weight, stride, padding), device=x.device, dtype=x.dtype, memory_format=CL)


@torch.library.custom_op(f"{_NS}::input_conv3d_bwd", mutates_args=())
def input_conv3d_bwd(dy: Tensor, x: Tensor, weight: Tensor, with_bias: bool, input_gradient: bool, stride: int,
                     padding: int) -> list[Tensor]:
    """Gradients of (x, weight, bias): the weight's and bias's on the Triton kernel up to
    WEIGHT_GRADIENT_MAX_CHANNELS input channels, x's (where asked for) and the rest on cuDNN's; empty where absent."""
    wanted = [input_gradient, x.shape[1] > WEIGHT_GRADIENT_MAX_CHANNELS, with_bias and
              x.shape[1] > WEIGHT_GRADIENT_MAX_CHANNELS]
    dx = dw = db = None
    if any(wanted):
        dx, dw, db = torch.ops.aten.convolution_backward(dy, x, weight, [weight.shape[0]] if with_bias else None,
                                                         [stride] * 3, [padding] * 3, [1] * 3, False, [0] * 3, 1,
                                                         wanted)
    if x.shape[1] <= WEIGHT_GRADIENT_MAX_CHANNELS:
        dw, db = input_conv3d_weight_gradient(dy, x, weight, stride, padding, with_bias)  # in the weight's layout
    else:
        dw = torch.empty_like(weight).copy_(dw)  # cuDNN's, in the weight's layout as the fake function says
    # a fresh empty tensor for each absent gradient: a custom op's outputs may not alias one another
    return [torch.empty_like(x).copy_(dx) if input_gradient else x.new_empty(0), dw,
            db.to(weight.dtype) if with_bias else x.new_empty(0)]


@input_conv3d_bwd.register_fake
def _(dy, x, weight, with_bias, input_gradient, stride, padding):
    return [torch.empty_like(x) if input_gradient else x.new_empty(0), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]) if with_bias else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.with_bias = bias is not None
    ctx.stride, ctx.padding = stride, padding


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    input_gradient = ctx.needs_input_grad[0]
    dx, dw, db = input_conv3d_bwd(dy, x, weight, ctx.with_bias, input_gradient, ctx.stride, ctx.padding)
    return dx if input_gradient else None, dw, db if ctx.with_bias else None, None, None


input_conv3d.register_autograd(_backward, setup_context=_setup_context)
