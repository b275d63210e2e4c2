"""The Triton selective scan (`nnunet_segmamba.ssm.triton_scan`) against the float64 definition.

The kernel tests run wherever the kernels can: on CUDA, and on CPU through Triton's interpreter
(TRITON_INTERPRET=1, which must be set before triton decorates the kernels, so `test_kernels_under_interpreter`
runs this file again in a subprocess). That way CI, which has no GPU, still checks the kernels' arithmetic:
forward, last state and every gradient, all three visiting orders, grouped B/C, odd lengths, chunk sizes,
inputs that are slices of larger tensors.

On CUDA only (`-m gpu`): fp16 / bf16 inputs, long sequences, fp16 autocast at L = 262,144 (finite, equal to the
float32 computation, NaN propagating from where it enters), and the tri-orientated layer through index maps.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_segmamba.ssm import dispatch, selective_scan, triton_common, visit
from test_selective_scan import F32, GPU_TOL, assert_close, grads_of, leaves, make_inputs, scan_definition

if not triton_common.TRITON_AVAILABLE:
    pytest.skip(f"triton not importable: {triton_common.TRITON_IMPORT_ERROR}", allow_module_level=True)
from nnunet_segmamba.ssm import triton_scan  # noqa: E402

INTERPRETING = triton_common.interpreting()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else ("cpu" if INTERPRETING else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or TRITON_INTERPRET=1 on CPU "
                                                          "(test_kernels_under_interpreter does that)")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
# float32 on the GPU: Triton's exp is the hardware's approximate exp2 (relative error ~1e-7 per call)
TOL = F32 if DEVICE == "cpu" else dict(rtol=1e-4, atol_scale=1e-4)


def check_order(inputs, order, num_slices=None, tol=None, block_l=None, seed=0):
    """Triton with `order` against the definition run on inputs permuted into that order (and back)."""
    tol = tol or TOL

    def v(t, inverse=False):
        return visit(t, order, num_slices, inverse) if isinstance(t, torch.Tensor) and t.dim() >= 3 else t

    expected_in = leaves({k: (t.cpu() if isinstance(t, torch.Tensor) else t) for k, t in inputs.items()},
                         torch.float64)
    permuted = {k: (v(t) if k in ("u", "delta", "z", "B", "C") else t) for k, t in expected_in.items()}
    out_e, last_e = scan_definition(**permuted)
    out_e = v(out_e, inverse=True)
    actual_in = leaves(inputs)
    out_a, last_a = triton_scan.selective_scan_triton(**actual_in, return_last_state=True, mode=order,
                                                      num_slices=num_slices, block_l=block_l)
    assert out_a.dtype == inputs["u"].dtype and out_a.shape == inputs["u"].shape
    assert_close(out_a.float(), out_e, **tol["out"] if "out" in tol else tol, what="out")
    assert_close(last_a.float(), last_e, **tol["out"] if "out" in tol else tol, what="last state")
    # the upstream gradient rounded to the output's dtype for both, as the inputs are
    dout = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(seed)).to(out_a.dtype).double()
    ge = grads_of(out_e, None, expected_in, dout, None)  # the kernel's last state carries no gradient
    ga = grads_of(out_a, None, actual_in, dout.to(out_a.dtype).to(out_a.device), None)
    assert set(ga) == set(ge)
    # a gradient that is exactly zero by construction (dA at L = 1: no state precedes the first step) comes out of
    # the kernel as a float32 difference of O(1) terms (a_t h_{t-1} = h_t - dt_t B_t u_t): on the GPU it is
    # checked at the scale of the other gradients, not at zero
    scale = max(g.abs().max().item() for g in ge.values())
    for name in ge:
        assert ga[name].shape == ge[name].shape and ga[name].dtype == actual_in[name].dtype, name
        assert_close(ga[name].float(), ge[name], **tol["grad"] if "grad" in tol else tol, what=f"grad {name}",
                     scale=scale if ge[name].abs().max() == 0 else None)


SHAPES = {
    "odd-L37": dict(batch=2, dim=6, n=4, length=37),
    "L1": dict(batch=3, dim=4, n=4, length=1),
    "n16-L130": dict(batch=1, dim=4, n=16, length=130),
    "n3-not-pow2": dict(batch=2, dim=4, n=3, length=21),
    "grouped-BC": dict(batch=2, dim=6, n=4, length=37, groups_B=2, groups_C=3),
    "grouped-B-only": dict(batch=2, dim=8, n=4, length=23, groups_B=4),
}
OPTIONS = {
    "no-D": dict(with_D=False),
    "no-z": dict(with_z=False),
    "bias-no-softplus": dict(softplus=False),
    "bare": dict(with_D=False, with_z=False, with_bias=False, softplus=False),
}


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_definition(shape):
    check_order(make_inputs(11, **shape, device=DEVICE), "forward")


@needs_kernels
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_options_match_definition(options):
    check_order(make_inputs(12, batch=2, dim=4, n=4, length=29, **options, device=DEVICE), "forward")


@needs_kernels
@pytest.mark.parametrize("order, num_slices, length", [("reverse", None, 37), ("slice", 4, 36), ("slice", 3, 48),
                                                       ("slice", 1, 20), ("slice", 20, 20)])
def test_visiting_orders_match_definition(order, num_slices, length):
    check_order(make_inputs(13, batch=2, dim=4, n=4, length=length, groups_B=2, device=DEVICE), order, num_slices)


@needs_kernels
@pytest.mark.parametrize("block_l", [16, 32])
def test_chunk_sizes_and_long_decay(block_l):
    # 10 chunks of 16 or 5 of 32: the chunk-to-chunk carries of state and adjoint are exercised
    check_order(make_inputs(14, batch=2, dim=4, n=4, length=160, device=DEVICE), "forward", block_l=block_l)


@needs_kernels
@pytest.mark.parametrize("carry_states", [4, 2], ids=["all-states", "states-split"])
def test_carry_over_more_chunks_than_one_tile(monkeypatch, carry_states):
    # 33 chunks of 16 in carry tiles of 16 chunks (256 in use; the same code, 8x fewer programs to interpret): the
    # third tile holds one chunk, and each tile starts from the one before's last state (forward) and adjoint
    # (reverse); the 4 states in one program per channel, or 2 in each of two
    monkeypatch.setattr(triton_scan, "CARRY_TILE", 16)
    monkeypatch.setitem(triton_scan.TUNING, "carry_states", carry_states)
    check_order(make_inputs(15, batch=1, dim=1, n=4, length=16 * 33, device=DEVICE), "reverse", block_l=16)


# The backward's main kernel with its two in-chunk scans in rows of 8 steps (TUNING["bwd_rows"]; by default where a
# GPU sweep timed them faster), forced on here for every case: chunks of 16, 32 and 64 steps (2, 4 and 8 groups of 8
# across lanes) with a partial last chunk, every order, the carries from chunk to chunk, with and without z, D, bias
# and softplus.
ROWS_CASES = {
    "chunk16-forward": dict(block_l=16, order="forward", length=37),
    "chunk32-reverse": dict(block_l=32, order="reverse", length=101),
    "chunk64-slice": dict(block_l=64, order="slice", num_slices=5, length=150),
    "chunk64-one-chunk-bare": dict(block_l=64, order="forward", length=29,
                                   options=dict(with_D=False, with_z=False, with_bias=False, softplus=False)),
    "chunk64-no-z-n16": dict(block_l=64, order="forward", length=200, n=16, options=dict(with_z=False)),
    # no padded steps, as at SegMamba's stages
    "chunk16-no-z-unpadded": dict(block_l=16, order="slice", num_slices=4, length=64, options=dict(with_z=False)),
}


def test_backward_scans_in_rows_where_timed_faster_unless_set(monkeypatch):
    """By default (bwd_rows None) the rows run for 16-bit inputs with the gate outside the scan, the case a GPU
    timed faster; with the gate or in float32 the flips; True and False choose for every input."""
    half, single = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    monkeypatch.setitem(triton_scan.TUNING, "bwd_rows", None)
    assert triton_scan._bwd_in_rows(half, None) and triton_scan._bwd_in_rows(half.half(), None)
    assert not triton_scan._bwd_in_rows(half, half) and not triton_scan._bwd_in_rows(single, None)
    monkeypatch.setitem(triton_scan.TUNING, "bwd_rows", True)
    assert triton_scan._bwd_in_rows(single, single)
    monkeypatch.setitem(triton_scan.TUNING, "bwd_rows", False)
    assert not triton_scan._bwd_in_rows(half, None)


@needs_kernels
@pytest.mark.parametrize("case", ROWS_CASES.values(), ids=ROWS_CASES.keys())
def test_backward_in_rows_matches_definition(monkeypatch, case):
    monkeypatch.setitem(triton_scan.TUNING, "bwd_rows", True)
    inputs = make_inputs(18, batch=2, dim=4, n=case.get("n", 4), length=case["length"], groups_B=2,
                         **case.get("options", {}), device=DEVICE)
    check_order(inputs, case["order"], case.get("num_slices"), block_l=case["block_l"])


@needs_kernels
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "flips"])
def test_padded_steps_with_negative_step_sizes_stay_out_of_the_results(monkeypatch, rows):
    """Without the softplus dt = delta + bias may be negative. The last chunk's padding loads delta as 0, so its dt
    would be the bias, here -40, and its decay exp(-40 A) overflows: the kernels zero the padding's dt, and the
    outputs and gradients stay the definition's (where a NaN from inf x 0 would otherwise reach the real steps)."""
    monkeypatch.setitem(triton_scan.TUNING, "bwd_rows", rows)
    inputs = make_inputs(19, batch=1, dim=2, n=4, length=20, softplus=False, device=DEVICE)
    inputs["delta_bias"] = torch.full_like(inputs["delta_bias"], -40.0)
    inputs["delta"] = inputs["delta"] + 40.0  # the drawn step sizes at the real steps (exact: Sterbenz)
    check_order(inputs, "forward", block_l=16)  # 4 real steps and 12 padded ones in the last chunk


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("order, num_slices, length", [("forward", None, 4099), ("slice", 16, 4096)])
def test_backward_in_rows_cuda_dtypes(monkeypatch, dtype, order, num_slices, length):
    monkeypatch.setitem(triton_scan.TUNING, "bwd_rows", True)
    inputs = make_inputs(200 + length, batch=2, dim=8, n=16, length=length, dtype=dtype, device="cuda")
    check_order(inputs, order, num_slices, tol=HALF_TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("programs_per_sm, splits", [(0, 1), (12, 2), (10 ** 6, 8)],
                         ids=["one-split", "two-splits", "split-per-channel"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, needs_cuda])],
                         ids=["fp32", "bf16"])
