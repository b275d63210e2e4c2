"""GPU: SegMamba's three convolutions on the network's input (the stem's 7^3 stride 2, the first residual block's
3^3 and its 1x1 shortcut), as they are and with the input's channels padded with zeros to a multiple of 8.

cuDNN's fast channels-last fp16 kernels need the input channels in multiples of 8 (16 bytes); with the 1 or 4
channels of MRI inputs it falls back to kernels without shared memory (`implicit_gemm_indexed_wo_smem`) and to
strided weight-gradient kernels, which profiles of the training step showed taking several times the
convolutions' memory traffic. Padding the channels with zeros, and the weights' input channels with zeros, keeps
the arithmetic (every added product is 0 x w) and lets cuDNN pick its aligned kernels. Each convolution is timed
as the training step runs it: forward, then the weight's gradient (the input needs none), fp16, channels-last,
cuDNN's full search (as the trainers set it), GPU time alone (`gpu_timing`); the padded versions include padding
the weight in every call, and the input's padding, done once for the three, is timed on its own. The last row of
each convolution is `networks.triton_input_conv`'s kernels, the network's path for these convolutions on a GPU;
`--tune` times those kernels alone under each of a few launch settings instead.

    python -m benchmarks.bench_input_convs --out $OUT/input_convs.json

Default cases: the hippocampus step (batch 7, 1 x 48 x 64 x 48) and the BraTS step (batch 2, 4 x 128^3). Prints a
markdown table and writes JSON. Needs a CUDA device; nothing is asserted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_timing import conv_report_with_full_search, gpu_times_ms, settings_applied, summary, write_report
from nnunet_segmamba.networks import triton_input_conv
from nnunet_segmamba.networks.triton_input_conv import input_conv3d_forward, input_conv3d_weight_gradient

SLEEP_CYCLES = 20_000_000
CL = torch.channels_last_3d
#: (name, kernel size, stride, padding) of the convolutions that read SegMamba's input
CONVS = (("stem 7^3 / 2", 7, 2, 3), ("block 3^3", 3, 1, 1), ("shortcut 1^3", 1, 1, 0))


def parse_case(text: str) -> tuple[int, int, tuple[int, ...]]:
    """'BATCHxCHANNELSxD,H,W' -> (batch, channels, spatial)."""
    batch, channels, spatial = text.split("x")
    return int(batch), int(channels), tuple(int(s) for s in spatial.split(","))


def padded_input(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x with zero channels appended up to `channels`, channels-last."""
    return F.pad(x, (0, 0, 0, 0, 0, 0, 0, channels - x.shape[1])).contiguous(memory_format=CL)


def conv_forward(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """The convolution, with the weight's input channels padded with zeros up to x's."""
    if x.shape[1] > weight.shape[1]:
        weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, x.shape[1] - weight.shape[1]))
    return F.conv3d(x, weight, stride=stride, padding=padding)


def conv_step(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dout: torch.Tensor) -> torch.Tensor:
    """The forward and the weight's gradient of one convolution, as a training step runs them."""
    (grad,) = torch.autograd.grad(conv_forward(x, weight, stride, padding), weight, dout)
    return grad


def triton_step(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dout: torch.Tensor) -> torch.Tensor:
    """The same forward and weight gradient on the Triton kernels (`networks/triton_input_conv.py`)."""
    with torch.no_grad():
        input_conv3d_forward(x, weight, None, stride, padding)
    return input_conv3d_weight_gradient(dout, x, weight, stride, padding, with_bias=False)[0]


