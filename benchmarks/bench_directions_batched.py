"""GPU: the tri-orientated layer's three directions as three scans, or as one scan over their channels stacked.

Each direction of SegMamba's Mamba layer has its own parameters (A, D, delta_bias, the causal conv's weights) and
its own B and C, so the layer runs three scans and three causal convs per layer at every stage. The scan treats its
channels independently and reads B and C per group of channels, so the three directions are also one scan over
3 x d_inner channels in 3 groups: one chain of kernels with three times the programs, where the smaller stages'
chains are bound by their kernels' latency rather than their work. This times, at each shape, the forward and
backward of the scan (bf16, no gate, D, delta_bias and softplus, as the trainers' compiled layers call it) and of
the causal conv (fp16, width 4, SiLU), both ways, each captured in a CUDA graph and replayed back to back (the GPU's
time alone, as the trainers replay their steps):

    python -m benchmarks.bench_directions_batched --shapes 18432x96,2304x192,288x384,36x768 --batch 7 \
        --out $OUT/directions_batched_hippo.json

Prints a markdown table and writes JSON. Needs a CUDA device; nothing is asserted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.bench_scan_gpu import parse_shapes, time_graphed
from benchmarks.gpu_timing import write_report
from nnunet_segmamba.ssm.triton_conv import causal_conv1d_triton
from nnunet_segmamba.ssm.triton_scan import selective_scan_triton

DIRECTIONS = 3


def scan_case(batch: int, dim: int, length: int, groups: int, n: int = 16, seed: int = 0) -> dict:
    """Leaves of one scan over `groups` directions' channels stacked (groups = 1: one direction)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    channels = groups * dim
    leaves = dict(u=r(batch, channels, length).bfloat16(), delta=(r(batch, channels, length) * 0.5 - 1.0).bfloat16(),
                  A=-torch.rand(channels, n, device="cuda", generator=g).add(0.5),
                  B=r(batch, groups, n, length).bfloat16(), C=r(batch, groups, n, length).bfloat16(),
                  D=r(channels), delta_bias=r(channels) * 0.1)
    if groups == 1:
        leaves["B"], leaves["C"] = leaves["B"][:, 0], leaves["C"][:, 0]
    leaves = {k: v.requires_grad_(True) for k, v in leaves.items()}
    return {"leaves": leaves, "dout": r(batch, channels, length).bfloat16()}


def scan_step(case: dict) -> None:
    leaves = case["leaves"]
    out = selective_scan_triton(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                                None, leaves["delta_bias"], True)
    torch.autograd.grad(out, list(leaves.values()), case["dout"])


def conv_case(batch: int, dim: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, dim, length, device="cuda", dtype=torch.float16, generator=g).requires_grad_(True)
    weight = (torch.randn(dim, 1, 4, device="cuda", generator=g) * 0.5).requires_grad_(True)
    bias = (torch.randn(dim, device="cuda", generator=g) * 0.1).requires_grad_(True)
    dout = torch.randn(batch, dim, length, device="cuda", dtype=torch.float16, generator=g)
    return {"leaves": (x, weight, bias), "dout": dout}


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
    parser.add_argument("--out", type=Path, default=Path("directions_batched.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_directions_batched: needs a CUDA device")
    rows = {}
    for length, dim in args.shapes:
        separate = [scan_case(args.batch, dim, length, 1, seed=i) for i in range(DIRECTIONS)]
        stacked = scan_case(args.batch, dim, length, DIRECTIONS)
        convs = [conv_case(args.batch, dim, length, seed=i) for i in range(DIRECTIONS)]
        conv_stacked = conv_case(args.batch, DIRECTIONS * dim, length)

        def each(step, cases):
            return lambda: [step(case) for case in cases]

        rows[f"{length}x{dim}"] = {
            "scan: three": time_graphed(each(scan_step, separate), args.warmup, args.runs)["mean_ms"],
            "scan: one, stacked": time_graphed(lambda: scan_step(stacked), args.warmup, args.runs)["mean_ms"],
            "conv: three": time_graphed(each(conv_step, convs), args.warmup, args.runs)["mean_ms"],
            "conv: one, stacked": time_graphed(lambda: conv_step(conv_stacked), args.warmup, args.runs)["mean_ms"],
        }
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch, "rows": rows,
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