def test_channel_splits_of_the_chunk_kernels(monkeypatch, one_multiprocessor, programs_per_sm, splits, dtype):
    """Every chunk kernel walks a group's channels in one program, or in several when the channels are split; with
    one split the backward's kernel writes dB / dC in the inputs' dtype itself, with several torch adds up float32
    partial sums (two in one pass): all give the definition's outputs and gradients."""
    monkeypatch.setitem(triton_scan.TUNING, "fwd_programs_per_sm", programs_per_sm)
    monkeypatch.setitem(triton_scan.TUNING, "bwd_programs_per_sm", programs_per_sm)
    assert triton_scan._d_split(2, 1, 3, 8, torch.device(DEVICE), programs_per_sm) == splits
    inputs = make_inputs(17, batch=2, dim=8, n=4, length=136, dtype=dtype, device=DEVICE)  # 3 chunks, last partial
    check_order(inputs, "forward", tol=HALF_TOL[dtype] if dtype != torch.float32 else TOL, block_l=64)


@pytest.mark.parametrize("chunks, splits", [(3, 4), (4, 1)], ids=["grid-below-threshold", "grid-at-threshold"])
def test_backward_is_unsplit_where_its_grid_fills_the_gpu(monkeypatch, one_multiprocessor, chunks, splits):
    """The backward's main kernel splits a group's channels as the other chunk kernels do, up to
    `bwd_programs_per_sm`, except where its unsplit grid already has `bwd_unsplit_programs_per_sm` programs per
    multiprocessor (here one): batch 2 x 3 chunks = 6 programs are split for 24, 2 x 4 = 8 are not."""
    monkeypatch.setitem(triton_scan.TUNING, "bwd_programs_per_sm", 24)
    monkeypatch.setitem(triton_scan.TUNING, "bwd_unsplit_programs_per_sm", 8)
    assert triton_scan._bwd_split(2, 1, chunks, 8, torch.device("cpu")) == splits


