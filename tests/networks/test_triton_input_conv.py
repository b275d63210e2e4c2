"""The few-channel input convolution's Triton kernels (`networks/triton_input_conv.py`) against torch's conv3d:
the forward and the weight's and bias's gradients, for the stem's, the residual block's and the shortcut's shapes,
with volumes smaller than the kernel, odd sizes and channels-first inputs.

On this CPU-only suite the kernels run under Triton's interpreter (`test_kernels_under_interpreter` runs the file's
interpreted tests again in subprocesses); the GPU test runs the same comparisons in half precision on CUDA.
"""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from nnunet_segmamba.networks import triton_input_conv
from nnunet_segmamba.ssm import triton_common

INTERPRETING = triton_common.interpreting()
interpreted = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 (test_kernels_under_interpreter "
                                                          "runs it)")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_common.TRITON_AVAILABLE),
                                reason="needs a CUDA device and triton")

# (channels, kernel size, stride, padding, bias, channels-last input, spatial size)
CASES = [(1, 3, 1, 1, False, True, (6, 5, 7)), (4, 3, 1, 1, False, True, (6, 5, 7)),
         (4, 7, 2, 3, True, True, (6, 5, 7)), (1, 7, 2, 3, True, False, (9, 4, 6)),
         (4, 1, 1, 0, False, True, (3, 5, 4)), (3, 3, 2, 1, True, False, (5, 6, 5))]


def compare(case, device: str, dtype: torch.dtype, tol: float) -> None:
    channels, size, stride, padding, with_bias, channels_last, spatial = case
    g = torch.Generator().manual_seed(sum(spatial) + 10 * channels + size)
    x = torch.randn(2, channels, *spatial, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    weight = torch.randn(5, channels, size, size, size, generator=g) * 0.3
    bias = torch.randn(5, generator=g) if with_bias else None
    w_ref = weight.double().requires_grad_()
    b_ref = bias.double().requires_grad_() if with_bias else None
    ref = F.conv3d(x.double(), w_ref, b_ref, stride, padding)
    dy = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad(ref, [w_ref] + ([b_ref] if with_bias else []), dy.double())

    x, dy = x.to(device, dtype), dy.to(device, dtype)
    weight, bias = weight.to(device), bias.to(device) if with_bias else None
    y = triton_input_conv.input_conv3d_forward(x, weight.to(dtype), bias.to(dtype) if with_bias else None, stride,
                                               padding)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    scale = ref.abs().max().item()
    assert (y.double().cpu() - ref).abs().max().item() <= tol * scale
    dw, db = triton_input_conv.input_conv3d_weight_gradient(dy, x, weight, stride, padding, with_bias)
    assert dw.shape == weight.shape and dw.dtype == weight.dtype
    assert (dw.double().cpu() - grads[0]).abs().max().item() <= tol * grads[0].abs().max().item()
    if with_bias:
        assert (db.double().cpu() - grads[1]).abs().max().item() <= tol * grads[1].abs().max().item()
    else:
        assert db is None


@interpreted
@pytest.mark.parametrize("case", CASES)
def test_interpreted_matches_conv3d(case, one_thread):
    compare(case, "cpu", torch.float32, 1e-5)


def test_kernels_under_interpreter(run_under_triton_interpreter):
    run_under_triton_interpreter(__file__, "interpreted", min_passed=len(CASES) + 5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_conv3d(case, dtype):
    compare(case, "cuda", dtype, 2e-2 if dtype == torch.bfloat16 else 4e-3)


@interpreted
@pytest.mark.parametrize("channels, size, stride, padding, with_bias", [(1, 7, 2, 3, True), (4, 3, 1, 1, False)],
                         ids=["one-channel-stem", "four-channel-block"])
def test_interpreted_op_gradients(channels, size, stride, padding, with_bias, one_thread):
    """The op through autograd (each pass on the kernel or on torch's, by channels), the input's gradient included,
    against F.conv3d in float64; and torch.library's checks of its fake function and autograd registration.

    The reference is float64 because oneDNN's float32 weight gradient (torch 2.14.1, oneDNN 3.12, on an AVX-512
    CPU) returns unwritten memory for a one-channel 7^3 kernel over a volume of about its size, the stem's case here
    (in float64 torch computes it without oneDNN)."""
    g = torch.Generator().manual_seed(channels + size)
    x = torch.randn(2, channels, 6, 5, 7, generator=g).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(5, channels, size, size, size, generator=g)
    bias = torch.randn(5, generator=g) if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
    ref_leaves = [t.double().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
    y = triton_input_conv.input_conv3d(leaves[0], leaves[1], leaves[2] if with_bias else None, stride, padding)
    ref = F.conv3d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, stride, padding)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)
    dy = torch.randn(ref.shape, generator=g)
    for got, want in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, ref_leaves, dy.double())):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4)
    torch.library.opcheck(triton_input_conv.input_conv3d, (leaves[0], leaves[1], leaves[2] if with_bias else None,
                                                           stride, padding))


