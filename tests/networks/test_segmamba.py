"""SegMamba: reference keys and sizes, shapes for nnU-Net patch sizes, options, gradients, errors."""
import math

import pytest
import torch

from nnunet_segmamba.benchmark import memory_held_by
from nnunet_segmamba.networks import SegMamba
from nnunet_segmamba.networks.blocks import CHANNELS_LAST, _ResBlockLayer
from nnunet_segmamba.networks.segmamba import MIXERS

TINY = dict(feat_size=(4, 8, 16, 32), hidden_size=32, depths=(1, 1, 1, 1))


def reference_state_dict_shapes(cin: int, cout: int, feat=(48, 96, 192, 384), hidden=768, depths=(2, 2, 2, 2)):
    """The reference's state_dict keys and shapes, written out from the spec (shared/spec/segmamba.md)."""
    shapes = {}
    shapes["vit.downsample_layers.0.0.weight"] = (feat[0], cin, 7, 7, 7)
    shapes["vit.downsample_layers.0.0.bias"] = (feat[0],)
    for i in range(1, 4):
        shapes[f"vit.downsample_layers.{i}.1.weight"] = (feat[i], feat[i - 1], 2, 2, 2)
        shapes[f"vit.downsample_layers.{i}.1.bias"] = (feat[i],)
    for i in range(4):
        d = feat[i]
        d_inner, dt_rank = 2 * d, math.ceil(d / 16)
        for j in range(depths[i]):
            p = f"vit.stages.{i}.{j}."
            shapes[p + "norm.weight"] = shapes[p + "norm.bias"] = (d,)
            m = p + "mamba."
            shapes[m + "in_proj.weight"] = (2 * d_inner, d)
            shapes[m + "out_proj.weight"] = (d, d_inner)
            for s in ("", "_b", "_s"):
                shapes[m + f"A{s}_log"] = (d_inner, 16)
                shapes[m + f"D{s}"] = (d_inner,)
                shapes[m + f"conv1d{s}.weight"] = (d_inner, 1, 4)
                shapes[m + f"conv1d{s}.bias"] = (d_inner,)
                shapes[m + f"x_proj{s}.weight"] = (dt_rank + 32, d_inner)
                shapes[m + f"dt_proj{s}.weight"] = (d_inner, dt_rank)
                shapes[m + f"dt_proj{s}.bias"] = (d_inner,)
        for k, ks in (("proj", 3), ("proj2", 3), ("proj3", 1), ("proj4", 1)):
            shapes[f"vit.gscs.{i}.{k}.weight"] = (d, d, ks, ks, ks)
            shapes[f"vit.gscs.{i}.{k}.bias"] = (d,)
        shapes[f"vit.mlps.{i}.fc1.weight"] = (2 * d, d, 1, 1, 1)
        shapes[f"vit.mlps.{i}.fc1.bias"] = (2 * d,)
        shapes[f"vit.mlps.{i}.fc2.weight"] = (d, 2 * d, 1, 1, 1)
        shapes[f"vit.mlps.{i}.fc2.bias"] = (d,)

    def res_block(prefix, cin_, cout_):
        shapes[prefix + "conv1.conv.weight"] = (cout_, cin_, 3, 3, 3)
        shapes[prefix + "conv2.conv.weight"] = (cout_, cout_, 3, 3, 3)
        if cin_ != cout_:
            shapes[prefix + "conv3.conv.weight"] = (cout_, cin_, 1, 1, 1)

    chans = [cin, feat[0], feat[1], feat[2], feat[3], hidden]
    for k in range(1, 6):
        res_block(f"encoder{k}.layer.", chans[k - 1], chans[k])
    ups = {5: (hidden, feat[3]), 4: (feat[3], feat[2]), 3: (feat[2], feat[1]), 2: (feat[1], feat[0])}
    for k, (a, b) in ups.items():
        shapes[f"decoder{k}.transp_conv.conv.weight"] = (a, b, 2, 2, 2)
        res_block(f"decoder{k}.conv_block.", 2 * b, b)
    res_block("decoder1.layer.", feat[0], feat[0])
    shapes["out.conv.conv.weight"] = (cout, feat[0], 1, 1, 1)
    shapes["out.conv.conv.bias"] = (cout,)
    return shapes


