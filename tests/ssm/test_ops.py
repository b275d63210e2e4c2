"""The custom ops of `nnunet_segmamba.ssm.ops` and torch.compile of the layers built on them.

CPU tests use the torch scan and small sizes. fullgraph=True makes any graph break an error, so a compile that
succeeds is the proof of zero graph breaks; "aot_eager" traces forward and backward as inductor would but skips
code generation (seconds instead of a minute), and one test runs inductor itself. GPU tests (marked `gpu`)
repeat the op checks and the compile for every backend that loads.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_segmamba.benchmark import memory_held_by
from nnunet_segmamba.networks import SegMamba
from nnunet_segmamba.networks.blocks import Conv3d
from nnunet_segmamba.nn import SS2D, TriOrientedMamba
from nnunet_segmamba.ssm import dispatch, ops, triton_common
from nnunet_segmamba.ssm.api import selective_scan_packed

SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
CUDA = torch.cuda.is_available()
# the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set before the first import, as for
# tests/ssm/test_triton_scan.py); their backward returns aliased gradients that the op must copy
CPU_BACKENDS = ["torch"] + (["triton"] if triton_common.interpreting() else [])


@pytest.fixture(autouse=True)
def _quiet(one_thread, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _scan_inputs(seed=0, batch=2, dim=4, n=3, length=12, groups=None, optional=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    # B and C as row slices of one tensor, as the mixer's x_proj output gives them (strided along the batch)
    rows = n * (groups or 1)
    B, C = r(batch, 2 * rows + 1, length).split([rows, rows, 1], dim=1)[:2]
    if groups is not None:
        B, C = B.unflatten(1, (groups, n)), C.unflatten(1, (groups, n))
    return [r(batch, dim, length), r(batch, dim, length, scale=0.5), -torch.rand(dim, n, generator=g).to(device) - 0.5,
            B, C, r(dim) if optional else None, r(batch, dim, length) if optional else None,
            r(dim) if optional else None]


def _grads(fn, tensors):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _assert_same(a, b, atol=0.0, what=""):
    assert (a is None) == (b is None), what
    if a is not None:
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")


# ---- the ops ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    dict(optional=True, order="slice", num_slices=4),
    dict(optional=False, groups=2, order="reverse", num_slices=None, softplus=False),
], ids=["D-z-bias-slice", "none-grouped-reverse"])
def test_scan_op_passes_opcheck(case):
    inputs = _scan_inputs(groups=case.get("groups"), optional=case["optional"])
    settings = (case.get("softplus", True), "torch", case["order"], case["num_slices"])
    torch.library.opcheck(ops.selective_scan, (*inputs, *settings))
    dout, dlast = torch.randn(inputs[0].shape), torch.randn(*inputs[0].shape[:2], inputs[2].shape[1])
    residuals = (torch.empty(0), torch.empty(0))  # what the forward returns for the torch scan
    torch.library.opcheck(ops.selective_scan_bwd, (dout, dlast, *inputs, *residuals, *settings),
                          test_utils=("test_schema", "test_faketensor"))


def test_packed_scan_op_passes_opcheck():
    u, delta, A, B, C, D, z, bias = _scan_inputs(seed=6)
    inputs = (u, torch.cat([delta, B, C], 1), A, D, z, bias)
    settings = (True, "torch", "slice", 4)
    torch.library.opcheck(ops.selective_scan_packed, (*inputs, *settings))
    dout, dlast = torch.randn(u.shape), torch.randn(*u.shape[:2], A.shape[1])
    torch.library.opcheck(ops.selective_scan_packed_bwd,
                          (dout, dlast, *inputs, torch.empty(0), torch.empty(0), *settings),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bias", [True, False])
def test_conv_op_passes_opcheck(bias):
    x, w, b = torch.randn(2, 4, 12), torch.randn(4, 1, 3), torch.randn(4) if bias else None
    settings = (True, "torch", "slice" if bias else "forward", 4 if bias else None)
    torch.library.opcheck(ops.causal_conv1d, (x, w, b, *settings))
    torch.library.opcheck(ops.causal_conv1d_bwd, (torch.randn(x.shape), x, w, b, *settings),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("order,num_slices", [("forward", None), ("reverse", None), ("slice", 3)])
@pytest.mark.parametrize("optional", [True, False], ids=["D-z-bias", "none"])
def test_scan_op_matches_eager_with_gradients(order, num_slices, optional, backend):
    """Same implementation inside: values and gradients are equal, bit for bit; absent inputs get no gradient."""
    inputs = _scan_inputs(seed=1, optional=optional)
    out_o, grads_o = _grads(lambda *t: ops.selective_scan(*t, True, backend, order, num_slices), inputs)
    out_e, grads_e = _grads(lambda *t: dispatch.selective_scan_eager(*t, True, False, backend, order, num_slices),
                            inputs)
    _assert_same(out_o, out_e, what="out")
    for name, go, ge in zip(SCAN_NAMES, grads_o, grads_e):
        _assert_same(go, ge, what=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_op_matches_eager_with_gradients(backend):
    inputs = [torch.randn(2, 4, 12), torch.randn(4, 1, 3), torch.randn(4)]
    out_o, grads_o = _grads(lambda *t: ops.causal_conv1d(*t, True, backend, "slice", 3), inputs)
    out_e, grads_e = _grads(lambda *t: dispatch.causal_conv1d_eager(*t, True, backend, "slice", 3), inputs)
    _assert_same(out_o, out_e, what="out")
    for name, go, ge in zip(("x", "weight", "bias"), grads_o, grads_e):
        _assert_same(go, ge, what=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ([pytest.param("triton", marks=pytest.mark.gpu)] if CUDA else []))
@pytest.mark.parametrize("programs_per_sm, splits", [(0, 1), (4, 2), (10 ** 6, 4)],
                         ids=["one-split", "two-splits", "split-per-channel"])
def test_packed_scan_op_gives_the_three_gradients_as_one(monkeypatch, one_multiprocessor, backend, programs_per_sm,
                                                       splits):
    """delta | B | C as one input: the outputs of the scan on its rows and, as one tensor, their three gradients,
    bit for bit; on the Triton kernels written in place with one channel split, added up with several (two in one
    pass into the packed gradient's rows)."""
    from nnunet_segmamba.ssm import triton_scan

    monkeypatch.setitem(triton_scan.TUNING, "bwd_programs_per_sm", programs_per_sm)
    # the inputs below: batch 2, one chunk, 4 channels
    device = "cuda" if CUDA and backend == "triton" else "cpu"
    assert triton_scan._d_split(2, 1, 1, 4, torch.device(device), programs_per_sm) == splits
    u, delta, A, B, C, D, z, bias = _scan_inputs(seed=4, device=device)
    out_s, grads_s = _grads(lambda *t: ops.selective_scan(*t, True, backend, "slice", 3),
                            [u, delta, A, B, C, D, z, bias])
    out_p, grads_p = _grads(lambda *t: ops.selective_scan_packed(*t, True, backend, "slice", 3),
                            [u, torch.cat([delta, B, C], 1), A, D, z, bias])
    _assert_same(out_p, out_s, what="out")
    _assert_same(grads_p[1], torch.cat([grads_s[1], grads_s[3], grads_s[4]], 1), what="grad delta | B | C")
    for name, gp, gs in zip(("u", "A", "D", "z", "delta_bias"), grads_p[:1] + grads_p[2:], grads_s[:1] + grads_s[2:3]
                            + grads_s[5:]):
        _assert_same(gp, gs, what=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ([pytest.param("triton", marks=pytest.mark.gpu)] if CUDA else []))
def test_parameter_sets_through_the_ops_are_each_sets_ops(backend):
    """The packed scan op and the causal conv op with parameter sets (A (sets, d, n), D and delta_bias (sets, d), the
    conv's weight (sets, d, 1, K) and bias (sets, d)): each block of the batch gets its set's outputs and gradients,
    as the ops called on each block with its own parameters (in one launch on the Triton kernels, set by set
    elsewhere)."""
    device = "cuda" if CUDA and backend == "triton" else "cpu"
    sets, blocks = 3, [_scan_inputs(seed=10 + i, optional=True, device=device) for i in range(3)]
    for inputs in blocks:
        inputs[6] = None  # no gate, as the compiled layers call the scan
    g = torch.Generator().manual_seed(7)
    conv_w = [(torch.randn(4, 1, 4, generator=g) * 0.5).to(device) for _ in range(sets)]
    conv_b = [torch.randn(4, generator=g).to(device) for _ in range(sets)]

    def layer(x, delta_B_C, A, D, bias, w, b):
        u = ops.causal_conv1d(x, w, b, True, backend, "forward", None)
        return ops.selective_scan_packed(u, delta_B_C, A, D, None, bias, True, backend, "slice", 3)[0]

    def args(inputs, w, b):
        x, delta, A, B, C, D, _, bias = inputs
        return [x, torch.cat([delta, B, C], 1), A, D, bias, w, b]

    stacked = [torch.cat(ts) if k in (0, 1) else torch.stack(ts)
               for k, ts in enumerate(zip(*[args(blocks[i], conv_w[i], conv_b[i]) for i in range(sets)]))]
    out, grads = _grads(layer, stacked)
    for i in range(sets):
        out_i, grads_i = _grads(layer, args(blocks[i], conv_w[i], conv_b[i]))
        rows = slice(2 * i, 2 * i + 2)
        _assert_same(out[rows], out_i, atol=1e-6, what=f"out of set {i}")
        for k, (g_all, g_i) in enumerate(zip(grads, grads_i)):
            _assert_same(g_all[rows] if k < 2 else g_all[i], g_i, atol=1e-5, what=f"grad {k} of set {i}")


def test_packed_scan_names_a_wrong_row_count():
    u, delta, A, B, C, *_ = _scan_inputs()
    with pytest.raises(ValueError, match="delta_B_C must be"):
        selective_scan_packed(u, torch.cat([delta, B], 1), A)


def test_eager_calls_do_not_go_through_the_ops(monkeypatch):
    """Eager mode calls the implementations directly: the op's dispatch costs nothing there."""
    def refuse(*args):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(ops, "selective_scan", refuse)
    monkeypatch.setattr(ops, "selective_scan_packed", refuse)
    monkeypatch.setattr(ops, "causal_conv1d", refuse)
    TriOrientedMamba(8, d_state=4, scan_backend="torch")(torch.randn(1, 16, 8), num_slices=4).sum().backward()


@pytest.mark.skipif(not (CUDA or triton_common.interpreting()), reason="needs CUDA or TRITON_INTERPRET=1 "
                    "(test_triton_residuals_under_interpreter runs it so)")
@pytest.mark.parametrize("optional", [True, False], ids=["D-z-bias", "none"])
def test_triton_backward_uses_the_forwards_residuals(monkeypatch, optional):
    """On the Triton kernels the op's forward returns the chunk states and the backward runs no forward again;
    values and gradients are still eager's, bit for bit."""
    from nnunet_segmamba.ssm.triton_scan import residual_shapes

    device = "cuda" if CUDA else "cpu"
    inputs = _scan_inputs(seed=3, optional=optional, device=device)
    assert dispatch.scan_keeps_residuals("triton", inputs[0].device)
    _, _, states, chunk_sum = ops.selective_scan(*inputs, True, "triton", "slice", 3)
    assert (tuple(states.shape), tuple(chunk_sum.shape)) == residual_shapes(inputs[0].shape, inputs[2].shape[1])
    out_e, grads_e = _grads(lambda *t: dispatch.selective_scan_eager(*t, True, False, "triton", "slice", 3), inputs)

    def refuse(*args, **kwargs):
        raise AssertionError("the backward ran the forward again")

    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    out_o = ops.selective_scan(*leaves, True, "triton", "slice", 3)[0]
    monkeypatch.setattr(dispatch, "selective_scan_eager", refuse)
    monkeypatch.setattr(dispatch, "selective_scan_keeping_residuals", refuse)
    out_o.square().sum().backward()
    _assert_same(out_o.detach(), out_e, what="out")
    for name, leaf, ge in zip(SCAN_NAMES, leaves, grads_e):
        _assert_same(leaf.grad if leaf is not None else None, ge, what=f"grad {name}")


@pytest.mark.skipif(not (CUDA or triton_common.interpreting()), reason="needs CUDA or TRITON_INTERPRET=1 "
                    "(test_triton_residuals_under_interpreter runs it so)")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_triton_conv_backward_runs_no_forward(monkeypatch, bias):
    """On the Triton kernels the conv op's backward needs only the forward's inputs: no forward runs again there,
    and the gradients are eager's (the autograd function's backward is the same code)."""
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(5)
    # x as the mixer passes it: one half of the in_proj output, strided along the batch
    x = torch.randn(2, 8, 12, generator=g).to(device)[:, 4:]
    inputs = [x, torch.randn(4, 1, 3, generator=g).to(device), torch.randn(4, generator=g).to(device) if bias else None]
    out_e, grads_e = _grads(lambda *t: dispatch.causal_conv1d_eager(*t, True, "triton", "slice", 3), inputs)

    def refuse(*args, **kwargs):
        raise AssertionError("the backward ran the forward again")

    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    out_o = ops.causal_conv1d(*leaves, True, "triton", "slice", 3)
    monkeypatch.setattr(dispatch, "causal_conv1d_eager", refuse)
    out_o.square().sum().backward()
    _assert_same(out_o.detach(), out_e, what="out")
    for name, leaf, ge in zip(("x", "weight", "bias"), leaves, grads_e):
        _assert_same(leaf.grad if leaf is not None else None, ge, what=f"grad {name}")


def test_triton_residuals_under_interpreter(run_under_triton_interpreter):
    """The Triton tests of this file on CPU through Triton's interpreter, so that CI checks the residual path."""
    run_under_triton_interpreter(__file__, "triton and not under_interpreter", min_passed=10)


# ---- torch.compile of the layers -------------------------------------------------------------------------------
def _compare_compiled(model, inputs, backend, atol=1e-4):
    """fullgraph=True compile of `model` against eager: outputs and every parameter's gradient."""
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    results = []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = run(*inputs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum(o.square().mean() for o in outs).backward()
        results.append(([o.detach() for o in outs], {k: p.grad.clone() for k, p in model.named_parameters()
                                                      if p.grad is not None}))
    (outs_e, grads_e), (outs_c, grads_c) = results
    for i, (a, b) in enumerate(zip(outs_c, outs_e)):
        _assert_same(a, b, atol=atol, what=f"output {i}")
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        _assert_same(grads_c[name], grads_e[name], atol=atol, what=f"grad {name}")


def test_packed_scan_compiles_without_graph_breaks():
    """The packed scan under fullgraph compile: eager's outputs and gradients (its one input's among them)."""
    u, delta, A, B, C, D, z, bias = _scan_inputs(seed=7)
    inputs = [u, torch.cat([delta, B, C], 1), A, D, z, bias]

    def scan(*t):
        return selective_scan_packed(*t, delta_softplus=True, backend="torch", order="slice", num_slices=3)

    out_e, grads_e = _grads(scan, inputs)
    out_c, grads_c = _grads(torch.compile(scan, backend="aot_eager", fullgraph=True), inputs)
    _assert_same(out_c, out_e, atol=1e-5, what="out")
    for name, gc, ge in zip(("u", "delta_B_C", "A", "D", "z", "delta_bias"), grads_c, grads_e):
        _assert_same(gc, ge, atol=1e-5, what=f"grad {name}")


def test_ss2d_compiles_without_graph_breaks():
    """MedMamba's mixer: four orders in one grouped scan (the tri-orientated one is in the tests below)."""
    torch.manual_seed(0)
    _compare_compiled(SS2D(8, d_state=4, scan_backend="torch"), (torch.randn(2, 4, 6, 8),), "aot_eager")


@pytest.mark.parametrize("channels_last", [False, True], ids=["channels-first", "channels-last"])
def test_segmamba_compiles_without_graph_breaks(channels_last, monkeypatch):
    """The whole network, deep-supervision heads included, in one graph (what nnU-Net's compile gets); in
    channels_last_3d (the trainers' layout on one GPU) its norms are the written-out autograd.Function.

    Eager runs torch's convolutions here, as the compiled graph does: the CPU's own passes (`networks.cpu_conv`,
    eager only, tested against torch's in tests/networks) sum in another order, and this small input (its deepest
    norms over 2 voxels) amplifies float32 rounding: the first convolution's weight gradient then moves by 5e-4 of
    its scale (by 5e-5 for an input perturbed by 1e-7), beyond the tolerance meant for what the compile changes."""
    monkeypatch.setattr(Conv3d, "forward", torch.nn.Conv3d.forward)
    torch.manual_seed(0)
    net = SegMamba(1, 3, depths=(1, 1, 1, 1), feat_size=(8, 16, 32, 64), hidden_size=128, deep_supervision=True,
                   scan_backend="torch")
    x = torch.randn(1, 1, 32, 16, 16)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last_3d), x.to(memory_format=torch.channels_last_3d)
    _compare_compiled(net, (x,), "aot_eager")


def test_stacked_directions_compile_without_graph_breaks():
    """The layer with its directions stacked (`stack_directions`, the default on CUDA), the branches recomputed as
    the trainers do at 128^3, in one graph: eager's values and gradients."""
    torch.manual_seed(0)
    model = TriOrientedMamba(8, d_state=4, scan_backend="torch", stack_directions=True, recompute_branches=True)
    _compare_compiled(model, (torch.randn(2, 64, 8), 4), "aot_eager")


def test_inductor_matches_eager():
    """inductor's generated code (C++ on the CPU) around the ops gives eager's values and gradients. Two of the
    three directions: the inter-slice one has the permutations around the ops; a fresh inductor cache costs
    ~40 s here, mostly fixed start-up, and each direction adds to the generated code."""
    torch.manual_seed(0)
    model = TriOrientedMamba(8, d_state=4, scan_backend="torch", directions=("forward", "slice"))
    _compare_compiled(model, (torch.randn(2, 64, 8), 4), "inductor")


def test_recomputed_branches_compile_and_hold_less():
    """TriOrientedMamba(recompute_branches=True) in one graph: eager's values and gradients, and AOTAutograd's
    partition keeps less of the compiled forward than it keeps without the recompute (the compiled trainers' case)."""
    held = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = TriOrientedMamba(16, d_state=8, scan_backend="torch", recompute_branches=recompute)
        inputs = (torch.randn(2, 8 * 16 * 16, 16), 8)
        _compare_compiled(model, inputs, "aot_eager")
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        _, held[recompute] = memory_held_by(lambda: compiled(*inputs), "cpu")
    assert held[True] < 0.5 * held[False], held


# ---- the same on CUDA, every backend that loads ------------------------------------------------------------------
def _gpu_backends():
    names = ["torch"]
    if dispatch.triton_scan_status()[0]:
        names.append("triton")
    if dispatch.cuda_scan_status()[0]:
        names.append("cuda")
    return names


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_ops_and_compile_on_cuda(backend):
    if backend not in _gpu_backends():
        pytest.skip(f"scan_backend {backend!r} does not load here")
    inputs = _scan_inputs(seed=2, dim=8, n=4, length=64, device="cuda")
    torch.library.opcheck(ops.selective_scan, (*inputs, True, backend, "slice", 4))
    conv = (torch.randn(2, 8, 64, device="cuda"), torch.randn(8, 1, 4, device="cuda"), torch.randn(8, device="cuda"))
    torch.library.opcheck(ops.causal_conv1d, (*conv, True, backend, "reverse", None))
    out_o, grads_o = _grads(lambda *t: ops.selective_scan(*t, True, backend, "slice", 4), inputs)
    out_e, grads_e = _grads(lambda *t: dispatch.selective_scan_eager(*t, True, False, backend, "slice", 4), inputs)
    _assert_same(out_o, out_e, atol=1e-5, what="out")
    for name, go, ge in zip(SCAN_NAMES, grads_o, grads_e):
        _assert_same(go, ge, atol=1e-4, what=f"grad {name}")
    for recompute in (False, True):
        torch.manual_seed(0)
        model = TriOrientedMamba(16, d_state=8, scan_backend=backend, recompute_branches=recompute).cuda()
        _compare_compiled(model, (torch.randn(2, 512, 16, device="cuda"), 8), "inductor", atol=1e-3)
