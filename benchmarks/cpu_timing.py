"""What the CPU benchmarks share: the machine's description, wall- and CPU-time of repeated runs, the arguments
every one of them takes (--runs, --threads, --out) and the JSON report."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["add_run_arguments", "apply_threads", "cpu_model", "load_average", "run", "system_info", "time_runs",
           "write_report"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    # on a machine shared with other jobs the timings are only as good as the load they ran under
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def system_info() -> dict[str, object]:
    """The CPU, torch's version and threads, and the load average, as each report's "system" entry."""
    return {"cpu": cpu_model(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": load_average()}


def time_runs(fn: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """Wall time (time.perf_counter) and the process's CPU time (time.process_time) of `runs` calls after
    `warmup` untimed ones, in ms: median, min and max of the wall time, median of the CPU time."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - start_cpu) * 1e3)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "cpu_median_ms": statistics.median(cpu), "runs": runs}


def add_run_arguments(parser: argparse.ArgumentParser, runs: int) -> None:
    """--runs (default `runs`), --threads and --out."""
    parser.add_argument("--runs", type=int, default=runs,
                        help=f"timed runs; the median is reported (default {runs})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON to this file")


def apply_threads(args: argparse.Namespace) -> None:
    """torch.set_num_threads(--threads), where given."""
    if args.threads:
        torch.set_num_threads(args.threads)


def write_report(report: dict, out: Path | None) -> None:
    """The report as JSON to `out` (nothing without one), and a line saying where."""
    if out:
        out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {out}")


def run(args: argparse.Namespace, bench: Callable[[argparse.Namespace], dict], show: Callable[[dict], None]) -> int:
    """A benchmark's main: torch's threads from --threads, the report, its table, its JSON to --out."""
    apply_threads(args)
    report = bench(args)
    show(report)
    write_report(report, args.out)
    return 0