def test_reference_keys_shapes_and_parameter_count():
    net = SegMamba(4, 4)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == reference_state_dict_shapes(4, 4)
    assert len(got) == 291
    assert sum(p.numel() for p in net.parameters()) == 67_416_196


def test_reference_state_dict_loads_strictly_into_any_option_that_keeps_the_architecture():
    reference = SegMamba(4, 4).state_dict()
    for kwargs in (dict(num_slices=(64, 32, 16, 8)), dict(dt_init_all_branches=True), dict(gradient_checkpointing=True),
                   dict(recompute_mamba_branches=True)):
        SegMamba(4, 4, **kwargs).load_state_dict(reference, strict=True)


@pytest.mark.parametrize("size", [(32, 32, 32), (40, 56, 40), (48, 64, 32)])
def test_output_shape_and_dtype_3d(size):
    torch.manual_seed(0)
    net = SegMamba(2, 3, **TINY).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 2, *size))
    assert y.shape == (1, 3, *size) and y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(64, 64), (56, 40), (33, 17)])
def test_output_shape_2d(size):
    torch.manual_seed(0)
    net = SegMamba(1, 5, spatial_dims=2, **TINY).eval()
    with torch.no_grad():
        y = net(torch.randn(2, 1, *size))
    assert y.shape == (2, 5, *size) and torch.isfinite(y).all()


def test_deep_supervision_outputs_match_nnunet_target_sizes():
    net = SegMamba(1, 3, deep_supervision=True, **TINY)
    outs = net(torch.randn(1, 1, 40, 56, 40))
    assert [tuple(o.shape[2:]) for o in outs] == [(40, 56, 40), (20, 28, 20), (10, 14, 10), (5, 7, 5)]
    net.deep_supervision = False  # what nnU-Net does for validation: heads stay, a single output comes back
    assert net(torch.randn(1, 1, 40, 56, 40)).shape == (1, 3, 40, 56, 40)
    assert any(k.startswith("ds_heads.") for k in net.state_dict())


def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    net = SegMamba(1, 2, **TINY).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def test_reference_num_slices_equal_true_depth_for_a_128_voxel_first_axis():
    torch.manual_seed(0)
    net = SegMamba(1, 2, **TINY).eval()
    ref = SegMamba(1, 2, num_slices=(64, 32, 16, 8), **TINY).eval()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 128, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
        # for another depth the reference's fixed counts reorder differently, so the outputs differ
        x = torch.randn(1, 1, 64, 32, 16)
        assert not torch.allclose(net(x), ref(x))


# configurations the trainers use: nnUNetTrainerSegMamba (DS), ...CE (no DS), ...NoMamba, 2D, and the options
TRAINER_CONFIGS = [
    dict(deep_supervision=True),
    dict(deep_supervision=False),
    dict(deep_supervision=True, mixer="none"),
    dict(deep_supervision=True, mixer="forward"),
    dict(deep_supervision=True, spatial_dims=2),
    dict(deep_supervision=False, block="v1"),
    dict(deep_supervision=True, gradient_checkpointing=True),
]


