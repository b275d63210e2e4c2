"""GPU: the tri-orientated layer's three directions as three scans, or as one scan over their batches stacked.

Each direction of SegMamba's Mamba layer has its own parameters (A, D, delta_bias, the causal conv's weights) and
its own B and C, so the layer runs three scans and three causal convs per layer at every stage. Stacked (as
`TriOrientedMamba(stack_directions=True)` runs them) the three directions' inputs are one batch, direction-major,
and the kernels read each batch element's parameters from its direction's set: one chain of kernels with three
times the programs, where the smaller stages' chains are bound by their kernels' latency rather than their work.
This times, at each shape, the forward and backward of the scan (bf16, no gate, D, delta_bias and softplus, as the
trainers' compiled layers call it) and of the causal conv (fp16, width 4, SiLU), both ways, each captured in a CUDA
graph and replayed back to back (the GPU's time alone, as the trainers replay their steps):

    python -m benchmarks.bench_directions_batched --shapes 18432x96,2304x192,288x384,36x768 --batch 7 \
        --out $OUT/directions_batched_hippo.json

`--tuning bwd_programs_per_sm=32` (repeatable; `key=value[,key=value]` of `triton_scan.TUNING`) adds a column: the
stacked scan with those settings, to find the channel splits that suit its larger grid.

Prints a markdown table and writes JSON. Needs a CUDA device; nothing is asserted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.bench_scan_gpu import parse_shapes, time_graphed
from benchmarks.gpu_timing import settings_applied, settings_parser, write_report
from nnunet_segmamba.ssm.triton_conv import causal_conv1d_triton
from nnunet_segmamba.ssm import triton_scan
from nnunet_segmamba.ssm.triton_scan import selective_scan_triton

DIRECTIONS = 3


def scan_case(batch: int, dim: int, length: int, sets: int, n: int = 16, seed: int = 0) -> dict:
    """Leaves of one scan over `sets` directions' batches stacked, each with its own parameter set (sets = 1: one
    direction, parameters without a set axis)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    rows = sets * batch
    leaves = dict(u=r(rows, dim, length).bfloat16(), delta=(r(rows, dim, length) * 0.5 - 1.0).bfloat16(),
                  A=-torch.rand(sets, dim, n, device="cuda", generator=g).add(0.5),
                  B=r(rows, n, length).bfloat16(), C=r(rows, n, length).bfloat16(),
                  D=r(sets, dim), delta_bias=r(sets, dim) * 0.1)
    if sets == 1:
        leaves.update(A=leaves["A"][0], D=leaves["D"][0], delta_bias=leaves["delta_bias"][0])
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    return {"leaves": leaves, "dout": r(rows, dim, length).bfloat16()}


def scan_step(case: dict) -> None:
    leaves = case["leaves"]
    out = selective_scan_triton(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                                None, leaves["delta_bias"], True)
    torch.autograd.grad(out, list(leaves.values()), case["dout"])


def conv_case(batch: int, dim: int, length: int, sets: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(sets * batch, dim, length, device="cuda", dtype=torch.float16, generator=g).requires_grad_(True)
    weight = (torch.randn(sets, dim, 1, 4, device="cuda", generator=g) * 0.5)
    bias = (torch.randn(sets, dim, device="cuda", generator=g) * 0.1)
    if sets == 1:
        weight, bias = weight[0], bias[0]
    dout = torch.randn(sets * batch, dim, length, device="cuda", dtype=torch.float16, generator=g)
    return {"leaves": (x, weight.requires_grad_(True), bias.requires_grad_(True)), "dout": dout}


def conv_step(case: dict) -> None:
    x, weight, bias = case["leaves"]
    torch.autograd.grad(causal_conv1d_triton(x, weight, bias, silu=True), [x, weight, bias], case["dout"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("18432x96,2304x192,288x384,36x768"),
                        help="LxD_INNER,... (each direction's sequence length and channels)")
    parser.add_argument("--batch", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--tuning", type=settings_parser(triton_scan.TUNING), action="append", default=[],
                        help="KEY=VALUE[,KEY=VALUE] of triton_scan.TUNING: one more column, the stacked scan with them")
    parser.add_argument("--out", type=Path, default=Path("directions_batched.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_directions_batched: needs a CUDA device")
    rows = {}
    for length, dim in args.shapes:
        separate = [scan_case(args.batch, dim, length, 1, seed=i) for i in range(DIRECTIONS)]
        stacked = scan_case(args.batch, dim, length, DIRECTIONS)
        convs = [conv_case(args.batch, dim, length, 1, seed=i) for i in range(DIRECTIONS)]
        conv_stacked = conv_case(args.batch, dim, length, DIRECTIONS)

        def each(step, cases):
            return lambda: [step(case) for case in cases]

        row = {
            "scan: three": time_graphed(each(scan_step, separate), args.warmup, args.runs)["mean_ms"],
            "scan: one, stacked": time_graphed(lambda: scan_step(stacked), args.warmup, args.runs)["mean_ms"],
        }
        for settings in args.tuning:
            name = "scan: one, stacked, " + ",".join(f"{k}={v}" for k, v in settings.items())
            # the kernels' grids are fixed at capture, inside the block
            with settings_applied(triton_scan.TUNING, **settings):
                row[name] = time_graphed(lambda: scan_step(stacked), args.warmup, args.runs)["mean_ms"]
        row["conv: three"] = time_graphed(each(conv_step, convs), args.warmup, args.runs)["mean_ms"]
        row["conv: one, stacked"] = time_graphed(lambda: conv_step(conv_stacked), args.warmup, args.runs)["mean_ms"]
        rows[f"{length}x{dim}"] = row
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
              "stacked": "the batch, direction-major, with parameter sets", "rows": rows,
              "command": "python -m benchmarks.bench_directions_batched " + " ".join(argv or [])}
    print(f"three directions, fwd + bwd graphed, GPU ms, batch {args.batch}, {report['gpu']}")
    columns = list(next(iter(rows.values())))
    print("| L x d_inner | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for shape, row in rows.items():
        print(f"| {shape} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
