"""CPU timing of the network's 3D convolutions as built (`networks.blocks.Conv3d`, `networks.cpu_conv`) against
torch's own path (`nn.Conv3d.forward`), on the same weights and input:

- one tile's prediction as nnU-Net's predictor runs it: the network in eval mode under torch.inference_mode, one
  forward pass per mirror flip (8 for a 3D tile), batch 1. For one small sample torch picks its unvectorised
  slow_conv3d.
- with --train, one training step instead: batch 2, deep supervision, forward and backward (the gradient of the
  outputs' summed means), where torch takes oneDNN's backward-data kernel for 3-convs and oneDNN for 1-convs.

Reports the largest difference of the outputs (prediction) or of the parameters' gradients (training step: also which
parameter, and its two values there).
Default: the demo's tiny SegMamba (feature sizes 8-64, the demo trainer's network) at 48^3, 4 -> 3 channels, the
fused CPU scan where it builds. Timings only, nothing is asserted. Example:

    python -m benchmarks.bench_tile_cpu --threads 2 --out tile_cpu.json
    python -m benchmarks.bench_tile_cpu --threads 2 --train --out train_step_cpu.json
"""
from __future__ import annotations

import argparse
import sys
from unittest import mock

import torch
import torch.nn as nn

from benchmarks.cpu_timing import add_run_arguments, run, system_info, time_runs
from nnunet_segmamba.networks import SegMamba
from nnunet_segmamba.networks.blocks import Conv3d
from nnunet_segmamba.training.inference import mirror_mean

SIZES = {"tiny": dict(feat_size=(8, 16, 32, 64), hidden_size=64, depths=(1, 1, 1, 1)), "full": {}}


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    net = SegMamba(4, 3, deep_supervision=args.train, **SIZES[args.network]).train(args.train)
    axes = (2, 3, 4)
    batch = 2 if args.train else 1
    x = torch.randn(batch, 4, args.side, args.side, args.side)

    def predict():
        with torch.inference_mode():
            return mirror_mean(net, x, axes)

    def train_step():
        net.zero_grad(set_to_none=True)
        sum(out.mean() for out in net(x)).backward()
        return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    run = train_step if args.train else predict
    results, outputs = {}, {}
    for label, conv_forward in (("torch's conv path (nn.Conv3d.forward)", nn.Conv3d.forward),
                                ("the network's (cpu_conv)", Conv3d.forward)):
        with mock.patch.object(Conv3d, "forward", conv_forward):
            results[label] = time_runs(run, args.warmup, args.runs)
            outputs[label] = run()
    first, second = outputs.values()
    where = None
    if args.train:  # the parameter whose gradient differs most, and its largest difference's two values
        name = max(first, key=lambda n: float((first[n] - second[n]).abs().max()))
        i = int((first[name] - second[name]).abs().flatten().argmax())
        where = {"parameter": name, "torch": float(first[name].flatten()[i]),
                 "cpu_conv": float(second[name].flatten()[i])}
        first, second = (torch.cat([g.flatten() for g in o.values()]) for o in (first, second))
    return {
        "system": system_info(),
        "config": {"network": args.network, "side": args.side, "batch": batch,
                   "step": "training step" if args.train else f"prediction, {2 ** len(axes)} flips",
                   "warmup": args.warmup, "runs": args.runs},
        "max_abs_difference": float((first - second).abs().max()),
        "max_abs_value": float(first.abs().max()),
        "largest_difference_at": where,
        "results": results,
    }


def print_table(report: dict) -> None:
    s, c = report["system"], report["config"]
    print(f"CPU: {s['cpu']}; torch {s['torch']} with {s['torch_threads']} threads; load average {s['load_average']}")
    print(f"{c['network']} SegMamba, {c['step']}, batch {c['batch']} x {c['side']}^3, median of {c['runs']} runs "
          f"after {c['warmup']} warm-up")
    print("\n| convolutions | median ms | min ms | max ms |\n|---|---|---|---|")
    for name, r in report["results"].items():
        print(f"| {name} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} |")
    what = "parameters' gradients" if c["step"] == "training step" else "mean outputs"
    print(f"\nlargest difference of the {what}: {report['max_abs_difference']:.2e} (their largest magnitude "
          f"{report['max_abs_value']:.2e})")
    if report["largest_difference_at"]:
        at = report["largest_difference_at"]
        print(f"in {at['parameter']}: {at['torch']:.7g} (torch's path) against {at['cpu_conv']:.7g} (cpu_conv)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=sorted(SIZES), default="tiny",
                        help="tiny (the demo trainer's network, default) or full (the paper's size)")
    parser.add_argument("--side", type=int, default=48, help="tile side in voxels (default 48, the demo's patch)")
    parser.add_argument("--train", action="store_true",
                        help="time a training step (batch 2, deep supervision, backward) instead of a prediction")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
    add_run_arguments(parser, runs=5)
    return run(parser.parse_args(argv), bench, print_table)


if __name__ == "__main__":
    sys.exit(main())