@pytest.mark.parametrize("channels_per_program, splits", [(8, 2), (4, 2), (3, 4), (2, 4), (1, 8)])
def test_split_backward_walks_at_most_the_capped_channels_a_program(monkeypatch, one_multiprocessor,
                                                                      channels_per_program, splits):
    """Where the backward's main kernel is split, each program walks at most `bwd_channels_per_program` of the
    group's 8 channels: the fewest splits (divisors of 8) beyond what the grid asks for (here 2) that do so."""
    monkeypatch.setitem(triton_scan.TUNING, "bwd_programs_per_sm", 12)  # 2 x 3 programs, split in two
    monkeypatch.setitem(triton_scan.TUNING, "bwd_unsplit_programs_per_sm", 8)
    monkeypatch.setitem(triton_scan.TUNING, "bwd_channels_per_program", channels_per_program)
    assert triton_scan._bwd_split(2, 1, 3, 8, torch.device("cpu")) == splits
    # an unsplit grid stays unsplit, whatever the cap
    assert triton_scan._bwd_split(2, 1, 4, 8, torch.device("cpu")) == 1


@needs_kernels
@pytest.mark.parametrize("programs_per_sm, splits", [(0, 1), (12, 2), (10 ** 6, 8)],
                         ids=["one-split", "two-splits", "split-per-channel"])
