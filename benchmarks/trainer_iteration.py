"""Where a trainer's training iteration goes: waiting for nnU-Net's data loader, the host's share of `train_step`,
and the GPU's.

    python -m benchmarks.trainer_iteration --data HIPPOCAMPUS_DIR --work WORK \
        --trainers nnUNetTrainer,nnUNetTrainerSegMamba --warmup 30 --iterations 100 --out iteration.json

A trainer name may set class attributes of the trainer for this run, `NAME:ATTRIBUTE=VALUE` (a Python literal),
to compare a tunable in one run: `--trainers nnUNetTrainerSegMamba,nnUNetTrainerSegMamba:channels_last=False`.

An epoch is more than its training steps: in one hippocampus study nnUNetTrainer needed 28.8 ms per iteration
for a 14 ms compiled step (docs/performance.md, "The three trainers in one run", the earlier run). This
runs each trainer's iterations as nnU-Net's `run_training` does, `train_step(next(dataloader_train))`, on the
hippocampus study's preprocessed data (`--work` may be the study's: it is prepared once) and fold 0 of its split,
and takes each iteration apart:

  wait      the time in `next(dataloader_train)`: the data loader had no batch ready;
  step      the wall time of `train_step`; nnU-Net's ends with a sync (it reads the loss back), ours on CUDA
            do not wait for the GPU, so the host may run up to a step ahead;
  GPU busy  the time the GPU runs kernels or copies, per iteration (torch.profiler over --profiled iterations,
            from an idle GPU to the end of their work; CUDA only). The kernels of replayed CUDA graphs count
            only where CUPTI reports them: a busy time far below the benchmark's step time
            (`nnunet-segmamba benchmark`) means it did not.
  GPU idle  the rest of those iterations' wall time, split by what the host was doing meanwhile: each part of
            the iteration (data loader, forward, loss, backward, GradScaler, clipping, optimizer, our finiteness
            check) is labelled for the profiler, and each stretch of idle GPU goes to the innermost label open then.
            A part that shows here makes the GPU wait, typically for launches after a sync.
  host wait the time the training thread spent in CUDA's synchronising calls in those iterations: what is left
            of the iteration is the host's own work, which bounds the iteration once no sync does.
  host      the training thread's time in each labelled part (innermost, as for the GPU's idle time), and of
            it the time waiting for the GPU: where the host's own work goes.

and the validation iterations of an epoch (nnU-Net's `validation_step`, --validation-iterations of them, and the
epoch's end that gathers their results, timed together), which an epoch's time includes too.

cuDNN runs in benchmark mode, as nnUNetv2_train sets it (the fastest algorithm for each convolution, timed on
first use). After `on_train_start` (network, compile, data loaders) --warmup iterations run untimed: they hold the
compile, cuDNN's timing and, for our trainers, the recording of the CUDA graphs. Nothing is trained to the end,
evaluated or saved. Prints a table and writes JSON. Not a test: it needs a GPU and minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path


# the labels of an iteration's parts; the optimizer labels its own steps ("Optimizer.step#SGD.step")
NEXT_BATCH, TRAIN_STEP, BETWEEN = "next(dataloader_train)", "train_step, rest", "between the labelled parts"
OWN_OPTIMIZER_LABEL = "Optimizer."


class _Labelled:
    """Calls `module` inside a profiler label; everything else (parameters(), attributes) goes to the module."""

    def __init__(self, module, label: str):
        self._module, self._label = module, label

    def __call__(self, *args, **kwargs):
        import torch

        with torch.profiler.record_function(self._label):
            return self._module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _labelled_function(function, label: str):
    import torch

    def labelled(*args, **kwargs):
        with torch.profiler.record_function(label):
            return function(*args, **kwargs)
    return labelled


_MISSING = object()


@contextlib.contextmanager
def labelled_parts(trainer):
    """Puts each part of nnU-Net's train_step in a profiler label while the block runs: the network, the loss, the
    backward, GradScaler's methods, gradient clipping and our trainers' training forward, scaled SGD step and
    finiteness checks (the optimizer labels its own step). Yields the labels; everything patched is restored at the
    end."""
    import torch

    parts = [(trainer, "network", "network forward"), (trainer, "loss", "loss forward"),
             (torch.Tensor, "backward", "backward"), (torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_")]
    if trainer.grad_scaler is not None:
        from nnunet_segmamba.training import amp_step

        parts += [(trainer.grad_scaler, name, f"GradScaler.{name}") for name in ("unscale_", "step", "update")]
        # our trainers' end of the step under a GradScaler (the calls above, or the unscale and clip in SGD's pass)
        parts.append((amp_step, "scaled_sgd_step", "scaled SGD step"))
    if hasattr(trainer, "_finite_on_all_ranks"):
        parts.append((trainer, "_finite_on_all_ranks", "finiteness check"))
    if hasattr(trainer, "_forward_and_loss"):  # our trainers' training forward: the two above, or one graph
        parts.append((trainer, "_forward_and_loss", "network and loss forward"))
    if hasattr(trainer, "_check_previous_loss") and trainer.grad_scaler is not None:
        parts.append((trainer, "_check_previous_loss", "previous step's loss check"))
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in parts]
    for owner, name, label in parts:
        value = getattr(owner, name)
        # a module keeps its attributes (parameters()) through the wrapper; a function stays a function, so
        # that a method (Tensor.backward) still binds its instance
        setattr(owner, name, _Labelled(value, label) if isinstance(value, torch.nn.Module)
                else _labelled_function(value, label))
    try:
        yield {label for _, _, label in parts}
    finally:
        for owner, name, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def merged_within(intervals: list[tuple[float, float]], window: tuple[float, float]) -> list[list[float]]:
    """The union of `intervals` (start, end) inside `window`, as sorted, disjoint [start, end] pieces."""
    lo, hi = window
    merged: list[list[float]] = []
    for start, end in sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def time_by_part(intervals: list[tuple[float, float]], parts: list[tuple[float, float, str]],
                 window: tuple[float, float]) -> dict[str, float]:
    """The time covered by `intervals` inside `window` (their union), split by the innermost of the nested,
    labelled `parts` open meanwhile (BETWEEN where none is). All times in one unit, intervals as (start, end)."""
    by_part: dict[str, float] = {}
    for piece_start, piece_end in merged_within(intervals, window):
        # cut the piece at every part boundary inside it; each cut goes to the innermost part around its middle
        cuts = sorted({piece_start, piece_end}
                      | {x for a, b, _ in parts for x in (a, b) if piece_start < x < piece_end})
        for a, b in zip(cuts, cuts[1:]):
            middle = (a + b) / 2
            around = [(start, end, name) for start, end, name in parts if start <= middle < end]
            # nested labels: the innermost is the latest to open
            name = max(around)[2] if around else BETWEEN
            by_part[name] = by_part.get(name, 0.0) + (b - a)
    return by_part


def gpu_idle_by_part(busy: list[tuple[float, float]], parts: list[tuple[float, float, str]],
                     window: tuple[float, float]) -> tuple[float, dict[str, float]]:
    """The GPU's busy time inside `window` (the union of the `busy` intervals: kernels and copies, which may
    overlap) and its idle time there split by the innermost labelled part open meanwhile (`time_by_part`)."""
    lo, hi = window
    merged = merged_within(busy, window)
    gaps, t = [], lo
    for start, end in merged:
        if start > t:
            gaps.append((t, start))
        t = max(t, end)
    if hi > t:
        gaps.append((t, hi))
    return sum(end - start for start, end in merged), time_by_part(gaps, parts, window)


# CUDA runtime calls in which the host waits for the GPU (`.item()`, `.cpu()`, events, explicit syncs)
HOST_WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")


def _profiled_iterations(trainer, profiled: int) -> dict:
    """Runs `profiled` labelled training iterations under torch.profiler; per iteration, in ms: wall time, GPU
    busy time, GPU idle time by part (see gpu_idle_by_part), the training thread's time waiting for the GPU, and
    the training thread's time by part, and of it the time waiting for the GPU."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    # start from an idle GPU and end when it is done: a host that runs ahead of the GPU (our trainers' steps do not
    # wait for it) would otherwise end the window while the GPU still has its last iterations' work queued
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        with labelled_parts(trainer) as labels:
            for _ in range(profiled):
                with torch.profiler.record_function(NEXT_BATCH):
                    batch = next(trainer.dataloader_train)
                with torch.profiler.record_function(TRAIN_STEP):
                    trainer.train_step(batch)
        torch.cuda.synchronize()
    events = prof.events()
    labels |= {NEXT_BATCH, TRAIN_STEP}
    parts = [(e.time_range.start, e.time_range.end, e.name) for e in events
             if e.device_type == torch.autograd.DeviceType.CPU
             and (e.name in labels or e.name.startswith(OWN_OPTIMIZER_LABEL))]
    busy = [(e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    outer = [(a, b) for a, b, name in parts if name in (NEXT_BATCH, TRAIN_STEP)]
    window = (min(a for a, _ in outer), max([b for _, b in outer] + [b for _, b in busy]))
    busy_us, idle_us = gpu_idle_by_part(busy, parts, window)
    training_thread = next(e.thread for e in events if e.name == TRAIN_STEP)
    waits = [(e.time_range.start, e.time_range.end) for e in events
             if e.name in HOST_WAITS and e.thread == training_thread]
    host_us, waiting_us = time_by_part([window], parts, window), time_by_part(waits, parts, window)

    def per_iteration(by_part: dict[str, float]) -> dict[str, float]:
        return {name: t / (1e3 * profiled) for name, t in sorted(by_part.items(), key=lambda kv: -kv[1])}

    return {"profiled_iteration_ms": (window[1] - window[0]) / (1e3 * profiled),
            "gpu_busy_ms_per_iteration": busy_us / (1e3 * profiled),
            "gpu_idle_ms_per_iteration_by_part": per_iteration(idle_us),
            "host_waiting_for_gpu_ms_per_iteration": sum(waiting_us.values()) / (1e3 * profiled),
            "host_ms_per_iteration_by_part": per_iteration(host_us),
            "host_waiting_for_gpu_ms_per_iteration_by_part": per_iteration(waiting_us)}


# the figures of the profiled iterations, None where there are none (on the CPU)
PROFILED_FIGURES = ("profiled_iteration_ms", "gpu_busy_ms_per_iteration", "gpu_idle_ms_per_iteration_by_part",
                    "host_waiting_for_gpu_ms_per_iteration", "host_ms_per_iteration_by_part",
                    "host_waiting_for_gpu_ms_per_iteration_by_part")


def measure_iterations(trainer, warmup: int, iterations: int, profiled: int, validation_iterations: int = 0) -> dict:
    """Times `iterations` training iterations of an nnU-Net trainer after `on_train_start` and `warmup` untimed
    ones; medians in ms of the wait for a batch, the step and their sum; on CUDA, over `profiled` more iterations,
    the GPU's busy time per iteration and its idle time split by what the host was doing (None on the CPU); then
    the mean of `validation_iterations` validation iterations with the epoch's end (`on_validation_epoch_end`).
    The data loaders are shut down at the end."""
    import torch

    from nnunet_segmamba.benchmark import _sync

    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        for _ in range(warmup):
            trainer.train_step(next(trainer.dataloader_train))
        waits, steps, totals = [], [], []
        for _ in range(iterations):
            t0 = time.perf_counter()
            batch = next(trainer.dataloader_train)
            t1 = time.perf_counter()
            trainer.train_step(batch)
            t2 = time.perf_counter()
            waits.append((t1 - t0) * 1e3)
            steps.append((t2 - t1) * 1e3)
            totals.append((t2 - t0) * 1e3)
        profiled_figures = dict.fromkeys(PROFILED_FIGURES)
        if trainer.device.type == "cuda" and profiled > 0:
            profiled_figures = _profiled_iterations(trainer, profiled)
        validation_ms = None
        if validation_iterations > 0:
            with torch.no_grad():
                trainer.on_validation_epoch_start()
                trainer.validation_step(next(trainer.dataloader_val))  # records the validation graphs: untimed
                # timed as a whole with the epoch's end, from an idle GPU until it is done: a step need not wait
                # for the GPU (ours do not), so a step's own wall time would be the host's share only
                _sync(trainer.device)
                t0 = time.perf_counter()
                outputs = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(validation_iterations)]
                trainer.on_validation_epoch_end(outputs)
                _sync(trainer.device)
                validation_ms = (time.perf_counter() - t0) * 1e3 / validation_iterations
    finally:
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
    result = {"iterations": iterations, "warmup": warmup, "batch_size": trainer.batch_size,
              "patch_size": [int(p) for p in trainer.configuration_manager.patch_size],
              "wait_ms_median": statistics.median(waits), "step_ms_median": statistics.median(steps),
              "iteration_ms_median": statistics.median(totals), "iteration_ms_mean": statistics.mean(totals),
              "profiled_iterations": profiled if profiled_figures["gpu_busy_ms_per_iteration"] is not None else 0,
              **profiled_figures, "validation_iterations": validation_iterations if validation_ms else 0,
              "validation_iteration_ms_mean": validation_ms}
    # what one epoch's iterations (250 + 50 for nnU-Net's trainers) take at this pace: the epoch without its end
    result["train_iterations_seconds_per_epoch"] = result["iteration_ms_mean"] * trainer.num_iterations_per_epoch / 1e3
    if validation_ms:
        result["validation_iterations_seconds_per_epoch"] = (validation_ms
                                                             * trainer.num_val_iterations_per_epoch / 1e3)
    return result


def parse_trainer(spec: str) -> tuple[str, dict]:
    """`NAME` or `NAME:ATTRIBUTE=VALUE` (VALUE a Python literal) -> (NAME, {ATTRIBUTE: VALUE})."""
    import ast

    name, _, setting = spec.partition(":")
    if not setting:
        return name, {}
    attribute, equals, value = setting.partition("=")
    try:
        if not (equals and attribute.isidentifier()):
            raise ValueError
        return name, {attribute: ast.literal_eval(value)}
    except (ValueError, SyntaxError):
        raise SystemExit(f"trainer_iteration: --trainers entry {spec!r} is not NAME or NAME:ATTRIBUTE=VALUE with a "
                         f"Python literal, e.g. nnUNetTrainerSegMamba:channels_last=False") from None


def build_trainer(dataset_id: int, spec: str, configuration: str, fold: int, device: str):
    """The trainer named by `spec` (`parse_trainer`) as nnUNetv2_train builds it (looked up in nnU-Net's trainers
    and nnUNet_extTrainer), with the spec's class attributes set on the instance before anything reads them (they
    are read from `initialize` on), and cuDNN set up as nnUNetv2_train sets it before training: benchmark mode,
    which times the convolution algorithms for each shape and keeps the fastest. The nnUNet_* variables must be
    set first: nnU-Net reads them when its modules are imported."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    name, attributes = parse_trainer(spec)
    trainer = get_trainer_from_args(str(dataset_id), configuration, fold, name, device=torch.device(device))
    for attribute, value in attributes.items():
        if not hasattr(type(trainer), attribute):
            raise SystemExit(f"trainer_iteration: {name} has no attribute {attribute!r} to set")
        setattr(trainer, attribute, value)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    return trainer


def markdown(report: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    trainers = report["trainers"]
    rows = ["| trainer | wait for a batch ms | train_step ms | iteration ms | profiled iteration ms | GPU busy ms "
            "| host waiting for the GPU ms | validation iteration ms | an epoch's training iterations s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in trainers.items():
        rows.append(f"| {name} | {ms(r['wait_ms_median'])} | {ms(r['step_ms_median'])} | "
                    f"{ms(r['iteration_ms_median'])} | {ms(r['profiled_iteration_ms'])} | "
                    f"{ms(r['gpu_busy_ms_per_iteration'])} | {ms(r['host_waiting_for_gpu_ms_per_iteration'])} | "
                    f"{ms(r['validation_iteration_ms_mean'])} | {r['train_iterations_seconds_per_epoch']:.1f} |")
    idle = {name: r["gpu_idle_ms_per_iteration_by_part"] for name, r in trainers.items()
            if r["gpu_idle_ms_per_iteration_by_part"]}
    if idle:
        rows += _parts_table("GPU idle ms per iteration, while the host was in", idle,
                             lambda name, part: ms(idle[name].get(part, 0.0)))
    host = {name: r["host_ms_per_iteration_by_part"] for name, r in trainers.items()
            if r["host_ms_per_iteration_by_part"]}
    if host:
        waiting = {name: trainers[name]["host_waiting_for_gpu_ms_per_iteration_by_part"] for name in host}
        rows += _parts_table("training thread ms per iteration in (of which waiting for the GPU)", host,
                             lambda name, part: f"{ms(host[name].get(part, 0.0))} ({ms(waiting[name].get(part, 0.0))})")
    return "\n".join(rows)


def _parts_table(title: str, by_trainer: dict[str, dict[str, float]], cell) -> list[str]:
    """A blank line and a table of one row per labelled part (the largest in any trainer first) and one column per
    trainer of `by_trainer` (trainer -> part -> ms); `cell(trainer, part)` writes an entry."""
    parts = sorted({part for by_part in by_trainer.values() for part in by_part},
                   key=lambda part: -max(by_part.get(part, 0.0) for by_part in by_trainer.values()))
    return (["", f"| {title} | " + " | ".join(by_trainer) + " |", "|---|" + "---|" * len(by_trainer)]
            + [f"| {part} | " + " | ".join(cell(name, part) for name in by_trainer) + " |" for part in parts])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/ and labels/ (MSD Task04)")
    parser.add_argument("--work", type=Path, required=True, help="working folder for nnU-Net's three folders")
    parser.add_argument("--trainers", default="nnUNetTrainer,nnUNetTrainerSegMamba,nnUNetTrainerSegMambaNoMamba",
                        help="comma-separated trainer names, each optionally NAME:ATTRIBUTE=VALUE")
    parser.add_argument("--warmup", type=int, default=30, help="untimed iterations (compile, CUDA graphs)")
    parser.add_argument("--iterations", type=int, default=100, help="timed iterations per trainer")
    parser.add_argument("--profiled", type=int, default=10, help="iterations under torch.profiler (GPU busy time)")
    parser.add_argument("--validation-iterations", type=int, default=20, help="timed validation iterations")
    parser.add_argument("--num-processes", type=int, default=os.cpu_count() or 4, help="worker processes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("trainer_iteration.json"), help="JSON output")
    args = parser.parse_args()

    from benchmarks.hippocampus_study import CONFIG, DATASET_ID, prepare_dataset

    prepared = prepare_dataset(args.data.resolve(), args.work.resolve(), args.num_processes)
    # the data loaders' worker count and nnU-Net's compile rule, as nnUNetv2_train would see them
    for name in ("nnUNet_n_proc_DA", "nnUNet_extTrainer", "nnUNet_compile"):
        if name in prepared["env"]:
            os.environ[name] = prepared["env"][name]
        else:
            os.environ.pop(name, None)

    import torch

    report = {"dataset": prepared["raw"].name, "device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "data_loader_processes": os.environ.get("nnUNet_n_proc_DA"), "trainers": {},
              "command": " ".join(sys.argv)}
    for name in args.trainers.split(","):
        print(f"== {name}", flush=True)
        trainer = build_trainer(DATASET_ID, name, CONFIG, 0, args.device)
        report["trainers"][name] = measure_iterations(trainer, args.warmup, args.iterations, args.profiled,
                                                      args.validation_iterations)
        print(json.dumps(report["trainers"][name], indent=1), flush=True)
        args.out.write_text(json.dumps(report, indent=2))
        del trainer
        torch.cuda.empty_cache()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
