"""Registers, spills and channel-loop length of the Triton scan kernels (and the causal conv's), compiled for a GPU
architecture on any machine (no GPU needed).

Triton compiles each kernel to PTX and its bundled `ptxas -v` reports the registers per thread and the bytes
spilled to local memory. A kernel that needs more than 255 registers spills, and a program's registers bound how
many programs share a multiprocessor: the H200 sweeps in docs/performance.md found the backward's main kernel
limited by exactly this, so this script lets launch settings and kernel changes be compared without a GPU.
Pointers and the length / batch strides are specialised as divisible by 16, as Triton does at run time for
SegMamba's shapes (that specialisation decides the vector width of loads, and with it the registers).
The SASS instructions of a kernel's channel loop (`nvdisasm` from the same package) are what its time scaled with in
the backward's changes recorded there; `--by-line [LINES]` also lists the LINES (default 12) source lines those
instructions come from most (ptxas' line info), which is how a costly library routine shows up. The causal conv's
kernels have no loop and are bound by memory: for them the global loads and stores count, and how wide they are (one
16-byte access per thread for 8 bf16 steps, or 8 two-byte ones). The GPU machine's Triton may differ from this
machine's, and its code can differ a lot: put an install of the GPU's version first on PYTHONPATH to compile as it
does.
Not a test and not a timing: the GPU sweep (`bench_scan_gpu.py --tune`) decides the defaults.

    python -m benchmarks.triton_registers --out triton_registers.json
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nnunet_segmamba.ssm import triton_conv, triton_scan

# pointers to tensors in the inputs' dtype; every other pointer is a float32 buffer. dBC_ptr among the latter, as
# the backward writes it when a group's channels are split over programs (the hippocampus patch's first stage);
# unsplit (128^3's first stage) it is in the inputs' dtype, which takes `_bwd_chunk`'s loop 9 instructions fewer
# (bf16, Triton 3.6: 1511 against 1520) and its kernel 240 fewer (2256 against 2496)
INPUT_DTYPE_POINTERS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
                        "dz_ptr", "out_ptr", "x_ptr", "dx_ptr"}
DIVISIBLE_INTS = {"L", "su", "sdelta", "sz", "sB", "sC", "s_ddelta", "s_dBC_split", "s_dBC_batch", "s_dBC_C",
                  "stride_xb", "stride_xd", "stride_ob", "stride_od", "stride_gb", "stride_gd", "stride_dxb",
                  "stride_dxd"}
KERNELS = {"bwd_chunk": triton_scan._bwd_chunk, "fwd_chunk_output": triton_scan._fwd_chunk_output,
           "fwd_chunk_summary": triton_scan._fwd_chunk_summary, "bwd_chunk_summary": triton_scan._bwd_chunk_summary,
           "conv_fwd": triton_conv._causal_conv1d_fwd_kernel,
           "conv_bwd": triton_conv._causal_conv1d_bwd_kernel}
# Mamba's configuration, on a sequence whose length is a multiple of the chunk (no padded steps: SegMamba's stages)
FLAGS = {"MODE": 0, "HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "PADDED": False}
# The causal conv as Mamba runs it (width 4, bias, SiLU) on long sequences, whose tiles are the largest; its block is
# not --block-l (the scan's chunk). Its weight and bias pointers are float32, as the parameters are.
CONV_CONSTANTS = {"K": 4, "MODE": 0, "HAS_BIAS": True, "SILU": True, "BLOCK_L": triton_conv.MAX_BLOCK_L}
# the channel loop's source lines that --by-line lists, and loop_lines, unless told otherwise
BY_LINE_LINES = 12


def is_conv_kernel(kernel) -> bool:
    """A causal conv kernel (constants CONV_CONSTANTS) rather than a scan kernel (NP, BL and FLAGS)."""
    return "BLOCK_L" in kernel.arg_names


def gpu_name(arch: int) -> str:
    """ptxas' name of compute capability `arch` (x 10) as Triton compiles for it: the architecture-specific
    features ("a") from sm_90 on."""
    return f"sm_{arch}{'a' if arch >= 90 else ''}"


def ptxas_path(arch: int = 90) -> str:
    # Triton ships a second ptxas for Blackwell (compute capability 10.x and up), where its install has one
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    path = tools / "ptxas-blackwell" if arch >= 100 and (tools / "ptxas-blackwell").is_file() else tools / "ptxas"
    if not path.is_file():
        raise SystemExit(f"no ptxas at {path}: this Triton install lacks the NVIDIA backend's tools")
    return str(path)


def compile_sass(kernel, consts: dict, pointer_dtype: Callable[[str], str], divisible_ints, arch: int,
                 num_warps: int, line_info: bool = False) -> tuple[str, str]:
    """`kernel` compiled for compute capability `arch` (x 10) with `consts` as its constexprs, its pointers to
    `pointer_dtype(name)` and its other arguments int32; the pointers and `divisible_ints` specialised as multiples
    of 16, as Triton's launch does. Returns ptxas -v's report and nvdisasm's listing (with source lines where
    `line_info`)."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        signature[name] = "*" + pointer_dtype(name) if name.endswith("_ptr") else "i32"
        if name.endswith("_ptr") or name in divisible_ints:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        cubin = os.path.join(tmp, "kernel.cubin")
        report = subprocess.run([ptxas_path(arch), "-v", *(["-lineinfo"] if line_info else []), "--gpu-name",
                                 gpu_name(arch), str(ptx), "-o", cubin], capture_output=True, text=True, check=True)
        nvdisasm = str(Path(ptxas_path(arch)).parent / "nvdisasm")
        listing = subprocess.run([nvdisasm, "-g", "-c", cubin], capture_output=True, text=True, check=True).stdout
    return report.stdout + report.stderr, listing


