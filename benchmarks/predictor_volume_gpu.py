"""A BraTS-size volume through nnU-Net's predictor and through `SegMambaPredictor`, per network, in one run.

    python -m benchmarks.predictor_volume_gpu --out predictor_volume.json

Each run predicts one random (C, *volume) image with `predict_sliding_window_return_logits` (what
`nnUNetv2_predict` runs per case and fold after preprocessing: sliding window, overlap 0.5, Gaussian weighting,
8-flip mirroring, fp16 autocast, the logits accumulated on the GPU), the network with random weights:

    <network>:nnunet            nnU-Net's `nnUNetPredictor` as `nnUNetv2_predict` runs it by default (eager)
    <network>:nnunet_compiled   the same with nnUNet_compile=t (torch.compile, default mode)
    <network>:segmamba          `SegMambaPredictor` (CUDA graphs, channels-last, float16 conv weights, batched flips)

for networks `segmamba` (the reference width; scan backend "auto", named in the JSON), `segmamba_stacked` (the same
with each Mamba layer's three directions as one scan, which the layer does by default only in training: its time and
peak memory where a tile's 8 flips are one batch), `segmamba_nomamba` (the same without its Mamba layers: what
SegMamba's convolutions alone cost) and `plainconv` (nnU-Net's PlainConvUNet for the patch), all from
`nnunet_segmamba.benchmark.build_network`. Each run: --warmup untimed passes
(compiles, CUDA graph recording, cuDNN's search; the first one's time is reported), then --repeats timed passes.
Prints a table and writes JSON; not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from nnunet_segmamba.benchmark import build_network, parse_sizes
from nnunet_segmamba.ssm import dispatch

DEFAULT_RUNS = ("segmamba:segmamba", "segmamba:nnunet", "plainconv:segmamba", "plainconv:nnunet",
                "plainconv:nnunet_compiled")
# the benchmark's names: SegMamba with the scan backend "auto", the same with its directions stacked
# (SegMamba(stack_mamba_directions=True)), its conv skeleton (mixer="none"), PlainConvUNet
NETWORKS = ("segmamba", "segmamba_stacked", "segmamba_nomamba", "plainconv")
# each predictor and the nnUNet_compile setting it is set up under (both predictors read it then)
PREDICTORS = {"nnunet": "f", "nnunet_compiled": "t", "segmamba": "t"}
# BraTS as nnU-Net trains it: three overlapping regions, one sigmoid head each
DATASET_JSON = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
                "regions_class_order": [1, 2, 3]}


def _plans(patch) -> dict:
    """The smallest plans nnU-Net's predictor reads: the configuration's patch size."""
    return {"dataset_name": "BraTS-size", "plans_name": "benchmark", "configurations": {"3d_fullres": {
        "patch_size": list(patch), "architecture": {"network_class_name": "benchmark", "arch_kwargs": {},
                                                    "_kw_requires_import": []}}}}


def make_predictor(run: str, device: torch.device, in_channels: int, patch, segmamba_width: int):
    """The predictor of `run` ("<network>:<predictor>") with its network set up, nothing compiled yet."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.training.predictor import SegMambaPredictor

    network_name, kind = run.split(":")
    network = build_network(network_name, in_channels, 3, segmamba_width, patch=patch)
    plans = PlansManager(_plans(patch))
    saved = os.environ.get("nnUNet_compile")
    os.environ["nnUNet_compile"] = PREDICTORS[kind]
    try:
        predictor = (SegMambaPredictor if kind == "segmamba" else nnUNetPredictor)(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=True,
            device=device, verbose=False, allow_tqdm=False)
        predictor.manual_initialization(network, plans, plans.get_configuration("3d_fullres"), None, DATASET_JSON,
                                        "benchmark", (0, 1, 2))
    finally:
        if saved is None:
            os.environ.pop("nnUNet_compile")
        else:
            os.environ["nnUNet_compile"] = saved
    return predictor


def time_run(run: str, device: torch.device, volume, patch, in_channels: int, segmamba_width: int, warmup: int,
             repeats: int) -> dict:
    predictor = make_predictor(run, device, in_channels, patch, segmamba_width)
    image = torch.randn(in_channels, *volume, generator=torch.Generator().manual_seed(0))

    def timed() -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits = predictor.predict_sliding_window_return_logits(image)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, logits

    first = [timed()[0] for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, logits = [], None
    for _ in range(repeats):
        s, logits = timed()
        seconds.append(s)
    tile_forward = getattr(predictor, "tile_forward", None)
    result = {"seconds": seconds, "seconds_median": statistics.median(seconds),
              "warmup_seconds": first, "output_finite": bool(torch.isfinite(logits).all()),
              "batched_mirroring": bool(tile_forward and tile_forward.batched),
              "cuda_graphs": bool(tile_forward and tile_forward.cuda_graphs),
              "peak_allocated_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                     if device.type == "cuda" else None)}
    del predictor, logits
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def format_table(report: dict) -> str:
    lines = [f"{'network:predictor':<28} {'s (median)':>10} {'vs plainconv:nnunet':>20} {'first pass s':>13} "
             f"{'peak GiB':>9}"]
    base = report["runs"].get("plainconv:nnunet", {}).get("seconds_median")
    for run, r in report["runs"].items():
        if "error" in r:
            lines.append(f"{run:<28} {r['error']}")
            continue
        ratio = f"{r['seconds_median'] / base:.2f}x" if base else "-"
        peak = f"{r['peak_allocated_gib']:.2f}" if r["peak_allocated_gib"] is not None else "-"
        first = f"{r['warmup_seconds'][0]:.1f}" if r["warmup_seconds"] else "-"
        lines.append(f"{run:<28} {r['seconds_median']:>10.2f} {ratio:>20} {first:>13} {peak:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help="comma-separated <network>:<predictor>, network segmamba, segmamba_nomamba or "
                             "plainconv, predictor nnunet, nnunet_compiled or segmamba")
    parser.add_argument("--volume", type=parse_sizes, default=(240, 240, 155), help="D,H,W of the image")
    parser.add_argument("--patch", type=parse_sizes, default=(128, 128, 128), help="N (a cube) or D,H,W")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--segmamba-width", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for run in runs:
        network, _, kind = run.partition(":")
        if network not in NETWORKS or kind not in PREDICTORS:
            parser.error(f"--runs: {run!r} is not <{'|'.join(NETWORKS)}>:<{'|'.join(PREDICTORS)}>")
    device = torch.device(args.device)
    report = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                           if k not in ("out", "runs")},
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "scan_backend": dispatch.resolve("auto", device), "runs": {}}
    for run in runs:
        print(f"[{run}] ...", flush=True)
        try:
            report["runs"][run] = time_run(run, device, args.volume, args.patch, args.in_channels,
                                           args.segmamba_width, args.warmup, args.repeats)
        except torch.OutOfMemoryError as exc:
            report["runs"][run] = {"error": f"OOM: {str(exc).splitlines()[0]}"}
            torch.cuda.empty_cache()
        print(f"[{run}] {report['runs'][run]}", flush=True)
    print(format_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
