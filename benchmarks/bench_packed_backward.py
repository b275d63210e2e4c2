"""GPU: the Triton scan's packed backward (the trainers' op), its GPU time per call at given shapes.

The backward of `selective_scan_packed` as the trainers' compiled layers call it (bf16, no gate, D and delta_bias,
softplus, the forward's residuals): its kernels and the torch operations around them (the sums over channel splits,
the gradient's rows). Each call is timed on the GPU alone (`gpu_timing`), as in a CUDA graph.
Versions alternate by running this file from each tree (PYTHONPATH picks the package):

    python -m benchmarks.bench_packed_backward --shapes 18432x96,2304x192 --batch 7 --out $OUT/packed_bwd.json

Prints a markdown table and writes JSON. Needs a CUDA device; nothing is asserted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.gpu_timing import (gpu_times_ms, settings_applied, settings_parser, summary, summary_cell,
                                   write_report)
from nnunet_segmamba.ssm import triton_scan

SLEEP_CYCLES = 20_000_000  # longer than the host takes to queue one backward call


def inputs(length: int, dim: int, batch: int, n: int = 16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    u = r(batch, dim, length).bfloat16()
    delta_B_C = torch.cat([r(batch, dim, length) * 0.5 - 1.0, r(batch, 2 * n, length)], 1).bfloat16()
    A = -torch.rand(dim, n, device="cuda", generator=g).add(0.5)
    D, bias = r(dim), r(dim) * 0.1
    delta, B, C = delta_B_C[:, :dim], delta_B_C[:, dim:dim + n], delta_B_C[:, dim + n:]
    _, _, states, chunk_sum = triton_scan.selective_scan_triton_fwd(u, delta, A, B, C, D, None, bias, True)
    dout = r(batch, dim, length).bfloat16()
    return dout, u, delta, A, B, C, D, bias, states, chunk_sum


def time_backward(args, iters: int) -> list[float]:
    dout, u, delta, A, B, C, D, bias, states, chunk_sum = args
    return gpu_times_ms(lambda: triton_scan.selective_scan_triton_bwd(dout, u, delta, A, B, C, D, None, bias, True,
                                                                      states, chunk_sum, packed=True),
                        iters, SLEEP_CYCLES)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="18432x96,2304x192", help="LxD_INNER,... (the scan's length, channels)")
    parser.add_argument("--batch", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("packed_backward.json"))
    parser.add_argument("--tuning", type=settings_parser(triton_scan.TUNING), default={},
                        metavar="KEY=INT[,KEY=INT]", help="launch settings of triton_scan.TUNING to time instead of "
                        "the kept ones, e.g. bwd_programs_per_sm=8")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_packed_backward: needs a CUDA device")
    rows = {}
    with settings_applied(triton_scan.TUNING, **args.tuning):
        for shape in args.shapes.split(","):
            length, dim = (int(v) for v in shape.split("x"))
            case = inputs(length, dim, args.batch)
            time_backward(case, args.warmup)
            rows[shape] = summary(time_backward(case, args.iters))
        tuning = dict(triton_scan.TUNING)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
              "package": triton_scan.__file__, "tuning": tuning, "backward": rows,
              "command": "python -m benchmarks.bench_packed_backward " + " ".join(argv or [])}
    print(f"packed backward, bf16, batch {args.batch}, {report['gpu']} ({triton_scan.__file__})")
    print("| L x d_inner | GPU ms per call (median; fastest / slowest) |\n|---|---|")
    for shape, r in rows.items():
        print(f"| {shape} | {summary_cell(r, 4)} |")
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
