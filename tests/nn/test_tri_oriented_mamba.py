"""TriOrientedMamba (SegMamba's ToM) against the spec (../shared/spec/segmamba.md, "Tri-orientated Mamba").

Every branch is recomputed here in float64 from the spec's equations (own conv loop, own scan, own reorderings by
explicit index arithmetic). A float64 copy of the module must match to 1e-9 (with A = -exp(A_log) formed in
float32 on both sides, as mamba-ssm and the module do); the float32 module to rtol = 1e-4, atol = 1e-4 times the
output's largest magnitude.
"""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from nnunet_segmamba.benchmark import memory_held_by
from nnunet_segmamba.nn import DIRECTIONS, TriOrientedMamba, slice_order
from nnunet_segmamba.nn import mamba as mamba_module

MAMBA_KEYS = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
              "A_log", "D", "out_proj.weight"]


# ----------------------------------------------------------------------------------------------------------------
# Own float64 implementation of one Mamba branch and of the orderings
# ----------------------------------------------------------------------------------------------------------------
def forward_order(length: int) -> list[int]:
    return list(range(length))


def backward_order(length: int) -> list[int]:
    return [length - 1 - p for p in range(length)]


def inter_slice_order(length: int, n: int) -> list[int]:
    """Position p of the reordered sequence holds element (p mod n) * (L / n) + floor(p / n)."""
    return [(p % n) * (length // n) + p // n for p in range(length)]


def mamba_branch64(x, z, conv_w, conv_b, x_proj_w, dt_w, dt_b, A_log, D, d_state):
    """x, z (B, d_inner, L) float64 -> y * silu(z) (B, d_inner, L), straight from the spec's equations."""
    batch, dim, length = x.shape
    width = conv_w.shape[-1]
    w = conv_w.reshape(dim, width)
    conv = conv_b[None, :, None].expand(batch, dim, length).clone()
    for k in range(width):
        shift = width - 1 - k  # weight k sees x[t - shift]
        conv[:, :, shift:] += w[None, :, k, None] * x[:, :, : length - shift]
    u = conv * torch.sigmoid(conv)
    x_dbl = torch.einsum("bdl,ed->ble", u, x_proj_w)  # (B, L, dt_rank + 2 d_state)
    dt_rank = x_dbl.shape[-1] - 2 * d_state
    dt, Bm, Cm = x_dbl[..., :dt_rank], x_dbl[..., dt_rank:dt_rank + d_state], x_dbl[..., dt_rank + d_state:]
    delta = F.softplus(torch.einsum("blr,dr->bdl", dt, dt_w) + dt_b[None, :, None])
    A = -torch.exp(A_log)  # (d_inner, d_state)
    h = torch.zeros(batch, dim, d_state, dtype=x.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * Bm[:, None, t, :] * u[:, :, t, None]
        ys.append((h * Cm[:, None, t, :]).sum(-1) + D * u[:, :, t])
    y = torch.stack(ys, dim=-1)
    return y * z * torch.sigmoid(z)


def params64(mixer: TriOrientedMamba, direction: str) -> dict:
    s = DIRECTIONS[direction]
    p = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    return dict(conv_w=p[f"conv1d{s}.weight"], conv_b=p[f"conv1d{s}.bias"], x_proj_w=p[f"x_proj{s}.weight"],
                dt_w=p[f"dt_proj{s}.weight"], dt_b=p[f"dt_proj{s}.bias"], A_log=p[f"A{s}_log"], D=p[f"D{s}"],
                d_state=mixer.d_state)


def branch_in_order64(mixer, hidden, direction, num_slices):
    """One direction's contribution, (B, d_inner, L) in the raster order, before out_proj."""
    h = hidden.double()
    xz = torch.einsum("ec,blc->bel", mixer.in_proj.weight.detach().double(), h)
    x, z = xz[:, : mixer.d_inner], xz[:, mixer.d_inner:]
    length = h.shape[1]
    order = {"forward": forward_order(length), "backward": backward_order(length),
             "slice": inter_slice_order(length, num_slices)}[direction]
    y = mamba_branch64(x[..., order], z[..., order], **params64(mixer, direction))
    back = torch.empty_like(y)
    back[..., order] = y  # element order[p] of the raster sequence came out at position p
    return back


def mixer_out64(mixer, hidden, num_slices):
    total = sum(branch_in_order64(mixer, hidden, d, num_slices) for d in mixer.directions)
    return torch.einsum("bel,ce->blc", total, mixer.out_proj.weight.detach().double())


def randomise(mixer: TriOrientedMamba, seed: int) -> TriOrientedMamba:
    """Perturb every parameter (D away from 1, A_log away from its init...) so that no term hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            scale = 0.1 if ("A" in name and "log" in name) or "dt_proj" in name else 0.3
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return mixer


D_, H_, W_ = 3, 4, 5  # a (D, H, W) feature map, flattened in raster order
L_ = D_ * H_ * W_


def make(directions=("forward", "backward", "slice"), d_model=8, d_state=4, seed=0, **kw):
    torch.manual_seed(seed)
    mixer = randomise(TriOrientedMamba(d_model, d_state=d_state, directions=directions, scan_backend="torch", **kw),
                      seed)
    hidden = torch.randn(2, L_, d_model, generator=torch.Generator().manual_seed(seed + 1))
    return mixer, hidden


# ----------------------------------------------------------------------------------------------------------------
# state_dict and initialisation
# ----------------------------------------------------------------------------------------------------------------
def reference_state_dict_shapes(d_model: int, d_inner: int, dt_rank: int, suffixes=("", "_b", "_s")):
    """(key, shape) in the order nn.Module lists the authors' ToM: own parameters first, then sub-modules."""
    own, modules = [], [("in_proj.weight", (2 * d_inner, d_model))]
    for s in suffixes:
        own += [(f"A{s}_log", (d_inner, 16)), (f"D{s}", (d_inner,))]
        modules += [(f"conv1d{s}.weight", (d_inner, 1, 4)), (f"conv1d{s}.bias", (d_inner,)),
                    (f"x_proj{s}.weight", (dt_rank + 32, d_inner)), (f"dt_proj{s}.weight", (d_inner, dt_rank)),
                    (f"dt_proj{s}.bias", (d_inner,))]
    return own + modules + [("out_proj.weight", (d_model, d_inner))]


@pytest.mark.parametrize("d_model,d_inner,dt_rank", [(48, 96, 3), (96, 192, 6), (384, 768, 24)])
def test_state_dict_matches_reference(d_model, d_inner, dt_rank):
    """Spec: d_inner = 2 d, d_state 16, d_conv 4, dt_rank = ceil(d / 16); keys and shapes, in order."""
    mixer = TriOrientedMamba(d_model)
    assert (mixer.d_inner, mixer.dt_rank) == (d_inner, dt_rank)
    got = [(k, tuple(v.shape)) for k, v in mixer.state_dict().items()]
    assert got == reference_state_dict_shapes(d_model, d_inner, dt_rank)
    assert len(got) == 1 + 3 * 7 + 1


def test_forward_only_has_mamba_ssm_keys_and_shapes():
    """directions=("forward",) gives mamba_ssm.Mamba(48)'s state_dict: same keys (and order), same shapes."""
    mixer = TriOrientedMamba(48, directions=("forward",))
    shapes = {"in_proj.weight": (192, 48), "conv1d.weight": (96, 1, 4), "conv1d.bias": (96,),
              "x_proj.weight": (35, 96), "dt_proj.weight": (96, 3), "dt_proj.bias": (96,), "A_log": (96, 16),
              "D": (96,), "out_proj.weight": (48, 96)}
    sd = mixer.state_dict()
    assert set(sd) == set(MAMBA_KEYS)
    assert list(sd) == ["A_log", "D"] + [k for k in MAMBA_KEYS if k not in ("A_log", "D")]
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == reference_state_dict_shapes(48, 96, 3, suffixes=("",))


@pytest.mark.parametrize("all_branches", [False, True])
def test_initialisation(all_branches):
    torch.manual_seed(0)
    mixer = TriOrientedMamba(48, dt_init_all_branches=all_branches)
    expected_A_log = torch.log(torch.arange(1, 17, dtype=torch.float32)).repeat(96, 1)
    for s in DIRECTIONS.values():
        torch.testing.assert_close(getattr(mixer, f"A{s}_log").detach(), expected_A_log)
        assert torch.equal(getattr(mixer, f"D{s}").detach(), torch.ones(96))
    bound = 3 ** -0.5
    for s in DIRECTIONS.values():
        dt_proj = getattr(mixer, f"dt_proj{s}")
        assert dt_proj.weight.abs().max() <= bound + 1e-7
        dt = F.softplus(dt_proj.bias.detach().double())
        special = s == "" or all_branches
        in_range = bool(((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all())
        assert in_range == special, (s, dt.min().item(), dt.max().item())
        if special:
            # log-uniform: both ends of [1e-3, 0.1] are approached in 96 draws
            assert dt.min() < 3e-3 and dt.max() > 0.03
        else:  # nn.Linear's default: uniform(+-1/sqrt(dt_rank)), softplus up to ~1
            assert dt_proj.bias.abs().max() <= bound + 1e-7 and dt.max() > 0.5


# ----------------------------------------------------------------------------------------------------------------
# The inter-slice order
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length,n", [(12, 3), (12, 1), (12, 12), (60, 4), (64, 8)])
def test_slice_order_formula_and_inverse(length, n):
    x = torch.arange(length).reshape(1, 1, length).expand(2, 3, length) * 10 + torch.arange(3)[None, :, None]
    ordered = slice_order(x, n)
    expected = torch.empty_like(x)
    for p in range(length):
        expected[..., p] = x[..., (p % n) * (length // n) + p // n]
    assert torch.equal(ordered, expected)
    assert torch.equal(slice_order(ordered, n, inverse=True), x)
    assert torch.equal(slice_order(slice_order(x, n, inverse=True), n), x)


def test_slice_order_visits_depth_first_on_a_raster():
    depth, height, width = 4, 3, 5
    index = torch.arange(depth * height * width)  # raster: p = d * H * W + h * W + w, W fastest
    ordered = slice_order(index, depth)
    for j in range(height * width):  # the j-th in-plane position (h, w) = divmod(j, W)
        h, w = divmod(j, width)
        block = ordered[j * depth:(j + 1) * depth]
        assert block.tolist() == [d * height * width + h * width + w for d in range(depth)]


def test_slice_order_rejects_non_divisor():
    with pytest.raises(ValueError) as info:
        slice_order(torch.zeros(2, 21), 4)
    assert "4" in str(info.value) and "21" in str(info.value)
    with pytest.raises(ValueError):
        slice_order(torch.zeros(2, 21), 0)


# ----------------------------------------------------------------------------------------------------------------
# The forward pass against the float64 definition
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_each_branch_method_matches_definition(direction):
    mixer, hidden = make(seed=3)
    mixer = mixer.double()
    xz = torch.einsum("ec,blc->bel", mixer.in_proj.weight.detach(), hidden.double())
    order = {"forward": forward_order(L_), "backward": backward_order(L_),
             "slice": inter_slice_order(L_, D_)}[direction]
    got = mixer.branch(xz[..., order], direction)
    expected = mamba_branch64(xz[:, : mixer.d_inner, order], xz[:, mixer.d_inner:, order],
                              **params64(mixer, direction))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_gate_outside_the_scan_is_the_same_branch(direction):
    """The gate applied by the branch (torch.compile's form on CUDA) instead of by the scan: the same values and
    gradients of xz and every parameter, in float64."""
    mixer, hidden = make(seed=12)
    mixer = mixer.double()
    xz0 = torch.einsum("ec,blc->bel", mixer.in_proj.weight.detach(), hidden.double())
    results = []
    for gate_outside in (False, True):
        mixer.zero_grad(set_to_none=True)
        xz = xz0.clone().requires_grad_(True)
        out = mixer.branch(xz, direction, gate_outside=gate_outside)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        results.append([out.detach(), xz.grad, *(p.grad for p in mixer.parameters() if p.grad is not None)])
    assert len(results[0]) == len(results[1]) > 3
    for inside, outside in zip(*results):
        torch.testing.assert_close(outside, inside, rtol=1e-10, atol=1e-12)


def test_module_is_out_proj_of_sum_of_three_branches():
    mixer, hidden = make(seed=4)
    expected = mixer_out64(mixer, hidden, D_)
    got32 = mixer(hidden, num_slices=D_)
    assert got32.shape == hidden.shape and got32.dtype == torch.float32
    atol = 1e-4 * expected.abs().max().item()
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=atol)
    got64 = copy.deepcopy(mixer).double()(hidden.double(), num_slices=D_)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, rtol=1e-9, atol=1e-9)
    # and it is not just one of them
    only_forward = torch.einsum("bel,ce->blc", branch_in_order64(mixer, hidden, "forward", D_),
                                mixer.out_proj.weight.detach().double())
    assert not torch.allclose(got64, only_forward, atol=1e-3)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_single_direction_module(direction):
    """A mixer with one direction is out_proj of that branch alone; ("forward",) is a plain Mamba layer."""
    mixer, hidden = make(directions=(direction,), seed=5)
    expected = torch.einsum("bel,ce->blc", branch_in_order64(mixer, hidden, direction, D_),
                            mixer.out_proj.weight.detach().double())
    got = mixer.double()(hidden.double(), num_slices=D_ if direction == "slice" else None)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_float64_module_is_float64_accurate():
    mixer, hidden = make(directions=("forward",), seed=5)
    expected = torch.einsum("bel,ce->blc", branch_in_order64(mixer, hidden, "forward", D_),
                            mixer.out_proj.weight.detach().double())
    got = mixer.double()(hidden.double())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_num_slices_at_construction_equals_call_time():
    mixer, hidden = make(seed=6)
    fixed, _ = make(seed=6, num_slices=D_)
    torch.testing.assert_close(fixed(hidden), mixer(hidden, num_slices=D_))
    # a call-time value overrides the constructor's
    other = mixer(hidden, num_slices=4)
    torch.testing.assert_close(fixed(hidden, num_slices=4), other)
    assert not torch.allclose(other, fixed(hidden))


def test_gradients_reach_every_parameter():
    mixer, hidden = make(seed=7)
    hidden.requires_grad_(True)
    out = mixer(hidden, num_slices=D_)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(8))).sum().backward()
    names = [n for n, _ in mixer.named_parameters()]
    assert len(names) == 1 + 3 * 7 + 1
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_merged_scan_inputs_are_the_two_projections():
    """delta, B and C from the one merged GEMM (the GPU's form) equal the reference's two projections, values and
    gradients of u and both weights, in float64; under autocast the merged form gives the same dtypes."""
    mixer, _ = make(seed=9)
    mixer = mixer.double()
    u = torch.randn(2, mixer.d_inner, L_, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    weights = (mixer.x_proj.weight, mixer.dt_proj.weight)
    grads_out = [torch.randn(2, rows, L_, dtype=torch.float64, generator=torch.Generator().manual_seed(11 + i))
                 for i, rows in enumerate((mixer.d_inner, mixer.d_state, mixer.d_state))]
    results = []
    for merged in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (u, *weights)]
        outputs = mixer.scan_inputs(*leaves, merged=merged)
        assert [tuple(o.shape) for o in outputs] == [(2, r, L_) for r in (mixer.d_inner, mixer.d_state, mixer.d_state)]
        assert all(o.stride(-1) == 1 for o in outputs)
        torch.autograd.backward(outputs, grads_out)
        results.append([*outputs, *(leaf.grad for leaf in leaves)])
    for separate, merged in zip(*results):
        torch.testing.assert_close(merged, separate, rtol=1e-10, atol=1e-10)
    assert results[0][0].abs().max() > 0.1  # delta is not trivially zero
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = [[o.dtype for o in mixer.float().scan_inputs(u.float(), *(w.float() for w in weights), merged=m)]
                  for m in (False, True)]
    assert dtypes[0] == dtypes[1] == [torch.bfloat16] * 3


def _bmm_projection(weight, x, positions_first):
    if positions_first:
        return torch.bmm(x.transpose(1, 2), weight.t().expand(x.shape[0], -1, -1))
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)


def _assert_projection_matches_bmm(project, positions_first, transposed_input, length, device, amp_dtype, rtol):
    """project's output, weight gradient and input gradient against autograd through torch.bmm: same dtypes, and
    values within rtol (atol = rtol times the largest magnitude), in float32 and under autocast to amp_dtype."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=g).to(device)
    x = (torch.randn(2, length, 5, generator=g) if transposed_input else torch.randn(2, 5, length, generator=g))
    grad_out = torch.randn(2, length, 7, generator=g) if positions_first else torch.randn(2, 7, length, generator=g)
    x, grad_out = x.to(device), grad_out.to(device)
    for amp, tol in ((False, 1e-5), (True, rtol)):
        results = []
        for fn in (_bmm_projection, project):
            w, x0 = weight.clone().requires_grad_(True), x.clone().requires_grad_(True)
            with torch.autocast(device, dtype=amp_dtype, enabled=amp):
                out = fn(w, x0.transpose(1, 2) if transposed_input else x0, positions_first=positions_first)
            out.backward(grad_out.to(out.dtype))
            results.append((out, w.grad, x0.grad))
        for got, want in zip(results[1], results[0]):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("positions_first", [False, True])
@pytest.mark.parametrize("transposed_input", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("split", [True, False])
def test_projection_gradients_are_those_of_a_batched_gemm(monkeypatch, positions_first, transposed_input, compiled,
                                                          split):
    """The projections' backward sums the weight's gradient over chunks of positions on long sequences (split-K
    by hand) and in one batched GEMM on short ones: either way the values, gradients and dtypes of autograd through
    torch.bmm, in float32 and under bf16 autocast (8 bits of mantissa in the partial products), eager and traced
    whole by torch.compile; 64 positions (4 chunks of 16 when split) and the input as a transposed view, as
    in_proj reads it."""
    monkeypatch.setattr(mamba_module, "WEIGHT_GRAD_CHUNK", 16)
    monkeypatch.setattr(mamba_module, "WEIGHT_GRAD_MIN_CHUNKS", 2 if split else 5)
    assert mamba_module._splits_weight_gradient(64) == split
    torch._dynamo.reset()  # the chunk settings are traced into the graphs: a fresh cache per setting
    project = torch.compile(mamba_module._project, backend="aot_eager", fullgraph=True) if compiled \
        else mamba_module._project
    _assert_projection_matches_bmm(project, positions_first, transposed_input, 64, "cpu", torch.bfloat16, 1e-2)


@pytest.mark.parametrize("split", [True, False])
def test_float64_projection_gradients_are_float64_accurate(monkeypatch, split):
    """The weight's gradient adds its partial products up in float64 for float64 operands, not float32."""
    monkeypatch.setattr(mamba_module, "WEIGHT_GRAD_CHUNK", 16)
    monkeypatch.setattr(mamba_module, "WEIGHT_GRAD_MIN_CHUNKS", 2 if split else 5)
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(7, 5, dtype=torch.float64, generator=g), torch.randn(2, 5, 64, dtype=torch.float64,
                                                                                 generator=g)
    grad_out = torch.randn(2, 7, 64, dtype=torch.float64, generator=g)
    grads = []
    for fn in (_bmm_projection, mamba_module._project):
        w = weight.clone().requires_grad_(True)
        fn(w, x, positions_first=False).backward(grad_out)
        grads.append(w.grad)
    assert grads[1].dtype == torch.float64
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_weight_gradient_is_split_on_the_sequences_where_that_was_measured_faster():
    """At the defaults: split at the 128^3 patch's first two stages (262144 and 32768 positions per case), one GEMM
    at the hippocampus patch's stages (18432 down to 36) and wherever the chunk does not divide L."""
    splits = mamba_module._splits_weight_gradient
    assert splits(64 ** 3) and splits(32 ** 3)
    assert not any(splits(n) for n in (18432, 2304, 288, 36, 16 ** 3, 32 ** 3 + 1024))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("positions_first", [False, True])
@pytest.mark.parametrize("chunks", [4, mamba_module.WEIGHT_GRAD_MIN_CHUNKS])
def test_projection_gradients_on_cuda(positions_first, chunks):
    """The same on a GPU, compiled by inductor, under fp16 autocast, at the default chunk: one GEMM (4 chunks'
    worth of positions) and split (the fewest chunks that split)."""
    project = torch.compile(mamba_module._project, fullgraph=True)
    _assert_projection_matches_bmm(project, positions_first, True, chunks * mamba_module.WEIGHT_GRAD_CHUNK, "cuda",
                                   torch.float16, 2e-3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_recomputed_branches_give_the_same_values_from_less_memory(backend):
    """recompute_branches=True: the same output and the same gradients (up to float32 rounding: the scan's custom
    op takes the gradients of a repeated forward), while the forward holds less than half of what the plain
    layer holds (its scans' outputs instead of every branch's inputs); the "cpu" backend reads the orders in
    place, the "torch" one works on ordered copies, which are recomputed too."""
    torch.manual_seed(0)
    plain = TriOrientedMamba(16, d_state=8, scan_backend=backend)
    recomputed = TriOrientedMamba(16, d_state=8, scan_backend=backend, recompute_branches=True)
    recomputed.load_state_dict(plain.state_dict())
    hidden = torch.randn(2, 8 * 16 * 16, 16)
    results = []
    for mixer in (plain, recomputed):
        x = hidden.clone().requires_grad_(True)
        out, held = memory_held_by(lambda: mixer(x, num_slices=8), "cpu")
        out.square().mean().backward()
        results.append((out.detach(), x.grad, [p.grad for p in mixer.parameters()], held))
    (out_p, dx_p, grads_p, held_p), (out_r, dx_r, grads_r, held_r) = results

    def same(got, want, what):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=what)

    torch.testing.assert_close(out_r, out_p, rtol=0, atol=0)
    same(dx_r, dx_p, "input gradient")
    for (name, _), gp, gr in zip(plain.named_parameters(), grads_p, grads_r):
        same(gr, gp, name)
    assert held_r < 0.5 * held_p, (held_r, held_p)
    # without gradients there is nothing to keep: the same code as the plain layer
    with torch.no_grad():
        torch.testing.assert_close(recomputed(hidden, num_slices=8), out_p, rtol=0, atol=0)


def stacked_and_one_by_one(mixer, hidden, num_slices, loss, compiled=False):
    """The mixer's output, input gradient and parameter gradients with its directions one by one and stacked."""
    results = []
    for stack in (False, True):
        mixer.stack_directions = stack
        mixer.zero_grad(set_to_none=True)
        run = torch.compile(mixer, fullgraph=True) if compiled else mixer
        x = hidden.clone().requires_grad_(True)
        out = run(x, num_slices=num_slices)
        loss(out).backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in mixer.named_parameters()}))
        torch._dynamo.reset()
    return results