@interpreted
def test_interpreted_op_without_input_gradient_or_bias(one_thread):
    """The network's input needs no gradient and the residual block's convolution has no bias: the backward op then
    returns two absent gradients, which must be distinct tensors (torch.compile rejects outputs that alias)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 6, 4, generator=g).to(memory_format=torch.channels_last_3d)
    weight = torch.randn(5, 4, 3, 3, 3, generator=g)
    dy = torch.randn(2, 5, 5, 6, 4, generator=g).to(memory_format=torch.channels_last_3d)
    dx, dw, db = triton_input_conv.input_conv3d_bwd(dy, x, weight, False, False, 1, 1)
    assert dx.numel() == 0 and db.numel() == 0 and dx is not db
    w_ref = weight.clone().requires_grad_()
    want, = torch.autograd.grad(F.conv3d(x, w_ref, None, 1, 1), w_ref, dy)
    torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-4)
    leaf = weight.clone().requires_grad_()
    got, = torch.autograd.grad(triton_input_conv.input_conv3d(x, leaf, None, 1, 1), leaf, dy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@interpreted
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_interpreted_recomputing_block_keeps_the_ops_3x3_output(compiled, one_thread, monkeypatch):
    """A residual block on a four-channel input with its two convolutions on the op, as on a GPU, recomputing its
    activations: the op's forward runs once for the 3^3 convolution, whose output the block keeps, and twice for the
    1x1x1 shortcut, which it recomputes (the policy had matched torch's convolution operator only, and so recomputed
    the 3^3 one too). Compiled: AOTAutograd's partition, as the trainers run it."""
    from nnunet_segmamba.networks import blocks

    calls = collections.Counter()
    kernel_forward = triton_input_conv.input_conv3d_forward

    def counted(x, weight, *args):
        calls[weight.shape[-1]] += 1
        return kernel_forward(x, weight, *args)

    monkeypatch.setattr(triton_input_conv, "input_conv3d_forward", counted)
    monkeypatch.setattr(triton_input_conv, "takes_triton_path", lambda x, conv: conv.in_channels <= 4)
    monkeypatch.setattr(blocks, "takes_cpu_path", lambda *args: False)
    torch.manual_seed(0)
    block = blocks._ResBlockLayer(3, 4, 8, recompute_activations=True).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 4, 6, 5, 7).to(memory_format=torch.channels_last_3d).requires_grad_(True)
    run = torch.compile(block, backend="aot_eager", fullgraph=True) if compiled else block
    run(x).sum().backward()
    assert calls == {3: 1, 1: 2}, calls


def test_routing_takes_half_precision_channels_last_cuda_convolutions_only():
    """`takes_triton_path` on the three convolutions of SegMamba's input: never on the CPU, nor channels-first, nor
    in float32 without autocast, nor from five input channels on."""
    conv = torch.nn.Conv3d(4, 8, 3, padding=1).to(memory_format=torch.channels_last_3d)
    x = torch.zeros(1, 4, 4, 4, 4)
    assert not triton_input_conv.takes_triton_path(x, conv)  # CPU
    if torch.cuda.is_available() and triton_common.TRITON_AVAILABLE:
        conv = conv.cuda()
        assert triton_input_conv.takes_triton_path(x.cuda().half(), conv)
        assert not triton_input_conv.takes_triton_path(x.cuda(), conv)
        with torch.autocast("cuda", dtype=torch.float16):
            assert triton_input_conv.takes_triton_path(x.cuda(), conv)
        assert not triton_input_conv.takes_triton_path(x.cuda().half(), conv.to(memory_format=torch.contiguous_format))
        wide = torch.nn.Conv3d(5, 8, 3, padding=1).cuda().to(memory_format=torch.channels_last_3d)
        assert not triton_input_conv.takes_triton_path(torch.zeros(1, 5, 4, 4, 4).cuda().half(), wide)


