"""GPU: SegMamba's 3^3 convolutions at full resolution, each of cuDNN's three passes alone, and the input's gradient
also as a forward convolution of the output's gradient with the transposed, mirrored kernel.

In the hippocampus step's profile (docs/performance.md, "Where the hippocampus step's kernels go now") the four
48 -> 48 convolutions at full resolution run at 225 TFLOP/s forward but 208 TFLOP/s for the input's gradient, for
which cuDNN's full search picks an sm80 kernel. The same problem as a forward convolution (stride 1: the adjoint of a
correlation is the correlation with the transposed, mirrored kernel, `cpu_conv.mirrored`) gets the forward's
kernels; timed here alone, it was not kept in the network (docs/performance.md, Tried / kept / why). Each pass is
timed as the training step runs it: fp16, channels-last, cuDNN's full search (as the trainers set it), GPU time
alone (`gpu_timing`); the mirrored kernel is made in every call, as a network would make it. Beside cuDNN's,
`triton_input_conv`'s forward (under a few launch settings) and weight gradient, kernels written for few input
channels, at these channels: how far that implicit GEMM is from cuDNN's at these shapes (a setting whose tiles
exceed shared memory is reported as failed).

    python -m benchmarks.bench_full_res_convs --out $OUT/full_res_convs.json

Default cases: the hippocampus step (batch 7, 48 x 64 x 48) and the BraTS step (batch 2, 128^3), each with the
48 -> 48 and the 96 -> 48 convolutions of the full-resolution blocks. Prints a markdown table and writes JSON.
Needs a CUDA device; nothing is asserted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_timing import conv_report_with_full_search, gpu_times_ms, settings_applied, summary, write_report
from nnunet_segmamba.networks import triton_input_conv
from nnunet_segmamba.networks.cpu_conv import mirrored

SLEEP_CYCLES = 20_000_000
CL = torch.channels_last_3d
#: (input channels, output channels) of the 3^3 convolutions at full resolution
CONVS = ((48, 48), (96, 48))
ONES, PADDING = [1, 1, 1], [1, 1, 1]


def parse_case(text: str) -> tuple[int, tuple[int, ...]]:
    """'BATCHxD,H,W' -> (batch, spatial)."""
    batch, spatial = text.split("x")
    return int(batch), tuple(int(s) for s in spatial.split(","))


def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv3d(x, weight, padding=PADDING)


def input_gradient(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cuDNN's input gradient (backward data), as autograd calls it."""
    return torch.ops.aten.convolution_backward(dout, x, weight, None, ONES, PADDING, ONES, False, [0, 0, 0], 1,
                                               [True, False, False])[0]


def input_gradient_as_forward(dout: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same gradient as a forward convolution, the mirrored kernel in dout's layout."""
    kernel, padding = mirrored(weight, PADDING)
    return F.conv3d(dout, kernel.contiguous(memory_format=CL), padding=padding)


def weight_gradient(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(dout, x, weight, None, ONES, PADDING, ONES, False, [0, 0, 0], 1,
                                               [False, True, False])[1]


#: launch settings (output positions per program, warps) of triton_input_conv's forward timed at these channels
TRITON_FORWARD_SETTINGS = ((32, 4), (64, 4), (64, 8))


def triton_forward_pass(block_m: int, warps: int) -> str:
    return f"forward, Triton {block_m}/{warps}"


#: the passes timed, in the table's order
PASSES = ("forward", "input gradient", "input gradient as forward", "weight gradient", "weight gradient, Triton",
          *(triton_forward_pass(block_m, warps) for block_m, warps in TRITON_FORWARD_SETTINGS))


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference relative to want's largest entry."""
    want = want.float()
    return (got.float() - want).abs().max().item() / want.abs().max().item()


def bench_case(batch: int, spatial: tuple[int, ...], iters: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    positions = batch * spatial[0] * spatial[1] * spatial[2]
    for cin, cout in CONVS:
        x = torch.randn((batch, cin, *spatial), device="cuda", generator=g).half().to(memory_format=CL)
        weight = (torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=g) * 0.05).half().to(memory_format=CL)
        dout = torch.randn((batch, cout, *spatial), device="cuda", generator=g).half().to(memory_format=CL)

        def triton_forward():  # triton_input_conv's forward kernel (written for few channels) at these channels
            return triton_input_conv.input_conv3d_forward(x, weight, None, 1, 1)

        # each pass and the launch settings (triton_input_conv.TUNING) it runs under
        passes = {"forward": (lambda: forward(x, weight), {}),
                  "input gradient": (lambda: input_gradient(dout, x, weight), {}),
                  "input gradient as forward": (lambda: input_gradient_as_forward(dout, weight), {}),
                  "weight gradient": (lambda: weight_gradient(dout, x, weight), {}),
                  "weight gradient, Triton": (
                      lambda: triton_input_conv.input_conv3d_weight_gradient(dout, x, weight, 1, 1, False), {}),
                  **{triton_forward_pass(block_m, warps): (triton_forward, {"fwd_block_m": block_m, "fwd_warps": warps})
                     for block_m, warps in TRITON_FORWARD_SETTINGS}}
        row = {"conv": f"{cin} -> {cout}", "gflop": 2 * positions * cout * cin * 27 / 1e9}
        with torch.no_grad():
            for name, (call, settings) in passes.items():
                with settings_applied(triton_input_conv.TUNING, **settings):
                    try:
                        call()  # cuDNN's search, or Triton's compile, untimed
                    except Exception as error:  # Triton's OutOfResources: these channels' tiles exceed shared memory
                        row[name] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
                        continue
                    row[name] = summary(gpu_times_ms(call, iters, SLEEP_CYCLES))
            row["input_gradient_max_rel_diff"] = max_rel_diff(input_gradient_as_forward(dout, weight),
                                                              input_gradient(dout, x, weight))
            first = triton_forward_pass(*TRITON_FORWARD_SETTINGS[0])
            if "ms_median" in row[first]:
                with settings_applied(triton_input_conv.TUNING, **passes[first][1]):
                    row["triton_forward_max_rel_diff"] = max_rel_diff(triton_forward(), forward(x, weight))
        rows.append(row)
        del x, weight, dout
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="7x48,64,48;2x128,128,128",
                        help="BATCHxD,H,W;... (default: the hippocampus and BraTS steps)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("full_res_convs.json"))
    args = parser.parse_args()
    report = conv_report_with_full_search("bench_full_res_convs", iters=args.iters)
    for case in args.cases.split(";"):
        batch, spatial = parse_case(case)
        rows = bench_case(batch, spatial, args.iters)
        report["cases"][case] = rows
        print(f"\nbatch {batch}, {'x'.join(map(str, spatial))}, {report['gpu']}; ms (TFLOP/s)")
        print(f"| convolution | {' | '.join(PASSES)} | input gradients' / Triton forward's max difference |")
        print("|---|" + "---|" * (len(PASSES) + 1))
        for r in rows:
            cells = [f"{r[p]['ms_median']:.3f} ({r['gflop'] / r[p]['ms_median']:.0f})" if "ms_median" in r[p]
                     else "failed" for p in PASSES]
            print(f"| {r['conv']} | {' | '.join(cells)} | {r['input_gradient_max_rel_diff']:.1e} / "
                  f"{r.get('triton_forward_max_rel_diff', float('nan')):.1e} |")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