def test_packed_gradient_is_the_three_gradients(monkeypatch, one_multiprocessor, programs_per_sm, splits):
    """The backward with delta | B | C's gradient as one tensor: its rows are the three gradients of the unpacked
    backward, bit for bit, whether the kernel writes them in place (one split) or the splits' partial sums are added
    up into them; the other gradients are the same too."""
    monkeypatch.setitem(triton_scan.TUNING, "bwd_programs_per_sm", programs_per_sm)
    assert triton_scan._d_split(2, 1, 3, 8, torch.device(DEVICE), programs_per_sm) == splits
    x = make_inputs(23, batch=2, dim=8, n=4, length=136, device=DEVICE)  # 3 chunks of 64, the last partial
    delta_B_C = torch.cat([x["delta"], x["B"], x["C"]], 1)
    delta, B, C = delta_B_C[:, :8], delta_B_C[:, 8:12], delta_B_C[:, 12:]  # row slices, as the layers pass them
    out, _, states, chunk_sum = triton_scan.selective_scan_triton_fwd(x["u"], delta, x["A"], B, C, x["D"], None,
                                                                      x["delta_bias"], True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    common = (dout, x["u"], delta, x["A"], B, C, x["D"], None, x["delta_bias"], True, states, chunk_sum)
    du, ddelta, dA, dB, dC, dD, _, dbias = triton_scan.selective_scan_triton_bwd(*common)
    du_p, d_delta_B_C, dA_p, dD_p, _, dbias_p = triton_scan.selective_scan_triton_bwd(*common, packed=True)
    torch.testing.assert_close(d_delta_B_C, torch.cat([ddelta, dB, dC], 1), rtol=0, atol=0)
    for packed, unpacked in ((du_p, du), (dA_p, dA), (dD_p, dD), (dbias_p, dbias)):
        torch.testing.assert_close(packed, unpacked, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("rows", [0, 1, 3, 700])
def test_partial_sums_added_up(rows):
    """The backward's float32 partial sums added up over their rows (`sum_parts`, `sum_parts_into_columns`): the
    sums in every output's dtype and layout, zeros where there is nothing to add, in the same order on every run."""
    g = torch.Generator().manual_seed(rows)
    parts = torch.randn(rows, 5, 18, generator=g).to(DEVICE)
    expected = parts.double().sum(0)
    dA, dD = torch.empty(5, 16, device=DEVICE), torch.empty(5, dtype=torch.float16, device=DEVICE)
    dbias = torch.empty(5, dtype=torch.float64, device=DEVICE)
    triton_common.sum_parts_into_columns(parts, [dA, dD, dbias])
    torch.testing.assert_close(dA.double(), expected[:, :16], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dD.double(), expected[:, 16].half().double(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dbias, expected[:, 17], rtol=1e-5, atol=1e-4)
    # the dD and dbias columns as one (D, 2) output
    both = triton_common.sum_parts_into_columns(parts, [dA.clone(), torch.empty(5, 2, device=DEVICE)])[1]
    torch.testing.assert_close(both.double(), expected[:, 16:], rtol=1e-5, atol=1e-4)
    # into the rows of a larger tensor (the packed gradient's last rows), rounded once
    flat = parts.reshape(rows, 3, 30)
    packed = torch.zeros(3, 40, dtype=torch.bfloat16, device=DEVICE)
    triton_common.sum_parts(flat, packed[:, 10:])
    torch.testing.assert_close(packed[:, 10:].double(), flat.double().sum(0), rtol=8e-3, atol=1e-5)
    assert not packed[:, :10].any()
    again = torch.zeros_like(packed)
    triton_common.sum_parts(flat, again[:, 10:])
    assert torch.equal(again, packed)
    with pytest.raises(ValueError, match="add up to W"):
        triton_common.sum_parts_into_columns(parts, [dA])
    # parameter sets in one launch: each set's rows into its own outputs, as each set alone gives them
    sets = torch.stack([parts, parts.flip(0) * 2])
    dA_s, dD_s = torch.empty(2, 5, 16, device=DEVICE), torch.empty(2, 5, device=DEVICE)
    triton_common.sum_parts_into_columns(sets, [dA_s, dD_s, torch.empty(2, 5, 1, device=DEVICE)])
    for i in range(2):
        alone = [torch.empty(5, 16, device=DEVICE), torch.empty(5, device=DEVICE), torch.empty(5, 1, device=DEVICE)]
        triton_common.sum_parts_into_columns(sets[i].contiguous(), alone)
        assert torch.equal(dA_s[i], alone[0]) and torch.equal(dD_s[i], alone[1])


def test_triton_without_gather_is_reported_unavailable(monkeypatch):
    """Triton before 3.3 (torch < 2.7) lacks tl.gather, which the backward uses: the backend is then unavailable,
    with the version and the fix, and the dispatcher falls back instead of failing at the first compile."""
    import importlib

    monkeypatch.delattr(triton_common.tl, "gather")
    try:
        importlib.reload(triton_common)
        assert not triton_common.TRITON_AVAILABLE
        assert "lacks tl.gather" in triton_common.TRITON_IMPORT_ERROR
        available, reason = dispatch.triton_scan_status()
        assert not available and "torch>=2.7" in reason
    finally:
        monkeypatch.undo()
        importlib.reload(triton_common)
    assert triton_common.TRITON_AVAILABLE


@needs_kernels
def test_slices_of_larger_tensors_are_read_in_place():
    """x and z as halves of one in_proj output, B and C as rows of one x_proj output: same as contiguous."""
    g = torch.Generator().manual_seed(15)
    b, d, n, L = 2, 4, 4, 40
    xz = torch.randn(b, 2 * d, L, generator=g).to(DEVICE)
    proj = torch.randn(b, 3 + 2 * n, L, generator=g).to(DEVICE)
    delta = (torch.randn(b, d, L, generator=g) * 0.5 - 1).to(DEVICE)
    A = -torch.rand(d, n, generator=g).add(0.5).to(DEVICE)
    u, z = xz.chunk(2, 1)
    B, C = proj[:, 3:3 + n], proj[:, 3 + n:]
    assert not u.is_contiguous() and not B.is_contiguous()
    for order, ns in (("forward", None), ("slice", 5)):
        strided = triton_scan.selective_scan_triton(u, delta, A, B, C, None, z, None, True, mode=order,
                                                    num_slices=ns)
        dense = triton_scan.selective_scan_triton(u.contiguous(), delta, A, B.contiguous(), C.contiguous(), None,
                                                  z.contiguous(), None, True, mode=order, num_slices=ns)
        torch.testing.assert_close(strided, dense, rtol=0, atol=0)


@needs_kernels
def test_dispatcher_uses_triton_with_orders():
    inputs = make_inputs(16, batch=1, dim=4, n=4, length=24, device=DEVICE)
    out = selective_scan(**inputs, backend="triton", order="slice", num_slices=4)
    ref = selective_scan(**{k: (t.cpu() if isinstance(t, torch.Tensor) else t) for k, t in inputs.items()},
                         backend="torch", order="slice", num_slices=4)
    assert_close(out, ref, **TOL, what="dispatcher")


def test_bad_arguments_raise_value_error():
    inputs = make_inputs(17, batch=1, dim=4, n=4, length=24)
    with pytest.raises(ValueError, match="mode"):
        triton_scan.selective_scan_triton(**inputs, mode="sideways")
    with pytest.raises(ValueError, match="num_slices"):
        triton_scan.selective_scan_triton(**inputs, mode="slice", num_slices=5)
    with pytest.raises(ValueError, match="block_l"):
        triton_scan.selective_scan_triton(**inputs, block_l=24)


def test_resolve_triton(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    if not INTERPRETING:
        # like "cuda": the variable chooses for CUDA tensors, CPU tensors keep the best CPU backend
        from nnunet_segmamba.ssm import cpu_scan

        assert dispatch.resolve("auto", cpu) == ("cpu" if cpu_scan.cpu_scan_status()[0] else "torch")
        with pytest.raises(ValueError, match="triton"):
            dispatch.resolve("triton", cpu)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.resolve("torch", cpu) == "torch"


def test_kernels_under_interpreter(run_under_triton_interpreter):
    """Run this file's kernel tests on CPU through Triton's interpreter (how CI checks the kernels)."""
    run_under_triton_interpreter(__file__, "not test_kernels_under_interpreter")


# ----------------------------------------------------------------------------------------------------------------
# CUDA only
# ----------------------------------------------------------------------------------------------------------------
HALF_TOL = {torch.float16: dict(out=dict(rtol=1e-2, atol_scale=5e-3), grad=dict(rtol=2e-2, atol_scale=1e-2)),
            **GPU_TOL}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("order, num_slices, length", [("forward", None, 4099), ("reverse", None, 1031),
                                                       ("slice", 16, 4096)])
def test_cuda_dtypes_and_lengths(dtype, order, num_slices, length):
    inputs = make_inputs(100 + length, batch=2, dim=8, n=16, length=length, groups_B=None, dtype=dtype,
                         device="cuda")
    check_order(inputs, order, num_slices, tol=HALF_TOL[dtype] if dtype != torch.float32 else TOL)


L_LONG = 64 ** 3


@pytest.mark.gpu
@needs_cuda
def test_fp16_autocast_long_sequence_is_finite_and_matches_float32():
    """L = 262,144 in fp16, as SegMamba's first stage sees it under autocast: no overflow to inf or NaN in the
    output or any gradient, and the same result as the float32 computation of the same fp16 inputs."""
    inputs = make_inputs(200, batch=1, dim=8, n=16, length=L_LONG, dtype=torch.float16, device="cuda")
    half = leaves(inputs)
    with torch.autocast("cuda", dtype=torch.float16):
        out = triton_scan.selective_scan_triton(**half)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    full = leaves(inputs, torch.float32)
    ref = triton_scan.selective_scan_triton(**full)
    assert_close(out.float(), ref, **HALF_TOL[torch.float16]["out"], what="fp16 vs fp32 out")
    dout = torch.randn_like(ref)
    g_half = grads_of(out, None, half, dout.half(), None)
    g_full = grads_of(ref, None, full, dout, None)
    for name, g in g_half.items():
        assert torch.isfinite(g).all(), name
        assert_close(g.float(), g_full[name], **HALF_TOL[torch.float16]["grad"], what=f"grad {name}")
    torch_ref = selective_scan(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()},
                               backend="torch")
    assert_close(ref, torch_ref, rtol=1e-3, atol_scale=1e-3, what="triton vs torch scan at L=262144")


@pytest.mark.gpu
@needs_cuda
def test_nan_propagates_from_where_it_enters():
    """A NaN in u at step t poisons the state from t on (as in every backend), never the steps before it."""
    L = L_LONG
    inputs = make_inputs(201, batch=1, dim=4, n=16, length=L, dtype=torch.float16, device="cuda")
    t_nan = L // 2 + 3
    inputs["u"][0, 1, t_nan] = float("nan")
    out = triton_scan.selective_scan_triton(**inputs)
    assert torch.isfinite(out[:, :, :t_nan]).all() and torch.isfinite(out[:, [0, 2, 3]]).all()
    assert torch.isnan(out[0, 1, t_nan:]).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not dispatch.cuda_scan_status()[0], reason="mamba-ssm's kernel is not installed")
def test_cuda_and_triton_backends_agree():
    inputs = make_inputs(202, batch=2, dim=64, n=16, length=32 ** 3, dtype=torch.bfloat16, device="cuda")
    a, b = leaves(inputs), leaves(inputs)
    out_t = selective_scan(**a, backend="triton")
    out_c = selective_scan(**b, backend="cuda")
    assert_close(out_t.float(), out_c.float(), **GPU_TOL[torch.bfloat16]["out"], what="out")
    dout = torch.randn_like(out_t)
    gt, gc = grads_of(out_t, None, a, dout, None), grads_of(out_c, None, b, dout, None)
    for name in gt:
        assert_close(gt[name].float(), gc[name].float(), **GPU_TOL[torch.bfloat16]["grad"], what=f"grad {name}")


# ----------------------------------------------------------------------------------------------------------------
# The tri-orientated layer through index maps
# ----------------------------------------------------------------------------------------------------------------
@needs_kernels
def test_tri_oriented_layer_index_maps_equal_copies_and_torch():
    """ToM with the triton backend reading the reverse and inter-slice orders in the kernels (no copies) against
    the same layer on flipped / permuted copies, and against the torch backend: outputs and all gradients."""
    from nnunet_segmamba.nn import TriOrientedMamba

    torch.manual_seed(18)
    layer = TriOrientedMamba(4, d_state=4, scan_backend="triton").to(DEVICE)  # small: CI runs it interpreted
    hidden = torch.randn(2, 4 * 3 * 5, 4, device=DEVICE)
    results = {}
    for name, backend, orders in (("maps", "triton", ("reverse", "slice")), ("copies", "triton", ()),
                                  ("torch", "torch", ())):
        layer.scan_backend, layer.index_map_orders = backend, orders
        layer.zero_grad()
        x = hidden.detach().clone().requires_grad_(True)
        out = layer(x, num_slices=4)
        out.backward(torch.ones_like(out))
        results[name] = [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]
    del layer.index_map_orders  # back to the class default
    for name in ("copies", "torch"):
        for a, b in zip(results["maps"], results[name]):
            assert_close(a.float().cpu(), b.double().cpu(), **TOL, what=f"maps vs {name}")


@needs_kernels
@pytest.mark.parametrize("packed, programs_per_sm", [(False, 0), (True, 10 ** 6)],
                         ids=["unpacked-one-split", "packed-split-per-channel"])
def test_parameter_sets_are_the_scans_of_each_set(monkeypatch, one_multiprocessor, packed, programs_per_sm):
    """A, D and delta_bias as (sets, d, ...): set i serves the i-th block of batch / sets consecutive batch elements,
    so one scan over the blocks stacked on the batch gives each block's own scan, outputs and gradients (their
    parameters' gradients summed over the block only): bit for bit, except dB and dC where the channel splits'
    float32 partial sums are added up (`sum_parts` tiles their rows by the column count, which the stacked batch
    triples: the same terms, summed in another order on a GPU)."""
    monkeypatch.setitem(triton_scan.TUNING, "bwd_programs_per_sm", programs_per_sm)
    sets, block = 3, 2
    dim, n, length = 4, 4, 70  # two chunks of 64, the last partial
    x = [make_inputs(40 + i, batch=block, dim=dim, n=n, length=length, with_z=False, device=DEVICE)
         for i in range(sets)]
    stacked = {k: torch.cat([xi[k] for xi in x]) if k in ("u", "delta", "B", "C") else torch.stack([xi[k] for xi in x])
               for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")}
    dout = torch.randn(sets * block, dim, length, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def scan_and_grads(t, dy):
        delta, B, C = t["delta"], t["B"], t["C"]
        out, _, states, chunk_sum = triton_scan.selective_scan_triton_fwd(t["u"], delta, t["A"], B, C, t["D"], None,
                                                                          t["delta_bias"], True)
        if packed:  # delta | B | C as one tensor, as the layers' projection gives them
            delta_B_C = torch.cat([delta, B, C], 1)
            delta, B, C = delta_B_C[:, :dim], delta_B_C[:, dim:dim + n], delta_B_C[:, dim + n:]
        grads = triton_scan.selective_scan_triton_bwd(dy, t["u"], delta, t["A"], B, C, t["D"], None, t["delta_bias"],
                                                      True, states, chunk_sum, packed=packed)
        return out, [g for g in grads if g is not None]

    out, grads = scan_and_grads(stacked, dout)
    for i in range(sets):
        rows = slice(i * block, (i + 1) * block)
        out_i, grads_i = scan_and_grads(x[i], dout[rows].contiguous())
        torch.testing.assert_close(out[rows], out_i, rtol=0, atol=0)
        # per batch element: du, d delta | B | C (packed) or ddelta, dB, dC; per set: dA, dD, dbias
        per_batch = [True, True, False, False, False] if packed else [True, True, False, True, True, False, False]
        for k, (g, g_i, batched) in enumerate(zip(grads, grads_i, per_batch)):
            summed_splits = programs_per_sm and (k == 1 if packed else k in (3, 4))  # d delta | B | C, or dB, dC
            tol = dict(rtol=1e-5, atol=1e-6 * g_i.abs().max().item()) if summed_splits else dict(rtol=0, atol=0)
            torch.testing.assert_close(g[rows] if batched else g[i], g_i, **tol)