@pytest.mark.parametrize("config", TRAINER_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_parameter_receives_a_gradient(config):
    torch.manual_seed(0)
    spatial = (24, 40) if config.get("spatial_dims") == 2 else (24, 40, 16)
    net = SegMamba(2, 3, **TINY, **config).train()
    outs = net(torch.randn(2, 2, *spatial))
    outs = outs if isinstance(outs, list) else [outs]
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_mixer_options_build_the_right_directions():
    for mixer, directions in MIXERS.items():
        net = SegMamba(1, 2, mixer=mixer, **TINY)
        keys = set(net.state_dict())
        assert ("vit.stages.0.0.mamba.A_b_log" in keys) == ("backward" in directions)
        assert ("vit.stages.0.0.mamba.A_s_log" in keys) == ("slice" in directions)
        assert ("vit.stages.0.0.mamba.A_log" in keys) == bool(directions)


def test_forward_mixer_layers_have_exactly_mamba_ssm_keys():
    net = SegMamba(1, 2, mixer="forward", **TINY)
    prefix = "vit.stages.1.0.mamba."
    keys = {k[len(prefix):] for k in net.state_dict() if k.startswith(prefix)}
    assert keys == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                    "dt_proj.bias", "A_log", "D", "out_proj.weight"}


@pytest.mark.parametrize("option", ["gradient_checkpointing", "recompute_mamba_branches", "recompute_conv_blocks"])
def test_recomputing_options_give_the_same_gradients(option):
    torch.manual_seed(0)
    plain = SegMamba(1, 2, recompute_mamba_branches=False, recompute_conv_blocks=False, **TINY)
    ckpt = SegMamba(1, 2, **{option: True}, **TINY)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 16, 16)
    for net in (plain, ckpt):
        net(x).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stacked_mamba_directions_give_the_same_gradients():
    """stack_mamba_directions=True on the CPU, where the default runs a branch at a time: the same output and
    gradients, in float64 (in float32 the stacked layers' merged delta projection rounds otherwise than the CPU's two
    projections, and this small input amplifies that at the stem, 1e-4 of its gradient's scale)."""
    torch.manual_seed(0)
    plain = SegMamba(1, 2, **TINY).double()
    stacked = SegMamba(1, 2, stack_mamba_directions=True, **TINY).double()
    stacked.load_state_dict(plain.state_dict())
    assert {m.stack_directions for m in stacked.modules() if hasattr(m, "stack_directions")} == {True}
    x = torch.randn(1, 1, 32, 16, 16, dtype=torch.float64)
    outs = [net(x) for net in (plain, stacked)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for out in outs:
        out.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), stacked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12 * max(p.grad.abs().max().item(), 1.0),
                                   msg=name)


