"""`causal_conv1d_triton` against plain torch in float64: the same convolution applied to x permuted into the
scan order, permuted back.

On this CPU-only suite the kernels run under Triton's interpreter, which has to be switched on (TRITON_INTERPRET=1)
before `@triton.jit` decorates them, i.e. before the module is first imported. The pytest process has imported
it already, so `test_kernels_under_interpreter` runs this file's interpreted tests again in subprocesses.
The GPU class runs the same comparison on CUDA, at a length that spans several tiles.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nnunet_segmamba.ssm import triton_common

INTERPRETING = triton_common.interpreting()


# ----------------------------------------------------------------------------------------------------------------
# The reference and one comparison, shared by the interpreted and the GPU tests.

def to_scan_order(x, mode, num_slices=None):
    if mode == "forward":
        return x
    if mode == "reverse":
        return x.flip(-1)
    batch, dim, length = x.shape
    return x.reshape(batch, dim, num_slices, length // num_slices).transpose(-1, -2).reshape(batch, dim, length)


def from_scan_order(xs, mode, num_slices=None):
    if mode == "forward":
        return xs
    if mode == "reverse":
        return xs.flip(-1)
    batch, dim, length = xs.shape
    return xs.reshape(batch, dim, length // num_slices, num_slices).transpose(-1, -2).reshape(batch, dim, length)


def conv_reference(x, weight, bias=None, silu=True, mode="forward", num_slices=None):
    """x (batch, d, L), weight (d, K): the causal depthwise convolution along the scan order, via F.conv1d."""
    length, width = x.shape[-1], weight.shape[-1]
    xs = to_scan_order(x, mode, num_slices)
    out = F.conv1d(xs, weight.reshape(weight.shape[0], 1, width), bias, padding=width - 1, groups=x.shape[1])
    out = out[..., :length]
    return from_scan_order(F.silu(out) if silu else out, mode, num_slices)


def max_relative_error(got, want):
    """Largest error relative to the reference's largest magnitude: sums over thousands of half-precision terms
    have elements near zero that an element-wise rtol would judge unfairly."""
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check_case(conv, *, device, dtype, batch, dim, length, width, mode, num_slices, silu, with_bias,
               weight_form="dK", seed=0, tol=1e-5, elementwise=True):
    """Forward and the gradients for x, weight and bias, against the float64 reference on the same (rounded)
    inputs; raises AssertionError, naming the case, on a mismatch."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    w64 = torch.randn(dim, width, generator=g, dtype=torch.float64) / width ** 0.5
    b64 = torch.randn(dim, generator=g, dtype=torch.float64) if with_bias else None
    dout64 = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    # Round through the dtype under test so that the reference sees exactly the kernel's inputs.
    x64, w64, dout64 = (t.to(dtype).double() for t in (x64, w64, dout64))
    b64 = b64.to(dtype).double() if b64 is not None else None

    x = x64.to(device, dtype).requires_grad_(True)
    w_shape = (dim, 1, width) if weight_form == "d1K" else (dim, width)
    w = w64.reshape(w_shape).to(device, dtype).requires_grad_(True)
    b = b64.to(device, dtype).requires_grad_(True) if b64 is not None else None
    out = conv(x, w, b, silu=silu, mode=mode, num_slices=num_slices)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    leaves = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(out, leaves, dout64.to(device, dtype))

    ref_leaves = [x64.clone().requires_grad_(True), w64.clone().requires_grad_(True)]
    ref_leaves += [b64.clone().requires_grad_(True)] if b64 is not None else []
    ref_bias = ref_leaves[2] if b64 is not None else None
    expected = conv_reference(ref_leaves[0], ref_leaves[1], ref_bias, silu=silu, mode=mode, num_slices=num_slices)
    ref_grads = torch.autograd.grad(expected, ref_leaves, dout64)

    label = (f"{str(dtype)[6:]} b{batch} d{dim} L{length} K{width} {mode}{'/' + str(num_slices) if num_slices else ''}"
             f" {'silu' if silu else 'linear'} {'bias' if with_bias else 'no-bias'} w{weight_form}")
    for name, got, want, leaf in zip(["out", "dx", "dweight", "dbias"], [out, *grads], [expected, *ref_grads],
                                     [x, *leaves]):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, f"{label}: {name} {got.dtype} {got.shape}"
        assert torch.isfinite(got).all(), f"{label}: {name} has non-finite elements (left unwritten?)"
        got = got.detach().reshape(want.shape).cpu()
        if elementwise:
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{label}: {name}\n{m}")
        else:
            err = max_relative_error(got, want)
            assert err <= tol, f"{label}: {name} max relative error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------------------------------------------
