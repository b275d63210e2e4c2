"""Mamba mixers on flattened image sequences: the tri-orientated Mamba of SegMamba (ToM).

SegMamba (Xing et al., "SegMamba: Long-range Sequential Modeling Mamba For 3D Medical Image Segmentation",
MICCAI 2024) runs one Mamba layer over the flattened feature map in three orders and sums the results before a
shared output projection:

    forward       the raster order (W fastest)
    backward      the raster order reversed
    inter-slice   the transpose of an (num_slices, L / num_slices) view: all slices of one in-plane position,
                  then the next position

Parameter names follow the authors' code (`A_log, D, A_b_log, D_b, A_s_log, D_s, conv1d, conv1d_b, ...`), so
their checkpoints load with strict=True; with only the forward direction the module's state_dict is exactly
that of `mamba_ssm.Mamba`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from ..ssm import dispatch
from ..ssm.api import causal_conv1d, selective_scan, selective_scan_packed
from ..ssm.ops import SELECTIVE_SCAN_OPS, split_delta_B_C
from ..ssm.orders import check_num_slices, visit
from .recompute import CheckpointPolicy, recomputes, selective_checkpoint, selective_checkpoint_contexts

__all__ = ["TriOrientedMamba", "slice_order", "DIRECTIONS"]

# direction name -> parameter-name suffix in the reference
DIRECTIONS = {"forward": "", "backward": "_b", "slice": "_s"}
# direction name -> the order in which its branch visits the raster sequence (`nnunet_segmamba.ssm.orders`)
ORDERS = {"forward": "forward", "backward": "reverse", "slice": "slice"}


def slice_order(x: torch.Tensor, num_slices: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the last axis (length L) into the inter-slice order, or back with `inverse=True`.

    Position q of the reordered sequence holds x[(q mod n) * (L / n) + q // n] for n = num_slices, i.e. the
    (n, L/n) view transposed. With n = D of a (D, H, W) raster, it visits the D slices of one (h, w) first.
    """
    return visit(x, "slice", num_slices, inverse=inverse)


def _scan_precision(p: torch.Tensor) -> torch.Tensor:
    """The scan's own parameters in float32 (even under autocast, as mamba-ssm does), or float64 if they are."""
    return p if p.dtype == torch.float64 else p.float()


# Positions of L summed per partial product in a projection's weight gradient, and the fewest chunks of them per
# batch element for which the projection splits the sum at all (see `_Projection`)
WEIGHT_GRAD_CHUNK = 2048
WEIGHT_GRAD_MIN_CHUNKS = 16


