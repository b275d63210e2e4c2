"""How far a compiled SegMamba's gradients are from exact ones, next to how far eager mode's are.

Under fp16 / bf16 autocast neither path computes the float64 result: each rounds differently (inductor fuses and
reorders, keeps some intermediates in float32), so compiled and eager gradients differ from each other by about as
much as each differs from float64. "Equal to the eager path within fp16 rounding" therefore means: the compiled
path is no further from float64 than eager mode is. This script measures that on a small SegMamba with random
weights: one training step's gradients (loss: squared error against a random target, summed) in float64 on the
torch scan (the reference), eagerly under autocast, and compiled under autocast, on the same weights and input.

Per parameter tensor it reports max |g - g64| / max |g64| for eager and for compiled, and max |compiled - eager|
on the same scale. Tensors whose exact gradient is (nearly) zero are left out of the summary and listed: the
biases of convolutions that an InstanceNorm follows get exactly zero in exact arithmetic (the norm removes any
per-channel constant), so what either path gives for them is rounding alone.

    python -m benchmarks.compiled_precision --out compiled_precision_cpu.json                       # bf16, CPU
    python -m benchmarks.compiled_precision --device cuda --precision fp16 --channels-last \
        --out compiled_precision_cuda.json

Prints a table and writes JSON. Not a test.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

# gradients below this fraction of the largest one are exactly zero but for float64 rounding (about 1e-16 of it)
ZERO_GRADIENT = 1e-10


def step_gradients(model, x, target, dtype, amp_dtype):
    """{parameter name: gradient (float64)} and the output (float64) of one forward + backward."""
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        out = model(x.to(dtype))
    ((out.to(dtype) - target.to(dtype)) ** 2).sum().backward()
    return ({name.replace("_orig_mod.", ""): p.grad.double() for name, p in model.named_parameters()},
            out.detach().double())


KEYS = ("eager_vs_float64", "compiled_vs_float64", "compiled_vs_eager")


def relative(a, b, scale: float) -> float:
    return (a - b).abs().max().item() / scale


def errors(eager, compiled, exact, scale: float) -> dict:
    """max |difference| / scale of eager and compiled against exact, and of compiled against eager (KEYS)."""
    return dict(zip(KEYS, (relative(eager, exact, scale), relative(compiled, exact, scale),
                           relative(compiled, eager, scale))))


def precision_report(device: str = "cpu", precision: str = "bf16", scan_backend: str = "auto",
                     compile_backend: str = "inductor", channels_last: bool = False, patch: int = 32, width: int = 8,
                     seed: int = 0) -> dict:
    """The comparison described above, as a dict: "output", "gradients_median" and "gradients_max" (each with
    "eager_vs_float64", "compiled_vs_float64", "compiled_vs_eager"), "per_tensor" rows and the
    "zero_gradient_tensors" left out."""
    import torch

    from nnunet_segmamba.networks import SegMamba
    from nnunet_segmamba.nn import set_scan_backend

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.manual_seed(seed)
    w = width
    net = SegMamba(2, 3, feat_size=(w, 2 * w, 4 * w, 8 * w), hidden_size=8 * w, depths=(1, 1, 1, 1),
                   scan_backend=scan_backend, recompute_mamba_branches=False,
                   recompute_conv_blocks=False).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 2, *(3 * (patch,)), generator=generator).to(device)
    target = torch.randn(2, 3, *(3 * (patch,)), generator=generator).to(device)

    reference = set_scan_backend(copy.deepcopy(net).double(), "torch")
    grads64, out64 = step_gradients(reference, x, target, torch.float64, None)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    print(f"eager step under {precision} autocast ...", file=sys.stderr)
    eager, out_eager = step_gradients(net, x, target, torch.float32, amp_dtype)
    print(f"compiled step ({compile_backend}; compiling takes a minute or two) ...", file=sys.stderr)
    compiled, out_compiled = step_gradients(torch.compile(net, backend=compile_backend), x, target,
                                            torch.float32, amp_dtype)

    largest = max(g.abs().max().item() for g in grads64.values())
    rows, zero = [], []
    for name, g64 in grads64.items():
        scale = g64.abs().max().item()
        if scale <= ZERO_GRADIENT * largest:
            zero.append(name)
            continue
        rows.append({"parameter": name, "max_abs_gradient": scale,
                     **errors(eager[name], compiled[name], g64, scale)})
    return {
        "settings": {"device": device, "precision": precision, "scan_backend": scan_backend,
                     "compile_backend": compile_backend, "channels_last": channels_last, "patch": patch,
                     "width": width, "seed": seed, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None},
        "output": errors(out_eager, out_compiled, out64, out64.abs().max().item()),
        "gradients_median": {k: statistics.median(r[k] for r in rows) for k in KEYS},
        "gradients_max": {k: max(r[k] for r in rows) for k in KEYS},
        "compiled_closer_than_eager": sum(r["compiled_vs_float64"] <= r["eager_vs_float64"] for r in rows),
        "tensors": len(rows),
        "zero_gradient_tensors": zero,
        "per_tensor": sorted(rows, key=lambda r: -r["compiled_vs_float64"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--scan-backend", default="auto", help="of the eager and compiled runs (default auto)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--channels-last", action="store_true", help="weights and input in channels_last_3d")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--width", type=int, default=8, help="channels of the first stage (doubling per stage)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    report = precision_report(args.device, args.precision, args.scan_backend, args.compile_backend,
                              args.channels_last, args.patch, args.width, args.seed)
    rows, zero = report["per_tensor"], report["zero_gradient_tensors"]
    print(f"SegMamba (width {args.width}, patch {args.patch}^3, batch 2) on {args.device}, {args.precision} autocast, "
          f"{args.compile_backend}; relative to the float64 step (max |difference| / max |float64|)\n")
    print("| | eager vs float64 | compiled vs float64 | compiled vs eager |\n|---|---|---|---|")
    print("| output | " + " | ".join(f"{report['output'][k]:.2e}" for k in KEYS) + " |")
    for what in ("median", "max"):
        values = report[f"gradients_{what}"]
        print(f"| gradients, {what} over {len(rows)} tensors | " + " | ".join(f"{values[k]:.2e}" for k in KEYS)
              + " |")
    print(f"\ncompiled at least as close to float64 as eager: {report['compiled_closer_than_eager']} of "
          f"{len(rows)} tensors; {len(zero)} tensors with a zero exact gradient left out (e.g. {zero[:2]})")
    print(f"\nfurthest from float64, compiled:\n\n| parameter | " + " | ".join(KEYS) + " |\n|---|---|---|---|")
    for r in report["per_tensor"][:args.top]:
        print(f"| {r['parameter']} | " + " | ".join(f"{r[k]:.2e}" for k in KEYS) + " |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
