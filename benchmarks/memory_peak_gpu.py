"""What the GPU memory holds at a training step's peak: the live allocations at the highest point of CUDA's
allocator trace, grouped by the code that allocated them.

Records the caching allocator's history (`torch.cuda.memory._record_memory_history`) from before the network is
built, runs --warmup steps (compiles, CUDA graph recording) and --steps more of the benchmark's training step
(`nnunet_segmamba.benchmark.training_step`, names as the benchmark's), and reports:

- the peak of each step (`max_memory_allocated` reset before it): which step sets the run's peak;
- the allocations alive at the trace's peak after the first step (which holds the compile and cuDNN's algorithm
  search, so the peaks of later steps are the ones that compare between networks), and at the whole run's, grouped
  by their innermost Python frame outside torch's own modules (a module's forward, the optimizer, or inductor's
  generated code for a compiled graph, whose buffers carry the generated file's line; for those also the buffer's
  shape and dtype and the kernel that fills it, whose name lists the fused operators), the largest groups first;
- with --snapshot, the snapshot as a pickle for https://pytorch.org/memory_viz (a picture of the timeline).

A CUDA graph replays from memory its recording reserved: those allocations appear in the trace of the recording
step only, which is where a CUDA-graph step's peak is. Needs a CUDA device. Prints tables and writes JSON; not a
test.

    python -m benchmarks.memory_peak_gpu --network 'segmamba_cl_recompute_compiled_cg[triton]' --out peak.json
"""
from __future__ import annotations

import argparse
import json
import linecache
import pickle
import re
import sys
from collections import defaultdict
from pathlib import Path

GIB = 1024 ** 3
# frames from these paths are the machinery that allocated, not the code that asked for the memory
LIBRARY_PARTS = ("/torch/", "/triton/", "<frozen", "/contextlib.py", "/functools.py")


def own_frame(frames: list[dict]) -> dict | None:
    """The innermost Python frame outside torch / Triton / the standard library. C++ frames (the allocator's own,
    '??' where symbols are missing) are skipped."""
    for frame in frames:
        name = frame.get("filename", "")
        if name.endswith(".py") and not any(part in name for part in LIBRARY_PARTS):
            return frame
    return None


def frame_label(frame: dict | None, frames: list[dict]) -> str:
    """`own_frame(frames)` as 'file:line (function)'."""
    if frame is None:
        return "torch internals" if frames else "no stack recorded"
    return f"{frame['filename']}:{frame.get('line', 0)} ({frame.get('name', '?')})"


# the first kernel called after a buffer's allocation in inductor's generated code, which is what fills it
_KERNEL_CALL = re.compile(r"\b(triton_\w+|cpp_fused\w*|extern_kernels\.\w+|torch\.ops\.[\w.]+)")


def generated_code_context(filename: str, line: int, lookahead: int = 15) -> str | None:
    """For a frame in inductor's generated code (its buffers are allocated on one line and filled by a kernel a few
    lines on): the allocation's shape and dtype and the kernel that follows, whose name lists the fused operators;
    None elsewhere or where the file is gone."""
    text = linecache.getline(filename, line).strip()
    allocation = re.search(r"empty_strided_\w+\((\([^)]*\)), \([^)]*\), (torch\.\w+)\)", text)
    if not allocation:
        return None
    for offset in range(1, lookahead + 1):
        call = _KERNEL_CALL.search(linecache.getline(filename, line + offset))
        if call:
            return f"{allocation.group(1)} {allocation.group(2)} -> {call.group(1)}"
    return f"{allocation.group(1)} {allocation.group(2)}"