# The kernels on CPU through Triton's interpreter (`test_kernels_under_interpreter` runs them there).

interpreted = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 (test_kernels_under_interpreter "
                                                          "runs this file so)")
SLICES = {1: [1], 7: [7], 12: [3, 4], 33: [3, 11]}  # num_slices dividing each length (1 and L are the trivial maps)


def interpreter_cases():
    """Every (length, mode) with both widths, and the four silu/bias combinations spread across them (the full
    product would cost the interpreter twice the time for little more coverage)."""
    flags = list(itertools.product([True, False], [True, False]))
    i = 0
    for length, slices in SLICES.items():
        orders = [("forward", None), ("reverse", None)] + [("slice", n) for n in slices]
        for (mode, num_slices), width in itertools.product(orders, [2, 4]):
            for silu, with_bias in (flags[i % 4], flags[(i + 1) % 4]):
                yield dict(batch=2, dim=3 + i % 3, length=length, width=width, mode=mode, num_slices=num_slices,
                           silu=silu, with_bias=with_bias, weight_form="d1K" if i % 5 == 0 else "dK", seed=i)
            i += 1


CASES = list(interpreter_cases())


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[f"{c['mode']}{c['num_slices'] or ''}-L{c['length']}-K{c['width']}-"
                                             f"{c['seed']}" for c in CASES])
def test_interpreted_matches_reference(case, one_thread):
    from nnunet_segmamba.ssm import triton_conv

    check_case(triton_conv.causal_conv1d_triton, device="cpu", dtype=torch.float32, **case)


@interpreted
@pytest.mark.parametrize("seed, length, mode, num_slices", [(100, 33, "forward", None), (101, 40, "reverse", None),
                                                            (102, 48, "slice", 4), (103, 33, "slice", 11)])
def test_interpreted_tile_boundaries(seed, length, mode, num_slices, monkeypatch, one_thread):
    """The tile shrunk so that a short sequence spans several programs, which then need the halo of K-1 steps on
    either side and add up their partial weight / bias sums."""
    from nnunet_segmamba.ssm import triton_conv

    monkeypatch.setattr(triton_conv, "MAX_BLOCK_L", triton_conv._MIN_BLOCK_L)
    check_case(triton_conv.causal_conv1d_triton, device="cpu", dtype=torch.float32, batch=2, dim=3, length=length,
               width=4, mode=mode, num_slices=num_slices, silu=seed % 2 == 0, with_bias=True, seed=seed)


@interpreted
@pytest.mark.parametrize("case", [
    # half-precision inputs go through the same float32 arithmetic; only the rounding of the results differs
    dict(dtype=torch.float16, dim=4, length=33, width=4, mode="slice", num_slices=3, seed=200, tol=1e-2,
         elementwise=False),
    dict(dtype=torch.bfloat16, dim=3, length=12, width=3, mode="reverse", num_slices=None, seed=201, tol=2e-2,
         elementwise=False),
    # the narrowest and widest kernels
    dict(dtype=torch.float32, dim=3, length=12, width=1, mode="slice", num_slices=4, seed=203),
    dict(dtype=torch.float32, dim=3, length=12, width=8, mode="slice", num_slices=4, seed=210),
], ids=["fp16", "bf16", "K1", "K8"])
def test_interpreted_dtypes_and_widths(case, one_thread):
    from nnunet_segmamba.ssm import triton_conv

    check_case(triton_conv.causal_conv1d_triton, device="cpu", batch=2, silu=True, with_bias=True, **case)


