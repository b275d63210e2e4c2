"""The fused CPU scan (`nnunet_segmamba.ssm.cpu_scan`) against `selective_scan_ref`.

- float64 inputs: outputs, last state and the gradients of u, delta, A, B, C, D, z and delta_bias equal the
  reference (run on visited copies for the reverse and inter-slice orders) to rtol = atol = 1e-10, over the
  options (D, z, delta_bias, softplus), shared / grouped B and C, the three orders, lengths around the
  checkpoint interval and batch > 1;
- float32 inputs against the float64 reference with the torch scan's tolerance (test_selective_scan.F32);
- the result really comes from the kernel (the autograd node), gradients do not depend on the thread count,
  operands with batch / channel strides (as the mixer passes them) are read in place, misuse is a ValueError;
- the fused causal convolution (+ SiLU) against test_causal_conv's loop, in every order, with its gradients;
- very strong decay (the float32 kernel clamps exp's argument) stays finite and equal to the reference.
Everything skips, with the reason, where the extension cannot be built.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nnunet_segmamba.ssm import dispatch, selective_scan, selective_scan_ref, visit
from nnunet_segmamba.ssm import cpu_scan
from test_selective_scan import F32, F64, assert_close, assert_gradients_close, grads_of, leaves, make_inputs


@pytest.fixture(scope="module", autouse=True)
def kernel():
    usable, reason = cpu_scan.cpu_scan_status()  # compiles on the first call (cached per machine)
    if not usable:
        pytest.skip(reason)


def reference(order, num_slices, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """selective_scan_ref on visited copies; the output back in the inputs' order."""
    def v(t):
        return visit(t, order, num_slices) if t is not None else None

    out, last = selective_scan_ref(v(u), v(delta), A, v(B), v(C), D, v(z), delta_bias, delta_softplus,
                                   return_last_state=True)
    return visit(out, order, num_slices, inverse=True), last


def check(inputs, order, num_slices, tol, dtype=None, seed=0):
    ref_in = leaves(inputs, torch.float64)
    out_e, last_e = reference(order, num_slices, **ref_in)
    act_in = leaves(inputs, dtype)
    out_a, last_a = cpu_scan.selective_scan_cpu(**act_in, return_last_state=True, order=order,
                                                num_slices=num_slices)
    assert out_a.dtype == act_in["u"].dtype and out_a.shape == out_e.shape and last_a.shape == last_e.shape
    assert_close(out_a, out_e, **tol, what="out")
    assert_close(last_a, last_e, **tol, what="last state")
    dout = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ge = grads_of(out_e, None, ref_in, dout, None)
    ga = grads_of(out_a, None, act_in, dout, None)
    assert_gradients_close(ga, ge, tol)


