"""GPU: the end of the trainers' training step under a GradScaler, nnU-Net's calls against `amp_step`.

nnU-Net's train_step ends with `scaler.unscale_`, `clip_grad_norm_(params, 12)`, `scaler.step` and
`scaler.update`: with SGD's fused kernel, four passes over SegMamba's gradients (unscale, norm, clip, SGD).
`nnunet_segmamba.training.amp_step.scaled_sgd_step` does the unscale and the clip inside the SGD pass: two. Both run
here on SegMamba's parameters (the trainers' network, channels-last) with random gradients of a realistic scale,
fused SGD as the trainers configure it, in alternating rounds. Each step is timed on the GPU alone (`gpu_timing`:
the backward keeps the GPU busy while the host queues the step in training). Also reported: the
largest difference between the weights after one step of each from the same state (the clip active).

    python -m benchmarks.bench_optimizer_step --out $OUT/optimizer_step.json

Prints a markdown table and writes JSON. Needs a CUDA device; nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from benchmarks.gpu_timing import gpu_times_ms, summary, summary_cell, write_report
from nnunet_segmamba.benchmark import GRAD_CLIP, SGD_KWARGS
from nnunet_segmamba.networks.segmamba import SegMamba
from nnunet_segmamba.training.amp_step import scaled_sgd_step

SLEEP_CYCLES = 50_000_000  # about 25-30 ms of a busy GPU, longer than the host takes to queue one step


def nnunets_step(model, optimizer, scaler) -> None:
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    scaler.step(optimizer)
    scaler.update()


def fused_step(model, optimizer, scaler) -> None:
    scaled_sgd_step(optimizer, scaler, GRAD_CLIP)


STEPS = {"nnU-Net's calls": nnunets_step, "amp_step": fused_step}


def optimizer_and_scaler(model):
    """Fused SGD as the trainers configure it, and a GradScaler with its scale created."""
    optimizer = torch.optim.SGD(model.parameters(), **SGD_KWARGS, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(torch.ones((), device="cuda"))  # creates the scale as the first scaled loss does
    return optimizer, scaler


def set_gradients(model, grads) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def setup(in_chans: int, out_chans: int, grad_std: float, seed: int):
    """SegMamba on the GPU with its optimizer and GradScaler, and scaled random gradients."""
    torch.manual_seed(seed)
    model = SegMamba(in_chans, out_chans).cuda().to(memory_format=torch.channels_last_3d)
    optimizer, scaler = optimizer_and_scaler(model)
    scale = scaler.get_scale()
    grads = [torch.randn_like(p) * (grad_std * scale) for p in model.parameters()]
    return model, optimizer, scaler, grads


def time_steps(step, model, optimizer, scaler, grads, iters: int) -> list[float]:
    return gpu_times_ms(lambda: step(model, optimizer, scaler), iters, SLEEP_CYCLES,
                        prepare=lambda: set_gradients(model, grads))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-chans", type=int, default=4)
    parser.add_argument("--out-chans", type=int, default=3)
    parser.add_argument("--grad-std", type=float, default=1e-2,
                        help="std of the random unscaled gradients (the norm then exceeds the clip at 12)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="timed steps per version and round")
    parser.add_argument("--out", type=Path, default=Path("optimizer_step.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_optimizer_step: needs a CUDA device")

    model, optimizer, scaler, grads = setup(args.in_chans, args.out_chans, args.grad_std, seed=0)
    params = sum(p.numel() for p in model.parameters())
    norm = float(torch.nn.utils.get_total_norm(grads)) / scaler.get_scale()
    # the same step from the same state by each version: how far apart the weights come out
    after = {}
    for name, step in STEPS.items():
        m = copy.deepcopy(model)
        o, s = optimizer_and_scaler(m)
        set_gradients(m, grads)
        step(m, o, s)
        after[name] = [p.detach().clone() for p in m.parameters()]
        del m, o
    a, b = after.values()
    max_diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    max_update = max(float((x - p.detach()).abs().max()) for x, p in zip(a, model.parameters()))
    del after, a, b

    for step in STEPS.values():  # warm-up: the kernels' first launches
        time_steps(step, model, optimizer, scaler, grads, 3)
    times = {name: [] for name in STEPS}
    for _ in range(args.rounds):
        for name, step in STEPS.items():
            times[name] += time_steps(step, model, optimizer, scaler, grads, args.iters)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "parameters": params,
              "gradient_norm": norm, "clip": GRAD_CLIP, "rounds": args.rounds, "iters": args.iters,
              "max_weight_difference": max_diff, "max_weight_update": max_update,
              "steps": {name: summary(t) for name, t in times.items()},
              "command": "python -m benchmarks.bench_optimizer_step " + " ".join(argv or [])}
    print(f"SegMamba({args.in_chans}, {args.out_chans}): {params / 1e6:.1f} M parameters, gradient norm {norm:.1f} "
          f"(clip {GRAD_CLIP}), {report['gpu']}")
    print("| end of the step, GPU time | ms (median; fastest / slowest) |\n|---|---|")
    for name, r in report["steps"].items():
        print(f"| {name} | {summary_cell(r, 3)} |")
    print(f"weights after one step: largest difference {max_diff:.3g} (largest update {max_update:.3g})")
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
