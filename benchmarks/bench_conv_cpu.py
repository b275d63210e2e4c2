"""CPU timing of each pass of a 3D convolution: torch's own path against the networks' (`networks.cpu_conv`).

Per shape, the median of --runs after one warm-up, float32, channels-first: the forward (torch: F.conv3d), the
input's gradient and the weight's gradient (torch: `convolution_backward` for that gradient alone, as its
autograd runs them). The default shapes are the demo network's at its 48^3 patch (feature size 8-64, batch 2),
one sample of its tile, the paper-size network's first stages (3 x 3 x 3 and 1 x 1 x 1 kernels) and the demo
network's strided stem and downsampling convolutions (the stem's input gradient, which training never needs, is
timed too): the measurements behind `cpu_conv`'s choices (its FEW_CHANNELS rule). Timings only, nothing is
asserted. Example:

    python -m benchmarks.bench_conv_cpu --threads 2 --out conv_cpu.json
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.cpu_timing import add_run_arguments, cpu_model, run, system_info, time_runs
from nnunet_segmamba.networks import cpu_conv

# in -> out channels, kernel side (and stride after "t", default 1), batch, input side; padding (kernel - 1) // 2
DEFAULT_SHAPES = ("8x8k3b2s48", "16x8k3b2s48", "4x8k3b2s48", "8x8k3b1s48", "8x8k3b2s24", "16x16k3b2s24",
                  "32x32k3b2s12", "96x96k3b2s32", "48x48k3b2s64", "8x3k1b2s48", "16x8k1b2s48", "48x48k1b2s64",
                  "4x8k7t2b2s48", "8x16k2t2b2s24")


def parse_shape(text: str) -> tuple[int, int, int, int, int, int]:
    """INxOUTkKERNEL[tSTRIDE]bBATCHsSIDE -> (in, out, kernel, stride, batch, side)."""
    try:
        channels, rest = text.split("k")
        c_in, c_out = channels.split("x")
        kernel, rest = rest.split("b")
        kernel, stride = kernel.split("t") if "t" in kernel else (kernel, 1)
        batch, side = rest.split("s")
        return int(c_in), int(c_out), int(kernel), int(stride), int(batch), int(side)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected INxOUTkKERNEL[tSTRIDE]bBATCHsSIDE, e.g. "
                                         "8x8k3b2s48 or 4x8k7t2b2s48")


def bench(args: argparse.Namespace) -> dict:
    """The table, a row printed as each shape is timed (the whole set takes minutes), and the report."""
    print(f"CPU: {cpu_model()}; torch {torch.__version__} with {torch.get_num_threads()} threads")
    print_header(args.runs)
    rows = []
    for c_in, c_out, kernel, stride, batch, side in args.shapes:
        torch.manual_seed(0)
        x = torch.randn(batch, c_in, side, side, side)
        weight = torch.randn(c_out, c_in, kernel, kernel, kernel)
        settings = ([stride] * 3, [(kernel - 1) // 2] * 3, [1, 1, 1], 1)  # stride, padding, dilation, groups
        grad = torch.randn(F.conv3d(x, weight, None, *settings[:3]).shape)

        def torch_backward(mask):
            return lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, settings[0], settings[1],
                                                               settings[2], False, [0, 0, 0], 1, mask)

        passes = {
            "forward": (lambda: F.conv3d(x, weight, None, *settings[:3]),
                        lambda: cpu_conv.forward(x, weight, None, *settings)),
            "input gradient": (torch_backward([True, False, False]),
                               lambda: cpu_conv.input_gradient(grad, x, weight, *settings)),
            "weight gradient": (torch_backward([False, True, False]),
                                lambda: cpu_conv.weight_gradient(grad, x, weight, *settings)),
        }
        row = {"shape": f"{c_in} -> {c_out}, {kernel}^3 kernel{f', stride {stride}' if stride > 1 else ''}, "
                        f"{batch} x {side}^3"}
        for name, (torch_pass, our_pass) in passes.items():
            row[name] = {"torch_ms": time_runs(torch_pass, 1, args.runs)["median_ms"],
                         "cpu_conv_ms": time_runs(our_pass, 1, args.runs)["median_ms"]}
        rows.append(row)
        print(format_row(row), flush=True)
    return {"system": system_info(),
            "config": {"runs": args.runs, "few_channels": cpu_conv.FEW_CHANNELS}, "rows": rows}


def format_row(row: dict) -> str:
    cells = [f"{row[p]['torch_ms']:.1f} / {row[p]['cpu_conv_ms']:.1f}"
             for p in ("forward", "input gradient", "weight gradient")]
    return f"| {row['shape']} | " + " | ".join(cells) + " |"


def print_header(runs: int) -> None:
    print(f"ms, median of {runs} runs after one warm-up: torch's path / cpu_conv's\n")
    print("| convolution | forward | input gradient | weight gradient |\n|---|---|---|---|", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=lambda v: [parse_shape(s) for s in v.split(",") if s],
                        default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="comma-separated INxOUTkKERNEL[tSTRIDE]bBATCHsSIDE (default: "
                             + ",".join(DEFAULT_SHAPES) + ")")
    add_run_arguments(parser, runs=5)
    return run(parser.parse_args(argv), bench, show=lambda report: None)  # bench prints its rows as they come


if __name__ == "__main__":
    sys.exit(main())