ORDERS = {"forward": None, "reverse": None, "slice": 5}
SHAPES = {  # lengths divisible by 5 for the slice order; CHUNK = 64 steps between the saved states
    "L5": dict(batch=2, dim=4, n=4, length=5),
    "L65": dict(batch=1, dim=4, n=16, length=65),
    "L130-batch3": dict(batch=3, dim=4, n=3, length=130),
    "grouped-BC": dict(batch=2, dim=6, n=4, length=35, groups_B=2, groups_C=3),
    "grouped-B-3dim-C": dict(batch=2, dim=4, n=16, length=70, groups_B=2),
    "groups-1": dict(batch=2, dim=4, n=4, length=20, groups_B=1, groups_C=1),
}
OPTIONS = {
    "all": dict(),
    "no-z": dict(with_z=False),
    "no-D-no-bias": dict(with_D=False, with_bias=False),
    "bias-no-softplus": dict(softplus=False),
    "bare": dict(with_D=False, with_z=False, with_bias=False, softplus=False),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_float64_matches_reference(shape, options, order):
    inputs = make_inputs(7, **shape, **options)
    check(inputs, order, ORDERS[order], F64, torch.float64)


@pytest.mark.parametrize("length", [1, 7, 64, 129])
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_lengths_around_the_checkpoint_interval(length, order):
    check(make_inputs(length, batch=2, dim=3, n=16, length=length), order, None, F64, torch.float64)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", ["L65", "grouped-BC"])
def test_float32_within_tolerance_of_float64(shape, order):
    check(make_inputs(3, **SHAPES[shape]), order, ORDERS[order], F32, seed=3)


def test_output_comes_from_the_kernel():
    inputs = leaves(make_inputs(1, batch=2, dim=4, n=4, length=10))
    for out in (cpu_scan.selective_scan_cpu(**inputs), selective_scan(**inputs, backend="cpu"),
                selective_scan(**inputs, backend="auto")):
        assert type(out.grad_fn).__name__ == "_CpuSelectiveScanBackward"
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpu"


def test_gradients_do_not_depend_on_the_thread_count():
    inputs = make_inputs(5, batch=2, dim=8, n=16, length=300, groups_B=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            act = leaves(inputs)
            out = cpu_scan.selective_scan_cpu(**act, order="slice", num_slices=10)
            results.append(grads_of(out, None, act, torch.ones_like(out), None))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, g in results[0].items():
            assert torch.equal(g, other[name]), name


def test_strided_operands_as_the_mixer_passes_them():
    """z a channel half of xz, B and C row blocks of x_dbl, u with a non-unit stride along L."""
    g = torch.Generator().manual_seed(0)
    batch, dim, n, length = 2, 4, 4, 24
    xz = torch.randn(batch, 2 * dim, length, generator=g, dtype=torch.float64)
    x_dbl = torch.randn(batch, 1 + 2 * n, length, generator=g, dtype=torch.float64)
    u = torch.randn(batch, dim, 2 * length, generator=g, dtype=torch.float64)[..., ::2]
    inputs = dict(u=u, delta=torch.rand(batch, dim, length, generator=g, dtype=torch.float64),
                  A=-torch.rand(dim, n, generator=g, dtype=torch.float64) - 0.5, B=x_dbl[:, 1:1 + n],
                  C=x_dbl[:, 1 + n:], D=torch.ones(dim, dtype=torch.float64), z=xz[:, dim:], delta_softplus=True)
    expected = reference("slice", 4, **inputs)[0]
    actual = cpu_scan.selective_scan_cpu(**inputs, order="slice", num_slices=4)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_inference_mode_and_bfloat16_output_dtype():
    inputs = leaves(make_inputs(2, batch=1, dim=4, n=4, length=16))
    with torch.inference_mode():
        out = cpu_scan.selective_scan_cpu(**inputs)
    expected = reference("forward", None, **leaves(make_inputs(2, batch=1, dim=4, n=4, length=16), torch.float64))[0]
    assert_close(out, expected, **F32)
    half = {k: (v.detach().bfloat16() if k in ("u", "delta", "z") else v) for k, v in inputs.items()}
    assert cpu_scan.selective_scan_cpu(**half).dtype == torch.bfloat16


def test_misuse_is_a_value_error():
    inputs = make_inputs(0, batch=1, dim=4, n=4, length=12)
    with pytest.raises(ValueError, match="order"):
        cpu_scan.selective_scan_cpu(**inputs, order="backward")
    with pytest.raises(ValueError, match="num_slices"):
        cpu_scan.selective_scan_cpu(**inputs, order="slice", num_slices=5)
    with pytest.raises(ValueError, match="delta"):
        cpu_scan.selective_scan_cpu(**{**inputs, "delta": inputs["delta"][..., :-1]})


def test_import_does_not_compile():
    code = ("import nnunet_segmamba.ssm.cpu_scan as m, nnunet_segmamba.nn\n"
            "assert m._load.cache_info().currsize == 0\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ----------------------------------------------------------------------------------------------------------------
# The fused causal depthwise convolution (+ SiLU) against the element-by-element loop of test_causal_conv
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("order,num_slices", [("forward", None), ("reverse", None), ("slice", 3)])
@pytest.mark.parametrize("length,width", [(12, 4), (1, 4), (9, 1), (6, 7)])
def test_conv_matches_loop(length, width, order, num_slices, silu):
    from test_causal_conv import conv_loop, make

    if order == "slice" and length % 3:
        num_slices = 1
    x, weight, bias = (t.requires_grad_() for t in make(length + width, batch=2, dim=3, length=length, width=width))
    expected = visit(conv_loop(visit(x, order, num_slices), weight, bias, silu), order, num_slices, inverse=True)
    actual = cpu_scan.causal_conv1d_cpu(x, weight.unsqueeze(1), bias, silu, order, num_slices)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = (x, weight, bias)
    for a, e in zip(torch.autograd.grad(actual, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_conv_float32_strided_input_and_dispatch():
    from nnunet_segmamba.ssm import causal_conv1d
    from test_causal_conv import conv_loop, make

    x, weight, bias = make(0, batch=2, dim=6, length=20, width=4)
    xz = torch.cat([x, x], dim=1).float().requires_grad_()  # x as the mixer passes it: a channel half of xz
    out = causal_conv1d(xz[:, :6], weight.float(), bias.float(), silu=True, backend="auto", order="slice",
                        num_slices=4)
    assert type(out.grad_fn).__name__ == "_CpuCausalConvBackward"
    expected = visit(conv_loop(visit(x, "slice", 4), weight, bias, True), "slice", 4, inverse=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        cpu_scan.causal_conv1d_cpu(x, weight[:2], bias)


def test_strong_decay_stays_finite():
    """delta A down to about -1e3 (decays far below float32's range): finite, and equal to the reference."""
    inputs = make_inputs(11, batch=1, dim=4, n=16, length=300, softplus=False)
    inputs["delta"] = inputs["delta"] * 60
    check(inputs, "forward", None, F32, seed=11)