def bench_case(batch: int, channels: int, spatial: tuple[int, ...], pads: list[int], features: int,
               iters: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((batch, channels, *spatial), device="cuda", generator=g).half().to(memory_format=CL)
    rows = []
    inputs = {channels: x}
    for p in pads:
        if p > channels:
            inputs[p] = padded_input(x, p)
            times = gpu_times_ms(lambda: padded_input(x, p), iters, SLEEP_CYCLES)
            rows.append({"conv": "input padding", "channels": p, "fwd_wgrad": summary(times)})
    for name, k, stride, padding in CONVS:
        weight = (torch.randn(features, channels, k, k, k, device="cuda", generator=g) * 0.05).half()
        weight = weight.to(memory_format=CL).requires_grad_()
        with torch.no_grad():
            out_shape = conv_forward(x, weight, stride, padding).shape
        dout = torch.randn(out_shape, device="cuda", generator=g).half().to(memory_format=CL)
        conv_rows, grads = [], []
        for c, xc in inputs.items():
            with torch.no_grad():
                conv_forward(xc, weight, stride, padding)  # cuDNN's search, untimed
                fwd = gpu_times_ms(lambda: conv_forward(xc, weight, stride, padding), iters, SLEEP_CYCLES)
            grads.append(conv_step(xc, weight, stride, padding, dout).float())  # the search again, untimed
            both = gpu_times_ms(lambda: conv_step(xc, weight, stride, padding, dout), iters, SLEEP_CYCLES)
            conv_rows.append({"conv": name, "channels": c, "fwd": summary(fwd), "fwd_wgrad": summary(both)})
        with torch.no_grad():
            input_conv3d_forward(x, weight, None, stride, padding)  # compiles, untimed
            fwd = gpu_times_ms(lambda: input_conv3d_forward(x, weight, None, stride, padding), iters, SLEEP_CYCLES)
        grads.append(triton_step(x, weight, stride, padding, dout).float())
        both = gpu_times_ms(lambda: triton_step(x, weight, stride, padding, dout), iters, SLEEP_CYCLES)
        conv_rows.append({"conv": name, "channels": f"{channels} (Triton)", "fwd": summary(fwd),
                          "fwd_wgrad": summary(both)})
        scale = grads[0].abs().max().item()
        for row, grad in zip(conv_rows, grads):
            row["wgrad_max_rel_diff"] = (grad - grads[0]).abs().max().item() / scale
        rows += conv_rows
    return rows


#: launch settings swept by --tune: forward (block_m, warps), weight gradient (block_m, block_k, warps, programs
#: per multiprocessor)
FWD_SETTINGS = ((128, 4), (64, 4), (256, 8), (128, 8), (64, 2))
WGRAD_SETTINGS = ((64, 64, 4, 4), (32, 128, 4, 4), (64, 128, 8, 4), (64, 64, 4, 8), (64, 32, 4, 4),
                  (128, 64, 8, 4), (64, 128, 4, 4), (64, 128, 4, 8))


def tune_case(batch: int, channels: int, spatial: tuple[int, ...], features: int, iters: int) -> list[dict]:
    """The Triton kernels' time under each launch setting (the forward and the weight gradient separately)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((batch, channels, *spatial), device="cuda", generator=g).half().to(memory_format=CL)
    rows = []
    for name, k, stride, padding in CONVS:
        weight = (torch.randn(features, channels, k, k, k, device="cuda", generator=g) * 0.05).half()
        y = input_conv3d_forward(x, weight, None, stride, padding)
        dout = torch.randn(y.shape, device="cuda", generator=g).half().to(memory_format=CL)
        for bm, warps in FWD_SETTINGS:
            with settings_applied(triton_input_conv.TUNING, fwd_block_m=bm, fwd_warps=warps):
                input_conv3d_forward(x, weight, None, stride, padding)
                t = gpu_times_ms(lambda: input_conv3d_forward(x, weight, None, stride, padding), iters, SLEEP_CYCLES)
            rows.append({"conv": name, "pass": "forward", "setting": [bm, warps], **summary(t)})
        for bm, bk, warps, ppsm in WGRAD_SETTINGS:
            with settings_applied(triton_input_conv.TUNING, wgrad_block_m=bm, wgrad_block_k=bk, wgrad_warps=warps,
                                  wgrad_programs_per_sm=ppsm):
                input_conv3d_weight_gradient(dout, x, weight, stride, padding, False)
                t = gpu_times_ms(lambda: input_conv3d_weight_gradient(dout, x, weight, stride, padding, False), iters,
                                 SLEEP_CYCLES)
            rows.append({"conv": name, "pass": "weight gradient", "setting": [bm, bk, warps, ppsm], **summary(t)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="7x1x48,64,48;2x4x128,128,128",
                        help="BATCHxCHANNELSxD,H,W;... (default: the hippocampus and BraTS steps)")
    parser.add_argument("--pads", default="8,16", help="channel counts to pad the input to")
    parser.add_argument("--features", type=int, default=48, help="the convolutions' output channels")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--tune", action="store_true", help="sweep the Triton kernels' launch settings instead")
    parser.add_argument("--out", type=Path, default=Path("input_convs.json"))
    args = parser.parse_args()
    report = conv_report_with_full_search("bench_input_convs", features=args.features, iters=args.iters)
    pads = [int(p) for p in args.pads.split(",")]
    for case in args.cases.split(";"):
        batch, channels, spatial = parse_case(case)
        if args.tune:
            rows = tune_case(batch, channels, spatial, args.features, args.iters)
            report["cases"][case] = rows
            print(f"\nbatch {batch}, {channels} x {'x'.join(map(str, spatial))}, {report['gpu']}: Triton settings")
            for r in rows:
                print(f"| {r['conv']} | {r['pass']} | {r['setting']} | {r['ms_median']:.4f} |")
            continue
        rows = bench_case(batch, channels, spatial, pads, args.features, args.iters)
        report["cases"][case] = rows
        print(f"\nbatch {batch}, {channels} x {'x'.join(map(str, spatial))}, {report['gpu']}")
        print("| convolution | input channels | forward ms | forward + weight gradient ms | weight grad vs unpadded |")
        print("|---|---|---|---|---|")
        for r in rows:
            fwd = f"{r['fwd']['ms_median']:.4f}" if "fwd" in r else ""
            diff = f"{r['wgrad_max_rel_diff']:.1e}" if "wgrad_max_rel_diff" in r else ""
            print(f"| {r['conv']} | {r['channels']} | {fwd} | {r['fwd_wgrad']['ms_median']:.4f} | {diff} |")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