def _project(weight: torch.Tensor, x: torch.Tensor, positions_first: bool = False) -> torch.Tensor:
    """weight (out, in) applied to every position of x (batch, in, L) -> (batch, out, L), contiguous; with
    `positions_first` -> (batch, L, out), contiguous. x may be a transposed view; BLAS reads it in place.

    Under autocast both operands are cast as autocast casts a GEMM's, before `_Projection` sees them, so that the
    casts' backwards return the gradients in the callers' dtypes as they would for a plain `torch.bmm`.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight, x = (t.to(dtype) if t.dtype != torch.float64 else t for t in (weight, x))
    return _Projection.apply(weight, x, positions_first)


class _Projection(torch.autograd.Function):
    """One batched GEMM against the broadcast weight, forward and backward.

    torch.matmul would fold batch and L into one GEMM instead, which costs a transposed copy of x and of the
    gradients (measured on CPU, forward + backward at the mixer's sizes: 1.3x to 5x slower). Autograd's own
    backward of that batched GEMM gives the weight's gradient as one GEMM per batch element with a tiny output
    and the whole sequence as its inner dimension (96 x 8 from 262144 positions at SegMamba's first stage), which
    cuBLAS runs on a handful of thread blocks, about 10x slower than reading its operands takes. Here the
    positions are cut into chunks of `WEIGHT_GRAD_CHUNK`, the chunks' products come out of one batched GEMM on
    strided views (no copies) and are summed: split-K by hand. The split takes one launch per batch element, which
    costs more than it saves on short sequences (on one H200: faster at the 128^3 patch, whose first two stages
    have 262144 and 32768 positions per case; slower at the hippocampus patch, 18432 positions and batch 7), so
    below `WEIGHT_GRAD_MIN_CHUNKS` chunks per batch element the weight's gradient is autograd's one batched GEMM.
    The input's gradient is the same GEMM as autograd's, written (batch, in, L) contiguous, which the scan kernels
    read without a copy.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, x: torch.Tensor, positions_first: bool) -> torch.Tensor:
        ctx.save_for_backward(weight, x)
        ctx.positions_first = positions_first
        if positions_first:
            return torch.bmm(x.transpose(1, 2), weight.t().expand(x.shape[0], -1, -1))
        return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, x = ctx.saved_tensors
        grad = grad.transpose(1, 2) if ctx.positions_first else grad  # (batch, out, L), a view
        grad_weight = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_weight = _weight_gradient(grad, x).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = torch.bmm(weight.t().expand(x.shape[0], -1, -1), grad)
        return grad_weight, grad_x, None


def _splits_weight_gradient(length: int) -> bool:
    """Whether a projection over `length` positions per batch element sums its weight's gradient over chunks."""
    return length % WEIGHT_GRAD_CHUNK == 0 and length >= WEIGHT_GRAD_MIN_CHUNKS * WEIGHT_GRAD_CHUNK


def _weight_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over batch and positions of grad (batch, out, L) x (batch, in, L)^T -> (out, in) in float32 (float64 for
    float64 operands), from partial products over chunks of L (each one a GEMM with a short inner dimension) on long
    sequences."""
    length = x.shape[-1]
    total = torch.promote_types(grad.dtype, torch.float32)  # the partial products added up in at least float32
    if not _splits_weight_gradient(length):
        return torch.bmm(grad, x.transpose(1, 2)).sum(0, dtype=total)
    chunk = WEIGHT_GRAD_CHUNK
    parts = []
    for g, xb in zip(grad, x):  # (out, L), (in, L): views with unit stride along L or along channels
        # (chunks, out, chunk) @ (chunks, chunk, in): batch stride = one chunk of positions
        parts.append(torch.bmm(g.unflatten(-1, (-1, chunk)).movedim(-2, 0),
                               xb.unflatten(-1, (-1, chunk)).movedim(-2, 0).transpose(1, 2)))
    return torch.cat(parts).sum(0, dtype=total)


def _keep_scan_outputs(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    # a recomputed branch keeps the scan's outputs (y and its chunk states): running the scan again would cost as
    # much as the rest of the layer; its inputs (the ordered copy of xz, the conv output u, x_proj's B and C, delta)
    # are cheap to make again and are not kept
    return CheckpointPolicy.MUST_SAVE if func in SELECTIVE_SCAN_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_RECOMPUTE_ALL_BUT_THE_SCAN = selective_checkpoint_contexts(_keep_scan_outputs)


def _gates_outside(gate_outside: bool | None, xz: torch.Tensor) -> bool:
    """`branch`'s gate_outside: None means under torch.compile on CUDA (see there)."""
    return torch.compiler.is_compiling() and xz.is_cuda if gate_outside is None else gate_outside


def _gated(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """y * silu(z) in the precision the kernels compute it (float32, float64 for float64), in y's dtype."""
    precision = _scan_precision(y).dtype
    return (y.to(precision) * nn.functional.silu(z.to(precision))).to(y.dtype)


def dt_projection_init(dt_rank: int, d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float,
                       dt_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's dt projection init: weight uniform(+-dt_scale / sqrt(dt_rank)), bias = softplus^-1(dt) with dt
    log-uniform in [dt_min, dt_max] (floored at dt_init_floor). Returns (weight (d_inner, dt_rank), bias (d_inner,))."""
    std = dt_rank ** -0.5 * dt_scale
    weight = torch.empty(d_inner, dt_rank).uniform_(-std, std)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return weight, dt + torch.log(-torch.expm1(-dt))


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    weight, bias = dt_projection_init(dt_rank, dt_proj.out_features, dt_min, dt_max, dt_init_floor)
    with torch.no_grad():
        dt_proj.weight.copy_(weight)
        dt_proj.bias.copy_(bias)
    dt_proj.bias._no_reinit = True


class TriOrientedMamba(nn.Module):
    """The tri-orientated Mamba mixer (ToM) of SegMamba; `directions=("forward",)` is a plain Mamba layer.

    Args:
        d_model: channels of the input sequence.
        d_state: SSM state size per channel (16).
        d_conv: width of the causal depthwise convolution (4).
        expand: d_inner = expand * d_model (2).
        dt_rank: rank of the delta projection; "auto" = ceil(d_model / 16).
        directions: any of "forward", "backward", "slice", in that order (all three: ToM).
        num_slices: default slice count for the inter-slice direction; None means it must be given at call
            time (SegMamba passes the depth of the feature map).
        dt_init_all_branches: the authors' code gives only the forward branch Mamba's dt initialisation (the
            backward and inter-slice dt_proj keep nn.Linear's default). True gives all branches Mamba's init.
        dt_min, dt_max, dt_init_floor: Mamba's dt initialisation range.
        scan_backend: selective-scan implementation ("auto", "cuda", "triton", "torch"), see
            `nnunet_segmamba.ssm.dispatch`.
        recompute_branches: when gradients are recorded, keep only each branch's scan output for the backward
            pass and recompute the rest of the branch there (the ordered copy of the in_proj output, the causal
            conv, the x and dt projections), by selective activation checkpointing: less than half of the
            layer's activation memory, for one more causal conv and two small GEMMs per branch (mamba-ssm's
            fused Mamba recomputes the conv and delta the same way). The scan itself is not run again on the
            Triton kernels; elsewhere its custom op's backward repeats the scan's forward (`ssm/ops.py`). None:
            for CUDA inputs only (measured there: 2.2 GiB less for SegMamba at 128^3 at the same step time,
            docs/performance.md; on the CPU it costs a small network time, and memory is rarely the limit).
        stack_directions: run the directions' branches as one: their ordered copies of the in_proj output stacked
            on the batch (direction-major), one causal conv, one batched projection and one scan, each direction
            with its own parameters as a parameter set (`ssm.selective_scan`'s A of shape (sets, d, n)). The same
            arithmetic as the branches one by one; on the GPU one chain of kernels with three times the programs,
            where the smaller stages' scans are bound by their kernels' latency. None: in training on CUDA with
            the branches kept (measured: 0.6 ms less per training step at the hippocampus patch, where the trainers
            keep them; docs/performance.md). Not where the branches are recomputed (the trainers at 128^3):
            measured there, stacked the step took 4.9 ms longer and its first step's peak rose 2.2 GiB, over the
            memory target; not without gradients (inference, where the predictor batches a tile's 8 flips and
            the three directions' intermediates would be held at once, not measured either); nor on the CPU, whose
            kernels read the orders in place, without copies.

    Shapes:
        forward(hidden_states (B, L, d_model), num_slices=None) -> (B, L, d_model)

    Example:
        >>> mixer = TriOrientedMamba(48)
        >>> y = mixer(torch.randn(2, 8 * 8 * 8, 48), num_slices=8)
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", directions: Sequence[str] = ("forward", "backward", "slice"),
                 num_slices: int | None = None, dt_init_all_branches: bool = False, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, scan_backend: str = "auto",
                 recompute_branches: bool | None = False, stack_directions: bool | None = None) -> None:
        super().__init__()
        directions = tuple(directions)
        unknown = [d for d in directions if d not in DIRECTIONS]
        if not directions or unknown or len(set(directions)) != len(directions):
            raise ValueError(f"directions must be distinct names from {tuple(DIRECTIONS)}, got {directions}")
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(
                f"d_model, d_state, d_conv and expand must be positive, got {d_model}, {d_state}, {d_conv}, {expand}"
            )
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.directions = tuple(d for d in DIRECTIONS if d in directions)  # canonical order
        self.num_slices = num_slices
        if scan_backend not in dispatch.BACKENDS:
            raise ValueError(f"scan_backend must be one of {dispatch.BACKENDS}, got {scan_backend!r}")
        self.scan_backend = scan_backend
        self.recompute_branches = recompute_branches
        self.stack_directions = stack_directions

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        for direction in self.directions:
            s = DIRECTIONS[direction]
            # registration order follows the reference so that state_dict keys come out in the same order
            if direction != "forward":
                self.register_parameter(f"A{s}_log", self._new_A_log())
            setattr(self, f"conv1d{s}", nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                  padding=d_conv - 1, bias=True))
            setattr(self, f"x_proj{s}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            if direction == "forward" or dt_init_all_branches:
                _init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
            setattr(self, f"dt_proj{s}", dt_proj)
            if direction == "forward":
                self.A_log = self._new_A_log()
            self.register_parameter(f"D{s}", self._new_D())
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _new_A_log(self) -> nn.Parameter:
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        p = nn.Parameter(torch.log(A))
        p._no_weight_decay = True
        return p

    def _new_D(self) -> nn.Parameter:
        p = nn.Parameter(torch.ones(self.d_inner))
        p._no_weight_decay = True
        return p

    # The visiting orders that a backend with index maps (triton) reads in its kernels; the others, and every
    # order on the other backends, run on flipped / permuted copies of xz. Measured on an H200 (docs/performance.md,
    # "Index maps"): the layer was fastest with copies for both orders (the inter-slice gathers at stride
    # L / num_slices cost more than one transpose, and descending addresses lose the vectorised loads), so by
    # default none is read in the kernels.
    index_map_orders: tuple[str, ...] = ()
    # The fused CPU kernels (backend "cpu": scan and convolution) read both orders in place: no copies at all.
    cpu_index_map_orders: tuple[str, ...] = ("reverse", "slice")

    def branch(self, xz: torch.Tensor, direction: str, order: str = "forward",
               num_slices: int | None = None, scan_as_op: bool = False,
               gate_outside: bool | None = None) -> torch.Tensor:
        """One direction's Mamba branch, visiting the sequence in `order` (see `nnunet_segmamba.ssm.visit`).

        Args:
            xz: (B, 2 * d_inner, L), the in_proj output (x and gate z stacked on channels).
            order, num_slices: the visiting order; the output comes back in xz's order. With the default
                "forward", xz is taken to be in the direction's own order already.
            scan_as_op: run the scan as its custom op in eager mode too (`ssm.selective_scan`'s `as_op`).
            gate_outside: multiply by silu(z) here instead of in the scan (in float32 as there, but on the scan's
                output rounded to u's dtype: one rounding more under autocast); None:
                under torch.compile on CUDA, where inductor fuses the gate and its gradients into the passes
                around the branch and the scan's kernels then run without z (fewer instructions in the
                backward's main kernel, which is bound by them), and in the scan everywhere else.
        Returns:
            (B, d_inner, L): y * silu(z), before out_proj.
        """
        s = DIRECTIONS[direction]
        conv, x_proj, dt_proj = getattr(self, f"conv1d{s}"), getattr(self, f"x_proj{s}"), getattr(self, f"dt_proj{s}")
        A = -torch.exp(_scan_precision(getattr(self, f"A{s}_log")))  # (d_inner, d_state)
        x, z = xz.chunk(2, dim=1)
        u = causal_conv1d(x, conv.weight, conv.bias, silu=True, backend=self.scan_backend, order=order,
                          num_slices=num_slices)  # (B, d_inner, L)
        gate_outside = _gates_outside(gate_outside, xz)
        scan_args = dict(D=_scan_precision(getattr(self, f"D{s}")), z=None if gate_outside else z,
                         delta_bias=_scan_precision(dt_proj.bias), delta_softplus=True, backend=self.scan_backend,
                         order=order, num_slices=num_slices, as_op=scan_as_op)
        # The projections act on each position alone, so they commute with the visiting order.
        if u.is_cuda:  # one GEMM gives delta | B | C, and the scan takes (and returns the gradient of) all three
            y = selective_scan_packed(u, self.delta_B_C(u, x_proj.weight, dt_proj.weight), A, **scan_args)
        else:
            delta, B, C = self.scan_inputs(u, x_proj.weight, dt_proj.weight, merged=False)
            y = selective_scan(u, delta, A, B, C, **scan_args)
        return _gated(y, z) if gate_outside else y

    def scan_inputs(self, u: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
                    merged: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scan's delta (before its bias and softplus), B and C from the conv output u (B, d_inner, L): each
        (B, rows, L), contiguous along L (row slices of one product), as the scan kernels read them.

        The reference projects twice: x_dbl = x_proj(u), then delta = dt_proj(dt) from x_dbl's first dt_rank rows.
        With `merged` the two products are one, delta = (dt_proj.weight @ x_proj.weight[:dt_rank]) u: a GEMM over
        d_inner channels gives delta, B and C together, the same linear map without the rank-dt_rank intermediate
        (nor its rounding under autocast). On the GPU the second product, of inner dimension dt_rank (3 at
        SegMamba's first stage), runs at about four times its memory floor in cuBLAS (docs/performance.md), and
        merged the layer reads u once and never writes delta's factors. The merged GEMM has 3.4x the multiply-adds
        at the first stage; on the CPU, where they count, it was slower at the hippocampus patch's first stage
        (`benchmarks/bench_scan_inputs.py`), so there the products stay the reference's.
        """
        if merged:
            return split_delta_B_C(self.delta_B_C(u, x_proj_weight, dt_proj_weight), self.d_state)
        x_dbl = _project(x_proj_weight, u)  # (B, dt_rank + 2 d_state, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        return _project(dt_proj_weight, dt), B, C  # the bias goes in as delta_bias

    def delta_B_C(self, u: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor) -> torch.Tensor:
        """The merged product of `scan_inputs`: delta | B | C as the rows of one (B, d_inner + 2 d_state, L)."""
        return _project(self._merged_weight(x_proj_weight, dt_proj_weight), u)

    def _merged_weight(self, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor) -> torch.Tensor:
        """The weight of delta | B | C from u, (d_inner + 2 d_state, d_inner): delta's rows dt_proj's weight times
        x_proj's first dt_rank rows; in the parameters' precision, not autocast's (autocast casts it once, in the
        product)."""
        with torch.autocast(x_proj_weight.device.type, enabled=False):
            delta_weight = dt_proj_weight @ x_proj_weight[:self.dt_rank]
        return torch.cat([delta_weight, x_proj_weight[self.dt_rank:]])

    def forward(self, hidden_states: torch.Tensor, num_slices: int | None = None) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"expected hidden_states of shape (B, L, d_model={self.d_model}), got {tuple(hidden_states.shape)}"
            )
        n = num_slices if num_slices is not None else self.num_slices
        if "slice" in self.directions:
            if n is None:
                raise ValueError("the inter-slice direction needs num_slices (at construction or call time)")
            check_num_slices(n, hidden_states.shape[1])
        # (B, 2 d_inner, L), contiguous along L as the scan kernels want it
        xz = _project(self.in_proj.weight, hidden_states.transpose(1, 2))
        recompute = recomputes(self.recompute_branches, xz)
        if self._stacks_directions(xz, recompute):
            out = (selective_checkpoint(self._stacked_output, xz, n, context_fn=_RECOMPUTE_ALL_BUT_THE_SCAN)
                   if recompute else self._stacked_output(xz, n))
            return _project(self.out_proj.weight, out, positions_first=True)
        in_kernels = self._orders_read_in_kernels(xz.device)
        out = 0
        for direction in self.directions:
            if recompute:
                out = out + selective_checkpoint(self._direction_output, xz, direction, n, in_kernels, True,
                                                 context_fn=_RECOMPUTE_ALL_BUT_THE_SCAN)
            else:
                out = out + self._direction_output(xz, direction, n, in_kernels)
        # (B, L, d_model), contiguous: the same batched GEMM with the roles of the operands swapped
        return _project(self.out_proj.weight, out, positions_first=True)

    def _direction_output(self, xz: torch.Tensor, direction: str, num_slices: int | None,
                          in_kernels: tuple[str, ...], scan_as_op: bool = False) -> torch.Tensor:
        """One direction's branch on xz in raster order -> (B, d_inner, L) in raster order."""
        order, ns = ORDERS[direction], (num_slices if direction == "slice" else None)
        if order == "forward" or order in in_kernels:
            return self.branch(xz, direction, order, ns, scan_as_op)
        return visit(self.branch(visit(xz, order, ns), direction, scan_as_op=scan_as_op), order, ns, inverse=True)

    def _stacks_directions(self, xz: torch.Tensor, recompute: bool) -> bool:
        if self.stack_directions is None:
            return xz.is_cuda and torch.is_grad_enabled() and not recompute and len(self.directions) > 1
        return bool(self.stack_directions)

    def _stacked_output(self, xz: torch.Tensor, num_slices: int | None) -> torch.Tensor:
        """The directions' branches as one (`stack_directions`): xz (B, 2 d_inner, L) in raster order -> the sum of
        their outputs (B, d_inner, L) in raster order."""
        orders = [(ORDERS[d], num_slices if d == "slice" else None) for d in self.directions]
        batch = xz.shape[0]
        # each direction's visiting order of xz, direction-major on the batch: its parameter set's block
        xz_all = torch.cat([xz if order == "forward" else visit(xz, order, ns) for order, ns in orders])
        y = self.stacked_branch(xz_all)
        out = 0
        for i, (order, ns) in enumerate(orders):
            y_i = y[i * batch:(i + 1) * batch]
            out = out + (y_i if order == "forward" else visit(y_i, order, ns, inverse=True))
        return out

    def stacked_branch(self, xz_all: torch.Tensor, gate_outside: bool | None = None) -> torch.Tensor:
        """The directions' branches on their ordered copies stacked direction-major: xz_all (sets x B, 2 d_inner, L)
        -> y * silu(z) (sets x B, d_inner, L), each block with its direction's parameters; `gate_outside` as in
        `branch`."""
        suffixes = [DIRECTIONS[d] for d in self.directions]
        A_log = torch.stack([getattr(self, f"A{s}_log") for s in suffixes])  # (sets, d_inner, d_state)
        D = torch.stack([getattr(self, f"D{s}") for s in suffixes])  # (sets, d_inner)
        dt_bias = torch.stack([getattr(self, f"dt_proj{s}").bias for s in suffixes])
        conv_weight = torch.stack([getattr(self, f"conv1d{s}").weight for s in suffixes])  # (sets, d_inner, 1, K)
        conv_bias = torch.stack([getattr(self, f"conv1d{s}").bias for s in suffixes])
        x, z = xz_all.chunk(2, dim=1)
        u = causal_conv1d(x, conv_weight, conv_bias, silu=True, backend=self.scan_backend)  # (sets x B, d_inner, L)
        gate_outside = _gates_outside(gate_outside, xz_all)
        y = selective_scan_packed(u, self.stacked_delta_B_C(u), -torch.exp(_scan_precision(A_log)),
                                  D=_scan_precision(D), z=None if gate_outside else z,
                                  delta_bias=_scan_precision(dt_bias), delta_softplus=True, backend=self.scan_backend)
        return _gated(y, z) if gate_outside else y

    def stacked_delta_B_C(self, u: torch.Tensor) -> torch.Tensor:
        """`delta_B_C` of every direction on its block of u (sets x B, d_inner, L), as one batched product."""
        sets = len(self.directions)
        suffixes = [DIRECTIONS[d] for d in self.directions]
        # (sets, d_inner + 2 d_state, d_inner)
        weights = torch.stack([self._merged_weight(getattr(self, f"x_proj{s}").weight,
                                                   getattr(self, f"dt_proj{s}").weight) for s in suffixes])
        blocks = u.unflatten(0, (sets, -1))  # (sets, B, d_inner, L)
        return torch.matmul(weights.unsqueeze(1), blocks).flatten(0, 1)

    def _orders_read_in_kernels(self, device: torch.device) -> tuple[str, ...]:
        """The orders whose branch passes the order to the kernels instead of working on a flipped or permuted
        copy. Under torch.compile: none, so that the choice of implementation (which probes for compiled
        extensions) stays out of the traced graph, and inductor fuses the copies into their neighbours."""
        if torch.compiler.is_compiling():
            return ()
        name = dispatch.resolve(self.scan_backend, device)
        return (self.cpu_index_map_orders if name == "cpu" else
                self.index_map_orders if dispatch.supports_index_maps(name) else ())
