"""What the GPU benchmarks that time one piece of a training step share: the piece's GPU time alone, the host's
launches left out, and the summary of such times."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

__all__ = ["gpu_times_ms", "summary"]


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


def summary(times: list[float]) -> dict[str, float]:
    """Median, fastest and slowest, in the keys of the benchmark's reports."""
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}
