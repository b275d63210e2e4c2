"""The selective scan against a float64 definition written here, independently of `selective_scan_ref`.

What is compared, and how closely:
- `selective_scan_torch` (every chunk size) and `selective_scan(..., backend="torch")` on float32 inputs against
  the float64 loop below: outputs, last state and the gradients of u, delta, A, B, C, D, z and delta_bias for a
  random upstream gradient on both. The float32 errors measured are ~3e-7 of the tensor's largest magnitude (the
  chunked scan reorders sums; gradients of A and delta_bias sum over batch and L); we allow rtol = 1e-5 plus
  atol = 1e-5 times the largest magnitude of the compared tensor, i.e. ~30x headroom.
- the library's `selective_scan_ref` and every backend on float64 inputs: they must stay in float64 and agree
  with ours to rtol = atol = 1e-10.
- a 4096-step scan with very strong decay (delta * A down to about -1e3): finite, and equal to ours.
- backend selection (`dispatch.resolve` and NNUNET_SEGMAMBA_SCAN_BACKEND).
- on a CUDA machine with mamba-ssm's kernel (`-m gpu`): backend "cuda" against the float64 definition, fp32 and
  bf16 inputs, with the per-dtype tolerances of `GPU_TOL`.
"""
from __future__ import annotations

import subprocess
import sys
import zlib

import pytest
import torch

