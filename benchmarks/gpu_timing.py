"""What the GPU benchmarks that time one piece of a training step share: the piece's GPU time alone, the host's
launches left out, the summary of such times, its table cell, and the JSON report written."""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path
from typing import Callable

import torch

__all__ = ["conv_report_with_full_search", "gpu_times_ms", "settings_applied", "settings_parser", "summary",
           "summary_cell", "write_report"]


def gpu_times_ms(call: Callable[[], object], iters: int, sleep_cycles: int,
                 prepare: Callable[[], object] | None = None) -> list[float]:
    """GPU milliseconds of `iters` calls of `call`, each timed alone: a sleep kernel of `sleep_cycles` (longer than
    the host takes to queue one call) is queued before the start event and keeps the GPU busy while the host queues
    the call, as the work before it does in a step, so the time between the events is the call's kernels and not
    the host's launches. `prepare` runs before each call, untimed."""
    times = []
    for _ in range(iters):
        if prepare is not None:
            prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def conv_report_with_full_search(name: str, **fields) -> dict:
    """For a benchmark of convolutions: stops with a one-line message without a CUDA device, turns on cuDNN's full
    search of its algorithms (as the trainers set it), and returns the report's head: the GPU, torch, cuDNN, `fields`
    and an empty "cases"."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{name} needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = 0
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            **fields, "cases": {}}


@contextlib.contextmanager
def settings_applied(settings: dict, **values):
    """A module's launch-settings dict (a Triton module's TUNING) with `values` in it for the block's duration, as it
    was after the block."""
    saved = dict(settings)
    settings.update(values)
    try:
        yield
    finally:
        settings.clear()
        settings.update(saved)


def settings_parser(settings: dict, option: str = "--tuning") -> Callable[[str], dict]:
    """An argparse `type` for `option`: 'KEY=INT[,KEY=INT]' with each KEY one of `settings` (a Triton module's
    TUNING) and each value a non-negative integer -> {KEY: value}, for `settings_applied`."""
    def parse(text: str) -> dict:
        values = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key not in settings or not value.strip().isdigit():
                raise argparse.ArgumentTypeError(f"{option} {text!r}: each item must be KEY=INTEGER (0 or more) with "
                                                 f"KEY one of {sorted(settings)}")
            values[key] = int(value)
        return values
    return parse


def summary(times: list[float]) -> dict[str, float]:
    """Median, fastest and slowest, in the keys of the benchmark's reports."""
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def summary_cell(times: dict[str, float], digits: int) -> str:
    """A `summary` as the benchmarks' tables show it: "median (fastest / slowest)"."""
    return f"{times['ms_median']:.{digits}f} ({times['ms_min']:.{digits}f} / {times['ms_max']:.{digits}f})"


def write_report(path: Path, report: dict) -> None:
    """The benchmark's JSON report at `path`, its folder made where missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
