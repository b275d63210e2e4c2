"""GPU timing of the Mamba layer's projection weight gradients: torch's batched GEMMs against the Triton kernel.

Each tri-orientated Mamba layer has six per-position projections (in_proj, out_proj, and per direction x_proj
and dt_proj); each one's weight gradient is a product over all batch positions with a tiny output
(`nn/mamba.py`, `_Projection`). For every stage of a patch (the sequence length and d_model of SegMamba's four
Mamba stages) and every projection, in the operands' layouts inside the layer (fp16, as under autocast), this
times

    torch     the layer's rule without Triton (`_weight_gradient_torch`: one batched GEMM and a sum, or split-K by
              hand on long sequences)
    bmm       one batched GEMM and a sum, whatever the length
    triton    `ssm.triton_projection.projection_weight_grad_triton`

captured in a CUDA graph and replayed back to back (the GPU's time per call, as the trainers' CUDA graphs see
it), and checks each against a float64 reference. Prints a table per patch, writes --out JSON. Example:

    python -m benchmarks.bench_projection_gpu --out projection_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.bench_scan_gpu import time_graphed
from nnunet_segmamba.nn import mamba as mamba_module
from nnunet_segmamba.ssm.triton_projection import projection_weight_grad_triton

# (name, batch, first stage's tokens); SegMamba's Mamba stages halve each axis and double d_model (48 first)
PATCHES = {"hippocampus 7 x 48 x 64 x 48": (7, 24 * 32 * 24), "128^3, batch 2": (2, 64 ** 3)}
D_STATE = 16


def operands(projection: str, batch: int, d_model: int, length: int, dtype: torch.dtype):
    """(grad (batch, out, L), x (batch, in, L)) as the layer's backward hands them to the weight gradient."""
    d_inner, dt_rank = 2 * d_model, -(-d_model // 16)
    r = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)  # noqa: E731
    if projection == "in_proj":  # grad of xz contiguous; x = hidden_states (B, L, d_model) transposed
        return r(batch, 2 * d_inner, length), r(batch, length, d_model).transpose(1, 2)
    if projection == "x_proj":  # grad of x_dbl contiguous; x = the conv output u
        return r(batch, dt_rank + 2 * D_STATE, length), r(batch, d_inner, length)
    if projection == "dt_proj":  # grad of delta contiguous; x = the dt rows of x_dbl (a slice)
        return r(batch, d_inner, length), r(batch, dt_rank + 2 * D_STATE, length)[:, :dt_rank]
    if projection == "out_proj":  # grad (B, L, d_model) transposed; x = the branches' sum
        return r(batch, length, d_model).transpose(1, 2), r(batch, d_inner, length)
    raise ValueError(projection)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    methods = {
        "torch": mamba_module._weight_gradient_torch,
        "bmm": lambda g, x: torch.bmm(g, x.transpose(1, 2)).sum(0, dtype=torch.float32),
        "triton": projection_weight_grad_triton,
    }
    rows = []
    for patch, (batch, tokens) in PATCHES.items():
        print(f"\n{patch}: ms per call, CUDA graph replays (max rel. error vs float64)\n")
        print("| stage | projection | out x in x (batch x L) | " + " | ".join(methods) + " |")
        print("|---|---|---|" + "---|" * len(methods))
        totals = dict.fromkeys(methods, 0.0)
        for stage in range(4):
            d_model, length = 48 * 2 ** stage, tokens // 8 ** stage
            for projection in ("in_proj", "x_proj", "dt_proj", "out_proj"):
                grad, x = operands(projection, batch, d_model, length, torch.float16)
                ref = torch.einsum("bol,bil->oi", grad.double(), x.double())
                row = {"patch": patch, "stage": stage, "projection": projection, "out": grad.shape[1],
                       "in": x.shape[1], "batch": batch, "length": length}
                cells = []
                for name, fn in methods.items():
                    err = ((fn(grad, x).double() - ref).abs().max() / ref.abs().max()).item()
                    ms = time_graphed(lambda: fn(grad, x), args.warmup, args.runs)["mean_ms"]
                    # per layer: three x_proj and dt_proj (one per direction), one in_proj and out_proj; two
                    # layers per stage in SegMamba
                    totals[name] += ms * (3 if projection in ("x_proj", "dt_proj") else 1) * 2
                    row[name] = {"ms": ms, "max_rel_error": err}
                    cells.append(f"{ms:.4f} ({err:.1e})")
                rows.append(row)
                print(f"| {stage + 1} | {projection} | {grad.shape[1]} x {x.shape[1]} x ({batch} x {length}) | "
                      + " | ".join(cells) + " |", flush=True)
        print("\nper training step (8 layers, 8 projections each): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in totals.items()))
        rows.append({"patch": patch, "per_step_ms": totals})
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                                        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
