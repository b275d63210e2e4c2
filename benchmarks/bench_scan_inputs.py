"""The Mamba layer's projections to the scan's inputs, two forms: the reference's x_proj then dt_proj (inner
dimension dt_rank, 3 at SegMamba's first stage), against the two merged into one GEMM over d_inner
(`TriOrientedMamba.scan_inputs(merged=True)`, the form the layer takes on CUDA).

For each shape (L x d_inner, batch): forward and backward of delta, B and C from the conv output u (gradients of u,
x_proj.weight and dt_proj.weight), fp16 autocast on CUDA, float32 on the CPU. On CUDA each form's step is captured
in a CUDA graph and replayed back to back (the GPU's time alone, as the trainers replay it); on the CPU the median
of timed calls. The forms alternate over --rounds, so a drift of the machine shows as rounds that disagree. Also
the largest difference of the merged form's delta from the reference form's, relative to its magnitude. Nothing
is asserted; prints a table and writes --out JSON.

    python -m benchmarks.bench_scan_inputs --device cuda --out scan_inputs_gpu.json
    OMP_NUM_THREADS=2 python -m benchmarks.bench_scan_inputs --device cpu --shapes 4096x96 --out scan_inputs_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.bench_scan_gpu import time_graphed
from nnunet_segmamba.benchmark import time_calls
from nnunet_segmamba.nn import TriOrientedMamba

# SegMamba's first two stages at the 128^3 patch (batch 2) and the first at the hippocampus patch (batch 7)
DEFAULT_SHAPES = "262144x96x2,32768x192x2,18432x96x7"
FORMS = {"separate": False, "merged": True}


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'262144x96x2,18432x96x7' -> [(262144, 96, 2), (18432, 96, 7)]: L x d_inner x batch."""
    shapes = []
    for item in text.split(","):
        try:
            length, d_inner, batch = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {item!r} must be LxD_INNERxBATCH, e.g. 18432x96x7") from None
        if min(length, batch) < 1 or d_inner < 2 or d_inner % 2:
            raise argparse.ArgumentTypeError(f"shape {item!r}: L and batch must be positive, d_inner even")
        shapes.append((length, d_inner, batch))
    return shapes


def make_step(mixer: TriOrientedMamba, u: torch.Tensor, grads: list[torch.Tensor], merged: bool):
    """One forward and backward of the projections; the weights' gradients accumulate, as in a training step."""
    amp = u.device.type == "cuda"

    def step():
        with torch.autocast(u.device.type, dtype=torch.float16, enabled=amp):
            outputs = mixer.scan_inputs(u, mixer.x_proj.weight, mixer.dt_proj.weight, merged=merged)
        torch.autograd.backward(outputs, [g.to(o.dtype) for o, g in zip(outputs, grads)])
        return outputs
    return step


def bench_shape(length: int, d_inner: int, batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    mixer = TriOrientedMamba(d_inner // 2).to(device)
    u = torch.randn(batch, d_inner, length, device=device)
    u = (u.half() if device.type == "cuda" else u).requires_grad_(True)
    grads = [torch.randn(batch, rows, length, device=device)
             for rows in (mixer.d_inner, mixer.d_state, mixer.d_state)]
    steps = {name: make_step(mixer, u, grads, merged) for name, merged in FORMS.items()}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        deltas = {name: mixer.scan_inputs(u, mixer.x_proj.weight, mixer.dt_proj.weight, merged=merged)[0].float()
                  for name, merged in FORMS.items()}
    scale = deltas["separate"].abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                times[name].append(time_graphed(step, args.warmup, args.runs)["mean_ms"])
            else:
                times[name].append(time_calls(step, device, args.warmup, args.runs)["ms_median"])
    return {"length": length, "d_inner": d_inner, "batch": batch, "dt_rank": mixer.dt_rank,
            "ms": {name: statistics.median(t) for name, t in times.items()}, "ms_rounds": times,
            "delta_rel_diff": (deltas["merged"] - deltas["separate"]).abs().max().item() / scale}


def print_table(report: dict) -> None:
    print(f"{report['device_name']}, torch {report['torch']}, {report['timing']}")
    print("| L x d_inner, batch (dt_rank) | separate ms | merged ms | merged / separate | delta rel. diff |")
    print("|---|---|---|---|---|")
    for r in report["shapes"]:
        ms = r["ms"]
        print(f"| {r['length']} x {r['d_inner']}, {r['batch']} ({r['dt_rank']}) | {ms['separate']:.3f} | "
              f"{ms['merged']:.3f} | {ms['merged'] / ms['separate']:.2f} | {r['delta_rel_diff']:.1e} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                        help=f"LxD_INNERxBATCH,... (default {DEFAULT_SHAPES})")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_scan_inputs: --device cuda needs a CUDA device; use --device cpu", file=sys.stderr)
        return 2
    report = {"torch": torch.__version__,
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "timing": ("CUDA graph replays, fp16 autocast" if device.type == "cuda" else
                         f"median of timed calls, float32, {torch.get_num_threads()} threads"),
              "shapes": [bench_shape(*shape, device, args) for shape in args.shapes]}
    print_table(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
