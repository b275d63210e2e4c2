"""The input conv's Triton forward kernel (`networks/triton_input_conv.py`) compiled for a GPU architecture on any
machine (no GPU needed): registers, spills, and the SASS instructions and global loads of its inner loop, for the
three convolutions on SegMamba's input at 1 and 4 channels. Each loop step covers one tap row (kd, kh) of the
kernel, BLOCK_J columns; the instructions per block of output positions are the loop's times KS^2 (the whole
kernel's where the compiler unrolled the loop). The input's strides are compiled as multiples of 16, as Triton's
launch specialises them at SegMamba's patches. A prediction of where the time goes, not a timing
(`bench_input_convs` times it on a GPU); put the GPU machine's Triton first on PYTHONPATH to compile as it does.

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

CASES = (("stem 7^3 / 2", 7, 2, 3), ("block 3^3", 3, 1, 1), ("shortcut 1^3", 1, 1, 0))
# the input's strides between samples, depths and rows, multiples of 16 at SegMamba's patches (multiples of 16 in
# each spatial size), which Triton's launch specialises as such, as it does the pointers
DIVISIBLE_INTS = ("sxb", "sxd", "sxh")


def forward_stats(channels: int, size: int, stride: int, padding: int, block_m: int, num_warps: int,
                  arch: int) -> dict:
    kernel = triton_input_conv._input_conv_fwd
    block_j, block_f = triton_input_conv._blocks(channels, size, 48)
    consts = dict(C=channels, KS=size, STRIDE=stride, PAD=padding, HAS_BIAS=False, PRECISION="tf32",
                  BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_F=block_f)
    text, listing = compile_sass(kernel, consts, lambda name: "fp16", DIVISIBLE_INTS, arch, num_warps)
    code = parse_listing(listing)
    body = innermost_loop(code)
    # a loop the compiler unrolled (the 3^3 kernel's 9 tap rows can be) leaves no backward branch: then the whole
    # kernel is the block's instructions
    per_block = len(body) * size * size if body else len(code)
    loads = collections.Counter(i.opcode for i in (body or code) if i.opcode.startswith("LDG"))
    return {"block_j": block_j, **register_usage(text), "loop_instructions": len(body),
            "per_block_of_positions": per_block, "loads": dict(loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--block-m", type=int, default=triton_input_conv.TUNING["fwd_block_m"])
    parser.add_argument("--warps", type=int, default=triton_input_conv.TUNING["fwd_warps"])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=Path("input_conv_sass.json"))
    args = parser.parse_args()
    rows = []
    print(f"forward kernel, Triton {triton.__version__}, {gpu_name(args.arch)}, BLOCK_M {args.block_m}, "
          f"{args.warps} warps")
    print("| convolution | channels | BLOCK_J | registers | spilled bytes | loop instructions | per block | "
          "loads (loop's, or the kernel's without one) |")
    print("|---|---|---|---|---|---|---|---|")
    for channels in args.channels:
        for name, size, stride, padding in CASES:
            stats = forward_stats(channels, size, stride, padding, args.block_m, args.warps, args.arch)
            rows.append({"conv": name, "channels": channels, **stats})
            print(f"| {name} | {channels} | {stats['block_j']} | {stats['registers']} | {stats['spill_stores']} | "
                  f"{stats['loop_instructions']} | {stats['per_block_of_positions']} | {stats['loads']} |")
    args.out.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "block_m": args.block_m,
                                    "warps": args.warps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
