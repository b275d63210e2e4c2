"""Where the scan's time goes on the GPU: per-kernel CUDA time of one forward+backward, where the GPU waits for
the host within a step, and a single step to attach Nsight Compute to.

    python -m benchmarks.profile_scan_gpu breakdown --out breakdown.json   # torch.profiler, per kernel
    python -m benchmarks.profile_scan_gpu timeline --out timeline.json     # per step: wall, kernels, idle, host
    ncu --clock-control none --kernel-name regex:'^_bwd_chunk$' --launch-skip 3 --launch-count 1 --set full \
        python -m benchmarks.profile_scan_gpu step --backend triton        # 4 steps: 3 to skip, 1 to profile

Inputs are the scan benchmark's (benchmarks/bench_scan_gpu.py: batch 2, d_state 16, Mamba's options; `--no-gate`
for the trainers' layers, whose gate is outside the scan), one shape and dtype per call. Nothing is asserted; the
breakdown prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_scan_gpu import (DTYPES, fwd_bwd_step, parse_shapes, scan_inputs, scan_leaves,
                                       time_queued)
from nnunet_segmamba.benchmark import time_calls


def prepared(args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    (length, d_inner), = args.shape
    return scan_leaves(scan_inputs(args.batch, d_inner, args.d_state, length, DTYPES[args.dtype],
                                   gate=not args.no_gate))


def warmed_up(args: argparse.Namespace, backend: str) -> tuple[dict, torch.Tensor]:
    """Inputs, after three steps on `backend` (compilation and the allocator's first blocks out of the way)."""
    leaves, dout = prepared(args)
    for _ in range(3):
        fwd_bwd_step(leaves, dout, backend)
    torch.cuda.synchronize()
    return leaves, dout


def new_report(args: argparse.Namespace) -> dict:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    command = " ".join(["python -m benchmarks.profile_scan_gpu", *sys.argv[1:]])
    return {"command": command, "config": config, "backends": {}}


def breakdown(args: argparse.Namespace) -> dict:
    """Mean CUDA time per step of each kernel over `--steps` forward+backward steps, for each backend."""
    report = new_report(args)
    for backend in args.backends:
        leaves, dout = warmed_up(args, backend)
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


def _step_spans(trace: dict) -> list[dict]:
    """Per profiled step (a "step" range on the host): microseconds from the step's start to its first kernel, to
    its last kernel's end, the time kernels ran (the union of their intervals) in between, and each idle gap
    before a device op, keyed by the op's index and the names on either side."""
    events = trace["traceEvents"]
    steps = sorted((e for e in events if e.get("name") == "step" and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                    key=lambda e: e["ts"])
    spans = []
    for i, s in enumerate(steps):
        stop = steps[i + 1]["ts"] if i + 1 < len(steps) else float("inf")
        mine = [e for e in device if s["ts"] <= e["ts"] < stop]
        if not mine:
            continue
        busy, reach, gaps = 0.0, mine[0]["ts"], {}
        for k, e in enumerate(mine):
            start, end = max(e["ts"], reach), e["ts"] + e["dur"]
            busy += max(0.0, end - start)
            if k and e["ts"] > reach:
                gaps[f"{k}: {mine[k - 1]['name'][:28]} -> {e['name'][:28]}"] = e["ts"] - reach
            reach = max(reach, end)
        spans.append({"to_first_kernel_us": mine[0]["ts"] - s["ts"], "span_us": reach - s["ts"],
                      "kernels_us": busy, "device_ops": len(mine), "host_us": s["dur"], "gaps_us": gaps})
    return spans


def timeline(args: argparse.Namespace) -> dict:
    """Per forward+backward step: CUDA-event wall time (the benchmark's way, a sync after each step), the steady
    state time when steps are launched back to back, the host's time per step, and from a profiler trace the
    time from a step's start to its first kernel and the GPU's idle time inside the step; plus the host's
    hottest Python functions (cProfile)."""
    report = new_report(args)
    for backend in args.backends:
        leaves, dout = warmed_up(args, backend)
        step = lambda: fwd_bwd_step(leaves, dout, backend)  # noqa: E731
        per_call = time_calls(step, torch.device("cuda"), 2, args.steps)
        queued = time_queued(step, 2, args.steps)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                with torch.profiler.record_function("step"):
                    fwd_bwd_step(leaves, dout, backend)
                torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            spans = _step_spans(json.loads(Path(f"{tmp}/trace.json").read_text()))
        med = {k: statistics.median(s[k] for s in spans) for k in spans[0] if k != "gaps_us"} if spans else {}
        gaps = {k: statistics.median(s["gaps_us"].get(k, 0.0) for s in spans) for k in spans[0]["gaps_us"]} \
            if spans else {}
        med["gaps_us"] = dict(sorted(gaps.items(), key=lambda kv: -kv[1]))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            fwd_bwd_step(leaves, dout, backend)
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        entry = {"wall_us_median": per_call["ms_median"] * 1e3, "back_to_back_us": queued["mean_ms"] * 1e3,
                 "host_us_per_step": queued["host_ms"] * 1e3, "profiled_step_median": med,
                 "cprofile_tottime": text.getvalue()}
        report["backends"][backend] = entry
        idle = med.get("span_us", 0) - med.get("kernels_us", 0)
        print(f"\n{backend} {args.shape[0][0]}x{args.shape[0][1]} {args.dtype}: wall {entry['wall_us_median']:.0f} us, "
              f"back-to-back {entry['back_to_back_us']:.0f} us, host {entry['host_us_per_step']:.0f} us/step; "
              f"profiled: first kernel after "
              f"{med.get('to_first_kernel_us', 0):.0f} us, kernels {med.get('kernels_us', 0):.0f} us, idle in span "
              f"{idle:.0f} us, {med.get('device_ops', 0):.0f} device ops")
        print("  idle before a device op (median us, op index: previous -> next):",
              ", ".join(f"{k} {v:.0f}" for k, v in list(med.get("gaps_us", {}).items())[:6]))
        print("\n".join(text.getvalue().splitlines()[:34]))
    return report


def step(args: argparse.Namespace) -> dict:
    leaves, dout = prepared(args)
    for _ in range(args.steps):
        fwd_bwd_step(leaves, dout, args.backends[0])
    torch.cuda.synchronize()
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("breakdown", "timeline", "step"))
    parser.add_argument("--shape", type=parse_shapes, default=parse_shapes("32768x192"), help="LxD_INNER")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--backends", "--backend", nargs="+", choices=("cuda", "triton"), default=["triton", "cuda"])
    parser.add_argument("--no-gate", action="store_true",
                        help="no gate z in the scan: the trainers' compiled layers apply it outside, and the kernels "
                             "then compile without it (the backward's scans in rows for 16-bit inputs)")
    parser.add_argument("--steps", type=int, default=None,
                        help="profiled steps (breakdown: 10, timeline: 30) or steps run (step: 4)")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = {"breakdown": 10, "timeline": 30, "step": 4}[args.what]
    report = {"breakdown": breakdown, "timeline": timeline, "step": step}[args.what](args)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