def compile_stats(kernel, block_l: int, num_warps: int, dtype: str, d_state: int, arch: int,
                  flags_off: tuple[str, ...] = (), by_line: int = 0, bwd_rows: bool = False) -> dict:
    """Registers, spills and the channel loop's counts of one kernel compiled with these settings; with `by_line`,
    also the loop's `by_line` source lines with the most instructions."""
    if is_conv_kernel(kernel):
        consts = {k: v for k, v in CONV_CONSTANTS.items() if k in kernel.arg_names}
    else:
        consts = {"NP": max(triton.next_power_of_2(d_state), 2), "BL": block_l}
        consts.update({k: (False if k in flags_off else v) for k, v in FLAGS.items() if k in kernel.arg_names})
        if "ROWS" in kernel.arg_names:  # the backward's in-chunk scans (triton_scan.TUNING["bwd_rows"])
            consts["ROWS"] = bwd_rows
    text, listing = compile_sass(kernel, consts, lambda name: dtype if name in INPUT_DTYPE_POINTERS else "fp32",
                                 DIVISIBLE_INTS, arch, num_warps, line_info=bool(by_line))
    code = parse_listing(listing)
    lines = {"loop_by_line": loop_lines(code, by_line)} if by_line else {}
    return {**register_usage(text), **loop_body(code), **lines}


def register_usage(ptxas_report: str) -> dict:
    """Registers per thread and spilled bytes, from `ptxas -v`'s report."""
    registers = re.search(r"Used (\d+) registers", ptxas_report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_report)
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


# nvdisasm's listing: one SASS instruction "/*address*/ [@predicate] OPCODE operands ;", ".L_x_N:" labels that
# branches name, and with line info (-g) "//## File "PATH", line N" before the instructions of that line
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
NVDISASM_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
NVDISASM_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH_TARGET = re.compile(r"\((\.L_x_\d+)\)")


class Instruction(NamedTuple):
    address: int
    opcode: str
    source: str | None  # "file:line", where the listing has line info
    target: int | None  # a branch's target address


