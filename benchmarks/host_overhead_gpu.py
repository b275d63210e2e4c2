"""Host time per call of what a scan step issues: torch's allocations and reductions, Triton launches with one
argument and with as many as the scan's kernels take, and a whole forward+backward of the scan per backend.

Each row is the best of three rounds of --calls calls back to back (the GPU work is tiny or runs behind, so this
is the host's time). The per-call timing of bench_scan_gpu.py (a sync after each call) holds the host's time to
the first kernel and any wait for the host inside the call; this says what that time is made of. Nothing is
asserted; prints a table and writes --out JSON.

    python -m benchmarks.host_overhead_gpu --out host_overhead.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl

from benchmarks.bench_scan_gpu import DTYPES, fwd_bwd_step, scan_inputs, scan_leaves


@triton.jit
def _one_argument(x_ptr):
    tl.store(x_ptr, 1.0)


@triton.jit
def _scan_sized_arguments(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9,
                          i10, i11, i12, i13, i14, i15, i16, i17, C0: tl.constexpr, C1: tl.constexpr,
                          C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr):
    tl.store(p0, 1.0)  # 12 pointers, 18 ints and 5 constants: about what the scan's kernels take


def host_us(fn: Callable[[], object], calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return min(rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    x = torch.zeros(64, device="cuda")
    pointers = [torch.zeros(64, device="cuda") for _ in range(12)]
    ints = [1024 * (i + 2) for i in range(18)]
    rows: dict[str, tuple[Callable[[], object], int]] = {
        "torch.empty (4 MiB)": (lambda: torch.empty(1 << 20, device="cuda"), args.calls),
        "torch.zeros (384 int32)": (lambda: torch.zeros(384, device="cuda", dtype=torch.int32), args.calls),
        "Tensor.sum (64 floats)": (lambda: x.sum(), args.calls),
        "Triton launch, 1 pointer": (lambda: _one_argument[(1,)](x), args.calls),
        "Triton launch, 12 pointers + 18 ints + 5 constexpr": (
            lambda: _scan_sized_arguments[(1,)](*pointers, *ints, C0=1, C1=2, C2=3, C3=4, C4=5), args.calls),
    }
    for backend in ("triton", "cuda"):
        leaves, dout = scan_leaves(scan_inputs(2, 192, 16, 32768, DTYPES[args.dtype]))
        rows[f"scan fwd+bwd, 32^3 x 192 {args.dtype}, {backend}"] = (
            lambda leaves=leaves, dout=dout, backend=backend: fwd_bwd_step(leaves, dout, backend), 30)
    results = {}
    print(f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}\n")
    print("| host us / call | what |\n|---|---|")
    for name, (fn, calls) in rows.items():
        results[name] = host_us(fn, calls)
        print(f"| {results[name]:.1f} | {name} |", flush=True)
    if args.out is not None:
        command = " ".join(["python -m benchmarks.host_overhead_gpu", *sys.argv[1:]])
        args.out.write_text(json.dumps({"command": command, "torch": torch.__version__,
                                        "triton": triton.__version__, "host_us": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
