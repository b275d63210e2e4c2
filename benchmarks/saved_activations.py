"""What a training step keeps for the backward pass, block by block: the activation part of peak memory.

Runs one forward of a benchmark network (`nnunet_segmamba.benchmark` names) under autocast and records every
tensor that autograd saves for the backward pass (`torch.autograd.graph.saved_tensors_hooks`), attributed to the
innermost module running when it was saved. A storage saved twice (a tensor and a view of it, or by two
operations) counts once, for the module that saved it first; parameters and their autocast copies are left out
(they are the weights, counted separately). Run eagerly: torch.compile decides anew what to keep (it recomputes
cheap pointwise results), so a compiled step keeps less than this says; the split between blocks is what it is for.

What the hooks cannot see, activation checkpointing's own cache (a recomputed Mamba branch keeps its scan's
output there), is in the second figure: the memory one forward still holds when it returns, at the patch run
here (`held_after_forward`).

Every activation of these networks grows with the patch's volume, so a smaller patch scaled by the volume ratio
(`--scale-to`) gives the full size's figures on a CPU:

    python -m benchmarks.saved_activations --network 'segmamba' --patch 64 --scale-to 128 --out saved.json
    TRITON_INTERPRET=1 python -m benchmarks.saved_activations --network 'segmamba[triton]' --no-triton-kernels ...

Prints a table and writes JSON. Not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

GIB = 1024 ** 3


def saved_for_backward(model, x, device_type: str, dtype) -> dict[str, dict[str, float]]:
    """{module path: {"bytes": ..., "tensors": ...}} of what one forward of `model` on `x` saves for backward.

    An activation is a saved tensor with x's batch size as its first axis (not broadcast along it); everything
    else saved (weights, their autocast copies, the scan's float32 A / D) does not grow with the patch and is left
    out."""
    import torch

    batch = x.shape[0]
    stack: list[str] = [""]
    seen: set[int] = set()
    saved: dict[str, dict[str, float]] = defaultdict(lambda: {"bytes": 0, "tensors": 0})

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        # stride 0 along the batch: a weight broadcast over it (the Mamba layers' batched projections)
        if key not in seen and t.dim() >= 2 and t.shape[0] == batch and t.stride(0) != 0 and storage.nbytes() > 0:
            seen.add(key)
            entry = saved[stack[-1]]
            entry["bytes"] += storage.nbytes()
            entry["tensors"] += 1
        return t

    def enter(name):
        return lambda module, args: stack.append(name)  # None: the inputs are left as they are

    def leave(module, args, output):
        stack.pop()  # returns None: the output is left as it is

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device_type, dtype=dtype):
            out = model(x)
        del out
    finally:
        for h in handles:
            h.remove()
    return dict(saved)


def held_after_forward(model, x, device_type: str, dtype) -> int:
    """Bytes that one forward of `model` on `x` still holds when it returns (`memory_held_by`): the output and all
    that is kept for the backward, whoever keeps it (autograd's saved tensors, activation checkpointing's cache,
    the autocast copies of the weights)."""
    import torch

    from nnunet_segmamba.benchmark import memory_held_by

    with torch.autocast(device_type, dtype=dtype):
        out, held = memory_held_by(lambda: model(x), x.device)
    del out
    return held


def launch_no_triton_kernels() -> int:
    """Make every Triton kernel of the scan and causal conv a launch that does nothing; returns how many.

    What autograd saves depends on shapes and dtypes, not on values, and Triton's interpreter (the only way to
    run the kernels without a GPU) takes tens of minutes for one forward at these sizes. The outputs are then
    uninitialised memory: good for counting bytes, for nothing else."""
    from nnunet_segmamba.ssm import triton_conv, triton_scan

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    replaced = 0
    for module in (triton_scan, triton_conv):
        for name, obj in list(vars(module).items()):
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                setattr(module, name, _NoLaunch())
                replaced += 1
    return replaced


def group(saved: dict[str, dict[str, float]], depth: int) -> dict[str, float]:
    """Bytes per module path cut to its first `depth` parts, or to one more where the first part is a container
    of numbered blocks (depth 1: "encoder1", "vit.stages"; depth 2: "encoder1.layer", "vit.stages.0")."""
    out: dict[str, float] = defaultdict(float)
    for path, entry in saved.items():
        parts = path.split(".")
        cut = depth + 1 if len(parts) > depth + 1 and parts[depth].isdigit() else depth
        out[".".join(parts[:cut]) or "(top)"] += entry["bytes"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def by_module_type(model, saved: dict[str, dict[str, float]]) -> dict[str, float]:
    modules = dict(model.named_modules())
    out: dict[str, float] = defaultdict(float)
    for path, entry in saved.items():
        out[type(modules[path]).__name__] += entry["bytes"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="segmamba", help="a benchmark network name (not a _compiled one)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", default="64", help="patch run here: N (a cube) or D,H,W")
    parser.add_argument("--scale-to", type=int, default=128, help="cube side the figures are scaled to")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--out-channels", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-triton-kernels", action="store_true",
                        help="for a [triton] network on the CPU (needs TRITON_INTERPRET=1): skip the kernels' "
                             "arithmetic, which does not change what is saved (launch_no_triton_kernels)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args()

    import torch

    from nnunet_segmamba.benchmark import build_network

    if "_compiled" in args.network:
        parser.error("the saved tensors of a compiled graph are not attributed to modules: use the eager name")
    if args.no_triton_kernels and not launch_no_triton_kernels():
        parser.error("--no-triton-kernels: no Triton kernels found (is triton installed?)")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # the same 2 bytes per element
    torch.manual_seed(0)
    patch = [int(p) for p in args.patch.split(",")] if "," in args.patch else [int(args.patch)] * 3
    model = build_network(args.network, args.in_channels, args.out_channels, patch=patch).to(device).train()
    x = torch.randn(args.batch, args.in_channels, *patch, device=device)
    saved = saved_for_backward(model, x, device.type, dtype)
    scale = args.scale_to ** 3 / (patch[0] * patch[1] * patch[2])
    params = sum(p.numel() for p in model.parameters())
    total = sum(e["bytes"] for e in saved.values()) * scale
    report = {
        "network": args.network, "batch": args.batch, "patch": patch, "scaled_to": args.scale_to,
        "device": str(device), "autocast_dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "saved_gib": total / GIB,
        # fp32 weights, their gradients and SGD's momentum buffer
        "weights_grads_momentum_gib": 3 * 4 * params / GIB,
        "by_block_gib": {k: v * scale / GIB for k, v in group(saved, 2).items()},
        "by_top_module_gib": {k: v * scale / GIB for k, v in group(saved, 1).items()},
        "by_module_type_gib": {k: v * scale / GIB for k, v in by_module_type(model, saved).items()},
        # not scaled: it includes the weights' autocast copies, which do not grow with the patch
        "held_after_forward_gib_at_patch": held_after_forward(model, x, device.type, dtype) / GIB,
        "command": " ".join(sys.argv),
    }
    print(f"{args.network}, batch {args.batch}, {'x'.join(map(str, patch))} scaled to {args.scale_to}^3 "
          f"({report['autocast_dtype']} autocast): saved for backward {report['saved_gib']:.2f} GiB; weights + "
          f"gradients + momentum {report['weights_grads_momentum_gib']:.2f} GiB; held after one forward at "
          f"{'x'.join(map(str, patch))} (not scaled) {report['held_after_forward_gib_at_patch']:.3f} GiB")
    for title, key in (("block", "by_block_gib"), ("module type", "by_module_type_gib")):
        print(f"\n| {title} | GiB | share |\n|---|---|---|")
        for name, gib in report[key].items():
            if gib >= 0.005:
                print(f"| {name} | {gib:.2f} | {gib / report['saved_gib']:.0%} |")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
