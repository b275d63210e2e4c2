"""GPU timings of the Triton causal conv (`nnunet_segmamba/ssm/triton_conv.py`) at SegMamba's shapes, against the
memory-bound floor.

For each (L, d_inner) in --shapes (default the four stages of SegMamba at the 128^3 patch: 64^3 x 96 down to 8^3 x
768), batch 2, width 4, bias and SiLU as Mamba runs it, in --dtype (default fp16, the trainers' autocast): x is one
half of an in_proj output (batch stride 2 d L) as the layer hands it over, the forward order. Times the forward and
the backward (`causal_conv1d_triton_bwd`, which the custom op's backward calls) each captured in a CUDA graph and
replayed back to back (the mean per call), as the trainers' CUDA graphs replay them. The floor: the bytes each must
move (forward: x read, out written; backward: x and dout read, dx written) over the copy bandwidth measured here.
Nothing is asserted. Needs a CUDA device; prints a markdown table and writes --out JSON:

    python -m benchmarks.bench_conv_gpu --out conv_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.bench_scan_gpu import copy_bandwidth, parse_shapes, time_graphed
from nnunet_segmamba.ssm.triton_conv import causal_conv1d_triton, causal_conv1d_triton_bwd

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SEGMAMBA_128 = "262144x96,32768x192,4096x384,512x768"


def bench_shape(length: int, d_inner: int, batch: int, dtype: torch.dtype, warmup: int, runs: int,
                bandwidth: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, 2 * d_inner, length, device="cuda", dtype=dtype, generator=g)
    x = xz[:, :d_inner]
    weight = torch.randn(d_inner, 1, 4, device="cuda", generator=g) * 0.5
    bias = torch.randn(d_inner, device="cuda", generator=g) * 0.1
    dout = torch.randn(batch, d_inner, length, device="cuda", dtype=dtype, generator=g)
    fwd = time_graphed(lambda: causal_conv1d_triton(x, weight, bias, silu=True), warmup, runs)
    bwd = time_graphed(lambda: causal_conv1d_triton_bwd(dout, x, weight, bias, silu=True), warmup, runs)
    tensor_bytes = batch * d_inner * length * x.element_size()
    return {"L": length, "d_inner": d_inner, "fwd_ms": fwd["mean_ms"], "bwd_ms": bwd["mean_ms"],
            "fwd_floor_ms": 2 * tensor_bytes / bandwidth * 1e3, "bwd_floor_ms": 3 * tensor_bytes / bandwidth * 1e3}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(SEGMAMBA_128),
                        help=f"LxD_INNER,... (default {SEGMAMBA_128})")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv_gpu: needs a CUDA device; run it on a machine with one", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth()
    rows = [bench_shape(length, d_inner, args.batch, DTYPES[args.dtype], args.warmup, args.runs, bandwidth)
            for length, d_inner in args.shapes]
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "batch": args.batch, "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}
    print(f"{report['gpu']}, {args.dtype}, batch {args.batch}, copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| L x d_inner | forward ms | its floor | backward ms | its floor |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L']} x {r['d_inner']} | {r['fwd_ms']:.4f} | {r['fwd_floor_ms']:.4f} | {r['bwd_ms']:.4f} "
              f"| {r['bwd_floor_ms']:.4f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
