"""MedMamba: published sizes, reference state_dict names, the four scan orders, SS2D against a float64
four-scan re-implementation, channel shuffle, gradients, input checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_segmamba.networks import medmamba as mm
from nnunet_segmamba.networks.medmamba import MedMamba, channel_shuffle, medmamba_b, medmamba_s, medmamba_t
from nnunet_segmamba.nn import SS2D, DropPath, merge_scan_orders, scan_orders
from nnunet_segmamba.nn import ss2d as ss2d_module


def _tiny(**kwargs) -> MedMamba:
    kwargs.setdefault("depths", (1, 1, 1, 1))
    kwargs.setdefault("dims", 8)
    return MedMamba(**kwargs)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# sizes and names


@pytest.mark.parametrize("factory, expected, published", [
    (medmamba_t, 15_221_608, 15.2),
    (medmamba_s, 23_557_480, 23.5),
    (medmamba_b, 48_144_872, 48.1),
])
def test_published_parameter_counts(factory, expected, published):
    # dims C, 2C, 4C, 8C with a 1000-class head; the paper's numbers are these rounded (S: 23.56 M printed 23.5)
    n = _num_params(factory())
    assert n == expected
    assert abs(n / 1e6 - published) < 0.1


def test_variant_layout():
    model = medmamba_t(num_classes=3)
    assert model.depths == (2, 2, 4, 2) and model.dims == [96, 192, 384, 768]
    assert [len(layer.blocks) for layer in model.layers] == [2, 2, 4, 2]
    assert model.layers[3].downsample is None
    assert medmamba_s(num_classes=3, dims=8).depths == (2, 2, 12, 2)
    assert medmamba_b(num_classes=3, depths=(1, 1, 1, 1)).dims == [128, 256, 512, 1024]


def test_state_dict_names_and_shapes():
    model = _tiny(in_chans=1, num_classes=5, depths=(1, 1, 2, 1), dims=32)
    sd = model.state_dict()
    # one block of width C = 64 (stage 1): SS2D on C/2 = 32 channels, d_inner = 64, dt_rank = 2, d_state 16
    p = "layers.1.blocks.0."
    expected = {
        "ln_1.weight": (32,), "ln_1.bias": (32,),
        "self_attention.x_proj_weight": (4, 2 + 32, 64),
        "self_attention.dt_projs_weight": (4, 64, 2),
        "self_attention.dt_projs_bias": (4, 64),
        "self_attention.A_logs": (4 * 64, 16),
        "self_attention.Ds": (4 * 64,),
        "self_attention.in_proj.weight": (128, 32),
        "self_attention.conv2d.weight": (64, 1, 3, 3), "self_attention.conv2d.bias": (64,),
        "self_attention.out_norm.weight": (64,), "self_attention.out_norm.bias": (64,),
        "self_attention.out_proj.weight": (32, 64),
        "conv33conv33conv11.1.weight": (32, 32, 3, 3), "conv33conv33conv11.1.bias": (32,),
        "conv33conv33conv11.4.weight": (32, 32, 3, 3), "conv33conv33conv11.4.bias": (32,),
        "conv33conv33conv11.7.weight": (32, 32, 1, 1), "conv33conv33conv11.7.bias": (32,),
    }
    for bn in (0, 2, 5):
        for name in ("weight", "bias", "running_mean", "running_var"):
            expected[f"conv33conv33conv11.{bn}.{name}"] = (32,)
        expected[f"conv33conv33conv11.{bn}.num_batches_tracked"] = ()
    block_keys = {k[len(p):]: tuple(v.shape) for k, v in sd.items() if k.startswith(p)}
    assert block_keys == expected
    top = {
        "patch_embed.proj.weight": (32, 1, 4, 4), "patch_embed.proj.bias": (32,),
        "patch_embed.norm.weight": (32,), "patch_embed.norm.bias": (32,),
        "layers.0.downsample.norm.weight": (128,), "layers.0.downsample.norm.bias": (128,),
        "layers.0.downsample.reduction.weight": (64, 128),
        "layers.2.downsample.reduction.weight": (256, 512),
        "head.weight": (5, 256), "head.bias": (5,),
    }
    for k, shape in top.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("layers.3.downsample") for k in sd)
    assert {k.split(".")[0] for k in sd} == {"patch_embed", "layers", "head"}
    # every key is one of: patch_embed.*, head.*, layers.i.downsample.*, layers.i.blocks.j.<block key>
    for k in sd:
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "blocks":
            assert ".".join(parts[4:]) in expected, k


# ---------------------------------------------------------------------------------------------------------------
# blocks


def test_channel_shuffle_interleaves_halves():
    conv = torch.tensor([0.0, 1, 2, 3])
    ssm = torch.tensor([10.0, 11, 12, 13])
    x = torch.cat([conv, ssm]).expand(2, 3, 3, 8)  # channels-last
    out = channel_shuffle(x, groups=2)
    assert out[0, 0, 0].tolist() == [0, 10, 1, 11, 2, 12, 3, 13]
    assert torch.equal(out[1, 2, 1], out[0, 0, 0])
    # channels-first and three groups: output channel i <- input channel (i % g) * (C / g) + i // g
    y = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(y, groups=3, dim=1).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    with pytest.raises(ValueError, match="divisor"):
        channel_shuffle(x, groups=3)


def test_block_output_is_shuffled_conv_and_ssm_branches():
    torch.manual_seed(0)
    block = mm.SSConvSSM(8).eval()
    x = torch.randn(2, 4, 4, 8)
    left, right = x[..., :4], x[..., 4:]
    conv = block.conv33conv33conv11(left.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ssm = block.self_attention(block.ln_1(right))
    y = block(x) - x
    torch.testing.assert_close(y[..., 0::2], conv)
    torch.testing.assert_close(y[..., 1::2], ssm)


def test_drop_path():
    x = torch.ones(1000, 3)
    dp = DropPath(0.25)
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    out = dp.train()(x)
    kept = out[:, 0] != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))  # kept samples scaled by 1 / keep
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))  # whole samples dropped
    assert 0.18 < (~kept).float().mean() < 0.32
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    model = _tiny(depths=(1, 2, 1, 1), drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob for layer in model.layers for b in layer.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_init():
    torch.manual_seed(0)
    model = _tiny(dims=32, num_classes=4)
    ss2d = model.layers[0].blocks[0].self_attention
    assert torch.equal(ss2d.A_logs, torch.log(torch.arange(1.0, 17)).repeat(4 * 32, 1))
    assert torch.equal(ss2d.Ds, torch.ones(4 * 32))
    dt = F.softplus(ss2d.dt_projs_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert ss2d.dt_projs_weight.abs().max() <= ss2d.dt_rank ** -0.5
    # trunc-normal(std 0.02) cut at +-2 (absolute, as timm's and torch's defaults: in effect a plain normal)
    assert torch.all(model.head.bias == 0) and model.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    w = model.layers[2].blocks[0].conv33conv33conv11[1].weight  # stage width 128, branch 64: fan_out = 64 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)
    assert torch.all(model.layers[0].downsample.norm.weight == 1)


# ---------------------------------------------------------------------------------------------------------------
# the four scan orders


def _row_major_index(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)


def test_scan_orders_by_index_arithmetic():
    H, W = 3, 5  # not square, so row- and column-major differ in shape too
    L = H * W
    s = scan_orders(_row_major_index(H, W))[0, :, 0]  # (4, L): which raster position each step reads
    col = [(q % H) * W + q // H for q in range(L)]  # step q of s1 reads row q % H, column q // H
    assert s[0].tolist() == list(range(L))
    assert s[1].tolist() == col
    assert s[2].tolist() == list(range(L))[::-1]
    assert s[3].tolist() == col[::-1]


def test_merge_scan_orders_undoes_each_order():
    H, W = 3, 5
    L = H * W
    torch.manual_seed(0)
    ys = torch.randn(2, 4, 3, L, dtype=torch.float64)
    merged = merge_scan_orders(ys, H, W)
    expected = torch.zeros(2, 3, L, dtype=torch.float64)
    for p in range(L):
        h, w = divmod(p, W)
        q1 = w * H + h  # step of s1 that visits raster position p
        expected[..., p] = ys[:, 0, :, p] + ys[:, 1, :, q1] + ys[:, 2, :, L - 1 - p] + ys[:, 3, :, L - 1 - q1]
    torch.testing.assert_close(merged, expected)
    # each order on its own is undone exactly: merging the scan of x gives 4 x
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    torch.testing.assert_close(merge_scan_orders(scan_orders(x), H, W), 4 * x.reshape(2, 3, L))
    with pytest.raises(ValueError):
        merge_scan_orders(ys, W + 1, H)


# ---------------------------------------------------------------------------------------------------------------
# SS2D against a float64 re-implementation with four separate sequential scans


def _ss2d_reference(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D written out: per direction its own projections and a step-by-step scan, float64."""
    b, H, W, _ = x.shape
    L, d, n, r = H * W, m.d_inner, m.d_state, m.dt_rank
    xz = x @ m.in_proj.weight.T
    u, z = xz[..., :d], xz[..., d:]
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), m.conv2d.weight, m.conv2d.bias, padding=1, groups=d))
    raster = u.reshape(b, d, L)
    col = torch.tensor([(q % H) * W + q // H for q in range(L)])  # raster position read at step q of s1
    orders = [torch.arange(L), col, torch.arange(L).flip(0), col.flip(0)]
    y = torch.zeros(b, d, L, dtype=x.dtype)
    for k, order in enumerate(orders):
        seq = raster[:, :, order]  # (b, d, L)
        dbl = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], seq)
        dt, Bm, Cm = dbl[:, :r], dbl[:, r:r + n], dbl[:, r + n:]
        delta = F.softplus(torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], dt) + m.dt_projs_bias[k][:, None])
        A = -torch.exp(m.A_logs[k * d:(k + 1) * d])  # (d, n)
        D = m.Ds[k * d:(k + 1) * d]
        h = torch.zeros(b, d, n, dtype=x.dtype)
        out = torch.zeros(b, d, L, dtype=x.dtype)
        for t in range(L):
            h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * Bm[:, None, :, t] * seq[:, :, t, None]
            out[:, :, t] = (h * Cm[:, None, :, t]).sum(-1) + D * seq[:, :, t]
        y[:, :, order] += out  # step t of this order wrote raster position order[t]
    y = F.layer_norm(y.transpose(1, 2), (d,), m.out_norm.weight, m.out_norm.bias, m.out_norm.eps)
    y = y * F.silu(z.reshape(b, L, d))
    return (y @ m.out_proj.weight.T).reshape(b, H, W, -1)


