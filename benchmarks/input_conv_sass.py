"""The input conv's Triton kernels (`networks/triton_input_conv.py`) compiled for a GPU architecture on any machine
(no GPU needed): registers, spills, and the SASS instructions and memory accesses of their inner loops, for the three
convolutions on SegMamba's input at 1 and 4 channels. A prediction of where the time goes, not a timing
(`bench_input_convs` times them on a GPU); put the GPU machine's Triton first on PYTHONPATH to compile as it does.

- The forward: each loop step covers one tap row (kd, kh) of the kernel, BLOCK_J columns; the instructions per block
  of output positions are the loop's times KS^2 (the whole kernel's where the compiler unrolled the loop).
- The weight gradient: each loop step multiplies one block of positions' patches, a tile of BLOCK_K (tap, channel)
  columns, with their output gradient; the warp instructions per 64 output positions are the loop's times the warps,
  the tiles of columns (one program each) and 64 / BLOCK_M.

The integer arguments that Triton's launch specialises as multiples of 16 at SegMamba's patches (the input's
strides between samples, depths and rows; for the weight gradient also the number of positions and of output
channels, 48) are compiled as such, as are the pointers.

    python -m benchmarks.input_conv_sass --out input_conv_sass.json
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import triton

from benchmarks.triton_registers import compile_sass, gpu_name, innermost_loop, parse_listing, register_usage
from nnunet_segmamba.networks import triton_input_conv
from nnunet_segmamba.ssm.triton_common import next_power_of_2

CASES = (("stem 7^3 / 2", 7, 2, 3), ("block 3^3", 3, 1, 1), ("shortcut 1^3", 1, 1, 0))
DIVISIBLE_INTS = ("sxb", "sxd", "sxh")
WGRAD_DIVISIBLE_INTS = DIVISIBLE_INTS + ("M", "F")
FEATURES = 48


def _accesses(code) -> dict:
    """Counts of the global loads, asynchronous copies and shared-memory stores among `code`, by opcode."""
    return dict(collections.Counter(i.opcode for i in code if i.opcode.startswith(("LDG", "STS"))))


def forward_stats(channels: int, size: int, stride: int, padding: int, block_m: int, num_warps: int,
                  arch: int) -> dict:
    kernel = triton_input_conv._input_conv_fwd
    block_j, block_f = triton_input_conv._blocks(channels, size, FEATURES)
    consts = dict(C=channels, KS=size, STRIDE=stride, PAD=padding, HAS_BIAS=False, PRECISION="tf32",
                  BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_F=block_f)
    text, listing = compile_sass(kernel, consts, lambda name: "fp16", DIVISIBLE_INTS, arch, num_warps)
    code = parse_listing(listing)
    body = innermost_loop(code)
    # a loop the compiler unrolled (the 3^3 kernel's 9 tap rows can be) leaves no backward branch: then the whole
    # kernel is the block's instructions
    per_block = len(body) * size * size if body else len(code)
    return {"block_j": block_j, **register_usage(text), "loop_instructions": len(body),
            "per_block_of_positions": per_block, "loads": _accesses(body or code)}


def weight_gradient_stats(channels: int, size: int, stride: int, padding: int, block_m: int, block_k: int,
                          num_warps: int, arch: int) -> dict:
    kernel = triton_input_conv._input_conv_wgrad
    block_k, tiles = triton_input_conv.weight_gradient_tiles(channels, size, block_k)  # as the launch has them
    consts = dict(C=channels, CP=next_power_of_2(channels), KS=size, STRIDE=stride, PAD=padding, HAS_BIAS=False,
                  PRECISION="tf32", BLOCK_M=block_m, BLOCK_K=block_k,
                  BLOCK_F=triton_input_conv._blocks(channels, size, FEATURES)[1])
    # CP (the channels padded to a power of two) for a kernel whose tiles hold whole taps
    consts = {name: value for name, value in consts.items() if name in kernel.arg_names}
    text, listing = compile_sass(kernel, consts, lambda name: "fp32" if name.startswith(("dw", "dbias")) else "fp16",
                                 WGRAD_DIVISIBLE_INTS, arch, num_warps)
    body = innermost_loop(parse_listing(listing))
    return {"block_k": block_k, "tiles": tiles, **register_usage(text), "loop_instructions": len(body),
            "warp_instructions_per_64_positions": len(body) * num_warps * tiles * 64 // block_m,
            "accesses": _accesses(body)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--block-m", type=int, default=triton_input_conv.TUNING["fwd_block_m"])
    parser.add_argument("--warps", type=int, default=triton_input_conv.TUNING["fwd_warps"])
    parser.add_argument("--wgrad-settings", default=None,
                        help="the weight gradient's BLOCK_M,BLOCK_K,WARPS;... (default: the launch's TUNING)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=Path("input_conv_sass.json"))
    args = parser.parse_args()
    tuning = triton_input_conv.TUNING
    wgrad_settings = ([tuple(int(v) for v in s.split(",")) for s in args.wgrad_settings.split(";")]
                      if args.wgrad_settings else [(tuning["wgrad_block_m"], tuning["wgrad_block_k"],
                                                    tuning["wgrad_warps"])])
    rows, wgrad_rows = [], []
    print(f"forward kernel, Triton {triton.__version__}, {gpu_name(args.arch)}, BLOCK_M {args.block_m}, "
          f"{args.warps} warps")
    print("| convolution | channels | BLOCK_J | registers | spilled bytes | loop instructions | per block | "
          "loads and shared-memory stores (loop's, or the kernel's without one) |")
    print("|---|---|---|---|---|---|---|---|")
    for channels in args.channels:
        for name, size, stride, padding in CASES:
            stats = forward_stats(channels, size, stride, padding, args.block_m, args.warps, args.arch)
            rows.append({"conv": name, "channels": channels, **stats})
            print(f"| {name} | {channels} | {stats['block_j']} | {stats['registers']} | {stats['spill_stores']} | "
                  f"{stats['loop_instructions']} | {stats['per_block_of_positions']} | {stats['loads']} |")
    print(f"\nweight gradient kernel, Triton {triton.__version__}, {gpu_name(args.arch)}")
    print("| convolution | channels | BLOCK_M, BLOCK_K, warps | tiles | registers | spilled bytes | loop instructions "
          "| warp instructions per 64 positions | loop's loads and shared-memory stores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for channels in args.channels:
        for name, size, stride, padding in CASES:
            launches = set()
            for block_m, block_k, warps in wgrad_settings:
                launch = (block_m, triton_input_conv.weight_gradient_tiles(channels, size, block_k), warps)
                if launch in launches:
                    continue  # the same launch: BLOCK_K capped by the kernel's columns
                launches.add(launch)
                stats = weight_gradient_stats(channels, size, stride, padding, block_m, block_k, warps, args.arch)
                wgrad_rows.append({"conv": name, "channels": channels, "block_m": block_m, "warps": warps, **stats})
                print(f"| {name} | {channels} | {block_m}, {stats['block_k']}, {warps} | {stats['tiles']} | "
                      f"{stats['registers']} | {stats['spill_stores']} | {stats['loop_instructions']} | "
                      f"{stats['warp_instructions_per_64_positions']} | {stats['accesses']} |")
    args.out.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "block_m": args.block_m,
                                    "warps": args.warps, "rows": rows, "weight_gradient": wgrad_rows}, indent=1))


if __name__ == "__main__":
    main()