def assert_same_results(got, want, rtol, atol_scale):
    """`stacked_and_one_by_one`'s two results equal within rtol and atol_scale x each tensor's largest value."""
    (out_s, dx_s, grads_s), (out_1, dx_1, grads_1) = got, want
    assert grads_s.keys() == grads_1.keys()
    for name, g, w in [("out", out_s, out_1), ("input gradient", dx_s, dx_1)] + [
            (name, grads_s[name], grads_1[name]) for name in grads_1]:
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol_scale * max(w.abs().max().item(), 1.0), msg=name)


@pytest.mark.parametrize("directions", [tuple(DIRECTIONS), ("backward", "slice")], ids=["three", "two"])
@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_stacked_directions_are_the_branches_one_by_one(directions, recompute):
    """stack_directions=True (the default in training on CUDA): the directions' ordered copies stacked on the batch,
    one causal conv, one batched projection and one scan with a parameter set per direction give the output and every
    gradient of the branches run one by one, to float64 rounding; with the branches recomputed too."""
    torch.manual_seed(0)
    mixer = TriOrientedMamba(8, d_state=4, directions=directions, dt_init_all_branches=True, scan_backend="torch",
                             recompute_branches=recompute).double()
    hidden = torch.randn(2, 4 * 4 * 4, 8, dtype=torch.float64)
    one_by_one, stacked = stacked_and_one_by_one(
        mixer, hidden, 4, lambda out: (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum())
    assert_same_results(stacked, one_by_one, rtol=1e-10, atol_scale=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stacked_directions_on_cuda_are_the_branches_one_by_one(compiled):
    """On the Triton kernels, eager and compiled: the stacked directions' output and gradients are those of the
    branches one by one, to float32 rounding."""
    torch.manual_seed(0)
    mixer = TriOrientedMamba(16, d_state=8, scan_backend="triton", dt_init_all_branches=True).cuda()
    hidden = torch.randn(2, 8 * 8 * 8, 16, device="cuda")
    one_by_one, stacked = stacked_and_one_by_one(mixer, hidden, 8, lambda out: out.square().mean(), compiled)
    assert_same_results(stacked, one_by_one, rtol=1e-4, atol_scale=1e-5)


def test_directions_are_stacked_by_default_in_training_on_cuda_with_the_branches_kept():
    cuda_tensor = types.SimpleNamespace(is_cuda=True)  # what the choice looks at
    assert TriOrientedMamba(8)._stacks_directions(cuda_tensor, recompute=False)
    with torch.no_grad():
        assert not TriOrientedMamba(8)._stacks_directions(cuda_tensor, recompute=False)
    assert not TriOrientedMamba(8)._stacks_directions(cuda_tensor, recompute=True)
    assert not TriOrientedMamba(8)._stacks_directions(torch.zeros(1), recompute=False)
    assert not TriOrientedMamba(8, directions=("forward",))._stacks_directions(cuda_tensor, False)  # one: no stack
    assert not TriOrientedMamba(8, stack_directions=False)._stacks_directions(cuda_tensor, recompute=False)
    assert TriOrientedMamba(8, stack_directions=True)._stacks_directions(torch.zeros(1), recompute=True)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    mixer, hidden = make(seed=9)
    with pytest.raises(ValueError, match="d_model=8"):
        mixer(hidden[..., :7], num_slices=D_)
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(hidden[0], num_slices=D_)
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(hidden[None], num_slices=D_)
    with pytest.raises(ValueError, match="num_slices"):
        mixer(hidden)  # slice direction without a slice count
    with pytest.raises(ValueError, match="num_slices=7"):
        mixer(hidden, num_slices=7)  # 7 does not divide 60


@pytest.mark.parametrize("kwargs", [dict(directions=()), dict(directions=("forward", "sideways")),
                                    dict(directions=("forward", "forward")), dict(d_state=0), dict(expand=0)])
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        TriOrientedMamba(8, **kwargs)


def test_dt_rank_auto():
    assert TriOrientedMamba(8, directions=("forward",)).dt_rank == 1
    assert TriOrientedMamba(40, directions=("forward",)).dt_rank == math.ceil(40 / 16)