def test_ss2d_matches_four_sequential_scans_float64():
    torch.manual_seed(0)
    m = SS2D(6, d_state=4).double()
    with torch.no_grad():  # move off the symmetric init so that a mixed-up direction would show
        m.A_logs.add_(0.3 * torch.randn_like(m.A_logs))
        m.Ds.add_(torch.randn_like(m.Ds))
        m.dt_projs_bias.add_(torch.randn_like(m.dt_projs_bias))
        m.out_norm.weight.add_(0.1 * torch.randn_like(m.out_norm.weight))
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), _ss2d_reference(m, x), rtol=1e-9, atol=1e-10)


def test_ss2d_one_grouped_scan_call(monkeypatch):
    calls = []
    real = ss2d_module.selective_scan

    def spy(u, delta, A, B, C, *args, **kwargs):
        calls.append((tuple(u.shape), tuple(A.shape), tuple(B.shape), tuple(C.shape)))
        return real(u, delta, A, B, C, *args, **kwargs)

    monkeypatch.setattr(ss2d_module, "selective_scan", spy)
    SS2D(4, d_state=16)(torch.randn(2, 3, 5, 4))
    # one call: 4 directions x d_inner 8 channels, B and C grouped per direction
    assert calls == [((2, 32, 15), (32, 16), (2, 4, 16, 15), (2, 4, 16, 15))]