@interpreted
def test_interpreted_strided_input(one_thread):
    """x as Mamba gets it, one half of `xz.chunk(2, dim=1)`: contiguous along L but with a batch stride of 2dL;
    and an incoming gradient with a zero batch stride."""
    from nnunet_segmamba.ssm import triton_conv

    g = torch.Generator().manual_seed(300)
    xz = torch.randn(2, 8, 12, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    dout = torch.randn(1, 4, 12, generator=g, dtype=torch.float64).expand(2, 4, 12)
    x = xz.float().requires_grad_(True)
    out = triton_conv.causal_conv1d_triton(x.chunk(2, dim=1)[1], weight.float(), bias.float(), silu=True,
                                           mode="slice", num_slices=3)
    (dx,) = torch.autograd.grad(out, [x], dout.float())
    x_ref = xz.clone().requires_grad_(True)
    expected = conv_reference(x_ref.chunk(2, dim=1)[1], weight, bias, silu=True, mode="slice", num_slices=3)
    (dx_ref,) = torch.autograd.grad(expected, [x_ref], dout)
    torch.testing.assert_close(out.detach().double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("weight_form", ["sdK", "sd1K"])
def test_interpreted_parameter_sets(weight_form, one_thread):
    """Weights (sets, d, K) or (sets, d, 1, K) and biases (sets, d): set i serves the i-th block of consecutive batch
    elements, so one call over the blocks stacked gives each block's own convolution and gradients (the weight's
    and bias's summed over the block only), bit for bit."""
    from nnunet_segmamba.ssm import triton_conv

    g = torch.Generator().manual_seed(400)
    sets, block, dim, width, length = 3, 2, 4, 4, 40
    x = torch.randn(sets * block, dim, length, generator=g).requires_grad_(True)
    weight = torch.randn(sets, dim, *((1,) if weight_form == "sd1K" else ()), width, generator=g).requires_grad_(True)
    bias = torch.randn(sets, dim, generator=g).requires_grad_(True)
    dout = torch.randn(sets * block, dim, length, generator=g)
    out = triton_conv.causal_conv1d_triton(x, weight, bias, silu=True, mode="reverse")
    grads = torch.autograd.grad(out, [x, weight, bias], dout)
    for i in range(sets):
        rows = slice(i * block, (i + 1) * block)
        x_i, w_i, b_i = (t.detach()[sel].clone().requires_grad_(True) for t, sel in ((x, rows), (weight, i), (bias, i)))
        out_i = triton_conv.causal_conv1d_triton(x_i, w_i, b_i, silu=True, mode="reverse")
        grads_i = torch.autograd.grad(out_i, [x_i, w_i, b_i], dout[rows])
        torch.testing.assert_close(out[rows], out_i, rtol=0, atol=0)
        for got, want in zip((grads[0][rows], grads[1][i], grads[2][i]), grads_i):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_kernels_under_interpreter(run_under_triton_interpreter):
    """Run this file's interpreted tests on CPU through Triton's interpreter (how CI checks the kernels)."""
    # the cases, 4 tile boundaries, 4 dtypes and widths, the strided input, the two forms of parameter sets
    run_under_triton_interpreter(__file__, "interpreted", min_passed=len(CASES) + 11)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks and import without triton: no kernel runs, so these need neither the interpreter nor a GPU.

def _args(**over):
    base = dict(x=torch.zeros(2, 3, 12), weight=torch.zeros(3, 4), bias=torch.zeros(3), silu=True, mode="forward",
                num_slices=None)
    base.update(over)
    return base


@pytest.mark.parametrize("over, words", [
    (dict(x=torch.zeros(3, 12)), "x must be a (batch, d, L)"),
    (dict(x=torch.zeros(2, 3, 12, dtype=torch.int32)), "dtype"),
    (dict(weight=torch.zeros(4, 4)), "weight must be (d, K)"),
    (dict(weight=torch.zeros(3, 2, 4)), "weight must be (d, K)"),
    (dict(weight=torch.zeros(3, 9)), "K = 9"),
    (dict(bias=torch.zeros(4)), "bias must be (d,)"),
    (dict(x=torch.zeros(4, 3, 12), weight=torch.zeros(3, 3, 4)), "sets dividing the batch"),
    (dict(weight=torch.zeros(2, 3, 4)), "bias must be (sets, d)"),
    (dict(mode="sideways"), "mode must be one of"),
    (dict(mode="slice"), "needs num_slices"),
    (dict(mode="slice", num_slices=5), "positive divisor of the sequence length L=12"),
    (dict(mode="slice", num_slices=0), "positive divisor of the sequence length L=12"),
], ids=["x-rank", "x-dtype", "weight-d", "weight-middle", "width", "bias", "sets-divide", "sets-bias", "mode",
        "no-slices", "slices-divide", "slices-zero"])
def test_bad_arguments_are_value_errors(over, words):
    from nnunet_segmamba.ssm.triton_conv import causal_conv1d_triton

    with pytest.raises(ValueError) as info:
        causal_conv1d_triton(**_args(**over))
    assert words in str(info.value)


def test_cpu_tensors_without_interpreter_are_value_error():
    pytest.importorskip("triton")
    from nnunet_segmamba.ssm import triton_common, triton_conv

    if triton_common.interpreting():
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors are legal")
    with pytest.raises(ValueError, match="CUDA"):
        triton_conv.causal_conv1d_triton(**_args())


def test_imports_without_triton():
    """A machine whose `import triton` fails still imports the module; a call then says what is missing."""
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from nnunet_segmamba.ssm import triton_conv as m\n"
        "assert not m.TRITON_AVAILABLE and 'triton' in m.TRITON_IMPORT_ERROR, m.TRITON_IMPORT_ERROR\n"
        "try:\n"
        "    m.causal_conv1d_triton(torch.zeros(1, 2, 5), torch.zeros(2, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'needs triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no RuntimeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------------

GPU_ORDERS = [("forward", 4099, None), ("reverse", 4099, None), ("slice", 4100, 41), ("slice", 4100, 4)]
GPU_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    @pytest.mark.parametrize("dtype", list(GPU_TOLERANCE), ids=lambda d: str(d)[6:])
    @pytest.mark.parametrize("mode, length, num_slices", GPU_ORDERS, ids=[f"{m}-{n}" for m, _, n in GPU_ORDERS])
    @pytest.mark.parametrize("silu, with_bias, width", [(True, True, 4), (False, False, 2), (True, False, 3)],
                             ids=["silu-bias-K4", "linear-K2", "silu-K3"])
    def test_matches_reference(self, dtype, mode, length, num_slices, silu, with_bias, width):
        from nnunet_segmamba.ssm.triton_conv import causal_conv1d_triton

        # Leave NaNs in the blocks the caching allocator will hand out next, so that an element the kernels
        # skip shows up as non-finite instead of as stale but plausible memory.
        poison = torch.full((8 * 2 * 5 * length,), float("nan"), dtype=torch.float32, device="cuda")
        del poison
        check_case(causal_conv1d_triton, device="cuda", dtype=dtype, batch=2, dim=5, length=length, width=width,
                   mode=mode, num_slices=num_slices, silu=silu, with_bias=with_bias, seed=length + width,
                   tol=GPU_TOLERANCE[dtype], elementwise=False)

    def test_every_output_written(self):
        from nnunet_segmamba.ssm.triton_conv import causal_conv1d_triton

        x = torch.randn(3, 7, 4100, device="cuda", dtype=torch.float16)
        weight = torch.randn(7, 1, 4, device="cuda")  # float32 weight on half x, as under autocast
        for mode, num_slices in [("forward", None), ("reverse", None), ("slice", 41)]:
            torch.full((x.numel(),), float("nan"), dtype=x.dtype, device="cuda")  # freed at once, reused below
            out = causal_conv1d_triton(x, weight, None, silu=True, mode=mode, num_slices=num_slices)
            assert torch.isfinite(out).all(), mode

    def test_deterministic_weight_gradient(self):
        from nnunet_segmamba.ssm.triton_conv import causal_conv1d_triton

        x = torch.randn(4, 8, 5000, device="cuda")
        weight = torch.randn(8, 4, device="cuda", requires_grad=True)
        bias = torch.randn(8, device="cuda", requires_grad=True)
        dout = torch.randn_like(x)
        first = torch.autograd.grad(causal_conv1d_triton(x, weight, bias, mode="reverse"), [weight, bias], dout)
        second = torch.autograd.grad(causal_conv1d_triton(x, weight, bias, mode="reverse"), [weight, bias], dout)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_host_side_sizes_match_triton():
    """The launch sizes are computed without Triton's constexpr helpers (slow to call on the host): same values."""
    triton = pytest.importorskip("triton")
    from nnunet_segmamba.ssm.triton_common import cdiv, next_power_of_2

    for x in (1, 2, 3, 15, 16, 17, 1000, 1024, 1025, 262144):
        assert next_power_of_2(x) == triton.next_power_of_2(x), x
        assert cdiv(x, 64) == triton.cdiv(x, 64), x