@pytest.mark.parametrize("channels_last", [True, False])
def test_one_channel_convolutions_are_routed_in_channels_last_networks_only(channels_last):
    """A one-channel input's convolutions (the stem, the first block's 3^3 and its 1x1x1 shortcut) count as in a
    channels-last network only where SegMamba views the input so, although their weights are channels-last
    contiguous either way; several input channels go by the weight, as before."""
    from nnunet_segmamba.networks.blocks import one_channel_in_layout_of
    from nnunet_segmamba.networks.segmamba import SegMamba

    net = SegMamba(1, 2, feat_size=(8, 16, 32, 64), hidden_size=64, depths=(1, 1, 1, 1))
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    x = one_channel_in_layout_of(torch.zeros(1, 1, 16, 16, 16), net.encoder2.layer.conv1.conv.weight)
    first_convs = [net.vit.downsample_layers[0][0], net.encoder1.layer.conv1.conv, net.encoder1.layer.conv3.conv]
    assert all(c.in_channels == 1 and c.weight.is_contiguous(memory_format=torch.channels_last_3d)
               for c in first_convs)
    assert all(triton_input_conv.in_channels_last_network(x, c.weight) == channels_last for c in first_convs)
    four = torch.nn.Conv3d(4, 8, 3)
    assert not triton_input_conv.in_channels_last_network(torch.zeros(1, 4, 4, 4, 4), four.weight)
    four = four.to(memory_format=torch.channels_last_3d)
    assert triton_input_conv.in_channels_last_network(torch.zeros(1, 4, 4, 4, 4), four.weight)


@pytest.mark.gpu
@needs_cuda
def test_segmamba_step_on_the_input_kernels_matches_cudnn(monkeypatch):
    """SegMamba channels-last under fp16 autocast, compiled without graph breaks: the output and the input
    convolutions' weight gradients with the Triton paths are as close to the float32 network's as cuDNN's alone
    (the routing switched off). Against each other the two fp16 paths differ by whole percents in the stem's weight
    gradient, a sum that cancels: rounding the float32 network's layer outputs to fp16 moves it as much."""
    from nnunet_segmamba.networks.blocks import one_channel_in_layout_of
    from nnunet_segmamba.networks.segmamba import SegMamba

    def step(autocast: bool):
        torch.manual_seed(0)
        model = SegMamba(1, 3, feat_size=(16, 32, 64, 128), hidden_size=128, depths=(1, 1, 1, 1)).cuda()
        model = model.to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, 1, 32, 32, 32, device="cuda")
        compiled = torch.compile(model, fullgraph=True) if autocast else model
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            out = compiled(x)
        # summed, not averaged: a mean's gradients reach the input convolutions at about 1e-7, below fp16's normal
        # range (the trainers' GradScaler scales the loss for the same reason)
        out.float().square().sum().backward()
        torch._dynamo.reset()
        # which of the three convolutions on the input took the Triton op, as the network views the input
        view = one_channel_in_layout_of(x, model.encoder2.layer.conv1.conv.weight)
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            routed_convs = sum(triton_input_conv.takes_triton_path(view, conv) for conv in (
                model.vit.downsample_layers[0][0], model.encoder1.layer.conv1.conv, model.encoder1.layer.conv3.conv))
        return routed_convs, {"output": out.float(),
                              "stem weight gradient": model.vit.downsample_layers[0][0].weight.grad,
                              "block weight gradient": model.encoder1.layer.conv1.conv.weight.grad}

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _, reference = step(autocast=False)
    routed_convs, routed = step(autocast=True)
    monkeypatch.setattr(triton_input_conv, "FORWARD_MAX_CHANNELS", 0)
    monkeypatch.setattr(triton_input_conv, "WEIGHT_GRADIENT_MAX_CHANNELS", 0)
    cudnn_routed_convs, cudnn = step(autocast=True)
    assert (routed_convs, cudnn_routed_convs) == (3, 0)
    for name, want in reference.items():
        error, cudnn_error = ((got[name] - want).abs().max().item() for got in (routed, cudnn))
        scale = want.abs().max().item()
        assert error <= 2 * cudnn_error + 1e-3 * scale, f"{name}: max error {error:.3g}, cuDNN's {cudnn_error:.3g}"


@pytest.mark.parametrize("channels, size", [(1, 7), (4, 7), (1, 3), (4, 3), (4, 1), (3, 3)])
@pytest.mark.parametrize("block_k", [16, 64, 128])
def test_weight_gradient_tiles_cover_every_column_once(channels, size, block_k):
    """The weight gradient's launch: tiles of a power of two columns (at least 16, for tl.dot, at most the setting
    where the kernel has more), as many as cover the kernel's size^3 x channels columns with no tile left empty."""
    tile, tiles = triton_input_conv.weight_gradient_tiles(channels, size, block_k)
    columns = size ** 3 * channels
    assert tile >= 16 and tile & (tile - 1) == 0
    assert tile <= block_k or tile == 16
    assert (tiles - 1) * tile < columns <= tiles * tile
