"""GPU comparison of the scan backends "torch", "cuda" (mamba-ssm's kernel) and "triton" (ours): accuracy and
CUDA-event timings against the memory-bound floor.

For each (L, d_inner) in --shapes (default 64^3 x 96 and 32^3 x 192), batch 2, d_state 16, float32 and bf16:
  * accuracy: outputs and the gradients of u, delta, A, B, C, D, z, delta_bias of each backend against the torch
    backend run on float32 copies of the same inputs (max abs error, and max abs error / max |reference|);
    in bf16, u/delta/z/B/C are bf16 as nn.Linear under autocast produces them, A/D/delta_bias stay float32;
  * timings: forward (no_grad) and forward+backward of the scan per backend, median of --runs after --warmup,
    each call timed on its own (a sync after it); forward+backward queued back to back (the mean per call); and
    forward+backward captured in a CUDA graph and replayed back to back (the mean per call): the GPU's time alone,
    as the trainers' CUDA graphs replay the scan, where the other two still hold the host's time at small shapes;
  * the TriOrientedMamba layer (d_model = d_inner / 2, num_slices = cube root of L) forward and forward+backward
    per backend, float32 and under bf16 autocast; for triton also with the reverse order ("triton-maps-reverse") and
    both orders ("triton-maps-all") read through index maps instead of flipped / permuted copies;
  * the floor: the bytes the scan must move (its inputs read once, its outputs written once) over the copy
    bandwidth measured here (a device-to-device copy, bytes read + written);
  * with --tune: triton's launch settings (TUNE_GRID; with --tune carry, the carry kernel's: CARRY_TUNE_GRID; with
    --tune rows, the backward's in-chunk scans: ROWS_TUNE_GRID)
    swept at every shape in bf16 (scan fwd+bwd, graphed), the one with the least time summed over the shapes
    applied before the table.
An unavailable backend is reported, and the others are still timed. Nothing is asserted.
Needs a CUDA device; prints the markdown table and writes --out JSON. Example:

    python -m benchmarks.bench_scan_gpu --out scan_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from nnunet_segmamba.benchmark import time_calls
from nnunet_segmamba.nn import TriOrientedMamba
from nnunet_segmamba.ssm import dispatch, selective_scan, triton_scan

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the layer on the triton backend with other index-map choices than the default (TriOrientedMamba.index_map_orders)
LAYER_VARIANTS = {"triton-maps-reverse": ("reverse",), "triton-maps-all": ("reverse", "slice")}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'262144x96,32768x192' -> [(262144, 96), (32768, 192)]. The layer (TriOrientedMamba) needs L to be a cube
    (num_slices = its cube root); the scan takes any L, e.g. 18432x96 (the hippocampus patch's first stage)."""
    shapes = []
    for item in text.split(","):
        try:
            length, d_inner = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} must be LxD_INNER, e.g. 32768x192") from None
        if length < 1 or d_inner < 2 or d_inner % 2:
            raise argparse.ArgumentTypeError(f"shape {item!r}: L must be positive and d_inner even")
        shapes.append((length, d_inner))
    return shapes


