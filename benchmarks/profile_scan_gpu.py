"""Where the scan's time goes on the GPU: per-kernel CUDA time of one forward+backward, and a single step to
attach Nsight Compute to.

    python benchmarks/profile_scan_gpu.py breakdown --out breakdown.json   # torch.profiler, per kernel
    ncu --clock-control none --kernel-name regex:'^_bwd_chunk$' --launch-skip 3 --launch-count 1 --set full \
        python benchmarks/profile_scan_gpu.py step --backend triton        # 4 steps: 3 to skip, 1 to profile

Inputs are the scan benchmark's (benchmarks/bench_scan_gpu.py: batch 2, d_state 16, Mamba's options), one shape
and dtype per call. Nothing is asserted; the breakdown prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan_gpu import DTYPES, fwd_bwd_step, parse_shapes, scan_inputs, scan_leaves  # noqa: E402


def prepared(args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    (length, d_inner), = args.shape
    return scan_leaves(scan_inputs(args.batch, d_inner, args.d_state, length, DTYPES[args.dtype]))


def breakdown(args: argparse.Namespace) -> dict:
    """Mean CUDA time per step of each kernel over `--steps` forward+backward steps, for each backend."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"command": " ".join(["python", *sys.argv]), "config": config, "backends": {}}
    for backend in args.backends:
        leaves, dout = prepared(args)
        for _ in range(3):
            fwd_bwd_step(leaves, dout, backend)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                fwd_bwd_step(leaves, dout, backend)
            torch.cuda.synchronize()
        kernels = []
        for event in prof.key_averages():
            total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
            if total_us > 0:
                kernels.append({"kernel": event.key[:90], "calls_per_step": event.count / args.steps,
                                "us_per_step": total_us / args.steps})
        kernels.sort(key=lambda k: -k["us_per_step"])
        report["backends"][backend] = {"kernels": kernels, "total_us_per_step": sum(k["us_per_step"] for k in kernels)}
        print(f"\n{backend}, L x d_inner {args.shape[0][0]} x {args.shape[0][1]}, {args.dtype}: "
              f"{report['backends'][backend]['total_us_per_step']:.0f} us of kernels per fwd+bwd")
        print("| us / step | calls | kernel |\n|---|---|---|")
        for k in kernels:
            print(f"| {k['us_per_step']:.1f} | {k['calls_per_step']:g} | {k['kernel']} |")
    return report


def step(args: argparse.Namespace) -> dict:
    leaves, dout = prepared(args)
    for _ in range(args.steps):
        fwd_bwd_step(leaves, dout, args.backends[0])
    torch.cuda.synchronize()
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("breakdown", "step"))
    parser.add_argument("--shape", type=parse_shapes, default=parse_shapes("32768x192"), help="LxD_INNER")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--backends", "--backend", nargs="+", choices=("cuda", "triton"), default=["triton", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (breakdown: 10) or steps run (step: 4)")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.what == "breakdown" else 4
    report = (breakdown if args.what == "breakdown" else step)(args)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