def test_mamba_branches_are_recomputed_by_default_on_cuda_only(monkeypatch):
    """recompute_mamba_branches=None (default): each layer recomputes its branches for CUDA inputs, not on the CPU,
    where it costs time; never with gradient_checkpointing, which recomputes whole stages."""
    from nnunet_segmamba.nn import mamba as mamba_module
    from nnunet_segmamba.nn import mamba_mixers

    def setting(**kwargs):
        return {mixer.recompute_branches for mixer in mamba_mixers(SegMamba(1, 2, **TINY, **kwargs))}

    assert setting() == {None} and setting(recompute_mamba_branches=True) == {True}
    assert setting(gradient_checkpointing=True) == setting(recompute_mamba_branches=False) == {False}

    checkpointed = []
    real_checkpoint = mamba_module.selective_checkpoint
    monkeypatch.setattr(mamba_module, "selective_checkpoint",
                        lambda *args, **kwargs: checkpointed.append(1) or real_checkpoint(*args, **kwargs))
    x = torch.randn(1, 1, 32, 16, 16)
    SegMamba(1, 2, **TINY)(x).sum().backward()
    assert not checkpointed  # None on the CPU: not recomputed
    SegMamba(1, 2, recompute_mamba_branches=True, **TINY)(x).sum().backward()
    assert checkpointed


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["channels-first", "channels-last"])
@pytest.mark.parametrize("in_channels", [4, 8], ids=["1x1-shortcut", "identity-shortcut"])
def test_recomputed_conv_blocks_give_the_same_values_from_less_memory(in_channels, channels_last, compiled):
    """recompute_activations=True: the block's output and gradients unchanged, while its forward holds 3 of the 5
    activation-sized tensors of the plain block with a 1x1 shortcut (its output, the two 3x3 convolutions'
    outputs; not the first norm's output nor the shortcut's), 3 of 4 without one. Compiled (AOTAutograd's partition,
    what the trainers run on a GPU) the same."""
    held, results = {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        block = _ResBlockLayer(3, in_channels, 8, recompute_activations=recompute)
        x = torch.randn(2, in_channels, 16, 16, 16)
        if channels_last:
            block, x = block.to(memory_format=torch.channels_last_3d), x.to(memory_format=torch.channels_last_3d)
        x.requires_grad_(True)
        run = torch.compile(block, backend="aot_eager", fullgraph=True) if compiled else block
        out, held[recompute] = memory_held_by(lambda: run(x), "cpu")
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results[recompute] = [out.detach(), x.grad] + [p.grad for p in block.parameters()]
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    activation = 2 * 8 * 16 ** 3 * 4
    assert held[False] >= (5 if in_channels != 8 else 4) * activation, held
    assert held[True] < 3.1 * activation, held


class _ForwardConvolutions(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the forward-convolution operators run, by kernel size (3 or 1)."""

    def __init__(self):
        super().__init__()
        self.counts = {3: 0, 1: 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.mkldnn_convolution.default):
            self.counts[args[1].shape[-1]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True], ids=["cpu-path", "torch-path"])
def test_recomputed_conv_blocks_keep_their_3x3_convolutions_on_every_path(channels_last):
    """The backward of a recomputing block runs the same 3x3 forward convolutions as the block that keeps every
    activation (none: the CPU path's input gradient at few channels is one) and recomputes only the 1x1 shortcut,
    whichever operator computed the convolutions: channels-first float32 on the CPU takes `cpu_conv` (oneDNN's
    operator, which the policy had missed, so the 3x3 convolutions were computed again), channels-last torch's."""
    runs = {}
    for recompute in (False, True):
        block = _ResBlockLayer(3, 4, 8, recompute_activations=recompute)
        x = torch.randn(2, 4, 8, 8, 8)
        if channels_last:
            block, x = block.to(memory_format=torch.channels_last_3d), x.to(memory_format=torch.channels_last_3d)
        out = block(x.requires_grad_(True))
        with _ForwardConvolutions() as counted:
            out.sum().backward()
        runs[recompute] = counted.counts
    assert runs[True][3] == runs[False][3]
    if channels_last:  # (the CPU path's 1x1 convolution is a matrix product)
        assert runs[True][1] == runs[False][1] + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recomputed_conv_blocks_match_on_cuda():
    """On a GPU (channels_last_3d, fp16 autocast, cuDNN), the default recomputation gives the outputs and gradients
    of the network that keeps every activation: the recomputed forward repeats the same kernels."""
    results = []
    for recompute in (False, None):
        torch.manual_seed(0)
        net = SegMamba(2, 3, recompute_conv_blocks=recompute, scan_backend="torch", **TINY).cuda()
        net = net.to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, 2, 32, 32, 32, device="cuda").to(memory_format=torch.channels_last_3d)
        with torch.autocast("cuda", dtype=torch.float16):
            out = net(x)
        # a sum, not a mean: gradients of order one, as GradScaler keeps them, not fp16's subnormals
        out.float().square().sum().backward()
        results.append([out.detach().float()] + [p.grad for p in net.parameters()])
    for got, want in zip(*results[::-1]):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_network_is_as_close_to_float64_as_eager_on_cuda():
    """Compiled by inductor under fp16 autocast in channels_last_3d (the trainers' layout), on the default scan
    backend, a small SegMamba's output and gradients are about as far from the float64 step as eager mode's (at most
    1.5x; gradients: the median over the parameters): both round, differently, so this, not compiled == eager, is
    "equal within fp16 rounding" (benchmarks/compiled_precision.py, which also leaves out the gradients that are
    exactly zero)."""
    from benchmarks.compiled_precision import precision_report

    report = precision_report(device="cuda", precision="fp16", channels_last=True)
    for what in ("output", "gradients_median"):
        errors = report[what]
        assert errors["compiled_vs_float64"] <= 1.5 * errors["eager_vs_float64"] + 1e-3, (what, errors)
    assert report["zero_gradient_tensors"]  # the conv biases before norms, left out


def test_conv_blocks_are_recomputed_by_default_on_cuda_only(monkeypatch):
    """recompute_conv_blocks=None (default): every residual block recomputes for CUDA inputs, not on the CPU."""
    from nnunet_segmamba.networks import blocks

    net = SegMamba(1, 2, **TINY)
    settings = {m.recompute_activations for m in net.modules() if isinstance(m, _ResBlockLayer)}
    assert settings == {None}
    assert {m.recompute_activations for m in SegMamba(1, 2, recompute_conv_blocks=False, **TINY).modules()
            if isinstance(m, _ResBlockLayer)} == {False}
    checkpointed = []
    real_checkpoint = blocks.selective_checkpoint
    monkeypatch.setattr(blocks, "selective_checkpoint",
                        lambda *args, **kwargs: checkpointed.append(1) or real_checkpoint(*args, **kwargs))
    x = torch.randn(1, 1, 32, 16, 16)
    net(x).sum().backward()
    assert not checkpointed  # None on the CPU: not recomputed
    SegMamba(1, 2, recompute_conv_blocks=True, **TINY)(x).sum().backward()
    assert len(checkpointed) == 10  # encoder1-5, decoder5-2's blocks, decoder1


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_instance_norm_keeps_a_channels_last_layout(spatial_dims, affine, dtype):
    """The networks' InstanceNorm: a channels-last input gives a channels-last output with torch's values and
    gradients of input, weight and bias (torch's own returns channels-first; its backward is written out, see
    `_InstanceNormChannelsLast`); a 16-bit input is normalised in float32 like torch's under autocast, a float64
    one (a float64 network's) in float64; a channels-first input takes torch's path exactly."""
    from nnunet_segmamba.networks.blocks import instance_norm_nd

    fmt = CHANNELS_LAST[spatial_dims + 2]
    g = torch.Generator().manual_seed(0)
    norm = instance_norm_nd(spatial_dims)(6, affine=affine)
    precision = torch.promote_types(dtype, torch.float32)
    norm = norm.to(precision)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    params = [p.detach().clone().requires_grad_(True) for p in (norm.weight, norm.bias)] if affine else [None, None]
    x = (torch.randn(2, 6, *[5, 7, 4][:spatial_dims], generator=g, dtype=precision) * 3 + 1).to(dtype)
    x_ref = x.to(precision).clone().requires_grad_(True)  # the reference in what the 16-bit norm computes in
    reference = torch.nn.functional.instance_norm(x_ref, weight=params[0], bias=params[1], eps=norm.eps)
    x_cl = x.to(memory_format=fmt).requires_grad_(True)
    y = norm(x_cl)
    assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous() and y.dtype == dtype
    tols = {torch.float32: (1e-5, 1e-5, 1e-4, 1e-5, 1e-4), torch.float64: (1e-12,) * 5}
    value_rtol, value_atol, grad_rtol, grad_atol, param_tol = tols.get(dtype, (1e-2, 2e-2, 1e-2, 2e-2, 1e-4))
    torch.testing.assert_close(y.to(precision), reference, rtol=value_rtol, atol=value_atol)
    dy = torch.randn(reference.shape, generator=g, dtype=precision).to(dtype)
    y.backward(dy)
    reference.backward(dy.to(precision))
    torch.testing.assert_close(x_cl.grad.to(precision), x_ref.grad, rtol=grad_rtol, atol=grad_atol)
    if affine:  # the parameters stay in at least float32; their gradients come from sums in that precision
        torch.testing.assert_close(norm.weight.grad, params[0].grad, rtol=param_tol, atol=param_tol)
        torch.testing.assert_close(norm.bias.grad, params[1].grad, rtol=param_tol, atol=param_tol)
    x = x.to(precision)
    assert torch.equal(norm(x), torch.nn.functional.instance_norm(x, weight=norm.weight, bias=norm.bias,
                                                                   eps=norm.eps))


def test_channels_last_segmamba_feeds_every_convolution_channels_last():
    """SegMamba (the paper's size) with weights and input in channels_last_3d: with convolutions that answer in
    channels-last, as cuDNN's half-precision ones do on a GPU, every convolution gets a channels-last input (with
    torch's InstanceNorm 42 of the 65 did not, each a layout copy on a GPU), and the output is the channels-first
    network's."""
    torch.manual_seed(0)
    net = SegMamba(4, 3, scan_backend="torch", deep_supervision=True).eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        expected = net(x)
    cl = torch.channels_last_3d
    net = net.to(memory_format=cl)
    inputs = []
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_pre_hook(lambda m, args: inputs.append(args[0].is_contiguous(memory_format=cl)))
            m.register_forward_hook(lambda m, args, out: out.contiguous(memory_format=cl))
    with torch.no_grad():
        out = net(x.to(memory_format=cl))
    assert len(inputs) == 65 and all(inputs)
    for head, expected_head in zip(out, expected, strict=True):
        torch.testing.assert_close(head, expected_head, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_channel_input_runs_channels_last_in_a_channels_last_network(spatial_dims):
    """A one-channel input is channels-first and channels-last at once, and torch reads it as channels-first: in a
    channels-last network its 1x1 shortcut convolution (whose weight is just as ambiguous) then answered
    channels-first, and so did that shortcut's norm. Every norm now gets a channels-last input, and the output is
    the channels-first network's; a channels-first network gets the input as it is."""
    torch.manual_seed(0)
    net = SegMamba(1, 3, spatial_dims=spatial_dims, scan_backend="torch", **TINY).eval()
    x = torch.randn((1, 1) + (32,) * spatial_dims)
    seen = []
    net.vit.downsample_layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        expected = net(x)
    assert seen[-1] is x
    cl = CHANNELS_LAST[spatial_dims + 2]
    net = net.to(memory_format=cl)
    layouts = []
    for m in net.modules():
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
            m.register_forward_pre_hook(
                lambda m, args: layouts.append(args[0].is_contiguous(memory_format=cl) and not args[0].is_contiguous()))
    with torch.no_grad():
        out = net(x)
    assert len(layouts) == 51 and all(layouts)  # the residual blocks', GSC's and the stages' norms
    assert seen[-1].stride(1) == 1 and seen[-1].data_ptr() == x.data_ptr()  # a view, channels-last
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_cpu_inference_of_one_small_sample_skips_torchs_slow_conv3d(monkeypatch):
    """The tiny networks' first stage (8 channels) predicting one 48^3 tile: torch alone picks its unvectorised
    slow_conv3d for it (batch x channels x depth x height <= 20480); the network's convolutions run through oneDNN
    with the same result, unless oneDNN is switched off."""
    from torch.profiler import profile

    from nnunet_segmamba.networks.blocks import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 48, 48, 48)
    with torch.no_grad():
        expected = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1)
        with profile() as run:
            out = conv(x)
    ops = {event.key for event in run.key_averages()}
    assert "aten::mkldnn_convolution" in ops and not any("slow_conv3d" in op for op in ops), ops
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with monkeypatch.context() as patch:  # oneDNN switched off by the user: torch's path
        patch.setattr(torch.backends.mkldnn, "enabled", False)
        with torch.no_grad(), profile() as run:
            conv(x)
    assert "aten::mkldnn_convolution" not in {event.key for event in run.key_averages()}
    net = SegMamba(1, 2, scan_backend="torch", feat_size=(8, 16, 32, 64), hidden_size=64, depths=(1, 1, 1, 1))
    assert all(type(m) is Conv3d for m in net.modules() if type(m) in (torch.nn.Conv3d, Conv3d))


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, padding, bias, input_grad", [
    (8, 8, 3, 1, 1, False, True),  # the residual blocks' 3-convs: the input's gradient as a mirrored convolution
    (5, 3, (3, 1, 3), 1, (1, 0, 0), True, True),  # anisotropic kernel and padding, bias
    (4, 8, 3, 1, 1, False, False),  # the network's first convolution: no gradient for the image
    (8, 3, 1, 1, 0, True, True),  # 1-convs (output heads, shortcuts, the GSC's): matrix products both ways
    (4, 6, 7, 2, 3, True, False),  # the stem: strided, torch's backward
    (6, 4, 2, 2, 0, False, True),  # the downsampling convolutions: strided, torch's backward for the input too
    (16, 12, 3, 1, 1, False, True),  # more than 8 channels either side: torch's backward
])
def test_cpu_convolutions_give_torchs_values_and_gradients(in_channels, out_channels, kernel, stride, padding,
                                                           bias, input_grad):
    """Every pass of the network's Conv3d on the CPU (`networks.cpu_conv`) against torch's own convolution:
    output and the gradients of input, weight and bias."""
    from torch.profiler import profile

    from nnunet_segmamba.networks.blocks import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=bias)
    x = torch.randn(2, in_channels, 10, 12, 14, requires_grad=input_grad)
    g = torch.randn_like(conv(x))
    results = []
    for forward in (lambda t: torch.nn.functional.conv3d(t, conv.weight, conv.bias, stride, padding), conv):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        with profile() as run:
            out = forward(x)
            out.backward(g)
        results.append([out, x.grad, conv.weight.grad, conv.bias.grad if bias else None])
    calls = {event.key: event.count for event in run.key_averages()}
    pointwise = kernel == 1
    mirrored = stride == 1 and input_grad and not pointwise and min(in_channels, out_channels) <= 8
    # oneDNN's forward convolution for the output, and again for the input's gradient where the kernel is mirrored
    assert calls.get("aten::mkldnn_convolution", 0) == (0 if pointwise else 1 + mirrored), calls
    assert ("aten::convolution_backward" in calls) != pointwise, calls  # the weight's gradient, where not a product
    for expected, actual in zip(*results):
        if expected is None:
            assert actual is None
        else:  # float32 sums of thousands of products in another order: within 1e-5 of the tensor's scale
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kwargs, x_shape, message", [
    (dict(), (1, 1, 32, 32), "expects a (B, C, D, H, W)"),
    (dict(), (1, 3, 32, 32, 32), "3 channels but the network was built with in_chans=1"),
    (dict(num_slices=(5, None, None, None)), (1, 1, 32, 32, 32), "num_slices[0]=5 does not divide"),
    (dict(pad_input=False), (1, 1, 40, 56, 40), "not a multiple of the total stride 16"),
    (dict(), (1, 1, 16, 12, 16), "deepest stage (stride 16) would hold a single voxel"),
])
def test_clear_errors_for_bad_input(kwargs, x_shape, message):
    net = SegMamba(1, 2, **TINY, **kwargs)
    with pytest.raises(ValueError) as err:
        net(torch.randn(*x_shape))
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mixer="bi"), "mixer must be one of"),
    (dict(block="v2"), "block must be one of"),
    (dict(spatial_dims=1), "spatial_dims must be 2 or 3"),
    (dict(feat_size=(8, 16, 32)), "four positive entries"),
    (dict(num_slices=(8, 4)), "one entry per stage"),
    (dict(gradient_checkpointing=True, recompute_mamba_branches=True), "set recompute_mamba_branches=False"),
])
def test_clear_errors_for_bad_arguments(kwargs, message):
    args = {**TINY, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SegMamba(1, 2, **args)
