"""Arithmetic of one tile's forward pass: floating-point operations per network, counted by torch's
FlopCounterMode on the meta device (shapes only: no weights, no data, no GPU, seconds on any machine).

Convolutions, transposed convolutions and matrix products are what it counts (torch's FLOP formulas); norms,
activations and the selective scan are not counted. For the convolution skeletons that the predictor compares
(SegMamba without its Mamba layers against nnU-Net's PlainConvUNet) that is the arithmetic the GPU spends its
time on, so the ratio of the counts is what the ratio of their inference times comes to at equal efficiency.

    python -m benchmarks.tile_flops --out tile_flops.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from nnunet_segmamba.benchmark import _network_list, build_network, parse_sizes

DEFAULT_NETWORKS = ("segmamba_nomamba", "plainconv", "resenc_m")


def tile_flops(name: str, patch: tuple[int, int, int], in_channels: int, out_channels: int) -> float:
    """FLOPs of one forward pass of network `name` on one tile (batch 1)."""
    with torch.device("meta"):
        net = build_network(name, in_channels, out_channels, patch=patch)
        x = torch.empty(1, in_channels, *patch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", type=_network_list, default=",".join(DEFAULT_NETWORKS),
                        help="comma-separated benchmark network names that run on the meta device")
    parser.add_argument("--patch", type=parse_sizes, default=(128, 128, 128), help="N (a cube) or D,H,W")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--out-channels", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the counts as JSON to this file")
    args = parser.parse_args(argv)
    counts = {}
    for name in args.networks:
        try:
            counts[name] = tile_flops(name, args.patch, args.in_channels, args.out_channels)
        except Exception as error:  # noqa: BLE001 - report the network that cannot be counted, count the others
            print(f"{name}: not counted on the meta device ({type(error).__name__}: {error})", file=sys.stderr)
    if not counts:
        return 1
    base = counts.get("plainconv")
    print("| network | TFLOP per tile forward | against plainconv |\n|---|---|---|")
    for name, flops in counts.items():
        ratio = f"{flops / base:.2f}x" if base else "-"
        print(f"| {name} | {flops / 1e12:.3f} | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps({"patch": list(args.patch), "in_channels": args.in_channels,
                                        "out_channels": args.out_channels, "torch": torch.__version__,
                                        "flops": counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