from nnunet_segmamba.ssm import (cpu_scan, dispatch, mamba_ssm_kernels, selective_scan, selective_scan_ref,
                                 selective_scan_torch)

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# ----------------------------------------------------------------------------------------------------------------
# The definition, in float64, one step at a time, straight from the equations
# ----------------------------------------------------------------------------------------------------------------
def scan_definition(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = <C_t, h_t> + D u_t;  out = y * silu(z).

    u, delta, z: (batch, d, L); A: (d, n); B, C: (batch, n, L) or (batch, G, n, L), group g serving channels
    [g d/G, (g+1) d/G). Everything is cast to float64. Returns (out (batch, d, L), h_L (batch, d, n)).
    """
    f64 = torch.float64
    u, delta, A = u.to(f64), delta.to(f64), A.to(f64)
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.to(f64).reshape(1, dim, 1)
    if delta_softplus:
        delta = torch.log1p(torch.exp(-delta.abs())) + delta.clamp(min=0)  # softplus, written out

    def channel_view(M):  # -> (batch, d, n, L) by explicit group index per channel
        M = M.to(f64)
        if M.dim() == 3:
            return M.unsqueeze(1).expand(batch, dim, *M.shape[1:])
        groups = M.shape[1]
        group_of_channel = torch.tensor([c // (dim // groups) for c in range(dim)])
        return M[:, group_of_channel]

    Bc, Cc = channel_view(B), channel_view(C)
    h = torch.zeros(batch, dim, A.shape[1], dtype=f64)
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (batch, d, 1)
        h = torch.exp(dt * A) * h + dt * Bc[:, :, :, t] * u[:, :, t, None]
        ys.append((Cc[:, :, :, t] * h).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(f64)[None, :, None] * u
    if z is not None:
        z = z.to(f64)
        y = y * z * torch.sigmoid(z)
    return y, h


# ----------------------------------------------------------------------------------------------------------------
# Inputs and comparisons
# ----------------------------------------------------------------------------------------------------------------
def make_inputs(seed, batch=2, dim=6, n=4, length=37, groups_B=None, groups_C=None, with_D=True, with_z=True,
                with_bias=True, softplus=True, dtype=torch.float32, device="cpu"):
    """Fresh random scan inputs from a seeded generator; decays kept in Mamba's range (A = -(0.5..n+0.5))."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)

    if softplus:
        delta = r(batch, dim, length, scale=0.5, shift=-2.0)  # softplus(-2 +- ...) ~ 0.1
    else:
        delta = (torch.rand(batch, dim, length, generator=g, dtype=torch.float64) * 0.3 + 0.01).to(dtype).to(device)
    A = -(torch.arange(1, n + 1, dtype=torch.float64).repeat(dim, 1)
          * torch.rand(dim, n, generator=g, dtype=torch.float64).add(0.5)).float().to(device)
    shape_B = (batch, n, length) if groups_B is None else (batch, groups_B, n, length)
    shape_C = (batch, n, length) if groups_C is None else (batch, groups_C, n, length)
    return dict(
        u=r(batch, dim, length), delta=delta, A=A, B=r(*shape_B), C=r(*shape_C),
        D=r(dim).float() if with_D else None, z=r(batch, dim, length) if with_z else None,
        # without softplus the bias must keep delta positive, or the scan grows instead of decaying
        delta_bias=(r(dim, scale=0.3).float().abs() if not softplus else r(dim, scale=0.3).float())
        if with_bias else None,
        delta_softplus=softplus,
    )


def leaves(inputs, dtype=None):
    """Detached copies (optionally cast) that require grad, keeping None and the softplus flag."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if dtype is not None:
                v = v.to(dtype)
            out[k] = v.requires_grad_(True)
        else:
            out[k] = v
    return out


def grads_of(out, last, inputs, dout, dlast):
    names = [k for k in GRAD_NAMES if inputs.get(k) is not None]
    targets, upstream = [out], [dout.to(out.dtype)]
    if last is not None and dlast is not None:
        targets.append(last)
        upstream.append(dlast.to(last.dtype))
    gs = torch.autograd.grad(targets, [inputs[k] for k in names], upstream)
    return dict(zip(names, gs))


def assert_close(actual, expected, rtol, atol_scale, what="", scale=None):
    """Elementwise |a - e| <= atol_scale * max|e| + rtol * |e| (atol relative to the tensor's own magnitude, or to
    `scale` where that is larger: for a tensor that is zero by construction but computed from O(scale) terms)."""
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    atol = atol_scale * max(expected.abs().max().item(), scale or 0.0, 1e-12)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_gradients_close(actual: dict, expected: dict, tol: dict) -> None:
    """The same inputs got gradients, each of the expected shape and within `tol` (`assert_close`'s arguments)."""
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert_close(actual[name], expected[name], **tol, what=f"grad {name}")


F32 = dict(rtol=1e-5, atol_scale=1e-5)
F64 = dict(rtol=1e-10, atol_scale=1e-10)

SHAPES = {
    "odd-L37": dict(batch=2, dim=6, n=4, length=37),
    "odd-L129": dict(batch=1, dim=4, n=8, length=129),
    "L1": dict(batch=3, dim=4, n=4, length=1),
    "batch3": dict(batch=3, dim=4, n=16, length=20),
    "grouped-BC": dict(batch=2, dim=6, n=4, length=37, groups_B=2, groups_C=3),
    "grouped-B-only": dict(batch=2, dim=8, n=4, length=23, groups_B=4),
    "grouped-C-only-G1": dict(batch=2, dim=4, n=4, length=23, groups_C=1),
}
OPTIONS = {
    "all": dict(),
    "no-D": dict(with_D=False),
    "no-z": dict(with_z=False),
    "no-bias-no-softplus": dict(with_bias=False, softplus=False),
    "bias-no-softplus": dict(softplus=False),
    "bare": dict(with_D=False, with_z=False, with_bias=False, softplus=False),
}


def check_against_definition(fn, inputs, seed, tol, check_last_grad=True):
    expected_in = leaves(inputs, torch.float64)
    out_e, last_e = scan_definition(**expected_in)
    actual_in = leaves(inputs)
    out_a, last_a = fn(**actual_in, return_last_state=True)
    assert out_a.dtype == inputs["u"].dtype
    assert out_a.shape == inputs["u"].shape and last_a.shape == last_e.shape
    assert_close(out_a, out_e, **tol, what="out")
    assert_close(last_a, last_e, **tol, what="last state")

    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out_e.shape, generator=g, dtype=torch.float64)
    dlast = torch.randn(last_e.shape, generator=g, dtype=torch.float64) if check_last_grad else None
    ge = grads_of(out_e, last_e, expected_in, dout, dlast)
    ga = grads_of(out_a, last_a, actual_in, dout, dlast)
    assert_gradients_close(ga, ge, tol)


# ----------------------------------------------------------------------------------------------------------------
# CPU: the torch backend against the definition
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_scan_matches_definition(shape, options):
    seed = zlib.crc32(repr((shape, options)).encode()) % 10_000
    inputs = make_inputs(seed, **shape, **options)
    check_against_definition(selective_scan_torch, inputs, seed, F32)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 37, 64, 1000])
@pytest.mark.parametrize("shape", ["odd-L37", "grouped-BC", "L1"])
def test_torch_scan_any_chunk(shape, chunk):
    """Chunk sizes that divide L, do not divide it, equal it and exceed it all give the definition."""
    inputs = make_inputs(100 + chunk, **SHAPES[shape])

    def fn(**kw):
        return selective_scan_torch(**kw, chunk=chunk)

    check_against_definition(fn, inputs, 100 + chunk, F32)


@pytest.mark.parametrize("shape", ["odd-L37", "odd-L129", "grouped-BC", "L1"])
def test_dispatcher_torch_backend_matches_definition(shape):
    inputs = make_inputs(7, **SHAPES[shape])

    def fn(**kw):
        return selective_scan(**kw, backend="torch")

    check_against_definition(fn, inputs, 7, F32)


