"""Where a training step's GPU time goes: kernel time of nnU-Net's train step per kernel category, per network.

    python -m benchmarks.profile_step_gpu --networks "segmamba_compiled[triton],segmamba_nomamba_compiled" \
        --out step_profile.json

The step is `nnunet_segmamba.benchmark.training_step` (batch 2, 4 x 128^3 -> 3, fp16 autocast, GradScaler,
nnU-Net's SGD, gradient clipping); network names are the benchmark's (`_compiled` = torch.compile). After
--warmup steps (the compile), --steps steps run under torch.profiler; each kernel is put in one category by its
name (`categorize`) and the table gives ms per step per category, the step's wall time without the profiler and
the top kernels; with --launchers N, for each top kernel the host operators that launched it (the innermost
operator and its parents), e.g. which operations a layout's copies come from. Nothing is asserted; prints tables
and writes JSON.

    python -m benchmarks.profile_step_gpu --networks 'segmamba_cl_compiled[triton]' --launchers 3 --out cl.json

cuDNN's search times torch's default number of algorithms per convolution (10, as nnU-Net's trainers run); our
trainers time every one, which --cudnn-benchmark-limit 0 gives (about 2 minutes more in the first step at 128^3).

With --inference the profiled step is the forward pass of a (batch, C, *patch) tile instead, under inference
mode and fp16 autocast, as the benchmark's patch inference and each of the sliding window's mirrored forwards:

    python -m benchmarks.profile_step_gpu --inference --batch 1 \
        --networks 'segmamba_cl_compiled[triton],plainconv_compiled' --out tile_forward_profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from nnunet_segmamba.benchmark import build_network, parse_sizes, tile_forward, training_step, uses_fused_sgd
from nnunet_segmamba.devices import check_cudnn_benchmark_limit

# first match wins; names are lower-cased. Inductor's kernels (triton_{poi,red,per}_fused_<ops>) are tried
# against INDUCTOR_CATEGORIES first, every kernel then against CATEGORIES.
INDUCTOR_CATEGORIES = (
    ("norm (inductor, fused)", ("batch_norm", "var_mean", "native_layer_norm", "layer_norm")),
    ("inductor other reductions", ("triton_red", "triton_per")),
    ("inductor pointwise", ("triton_poi",)),
)
CATEGORIES = (
    # triton_input_conv's kernels (the convolutions on the few-channel input) first: "_conv_fwd" below is the
    # causal conv's
    ("convolution", ("_input_conv_",)),
    ("scan (ours)", ("selective_scan", "_fwd_chunk", "_bwd_chunk", "_chunk_carry", "_causal_conv", "_conv_fwd",
                     "_conv_bwd", "_sum_parts")),
    ("layout copy (cuDNN)", ("nchwtonhwc", "nhwctonchw", "nchw2nhwc", "nhwc2nchw")),
    ("norm (eager)", ("batch_norm", "instance_norm", "bn_", "layer_norm", "welford")),
    # cuDNN's convolutions are implicit GEMMs named by pass (fprop / dgrad / wgrad); cuBLAS's plain GEMMs (nvjet,
    # cutlass and xmma GEMM kernels: the Mamba projections, the linear layers) are told apart from them first
    ("convolution", ("conv", "implicit", "dgrad", "wgrad", "fprop", "cudnn")),
    ("GEMM", ("gemm", "cublas", "nvjet")),
    ("convolution", ("xmma", "cutlass", "sm90", "sm80")),
    ("copy / elementwise (aten)", ("copy", "elementwise", "cat", "fill", "reduce")),
)


def categorize(kernel: str) -> str:
    name = kernel.lower()
    for cat, keys in (INDUCTOR_CATEGORIES + CATEGORIES if name.startswith("triton_") else CATEGORIES):
        if any(k in name for k in keys):
            return cat
    return "other"


def kernel_launchers(events, steps: int, depth: int = 4) -> dict[str, list[dict]]:
    """Which host operations launched each kernel: for every CPU event that launched kernels (torch.profiler links
    a kernel to the innermost operator open at its launch), the chain of that operator and up to `depth` - 1 of
    its parents ("aten::copy_ < aten::contiguous < aten::convolution_backward"; the innermost with its first two
    input shapes where recorded), with the kernel's ms and calls per step under it, largest first. Says, for
    instance, which operators' copies a layout change brings in, or which stage a scan kernel ran for."""
    per_kernel: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for event in events:
        if not getattr(event, "kernels", None):
            continue
        shapes = [list(s) for s in (getattr(event, "input_shapes", None) or []) if s][:2]
        chain, parent = [event.name + (f" {shapes}" if shapes else "")], event.cpu_parent
        while parent is not None and len(chain) < depth:
            chain.append(parent.name)
            parent = parent.cpu_parent
        for kernel in event.kernels:
            entry = per_kernel[kernel.name][" < ".join(chain)]
            entry[0] += kernel.duration / 1e3 / steps
            entry[1] += 1
    return {kernel: [{"ops": ops, "ms_per_step": round(ms, 3), "calls_per_step": n / steps}
                     for ops, (ms, n) in sorted(chains.items(), key=lambda kv: -kv[1][0])]
            for kernel, chains in per_kernel.items()}