def live_at_peak(trace: list[dict], start: int = 0) -> tuple[int, int, list[dict]]:
    """(peak bytes, the trace index where it was reached, the allocations alive then) from one device's trace,
    the peak taken over the events from index `start` on (what is alive counts from the trace's beginning): an
    allocation counts from its 'alloc' to its 'free_completed', as pytorch's memory_viz counts them. Memory
    allocated before the trace started is not in it."""
    def replay(events):
        live: dict[int, dict] = {}
        total = 0
        for index, event in enumerate(events):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
            elif event["action"] == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
            yield index, total, live

    peak, peak_index = 0, -1
    for index, total, _ in replay(trace):
        if index >= start and total > peak:
            peak, peak_index = total, index
    # once more up to the peak to take the live set there (copying it at every new maximum would be quadratic)
    live: dict[int, dict] = {}
    for _, _, live in replay(trace[:peak_index + 1]):
        pass
    return peak, peak_index, list(live.values())


def group_by_frame(allocations: list[dict], top: int) -> list[dict]:
    groups: dict[str, list] = defaultdict(lambda: [0, 0, None])
    for event in allocations:
        frames = event.get("frames", [])
        frame = own_frame(frames)
        entry = groups[frame_label(frame, frames)]
        entry[0] += event["size"]
        entry[1] += 1
        if entry[2] is None and frame is not None:
            entry[2] = generated_code_context(frame["filename"], frame.get("line", 0))
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"frame": frame, "gib": size / GIB, "allocations": count, "generated_code": code}
            for frame, (size, count, code) in ranked]


def run(network: str, batch: int, patch, in_channels: int, out_channels: int, warmup: int, steps: int) -> tuple:
    import torch

    from nnunet_segmamba.benchmark import build_network, training_step, uses_fused_sgd

    torch.backends.cudnn.benchmark = True  # as nnU-Net's training
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    model = build_network(network, in_channels, out_channels, patch=patch).cuda().train()
    step, _ = training_step(model, torch.device("cuda"), batch, patch, in_channels, out_channels, amp=True,
                            fused_sgd=uses_fused_sgd(network, torch.device("cuda")))
    step_peaks, first_step_events = [], 0
    for i in range(warmup + steps):
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        step_peaks.append(torch.cuda.max_memory_allocated() / GIB)
        if i == 0:
            first_step_events = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return step_peaks, first_step_events, snapshot


def main(argv: list[str] | None = None) -> int:
    from nnunet_segmamba.benchmark import parse_sizes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="segmamba_cl_recompute_compiled_cg[triton]")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=parse_sizes, default=(128, 128, 128), help="N (a cube) or D,H,W")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--out-channels", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (compile, recording)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="groups listed")
    parser.add_argument("--snapshot", type=Path, default=None, help="also write the snapshot pickle here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("memory_peak_gpu needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    step_peaks, first_step_events, snapshot = run(args.network, args.batch, args.patch, args.in_channels,
                                                  args.out_channels, args.warmup, args.steps)
    if args.snapshot:
        args.snapshot.write_bytes(pickle.dumps(snapshot))
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    report = {"network": args.network, "batch": args.batch, "patch": list(args.patch), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(), "step_peaks_gib": step_peaks, "trace_events": len(trace),
              "first_step_events": first_step_events}
    print(f"{args.network}, batch {args.batch}, patch {'x'.join(map(str, args.patch))}")
    print("peak per step (GiB): " + ", ".join(f"{p:.2f}" for p in step_peaks))
    for key, start, what in (("after_first_step", first_step_events, "after the first step"),
                             ("whole_run", 0, "over the whole run")):
        peak, index, live = live_at_peak(trace, start)
        groups = group_by_frame(live, args.top)
        report[key] = {"peak_gib": peak / GIB, "peak_event": index, "live_at_peak": groups}
        print(f"\ntrace peak {what}: {peak / GIB:.2f} GiB at event {index} of {len(trace)}; alive then, by "
              f"allocating frame:")
        print("| GiB | allocations | frame | in generated code: buffer, then the kernel that fills it |\n"
              "|---|---|---|---|")
        for g in groups:
            print(f"| {g['gib']:.3f} | {g['allocations']} | {g['frame']} | {g['generated_code'] or ''} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
