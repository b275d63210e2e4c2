"""CPU timing of one tile's prediction as nnU-Net's predictor runs it: the network in eval mode under
torch.inference_mode, one forward pass per mirror flip (8 for a 3D tile), batch 1.

Compares the network's 3D convolutions as built (`networks.blocks.Conv3d`, which runs them through oneDNN) with
torch's own choice (`nn.Conv3d.forward`, which for one small sample picks its unvectorised slow_conv3d), on the
same weights and input, and reports the largest difference of the summed outputs. Default: the demo's tiny
SegMamba (feature sizes 8-64, the demo trainer's network) on a 48^3 tile, 4 -> 3 channels. Timings only, nothing
is asserted. Example:

    python -m benchmarks.bench_tile_cpu --threads 2 --out tile_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

from benchmarks.bench_mixer_cpu import _load_average, cpu_model, time_runs
from nnunet_segmamba.networks import SegMamba
from nnunet_segmamba.networks.blocks import Conv3d
from nnunet_segmamba.training.inference import mirror_mean

SIZES = {"tiny": dict(feat_size=(8, 16, 32, 64), hidden_size=64, depths=(1, 1, 1, 1)), "full": {}}


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    net = SegMamba(4, 3, **SIZES[args.network]).eval()
    tile = torch.randn(1, 4, args.side, args.side, args.side)
    axes = (2, 3, 4)

    def predict():
        with torch.inference_mode():
            return mirror_mean(net, tile, axes)

    results, outputs = {}, {}
    for label, conv_forward in (("torch's conv path (nn.Conv3d.forward)", nn.Conv3d.forward),
                                ("the network's (oneDNN)", Conv3d.forward)):
        with mock.patch.object(Conv3d, "forward", conv_forward):
            results[label] = time_runs(predict, args.warmup, args.runs)
            outputs[label] = predict()
    first, second = outputs.values()
    return {
        "system": {"cpu": cpu_model(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "load_average": _load_average()},
        "config": {"network": args.network, "side": args.side, "flips": 2 ** len(axes), "warmup": args.warmup,
                   "runs": args.runs},
        "max_abs_difference": float((first - second).abs().max()),
        "results": results,
    }


def print_table(report: dict) -> None:
    s, c = report["system"], report["config"]
    print(f"CPU: {s['cpu']}; torch {s['torch']} with {s['torch_threads']} threads; load average {s['load_average']}")
    print(f"{c['network']} SegMamba, one {c['side']}^3 tile, {c['flips']} flips one pass at a time, median of "
          f"{c['runs']} runs after {c['warmup']} warm-up")
    print("\n| convolutions | median ms | min ms | max ms |\n|---|---|---|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} |")
    print(f"\nlargest difference of the mean outputs: {report['max_abs_difference']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=sorted(SIZES), default="tiny",
                        help="tiny (the demo trainer's network, default) or full (the paper's size)")
    parser.add_argument("--side", type=int, default=48, help="tile side in voxels (default 48, the demo's patch)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench(args)
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