def profile_network(name: str, batch: int, patch, in_channels: int, out_channels: int, warmup: int, steps: int,
                    top: int, launchers: int = 0, inference: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_network(name, in_channels, out_channels, patch=patch).cuda().train()
    if inference:
        step = tile_forward(model, torch.device("cuda"), patch, in_channels, amp=True, batch=batch)
    else:
        step, _ = training_step(model, torch.device("cuda"), batch, patch, in_channels, out_channels, amp=True,
                                fused_sgd=uses_fused_sgd(name, torch.device("cuda")))
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if launchers else [])
    with torch.profiler.profile(activities=activities, record_shapes=bool(launchers)) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        # with the host profiled too, the host's annotated regions (a compiled graph's call, the optimizer's step)
        # come back as device events spanning their kernels: kernels are counted once, annotations not at all
        if getattr(event, "is_user_annotation", False) or event.name.startswith("## "):
            continue
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            entry = per_kernel[event.name]
            entry[0] += event.device_time_total / 1e3 / steps
            entry[1] += 1
    by_category: dict[str, float] = defaultdict(float)
    for kernel, (ms, _) in per_kernel.items():
        by_category[categorize(kernel)] += ms
    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    result = {
        "wall_ms_median": sorted(walls)[len(walls) // 2],
        "kernel_ms_per_step": sum(by_category.values()),
        "peak_gib": torch.cuda.max_memory_allocated() / 1024 ** 3,
        "warmup_s": warmup_s,
        "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": k[:160], "ms_per_step": round(ms, 3), "calls_per_step": n / steps,
                         "category": categorize(k)} for k, (ms, n) in kernels[:top]],
    }
    if launchers:
        launched_by = kernel_launchers(prof.events(), steps)
        for entry, (kernel, _) in zip(result["top_kernels"], kernels[:top]):
            entry["launched_by"] = launched_by.get(kernel, [])[:launchers]
    del model, step
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="segmamba_compiled[triton],segmamba_nomamba_compiled")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=parse_sizes, default=(128, 128, 128), help="N (a cube) or D,H,W")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--out-channels", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--launchers", type=int, default=0, metavar="N",
                        help="for each top kernel, the N host operator chains that launched most of its time "
                             "(profiles the host too)")
    parser.add_argument("--inference", action="store_true",
                        help="profile a tile's forward pass (inference mode, fp16) instead of the training step")
    parser.add_argument("--cudnn-benchmark-limit", type=int, default=None, metavar="N",
                        help="how many of cuDNN's algorithms its search times per convolution: 0 for every one, as "
                             "our trainers set it; default torch's (10), as nnU-Net's trainers leave it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        check_cudnn_benchmark_limit(args.cudnn_benchmark_limit, "--cudnn-benchmark-limit")
    except ValueError as exc:
        parser.error(str(exc))
    torch.backends.cudnn.benchmark = True  # as nnU-Net's training
    if args.cudnn_benchmark_limit is not None:  # cuDNN keeps its choices for the process: one limit per run
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "batch": args.batch,
              "patch": list(args.patch), "step": "tile forward" if args.inference else "training step",
              "cudnn_benchmark_limit": torch.backends.cudnn.benchmark_limit, "networks": {}}
    for name in args.networks.split(","):
        print(f"== {name}", flush=True)
        try:
            r = profile_network(name, args.batch, args.patch, args.in_channels, args.out_channels,
                                args.warmup, args.steps, args.top, args.launchers, args.inference)
        except Exception as exc:  # keep the other networks' figures
            print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
            report["networks"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        report["networks"][name] = r
        print(f"   wall {r['wall_ms_median']:.1f} ms/step, kernels {r['kernel_ms_per_step']:.1f} ms/step, "
              f"peak {r['peak_gib']:.2f} GiB, warm-up {r['warmup_s']:.0f} s")
        for cat, ms in r["by_category_ms"].items():
            print(f"   {cat:28s} {ms:8.1f} ms")
        for k in r["top_kernels"]:
            print(f"   {k['ms_per_step']:7.2f} ms x{k['calls_per_step']:5.1f}  [{k['category']}] {k['name'][:110]}")
            for launcher in k.get("launched_by", []):
                print(f"           {launcher['ms_per_step']:7.2f} ms x{launcher['calls_per_step']:5.1f}  "
                      f"from {launcher['ops'][:110]}")
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