def test_dispatcher_without_last_state_returns_tensor():
    inputs = make_inputs(3)
    out = selective_scan(**inputs, backend="torch")
    assert isinstance(out, torch.Tensor) and out.shape == inputs["u"].shape


@pytest.mark.parametrize("shape", ["odd-L37", "grouped-BC", "L1"])
@pytest.mark.parametrize("options", ["all", "bare"])
def test_library_reference_matches_definition(shape, options):
    inputs = make_inputs(11, **SHAPES[shape], **OPTIONS[options])
    check_against_definition(selective_scan_ref, inputs, 11, F32)


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_torch,
                                lambda **kw: selective_scan(**kw, backend="torch")],
                         ids=["ref", "torch", "dispatch"])
def test_float64_passes_through(fn):
    """float64 inputs are computed and returned in float64, to the definition's precision."""
    inputs = make_inputs(5, **SHAPES["grouped-BC"], dtype=torch.float64)
    inputs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    out, last = fn(**inputs, return_last_state=True)
    assert out.dtype == torch.float64 and last.dtype == torch.float64
    check_against_definition(fn, inputs, 5, F64)


def test_long_sequence_strong_decay_is_finite():
    """L = 4096 with delta up to ~20 and A down to -64: decays underflow to 0 without overflow or NaN."""
    length = 4096
    inputs = make_inputs(17, batch=1, dim=3, n=4, length=length, softplus=True)
    g = torch.Generator().manual_seed(18)
    inputs["delta"] = torch.randn(1, 3, length, generator=g) * 4 + 5  # softplus -> up to ~20
    inputs["A"] = -torch.rand(3, 4, generator=g) * 60 - 4
    leaf = leaves(inputs)
    out, last = selective_scan_torch(**leaf, return_last_state=True)
    out_e, last_e = scan_definition(**leaves(inputs, torch.float64))
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert_close(out, out_e, **F32, what="out")
    assert_close(last, last_e, **F32, what="last state")
    grads = torch.autograd.grad((out * torch.randn(out.shape, generator=g)).sum() + last.sum(),
                                [leaf[k] for k in GRAD_NAMES])
    for name, grad in zip(GRAD_NAMES, grads):
        assert torch.isfinite(grad).all(), name


def test_bad_shapes_raise_value_error():
    inputs = make_inputs(1)
    with pytest.raises(ValueError, match="delta"):
        selective_scan_torch(**{**inputs, "delta": inputs["delta"][..., :-1]})
    with pytest.raises(ValueError, match="groups"):
        selective_scan_torch(**{**inputs, "B": torch.randn(2, 4, 4, 37)})  # 4 groups do not divide d=6
    with pytest.raises(ValueError, match="D"):
        selective_scan_torch(**{**inputs, "D": torch.randn(5)})


# ----------------------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def best_cpu_backend() -> str:
    return "cpu" if cpu_scan.cpu_scan_status()[0] else "torch"


@pytest.mark.parametrize("env", [None, "", "auto", "torch", "TORCH", " auto ", "cpu"])
def test_resolve_cpu_tensors(monkeypatch, env):
    if env is None:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, env)
    expected = "torch" if env and env.strip().lower() == "torch" else best_cpu_backend()
    assert dispatch.resolve("auto", CPU) == expected
    assert dispatch.resolve("torch", CPU) == "torch"


def test_resolve_cuda_on_cpu_tensors_is_value_error(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="cuda"):
        dispatch.resolve("cuda", CPU)
    with pytest.raises(ValueError):
        selective_scan(**make_inputs(2), backend="cuda")


def test_env_var_cuda_leaves_cpu_tensors_on_the_best_cpu_backend(monkeypatch):
    # the variable picks the backend for CUDA tensors; CPU work in the same job must keep running
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dispatch.resolve("auto", CPU) == best_cpu_backend()
    inputs = make_inputs(2)
    torch.testing.assert_close(selective_scan(**inputs, backend="auto"), selective_scan(**inputs, backend="torch"))


