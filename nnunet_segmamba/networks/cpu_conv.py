"""The networks' 3D convolutions on the CPU in float32, each pass the fastest way measured on a 2-core CPU.

torch's own CPU path is slow in four places, most at the few channels of the demo's network (8 at its 48^3 patch;
docs/performance.md, "The 3D convolutions on the CPU", `benchmarks/bench_conv_cpu.py`):
- one sample below batch x channels x depth x height = 20480 runs through torch's unvectorised `slow_conv3d` (a
  threshold meant for 2D): an 8 -> 8 convolution of one 48^3 sample 50.9 ms instead of 3.8. Here every convolution
  with a kernel runs through oneDNN.
- a 1 x 1 x 1 convolution through oneDNN takes 1.9-12x a matrix product over the positions (an 8 -> 3 output head
  at 2 x 48^3: 2.1 against 0.3 ms forward; 48 -> 48 at 2 x 64^3: 117.9 against 63.6 ms). Here it is that
  product, both ways.
- at 8 channels or fewer on either side, oneDNN's backward-data kernel takes about three times its own forward
  convolution (8 -> 8 at 2 x 48^3: 30.0 against 11.2 ms), while from 16 channels on it takes about the forward's
  time. There the input's gradient is oneDNN's forward convolution of the output's gradient with the transposed,
  mirrored kernel: the same values (stride 1: the adjoint of a correlation is the correlation with the mirrored
  kernel).
- at those channel counts oneDNN's weight gradient takes 1.6-3.3x as long on channels-first operands
  as on channels-last copies of them, copies included (29.4 against 8.8 ms); here it gets the copies.
Everything else keeps torch's path: other devices and dtypes, autocast, torch.compile and training in channels-last
(which the CPU trainers do not use).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["conv3d", "forward", "has_mirrored_input_gradient", "input_gradient", "mirrored", "takes_cpu_path",
           "weight_gradient"]

# the channel count (input or output) up to which oneDNN's channels-first backward kernels are the slow ones
FEW_CHANNELS = 8


def _channels_first(t: torch.Tensor) -> bool:
    """Whether t has exactly a channels-first contiguous tensor's strides. is_contiguous() would also accept a
    one-channel input viewed channels-last, which torch's convolution answers in channels-last."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= size
    return t.stride() == tuple(reversed(strides))


def takes_cpu_path(x: torch.Tensor, padding_mode: str, padding) -> bool:
    """Whether a Conv3d call on x goes to `conv3d` below instead of torch's path: float32 on the CPU, not under
    torch.compile or autocast, not where oneDNN is missing or switched off (`torch.backends.mkldnn.enabled`)."""
    # is_compiling() first: dynamo refuses to trace torch.backends.mkldnn.is_available() (a graph break)
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and padding_mode == "zeros" and not isinstance(padding, str) and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu"))


def _is_pointwise(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], groups: int) -> bool:
    return groups == 1 and weight.shape[2:] == (1, 1, 1) and all(s == 1 for s in stride) and not any(padding)


def _few_channels(weight: torch.Tensor, groups: int) -> bool:
    return min(weight.shape[0], weight.shape[1] * groups) <= FEW_CHANNELS


def has_mirrored_input_gradient(weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether the convolution's input gradient is a forward convolution of its output's gradient (`mirrored`):
    stride 1, no dilation, no groups, at most kernel - 1 of padding."""
    return (groups == 1 and all(s == 1 for s in stride) and all(d == 1 for d in dilation)
            and all(p <= k - 1 for p, k in zip(padding, weight.shape[2:])))


def mirrored(weight: torch.Tensor, padding) -> tuple[torch.Tensor, list[int]]:
    """The kernel and padding of the forward convolution that takes a convolution's output gradient to its input
    gradient (where `has_mirrored_input_gradient`): the correlation with the transposed, mirrored kernel, padded so
    that the output has the input's size."""
    return weight.transpose(0, 1).flip(2, 3, 4), [k - 1 - p for p, k in zip(padding, weight.shape[2:])]


def forward(x, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """The convolution's output."""
    if _is_pointwise(weight, stride, padding, groups):
        # (batch, out, in) @ (batch, in, positions): one batched GEMM on views, no copies
        out = torch.bmm(weight.flatten(1).expand(x.shape[0], -1, -1), x.flatten(2))
        if bias is not None:
            out += bias[:, None]
        return out.view(x.shape[0], weight.shape[0], *x.shape[2:])
    return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)


def input_gradient(grad, x, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """The gradient of the convolution's input x from its output's gradient (contiguous)."""
    if _is_pointwise(weight, stride, padding, groups):
        return torch.bmm(weight.flatten(1).t().expand(x.shape[0], -1, -1), grad.flatten(2)).view_as(x)
    if _few_channels(weight, groups) and has_mirrored_input_gradient(weight, stride, padding, dilation, groups):
        kernel, kernel_padding = mirrored(weight, padding)
        return torch.mkldnn_convolution(grad, kernel, None, kernel_padding, [1, 1, 1], [1, 1, 1], 1)
    return torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0, 0],
                                               groups, [True, False, False])[0]


def weight_gradient(grad, x, weight, stride, padding, dilation, groups) -> torch.Tensor:
    """The gradient of the convolution's weight from its output's gradient (contiguous)."""
    if _is_pointwise(weight, stride, padding, groups):
        return torch.bmm(grad.flatten(2), x.flatten(2).transpose(1, 2)).sum(0).view_as(weight)
    if _few_channels(weight, groups):
        grad, x = (t.contiguous(memory_format=torch.channels_last_3d) for t in (grad, x))
    return torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, [0, 0, 0],
                                               groups, [False, True, False])[1]


class _Conv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.settings = stride, padding, dilation, groups
        return forward(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        return (input_gradient(grad, x, weight, *ctx.settings) if need_x else None,
                weight_gradient(grad, x, weight, *ctx.settings) if need_w else None,
                grad.sum((0, 2, 3, 4)) if need_b else None, None, None, None, None)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """F.conv3d's values and gradients for a float32 CPU input (`takes_cpu_path`), faster."""
    stride, padding, dilation = (list(v) for v in (stride, padding, dilation))
    if not (_channels_first(x) and _channels_first(weight)):
        if torch.is_grad_enabled():  # training in another layout: torch's path
            return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)  # oneDNN keeps it
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Conv3d.apply(x, weight, bias, stride, padding, dilation, groups)
    return forward(x, weight, bias, stride, padding, dilation, groups)