# ---------------------------------------------------------------------------------------------------------------
# whole network


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = _tiny(in_chans=2, num_classes=3, drop_path_rate=0.0)
    # 64 x 64: the last stage is 2 x 2, so its scan has more than one step and A gets a gradient too
    loss = model(torch.randn(2, 2, 64, 64)).logsumexp(1).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("in_chans, num_classes, size", [(1, 2, 32), (3, 7, 64), (5, 11, 32)])
def test_any_channels_and_classes(in_chans, num_classes, size):
    model = _tiny(in_chans=in_chans, num_classes=num_classes).eval()
    out = model(torch.randn(2, in_chans, size, size + 32))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


def test_input_size_must_be_multiple_of_32():
    model = _tiny(in_chans=1, num_classes=2)
    with pytest.raises(ValueError, match=r"multiple of 32, got 28x28.*32x32"):
        model(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="48x64"):
        model(torch.randn(1, 1, 48, 64))
    with pytest.raises(ValueError, match="in_chans|1, H, W"):
        model(torch.randn(1, 3, 32, 32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        MedMamba(dims=7)
    with pytest.raises(ValueError, match="2 \\* dims"):
        MedMamba(dims=[16, 32, 48, 96])
    with pytest.raises(ValueError, match="depths"):
        MedMamba(depths=(2, 0, 2, 2))
    with pytest.raises(ValueError, match="drop_path_rate"):
        MedMamba(depths=(1, 1, 1, 1), dims=8, drop_path_rate=1.5)