def time_cuda(fn: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """CUDA-event timing from the benchmark command, under this script's JSON keys."""
    timing = time_calls(fn, torch.device("cuda"), warmup, runs)
    return {"median_ms": timing["ms_median"], "min_ms": timing["ms_min"], "runs": runs}


def time_queued(fn: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """Milliseconds per call of `runs` calls queued back to back with one sync at the end: the GPU's time per call
    once the host runs ahead of it, as in a training loop. time_cuda syncs after every call, so its numbers also
    hold the host's time to the first kernel and any wait for the host inside the call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3 / runs  # the host's time per call: the GPU is still busy here
    end.record()
    end.synchronize()
    return {"mean_ms": start.elapsed_time(end) / runs, "host_ms": host_ms, "runs": runs}


def time_graphed(fn: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """Milliseconds per call of `fn` captured once in a CUDA graph and replayed `runs` times back to back: the
    GPU's time per call with no host between its kernels, as where the trainers replay their steps as CUDA graphs
    (at small shapes the host's launches bound time_cuda and time_queued)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, caches) outside the capture, as torch.cuda.graph wants
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    end.synchronize()
    return {"mean_ms": start.elapsed_time(end) / runs, "runs": runs}


def scan_inputs(batch: int, d_inner: int, d_state: int, length: int, dtype: torch.dtype, seed: int = 0,
                gate: bool = True) -> dict:
    """The scan's inputs as a Mamba layer gives them; no gate z with `gate=False` (the layer applies it outside the
    scan under torch.compile on CUDA, as the trainers run it, and the kernels then compile without it)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device="cuda") * scale + shift).to(dt)

    inputs = dict(
        u=r(batch, d_inner, length), delta=r(batch, d_inner, length, scale=0.5, shift=-2.0),
        A=-torch.arange(1, d_state + 1, device="cuda", dtype=torch.float32).repeat(d_inner, 1),
        B=r(batch, d_state, length), C=r(batch, d_state, length), D=r(d_inner, dt=torch.float32),
        z=r(batch, d_inner, length), delta_bias=r(d_inner, scale=0.3, dt=torch.float32),
    )
    if not gate:  # z is drawn all the same, so that the other inputs (delta_bias after it) are those with the gate
        del inputs["z"]
    return inputs


def with_grad(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    return {k: (v.to(dtype) if dtype is not None else v).detach().clone().requires_grad_(True)
            for k, v in inputs.items()}


def run_scan(inputs: dict, backend: str) -> torch.Tensor:
    return selective_scan(**inputs, delta_softplus=True, backend=backend)


def errors(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    diff = (actual.float() - expected.float()).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(expected.float().abs().max().item(), 1e-30)}


def accuracy(base: dict, backend: str) -> dict:
    """Output and gradient errors of `backend` on `base` against the torch backend on float32 copies."""
    ref_in = with_grad(base, torch.float32)
    ref = run_scan(ref_in, "torch")
    dout = torch.randn(ref.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    names = [k for k in GRAD_NAMES if k in base]  # z only with the gate
    ref_grads = torch.autograd.grad(ref, [ref_in[k] for k in names], dout)
    test_in = with_grad(base)
    out = run_scan(test_in, backend)
    grads = torch.autograd.grad(out, [test_in[k] for k in names], dout.to(out.dtype))
    result = {"out": errors(out, ref)}
    result.update({f"d{k}": errors(g, rg) for k, g, rg in zip(names, grads, ref_grads)})
    return result


def scan_leaves(base: dict) -> tuple[dict, torch.Tensor]:
    """Inputs that take gradients, and an output gradient, for timing forward+backward steps."""
    return with_grad(base), torch.randn(base["u"].shape, device="cuda").to(base["u"].dtype)


def fwd_bwd_step(leaves: dict, dout: torch.Tensor, backend: str) -> None:
    torch.autograd.grad(run_scan(leaves, backend), list(leaves.values()), dout)


def bench_scan(base: dict, backend: str, warmup: int, runs: int) -> dict:
    leaves, dout = scan_leaves(base)

    def fwd():
        with torch.no_grad():
            run_scan(leaves, backend)

    return {"fwd": time_cuda(fwd, warmup, runs),
            "fwd+bwd": time_cuda(lambda: fwd_bwd_step(leaves, dout, backend), warmup, runs),
            "fwd+bwd queued": time_queued(lambda: fwd_bwd_step(leaves, dout, backend), warmup, runs),
            "fwd+bwd graphed": guarded(lambda: time_graphed(lambda: fwd_bwd_step(leaves, dout, backend), warmup,
                                                            runs))}


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20 copies."""
    src = torch.randn(int(gib * 2 ** 30) // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_calls(lambda: dst.copy_(src), torch.device("cuda"), 3, 20)["ms_median"]
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2 ** 30 / (ms / 1e3)


def floor_ms(batch: int, d_inner: int, d_state: int, length: int, dtype: torch.dtype, bandwidth: float,
             gate: bool = True) -> dict:
    """Bytes that must move: forward reads u, delta, z, B, C and writes out; the backward reads u, delta, z, B, C
    and dout and writes du, ddelta, dz, dB, dC (A, D, delta_bias and the chunk states are negligible); z and dz
    only with the gate."""
    size = torch.tensor([], dtype=dtype).element_size()
    rows, bc = batch * d_inner * length, batch * d_state * length
    fwd = size * ((4 if gate else 3) * rows + 2 * bc)
    bwd = size * ((7 if gate else 5) * rows + 4 * bc)
    return {"fwd": fwd / bandwidth * 1e3, "fwd+bwd": (fwd + bwd) / bandwidth * 1e3, "bytes_fwd": fwd,
            "bytes_fwd+bwd": fwd + bwd}


# the forward's warps were settled at 1 by the sweep over (128, 256, 512) x (1, 2) x (1, 2, 4), and the backward at
# chunk 64, 1 warp, 8 programs per multiprocessor by the sweep over (32, 64, 128) x (1, 2) x (4, 8, 16, 32), both
# recorded in docs/performance.md at batch 2 and 64^3 / 32^3; later sweeps of the chunk, the backward's warps and
# its split target around that choice kept it. This grid sweeps the split targets of the chunk kernels, which walk
# a group's channels in one program since they load B / C once per program: fewer, longer programs against enough
# of them to fill the GPU (at the hippocampus patch's first stage, batch 7 x 288 chunks = 2016 programs before any
# split), for the two summaries and the forward's output, and for the backward's main kernel; centred on the
# setting the last sweep kept (64 / 16), whose forward value sat at that grid's edge
TUNE_GRID = [dict(block_l=64, warps_fwd=1, warps_bwd=1, fwd_programs_per_sm=fwd, bwd_programs_per_sm=bwd)
             for fwd in (32, 64, 128) for bwd in (8, 16, 32)]
# The carry kernel (the scan over chunks, one row per (batch, channel)): a row's states in one program or split over
# several, and its warps
CARRY_TUNE_GRID = [dict(carry_states=states, warps_carry=warps) for states in (16, 8, 4) for warps in (4, 2, 1)]
# The backward's main kernel with its in-chunk scans by tl.associative_scan and flips, or in rows of 8 steps
# (`_scan_rows`); each twice, in alternation, so that a drift of the GPU's clocks over the sweep shows
ROWS_TUNE_GRID = [dict(bwd_rows=rows) for rows in (False, True, False, True)]
TUNE_GRIDS = {"chunks": TUNE_GRID, "carry": CARRY_TUNE_GRID, "rows": ROWS_TUNE_GRID}


def tune(bases: dict, warmup: int, runs: int, grid: list[dict] = TUNE_GRID) -> dict:
    """The triton scan's fwd+bwd time for each launch setting of `grid` at each shape; the setting with the
    least graphed time summed over the shapes (what a network with one such scan per shape spends on them; over
    its repeats too, where the grid lists a setting more than once) is applied to triton_scan.TUNING."""
    keys = tuple(grid[0])
    results = []
    for setting in grid:
        triton_scan.TUNING.update(setting)
        for shape, base in bases.items():
            entry = {"shape": shape, **setting, **guarded(lambda: bench_scan(base, "triton", warmup, runs))}
            results.append(entry)
            print(f"tune: {entry}", file=sys.stderr)
    ok = [r for r in results if "error" not in r and "error" not in r["fwd+bwd graphed"]]
    score = {}
    for r in ok:
        key = tuple(r[k] for k in keys)
        score[key] = score.get(key, 0.0) + r["fwd+bwd graphed"]["mean_ms"]
    # a setting listed more than once in the grid is timed that many times, and its times are summed
    runs_of = {k: sum(1 for setting in grid if tuple(setting[key] for key in keys) == k) for k in score}
    complete = {k: v for k, v in score.items()
                if sum(1 for r in ok if tuple(r[key] for key in keys) == k) == len(bases) * runs_of[k]}
    triton_scan.TUNING.update(zip(keys, min(complete, key=complete.get)))
    return {"keys": keys, "results": results, "chosen": dict(triton_scan.TUNING),
            "score": {str(k): v for k, v in score.items()}}


def bench_layer(length: int, d_inner: int, batch: int, dtype_name: str, backend: str, warmup: int,
                runs: int) -> dict:
    side = round(length ** (1 / 3))
    if side ** 3 != length:
        raise ValueError(f"the layer needs L to be a cube (num_slices = its side), got {length}; use --skip-layer")
    torch.manual_seed(0)
    layer = TriOrientedMamba(d_inner // 2, scan_backend=backend.split("-")[0]).cuda()
    if backend in LAYER_VARIANTS:
        layer.index_map_orders = LAYER_VARIANTS[backend]
    x = torch.randn(batch, length, d_inner // 2, device="cuda", requires_grad=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype_name == "bf16")

    def fwd():
        with torch.no_grad(), autocast:
            layer(x, num_slices=side)

    def fwd_bwd():
        with autocast:
            out = layer(x, num_slices=side)
        torch.autograd.grad(out.float().sum(), [x, *layer.parameters()])

    return {"fwd": time_cuda(fwd, warmup, runs), "fwd+bwd": time_cuda(fwd_bwd, warmup, runs)}


def guarded(fn: Callable[[], dict]) -> dict:
    """Run one case; an OOM or a kernel error becomes {'error': ...} so that the other cases still run."""
    try:
        return fn()
    except Exception as exc:  # OutOfMemoryError, a kernel's RuntimeError...
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}


def bench(args: argparse.Namespace) -> dict:
    cuda_ok, cuda_reason = dispatch.cuda_scan_status()
    triton_ok, triton_reason = dispatch.triton_scan_status()
    available = {"torch": True, "cuda": cuda_ok, "triton": triton_ok}
    names = [b for b in args.backends if available[b]]
    bandwidth = copy_bandwidth()
    gate = not args.no_gate
    report = {
        "system": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                   "cuda_backend": cuda_ok, "cuda_backend_reason": cuda_reason, "triton_backend": triton_ok,
                   "triton_backend_reason": triton_reason, "copy_bandwidth_GBps": bandwidth / 1e9,
                   "triton_tuning": dict(triton_scan.TUNING)},
        "config": {"batch": args.batch, "d_state": args.d_state, "warmup": args.warmup, "runs": args.runs,
                   "shapes": args.shapes, "dtypes": args.dtypes, "gate_in_scan": gate},
        "cases": [],
    }
    if args.tune and triton_ok:
        bases = {f"{length}x{d_inner}": scan_inputs(args.batch, d_inner, args.d_state, length, torch.bfloat16,
                                                    gate=gate)
                 for length, d_inner in args.shapes}
        report["tune"] = {"dtype": "bf16", "grid": args.tune,
                          **tune(bases, args.warmup, args.runs, TUNE_GRIDS[args.tune])}
        report["system"]["triton_tuning"] = dict(triton_scan.TUNING)
        del bases
        torch.cuda.empty_cache()
    for length, d_inner in args.shapes:
        for dtype_name in args.dtypes:
            base = scan_inputs(args.batch, d_inner, args.d_state, length, DTYPES[dtype_name], gate=gate)
            floor = floor_ms(args.batch, d_inner, args.d_state, length, DTYPES[dtype_name], bandwidth, gate)
            for backend in names + (list(LAYER_VARIANTS) if "triton" in names and not args.skip_layer else []):
                case = {"L": length, "d_inner": d_inner, "dtype": dtype_name, "backend": backend, "floor": floor}
                if backend not in LAYER_VARIANTS:
                    case["accuracy"] = guarded(lambda: accuracy(base, backend))
                    runs = args.runs if backend != "torch" else max(3, args.runs // 5)  # the slow one, fewer
                    case["scan"] = guarded(lambda: bench_scan(base, backend, args.warmup, runs))
                if not args.skip_layer:
                    case["layer"] = guarded(lambda: bench_layer(length, d_inner, args.batch, dtype_name, backend,
                                                                args.warmup, args.runs))
                report["cases"].append(case)
                print(f"done: L={length} d_inner={d_inner} {dtype_name} {backend}", file=sys.stderr)
            del base
            torch.cuda.empty_cache()
    return report


def _ms(entry: dict, key: str) -> str:
    # an error of the whole entry (the backend did not run) or of this timing alone (a graph capture that failed)
    value = entry if "error" in entry else entry.get(key, {"error": "-"})
    if "error" in value:
        return "-" if value["error"] in ("-", "skipped") else "error"
    return f"{value.get('median_ms', value.get('mean_ms')):.2f}"


def print_table(report: dict) -> None:
    s = report["system"]
    print(f"GPU: {s['gpu']}; torch {s['torch']} (CUDA {s['cuda']}); cuda backend: "
          f"{'available' if s['cuda_backend'] else 'UNAVAILABLE - ' + s['cuda_backend_reason']}; triton backend: "
          f"{'available' if s['triton_backend'] else 'UNAVAILABLE - ' + s['triton_backend_reason']}; "
          f"copy bandwidth {s['copy_bandwidth_GBps']:.0f} GB/s; triton tuning {s['triton_tuning']}\n")
    if "tune" in report:
        t = report["tune"]
        print(f"triton launch settings, scan in {t['dtype']} (chosen: {t['chosen']}):")
        for r in t["results"]:
            setting = " ".join(f"{k} {r[k]}" for k in t["keys"])
            print(f"  {r['shape']:>10} {setting}: fwd {_ms(r, 'fwd')} ms, fwd+bwd {_ms(r, 'fwd+bwd')} ms, graphed "
                  f"{_ms(r, 'fwd+bwd graphed')} ms")
        print()
    print("| L x d_inner | dtype | backend | scan fwd ms | scan fwd+bwd ms | fwd+bwd queued ms | fwd+bwd graphed ms "
          "| floor fwd / fwd+bwd ms | layer fwd ms | layer fwd+bwd ms | out rel err | worst grad rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in report["cases"]:
        acc = c.get("accuracy", {"error": "-"})
        if "error" in acc:
            out_err = worst = "-" if acc["error"] == "-" else "error"
        else:
            out_err = f"{acc['out']['max_rel']:.1e}"
            name, val = max(((k, v["max_rel"]) for k, v in acc.items() if k != "out"), key=lambda kv: kv[1])
            worst = f"{val:.1e} ({name})"
        layer = c.get("layer", {"error": "skipped"})
        scan = c.get("scan", {"error": "-"})
        fl = c["floor"]
        print(f"| {c['L']} x {c['d_inner']} | {c['dtype']} | {c['backend']} | {_ms(scan, 'fwd')} | "
              f"{_ms(scan, 'fwd+bwd')} | {_ms(scan, 'fwd+bwd queued')} | {_ms(scan, 'fwd+bwd graphed')} | "
              f"{fl['fwd']:.2f} / {fl['fwd+bwd']:.2f} | "
              f"{_ms(layer, 'fwd')} | "
              f"{_ms(layer, 'fwd+bwd')} | {out_err} | {worst} |")
    errors_seen = [(c, part) for c in report["cases"] for part in ("accuracy", "scan", "layer")
                   if c.get(part, {}).get("error", "-") not in ("-", "skipped")]
    for c, part in errors_seen:
        print(f"\n{part} failed for L={c['L']} d_inner={c['d_inner']} {c['dtype']} {c['backend']}: "
              f"{c[part]['error']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("262144x96,32768x192"),
                        help="comma-separated LxD_INNER (default 262144x96,32768x192 = 64^3, 32^3); the layer "
                             "needs L to be a cube, the scan alone (--skip-layer) takes any L")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="input precisions (default fp32 bf16)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--d-state", type=int, default=16, help="SSM state size (default 16)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per case (default 5)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per case; median reported (default 30)")
    parser.add_argument("--skip-layer", action="store_true", help="time the scan only, not TriOrientedMamba")
    parser.add_argument("--no-gate", action="store_true",
                        help="the scan without its gate z, as the trainers' compiled layers run it")
    parser.add_argument("--backends", nargs="+", choices=("torch", "cuda", "triton"),
                        default=["cuda", "triton", "torch"], help="scan backends to compare (default all available)")
    parser.add_argument("--tune", nargs="?", const="chunks", default=None, choices=sorted(TUNE_GRIDS),
                        help="sweep triton launch settings first: the chunk kernels' (chunks, the default), the "
                             "carry kernel's (carry) or the backward's in-chunk scans (rows)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_scan_gpu.py needs a CUDA device (torch.cuda.is_available() is False); "
              f"the cuda backend status here: {dispatch.cuda_scan_status()[1]}", file=sys.stderr)
        return 2
    report = bench(args)
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
