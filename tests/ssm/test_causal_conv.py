"""`causal_conv1d` against the loop that defines it: out[t] = bias + sum_k w[k] x[t - (K-1) + k], zero left padding.

float64 inputs are compared to 1e-12; float32 to the float64 loop at rtol = atol = 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_segmamba.ssm import causal_conv1d


def conv_loop(x, weight, bias=None, silu=False):
    """x (batch, d, L), weight (d, K), bias (d,): the depthwise causal convolution, element by element."""
    batch, dim, length = x.shape
    width = weight.shape[-1]
    rows = []
    for b in range(batch):
        chans = []
        for c in range(dim):
            steps = []
            for t in range(length):
                acc = bias[c] if bias is not None else x.new_zeros(())
                for k in range(width):
                    src = t - (width - 1) + k
                    if src >= 0:  # positions before the sequence are zeros
                        acc = acc + weight[c, k] * x[b, c, src]
                steps.append(acc)
            chans.append(torch.stack(steps))
        rows.append(torch.stack(chans))
    out = torch.stack(rows)
    return out * torch.sigmoid(out) if silu else out


def make(seed, batch=2, dim=3, length=9, width=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, length, generator=g, dtype=dtype)
    weight = torch.randn(dim, width, generator=g, dtype=dtype)
    bias = torch.randn(dim, generator=g, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "linear"])
@pytest.mark.parametrize("weight_form", ["d1K", "dK"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("length", [1, 3, 9])
def test_matches_loop_with_gradients(silu, weight_form, with_bias, length):
    x, weight, bias = make(length, length=length)
    bias = bias if with_bias else None
    w_lib = (weight.unsqueeze(1) if weight_form == "d1K" else weight).clone().requires_grad_(True)
    x_lib = x.clone().requires_grad_(True)
    b_lib = bias.clone().requires_grad_(True) if bias is not None else None
    out = causal_conv1d(x_lib, w_lib, b_lib, silu=silu, backend="torch")

    x_ref, w_ref = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    b_ref = bias.clone().requires_grad_(True) if bias is not None else None
    expected = conv_loop(x_ref, w_ref, b_ref, silu=silu)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=out.dtype)
    lib_leaves = [x_lib, w_lib] + ([b_lib] if b_lib is not None else [])
    ref_leaves = [x_ref, w_ref] + ([b_ref] if b_ref is not None else [])
    got = torch.autograd.grad(out, lib_leaves, dout)
    want = torch.autograd.grad(expected, ref_leaves, dout)
    assert got[1].shape == w_lib.shape  # gradient in the form the weight was given
    for name, g_lib, g_ref in zip(["x", "weight", "bias"], got, want):
        torch.testing.assert_close(g_lib.reshape(g_ref.shape), g_ref, rtol=1e-12, atol=1e-12, msg=name)


def test_float32_against_float64_loop():
    x, weight, bias = make(5, batch=1, dim=4, length=12)
    out = causal_conv1d(x.float(), weight.float().unsqueeze(1), bias.float(), silu=True, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), conv_loop(x, weight, bias, silu=True), rtol=1e-5, atol=1e-5)


def test_is_causal():
    """Changing x at step t changes no output before t."""
    x, weight, bias = make(6, length=10)
    out = causal_conv1d(x, weight, bias, backend="torch")
    x2 = x.clone()
    x2[..., 6:] += 10.0
    out2 = causal_conv1d(x2, weight, bias, backend="torch")
    torch.testing.assert_close(out[..., :6], out2[..., :6], rtol=0, atol=0)
    assert not torch.allclose(out[..., 6:], out2[..., 6:])


def test_matches_nn_conv1d_module_as_mamba_uses_it():
    """Mamba stores the conv as nn.Conv1d(d, d, K, groups=d, padding=K-1) and keeps the first L outputs."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    x = torch.randn(2, 6, 11, dtype=torch.float64)
    torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias, silu=False, backend="torch"),
                               conv(x)[..., :11])


def test_cuda_backend_on_cpu_tensors_is_value_error():
    x, weight, bias = make(1)
    with pytest.raises(ValueError):
        causal_conv1d(x, weight, bias, backend="cuda")
