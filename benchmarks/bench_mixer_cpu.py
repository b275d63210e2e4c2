"""CPU timing of the tri-orientated Mamba mixer and of the plain selective scan, per scan backend, side by side.

Runs TriOrientedMamba(d_model=48) forward+backward on a 16^3 feature map (L = 4096, num_slices 16, batch 2,
float32), and the scan alone at the mixer's size (d_inner 96, d_state 16), forward and forward+backward, on each
backend of --backends: "torch" (the chunked PyTorch scan) and "cpu" (the fused C++ kernels of
`nnunet_segmamba.ssm.cpu_scan`, compiled on first use; its build or load time is reported). Each case is warmed
up, then timed with time.perf_counter; the table shows the median (and min/max) of the runs, and the median CPU
time of the process (time.process_time: on a machine shared with other jobs, wall time / CPU time well above
1 / threads means the threads waited for a core). Timings only, nothing is asserted. Example:

    python -m benchmarks.bench_mixer_cpu --threads 2 --runs 10 --out mixer_cpu.json

With --network-side S it also times one forward (torch.inference_mode) of the full-size SegMamba (4 -> 3
channels) on an S^3 tile, per backend, against the same network with mixer="none" (the skeleton without Mamba
layers): the mixers' share of a sliding-window prediction. Run once (--network-runs), it takes about a minute at
S = 128 on two cores.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.cpu_timing import add_run_arguments, run, system_info, time_runs
from nnunet_segmamba.nn import TriOrientedMamba, set_scan_backend
from nnunet_segmamba.ssm import selective_scan
from nnunet_segmamba.ssm.cpu_scan import cpu_scan_status


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    length = args.side ** 3
    x = torch.randn(args.batch, length, args.d_model, requires_grad=True)
    build_s = None
    if "cpu" in args.backends:
        start = time.perf_counter()
        usable, reason = cpu_scan_status()  # compiles the extension, or loads the cached build
        build_s = time.perf_counter() - start
        if not usable:
            raise SystemExit(f"backend 'cpu' unavailable: {reason}")
    mixer = TriOrientedMamba(args.d_model)
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

    def cases_for(backend: str) -> dict[str, Callable[[], object]]:
        set_scan_backend(mixer, backend)  # the same weights on every backend

        def mixer_fwd():
            with torch.no_grad():
                mixer(x, num_slices=args.side)

        def mixer_fwd_bwd():
            out = mixer(x, num_slices=args.side)
            torch.autograd.grad(out.sum(), [x, *mixer.parameters()])

        def scan_fwd():
            with torch.no_grad():
                selective_scan(**scan_inputs, delta_softplus=True, backend=backend)

        def scan_fwd_bwd():
            out = selective_scan(**scan_inputs, delta_softplus=True, backend=backend)
            torch.autograd.grad(out.sum(), list(scan_inputs.values()))

        return {
            f"TriOrientedMamba({args.d_model}) fwd, {backend}": mixer_fwd,
            f"TriOrientedMamba({args.d_model}) fwd+bwd, {backend}": mixer_fwd_bwd,
            f"selective_scan (d={d_inner}, n={n}) fwd, {backend}": scan_fwd,
            f"selective_scan (d={d_inner}, n={n}) fwd+bwd, {backend}": scan_fwd_bwd,
        }

    results = {}
    for backend in args.backends:
        for name, fn in cases_for(backend).items():
            results[name] = time_runs(fn, args.warmup, args.runs)
    if args.network_side:
        results.update(bench_network(args))
    return {
        "config": {"d_model": args.d_model, "L": length, "num_slices": args.side, "batch": args.batch,
                   "dtype": "float32", "backends": list(args.backends), "warmup": args.warmup, "runs": args.runs},
        "system": {**system_info(), "python": sys.version.split()[0]},
        "cpu_kernel_build_or_load_s": build_s,
        "results": results,
    }


def bench_network(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from nnunet_segmamba.networks import SegMamba

    side = args.network_side
    tile = torch.randn(1, 4, side, side, side)
    results = {}
    for mixer, backends in (("none", ["-"]), ("tom", args.backends)):
        torch.manual_seed(0)
        net = SegMamba(4, 3, mixer=mixer).eval()
        for backend in backends:
            if backend != "-":
                set_scan_backend(net, backend)

            def forward():
                with torch.inference_mode():
                    net(tile)

            label = f"SegMamba {side}^3 forward, mixer {mixer}" + (f", {backend}" if backend != "-" else "")
            results[label] = time_runs(forward, 1 if side <= 64 else 0, args.network_runs)
    return results


def print_table(report: dict) -> None:
    s, c = report["system"], report["config"]
    print(f"CPU: {s['cpu']}; torch {s['torch']} with {s['torch_threads']} threads")
    print(f"L = {c['L']} ({c['num_slices']} slices), batch {c['batch']}, {c['dtype']}, backends "
          f"{', '.join(c['backends'])}, median of {c['runs']} runs after {c['warmup']} warm-up; load average "
          f"{s['load_average']}")
    if report["cpu_kernel_build_or_load_s"] is not None:
        print(f"fused CPU kernel: built or loaded in {report['cpu_kernel_build_or_load_s']:.1f} s")
    print("\n| case | median ms | min ms | max ms | CPU ms (median) |\n|---|---|---|---|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | {r['cpu_median_ms']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=48, help="mixer width d_model (default 48)")
    parser.add_argument("--side", type=int, default=16, help="feature map side: L = side^3, num_slices = side")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    add_run_arguments(parser, runs=10)
    parser.add_argument("--backends", type=lambda v: [b.strip() for b in v.split(",") if b.strip()],
                        default=["torch", "cpu"], help="comma-separated scan backends (default torch,cpu)")
    parser.add_argument("--network-side", type=int, default=0,
                        help="also time the full SegMamba forward on a tile of this side (e.g. 64 or 128)")
    parser.add_argument("--network-runs", type=int, default=1, help="timed runs of the network (default 1)")
    return run(parser.parse_args(argv), bench, print_table)


if __name__ == "__main__":
    sys.exit(main())
