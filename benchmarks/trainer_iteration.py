"""Where a trainer's training iteration goes: waiting for nnU-Net's data loader, the host's share of `train_step`,
and the GPU's.

    python -m benchmarks.trainer_iteration --data HIPPOCAMPUS_DIR --work WORK \
        --trainers nnUNetTrainer,nnUNetTrainerSegMamba --warmup 30 --iterations 100 --out iteration.json

An epoch is more than its training steps: on the hippocampus nnUNetTrainer needs 28.8 ms per iteration for a
14 ms compiled step, SegMamba 68 ms for a 54 ms one (docs/performance.md, "The three trainers in one run"). This
runs each trainer's iterations as nnU-Net's `run_training` does, `train_step(next(dataloader_train))`, on the
hippocampus study's preprocessed data (`--work` may be the study's: it is prepared once) and fold 0 of its split,
and takes each iteration apart:

  wait      the time in `next(dataloader_train)`: the data loader had no batch ready;
  step      the wall time of `train_step`, which ends with a sync (nnU-Net reads the loss back);
  GPU busy  the GPU's kernel and copy time per iteration (torch.profiler over --profiled iterations; CUDA only),
            so that step - GPU busy is what the GPU waits for the host inside a step. The kernels of replayed
            CUDA graphs count only where CUPTI reports them: a busy time far below the benchmark's step time
            (`nnunet-segmamba benchmark`) means it did not.

After `on_train_start` (network, compile, data loaders) --warmup iterations run untimed: they hold the compile and,
for our trainers, the recording of the CUDA graphs. Nothing is trained to the end, evaluated or saved. Prints a
table and writes JSON. Not a test: it needs a GPU and minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def measure_iterations(trainer, warmup: int, iterations: int, profiled: int) -> dict:
    """Times `iterations` training iterations of an nnU-Net trainer after `on_train_start` and `warmup` untimed
    ones; medians in ms of the wait for a batch, the step and their sum, and the GPU's busy time per iteration
    over `profiled` more iterations (None on the CPU). The data loaders are shut down at the end."""
    import torch

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
        gpu_busy = None
        if trainer.device.type == "cuda" and profiled > 0:
            activities = [torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(profiled):
                    trainer.train_step(next(trainer.dataloader_train))
                torch.cuda.synchronize()
            busy_us = sum(e.device_time_total for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA)
            gpu_busy = busy_us / 1e3 / profiled
    finally:
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
    result = {"iterations": iterations, "warmup": warmup, "batch_size": trainer.batch_size,
              "patch_size": [int(p) for p in trainer.configuration_manager.patch_size],
              "wait_ms_median": statistics.median(waits), "step_ms_median": statistics.median(steps),
              "iteration_ms_median": statistics.median(totals), "iteration_ms_mean": statistics.mean(totals),
              "gpu_busy_ms_per_iteration": gpu_busy, "profiled_iterations": profiled if gpu_busy is not None else 0}
    # what one epoch's iterations (250 for nnU-Net's trainers) take at this pace: the training part of the epoch
    result["train_iterations_seconds_per_epoch"] = result["iteration_ms_mean"] * trainer.num_iterations_per_epoch / 1e3
    return result


def build_trainer(dataset_id: int, name: str, configuration: str, fold: int, device: str):
    """The trainer `name` as nnUNetv2_train builds it (looked up in nnU-Net's trainers and nnUNet_extTrainer). The
    nnUNet_* variables must be set first: nnU-Net reads them when its modules are imported."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args(str(dataset_id), configuration, fold, name, device=torch.device(device))


def markdown(report: dict) -> str:
    rows = ["| trainer | wait for a batch ms | train_step ms | iteration ms | GPU busy ms "
            "| an epoch's training iterations s |", "|---|---|---|---|---|---|"]
    for name, r in report["trainers"].items():
        busy = f"{r['gpu_busy_ms_per_iteration']:.1f}" if r["gpu_busy_ms_per_iteration"] is not None else "-"
        rows.append(f"| {name} | {r['wait_ms_median']:.1f} | {r['step_ms_median']:.1f} | "
                    f"{r['iteration_ms_median']:.1f} | {busy} | {r['train_iterations_seconds_per_epoch']:.1f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with images/ and labels/ (MSD Task04)")
    parser.add_argument("--work", type=Path, required=True, help="working folder for nnU-Net's three folders")
    parser.add_argument("--trainers", default="nnUNetTrainer,nnUNetTrainerSegMamba,nnUNetTrainerSegMambaNoMamba",
                        help="comma-separated trainer names")
    parser.add_argument("--warmup", type=int, default=30, help="untimed iterations (compile, CUDA graphs)")
    parser.add_argument("--iterations", type=int, default=100, help="timed iterations per trainer")
    parser.add_argument("--profiled", type=int, default=10, help="iterations under torch.profiler (GPU busy time)")
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
        report["trainers"][name] = measure_iterations(trainer, args.warmup, args.iterations, args.profiled)
        print(json.dumps(report["trainers"][name], indent=1), flush=True)
        args.out.write_text(json.dumps(report, indent=2))
        del trainer
        torch.cuda.empty_cache()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