def parse_listing(listing: str) -> list[Instruction]:
    labels, pending, source, raw = {}, [], None, []
    for text in listing.splitlines():
        if (label := NVDISASM_LABEL.match(text)):
            pending.append(label.group(1))
        elif (line := NVDISASM_LINE.search(text)):
            source = f"{os.path.basename(line.group(1))}:{line.group(2)}"
        elif (instruction := SASS_LINE.search(text)):
            address = int(instruction.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            target = BRANCH_TARGET.search(instruction.group(3)) if instruction.group(2).startswith("BRA") else None
            raw.append((address, instruction.group(2), source, target.group(1) if target else None))
    return [Instruction(address, opcode, source, labels.get(target)) for address, opcode, source, target in raw]


def innermost_loop(code: list[Instruction]) -> list[Instruction]:
    """The instructions between the shortest backward branch and its target; empty without a loop."""
    loops = [(i.target, i.address) for i in code if i.target is not None and i.target < i.address]
    if not loops:
        return []
    lo, hi = min(loops, key=lambda span: span[1] - span[0])
    return [i for i in code if lo <= i.address <= hi]


def loop_body(code: list[Instruction]) -> dict:
    """The kernel's SASS instruction count, and those in its innermost loop: the backward's channel loop runs once
    per channel, so its length is what the kernel's time scales with (0 without a loop). Also the whole kernel's
    global loads and stores, and how many are 8 or 16 bytes wide: what a loop-less, memory-bound kernel (the causal
    conv's) scales with."""
    body = innermost_loop(code)
    return {"instructions": len(code), "loop_instructions": len(body),
            "loop_shuffles": sum(i.opcode.startswith("SHFL") for i in body),
            "global_loads": sum(i.opcode.startswith("LDG") for i in code),
            "global_stores": sum(i.opcode.startswith("STG") for i in code),
            "wide_accesses": sum(i.opcode.startswith(("LDG", "STG")) and i.opcode.endswith((".64", ".128"))
                                 for i in code)}


def loop_lines(code: list[Instruction], top: int = BY_LINE_LINES) -> list[dict]:
    """The innermost loop's instructions by the source line they come from (file name and line; a library routine
    inlined into the kernel counts under its own file), the `top` lines with the most, and each line's three
    commonest opcodes. Empty without a loop."""
    by_line: dict[str, list[str]] = {}
    for i in innermost_loop(code):
        by_line.setdefault(i.source or "?", []).append(i.opcode.split(".")[0])
    ranked = sorted(by_line.items(), key=lambda item: -len(item[1]))[:top]
    return [{"source": where, "instructions": len(ops),
             "top_opcodes": dict(collections.Counter(ops).most_common(3))} for where, ops in ranked]


def _line_count(text: str) -> int:
    """--by-line's LINES: a positive integer."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of source lines, got {text!r}")
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["bwd_chunk", "fwd_chunk_output"])
    parser.add_argument("--block-l", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"])
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    parser.add_argument("--flags-off", nargs="+", default=[], choices=[k for k, v in FLAGS.items() if v is True],
                        help="compile without these options of Mamba's configuration (e.g. HAS_Z: no z gate)")
    parser.add_argument("--bwd-rows", action="store_true",
                        help="compile the backward's main kernel with its in-chunk scans in rows of 8 steps, as "
                             "the launch does for 16-bit inputs without the gate (default: with flips)")
    parser.add_argument("--by-line", type=_line_count, nargs="?", const=BY_LINE_LINES, default=0, metavar="LINES",
                        help="also list the channel loop's instructions by source line (ptxas -lineinfo, nvdisasm): "
                             f"the LINES lines with the most (default {BY_LINE_LINES})")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON to this file")
    args = parser.parse_args()

    rows = []
    off = (f", without {' '.join(args.flags_off)}" if args.flags_off else "") + (
        ", the backward's scans in rows" if args.bwd_rows else "")
    print(f"triton {triton.__version__}, sm_{args.arch}, d_state {args.d_state}{off}\n")
    print("| kernel | dtype | block_l | warps | registers | spill stores / loads (bytes) | instructions "
          "| loop instructions (shuffles) | global loads / stores (of them 8 or 16 bytes wide) |")
    print("|---|---|---|---|---|---|---|---|---|")
    done = set()
    for name, dtype, block_l, warps in itertools.product(args.kernels, args.dtypes, args.block_l, args.warps):
        if is_conv_kernel(KERNELS[name]):  # the conv's own block, whatever --block-l says
            block_l = CONV_CONSTANTS["BLOCK_L"]
        if (name, dtype, block_l, warps) in done:
            continue
        done.add((name, dtype, block_l, warps))
        row = {"kernel": name, "dtype": dtype, "block_l": block_l, "warps": warps,
               **compile_stats(KERNELS[name], block_l, warps, dtype, args.d_state, args.arch, tuple(args.flags_off),
                               args.by_line, args.bwd_rows)}
        rows.append(row)
        print(f"| {name} | {dtype} | {block_l} | {warps} | {row['registers']} | "
              f"{row['spill_stores']} / {row['spill_loads']} | {row['instructions']} | {row['loop_instructions']} "
              f"({row['loop_shuffles']}) | {row['global_loads']} / {row['global_stores']} ({row['wide_accesses']}) |",
              flush=True)
    for row in rows if args.by_line else []:
        if row["loop_by_line"]:
            print(f"\n{row['kernel']} {row['dtype']} block_l {row['block_l']} warps {row['warps']}: the channel loop "
                  f"by source line\n\n| source | instructions | commonest opcodes |\n|---|---|---|")
            for line in row["loop_by_line"]:
                opcodes = ", ".join(f"{op} {n}" for op, n in line["top_opcodes"].items())
                print(f"| {line['source']} | {line['instructions']} | {opcodes} |")
    if args.out:
        command = " ".join(["python -m benchmarks.triton_registers", *sys.argv[1:]])
        args.out.write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "d_state": args.d_state,
                                        "flags_off": args.flags_off, "bwd_rows": args.bwd_rows, "command": command,
                                        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