def test_explicit_backend_beats_env_var(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    assert dispatch.resolve("torch", CPU) == "torch"


@pytest.mark.parametrize("name", ["tritn", "gpu", "CUDA2"])
def test_resolve_invalid_name(monkeypatch, name):
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.resolve("auto", CPU)
    monkeypatch.delenv(dispatch.ENV_VAR)
    with pytest.raises(ValueError, match="scan_backend must be one of"):
        dispatch.resolve(name, CPU)


def test_missing_kernels_are_reported_not_raised():
    kernel, reason = mamba_ssm_kernels.load_extension("selective_scan_cuda")
    usable, why = dispatch.cuda_scan_status()
    if kernel is None:
        assert reason and not usable and "selective_scan_cuda" in why
    fn, reason = mamba_ssm_kernels.causal_conv1d_function()
    assert (fn is None) == bool(reason)


def test_package_imports_without_compiled_kernels():
    """A fresh interpreter in which mamba_ssm, causal_conv1d and selective_scan_cuda cannot be imported."""
    code = (
        "import sys\n"
        "for m in ('mamba_ssm', 'causal_conv1d', 'selective_scan_cuda', 'causal_conv1d_cuda', 'triton'):\n"
        "    sys.modules[m] = None  # makes `import m` raise ImportError\n"
        "import torch, nnunet_segmamba, nnunet_segmamba.ssm, nnunet_segmamba.nn\n"
        "from nnunet_segmamba.ssm import dispatch, mamba_ssm_kernels\n"
        "assert mamba_ssm_kernels.load_extension('selective_scan_cuda')[0] is None\n"
        "assert mamba_ssm_kernels.causal_conv1d_function()[0] is None\n"
        "from nnunet_segmamba.ssm import cpu_scan\n"
        "assert dispatch.resolve('auto', torch.device('cpu')) == "
        "('cpu' if cpu_scan.cpu_scan_status()[0] else 'torch')\n"
        "assert not dispatch.triton_scan_status()[0]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------------------------
# GPU: mamba-ssm's kernel (backend "cuda") against the definition
# ----------------------------------------------------------------------------------------------------------------
def _cuda_kernel_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    usable, reason = dispatch.cuda_scan_status()
    return usable, reason


_GPU_READY, _GPU_REASON = _cuda_kernel_ready()
needs_kernel = pytest.mark.skipif(not _GPU_READY, reason=_GPU_REASON)

# (rtol, atol relative to the tensor's largest magnitude) for outputs and for gradients, per input dtype. The
# reference gets the same (bf16-rounded) inputs in float64, so the difference is the kernel's arithmetic only.
GPU_TOL = {
    torch.float32: dict(out=dict(rtol=1e-3, atol_scale=1e-3), grad=dict(rtol=2e-3, atol_scale=2e-3)),
    torch.bfloat16: dict(out=dict(rtol=3e-2, atol_scale=2e-2), grad=dict(rtol=5e-2, atol_scale=3e-2)),
}


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_z", [True, False], ids=["z", "no-z"])
@pytest.mark.parametrize("groups", [None, 2], ids=["ungrouped", "grouped"])
@pytest.mark.parametrize("length", [37, 2048])
def test_cuda_backend_matches_definition(dtype, with_z, groups, length):
    seed = 1000 + length + (groups or 0)
    inputs = make_inputs(seed, batch=2, dim=8, n=16, length=length, groups_B=groups, groups_C=groups,
                         with_z=with_z, dtype=dtype, device="cuda")
    # weights stay float32 as in a network: A, D, delta_bias
    expected_in = leaves({k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()},
                         torch.float64)
    out_e, last_e = scan_definition(**expected_in)
    actual_in = leaves(inputs)
    out_a, last_a = selective_scan(**actual_in, return_last_state=True, backend="cuda")
    assert out_a.dtype == dtype and out_a.is_cuda
    tol = GPU_TOL[dtype]
    assert_close(out_a.float(), out_e, **tol["out"], what="out")
    assert_close(last_a.float(), last_e, **tol["out"], what="last state")
    dout = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # the kernel's last state carries no gradient (as in mamba-ssm), so only the output gets one
    ge = grads_of(out_e, None, expected_in, dout, None)
    ga = grads_of(out_a, None, actual_in, dout.to(dtype).cuda(), None)
    for name in ge:
        assert_close(ga[name].float(), ge[name], **tol["grad"], what=f"grad {name}")


@pytest.mark.gpu
@needs_kernel
def test_cuda_backend_bf16_inputs_with_float32_B_C():
    """u/delta/z in bf16 with B/C left in float32 (mixed precision outside autocast) must work as on torch.

    mamba-ssm's kernel requires variable B/C to have u's dtype (TORCH_CHECK(B.scalar_type() == input_type)).
    """
    inputs = make_inputs(77, batch=2, dim=8, n=16, length=64, dtype=torch.bfloat16, device="cuda")
    inputs["B"], inputs["C"] = inputs["B"].float(), inputs["C"].float()
    out = selective_scan(**inputs, backend="cuda")
    ref = selective_scan(**inputs, backend="torch")
    assert_close(out.float(), ref.float(), **GPU_TOL[torch.bfloat16]["out"], what="out")
