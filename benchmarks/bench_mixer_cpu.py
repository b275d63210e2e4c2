"""CPU timing of the tri-orientated Mamba mixer and of the plain selective scan (PyTorch backend).

Runs TriOrientedMamba(d_model=48) forward+backward on a 16^3 feature map (L = 4096, num_slices 16, batch 2,
float32), and the scan alone at the mixer's size (d_inner 96, d_state 16), forward and forward+backward. Each is
warmed up, then timed with time.perf_counter; the table shows the median (and min/max) of the runs. Timings only,
nothing is asserted. Example:

    python -m benchmarks.bench_mixer_cpu --runs 10 --out mixer_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from nnunet_segmamba.nn import TriOrientedMamba
from nnunet_segmamba.ssm import selective_scan


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_runs(fn: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": runs}


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    length = args.side ** 3
    mixer = TriOrientedMamba(args.d_model, scan_backend="torch")
    x = torch.randn(args.batch, length, args.d_model, requires_grad=True)

    def mixer_fwd():
        with torch.no_grad():
            mixer(x, num_slices=args.side)

    def mixer_fwd_bwd():
        out = mixer(x, num_slices=args.side)
        torch.autograd.grad(out.sum(), [x, *mixer.parameters()])

    d_inner, n = mixer.d_inner, mixer.d_state
    scan_inputs = dict(
        u=torch.randn(args.batch, d_inner, length, requires_grad=True),
        delta=(torch.randn(args.batch, d_inner, length) * 0.5 - 2).requires_grad_(True),
        A=(-torch.arange(1, n + 1, dtype=torch.float32).repeat(d_inner, 1)).requires_grad_(True),
        B=torch.randn(args.batch, n, length, requires_grad=True),
        C=torch.randn(args.batch, n, length, requires_grad=True),
        D=torch.ones(d_inner, requires_grad=True),
        z=torch.randn(args.batch, d_inner, length, requires_grad=True),
        delta_bias=torch.zeros(d_inner, requires_grad=True),
    )

    def scan_fwd():
        with torch.no_grad():
            selective_scan(**scan_inputs, delta_softplus=True, backend="torch")

    def scan_fwd_bwd():
        out = selective_scan(**scan_inputs, delta_softplus=True, backend="torch")
        torch.autograd.grad(out.sum(), list(scan_inputs.values()))

    cases = {
        f"TriOrientedMamba({args.d_model}) fwd": mixer_fwd,
        f"TriOrientedMamba({args.d_model}) fwd+bwd": mixer_fwd_bwd,
        f"selective_scan torch (d={d_inner}, n={n}) fwd": scan_fwd,
        f"selective_scan torch (d={d_inner}, n={n}) fwd+bwd": scan_fwd_bwd,
    }
    results = {name: time_runs(fn, args.warmup, args.runs) for name, fn in cases.items()}
    return {
        "config": {"d_model": args.d_model, "L": length, "num_slices": args.side, "batch": args.batch,
                   "dtype": "float32", "backend": "torch", "warmup": args.warmup, "runs": args.runs},
        "system": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "python": sys.version.split()[0]},
        "results": results,
    }


def print_table(report: dict) -> None:
    s, c = report["system"], report["config"]
    print(f"CPU: {s['cpu']}; torch {s['torch']} with {s['torch_threads']} threads")
    print(f"L = {c['L']} ({c['num_slices']} slices), batch {c['batch']}, {c['dtype']}, backend {c['backend']}, "
          f"median of {c['runs']} runs after {c['warmup']} warm-up\n")
    print("| case | median ms | min ms | max ms |\n|---|---|---|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=48, help="mixer width d_model (default 48)")
    parser.add_argument("--side", type=int, default=16, help="feature map side: L = side^3, num_slices = side")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs; the median is reported (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench(args)
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
