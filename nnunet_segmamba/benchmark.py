"""`nnunet-segmamba benchmark`: training step, memory and sliding-window inference of SegMamba and its peers.

Every network runs in one process at the same setting; the defaults are the paper's (batch 2, 4 x 128^3 input,
3 region outputs, fp16 autocast):

- training step: nnU-Net's `train_step` (SGD lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5; GradScaler;
  unscale, grad-norm clip 12, step), with BCE-with-logits on random binary targets standing in for nnU-Net's
  region loss. SGD as each network's trainer runs it: SegMamba's fused kernel on CUDA (our trainers'
  `configure_optimizers`), torch's default for nnU-Net's and MONAI's networks (`uses_fused_sgd`). Median of
  `iters` steps after `warmup`, timed with CUDA events (time.perf_counter on the CPU).
  Peak memory is torch.cuda.max_memory_allocated over the steps (weights, gradients, optimizer state and
  activations), None on the CPU.
- patch inference: one forward pass of a (1, C, *patch) tile under fp16 autocast.
- volume inference: MONAI's `sliding_window_inference` over one (1, C, *volume) image (BraTS: 240 x 240 x 155)
  with patch-sized tiles, overlap 1 - step (nnU-Net's tile_step_size 0.5), Gaussian weighting (sigma = patch/8),
  batch-1 tiles, and nnU-Net's mirror TTA applied per tile by `mirror_mean` (the mean over all 8 flips of the three
  spatial axes), timed once; for a compiled network after one untimed pass. See `tile_layout` for how the tile
  positions compare with nnU-Net's predictor.

Out-of-memory in one phase is recorded as "OOM" and the run goes on; the memory of each network is freed before
the next. torch, MONAI and the networks are imported inside functions: importing this module needs no GPU.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

# default run order: the chunked PyTorch scan last, as the one most likely to be slow or run out of memory
NETWORKS = ("segmamba[cuda]", "segmamba[triton]", "segmamba_nomamba", "plainconv", "resenc_m", "swinunetr",
            "segmamba[torch]")
# further choices for --networks, not run by default: gradient checkpointing of the Mamba stages and recomputed
# Mamba branches (memory), and torch.compile'd variants (`_compiled`: `torch.compile(network)`, as nnU-Net's
# trainer compiles)
COMPILED_NETWORKS = ("segmamba_compiled[cuda]", "segmamba_compiled[triton]", "segmamba_compiled[torch]",
                     "segmamba_ckpt_compiled[triton]", "segmamba_nomamba_compiled", "plainconv_compiled",
                     "resenc_m_compiled")
# `_compiled_cl`: compiled with inductor's channels-last layout optimisation forced on. Inductor's own heuristic
# (GraphLowering.decide_layout_opt) leaves it off for U-Nets in training, because their decoders have
# convolutions with twice as many input as output channels; cuDNN then converts layouts around every call.
LAYOUT_OPT_NETWORKS = ("segmamba_compiled_cl[triton]", "segmamba_nomamba_compiled_cl", "plainconv_compiled_cl",
                       "resenc_m_compiled_cl")
# `_compiled_cg`: compiled with mode="reduce-overhead", which replays each compiled graph (forward, backward) as
# one CUDA graph instead of launching its kernels one by one: for steps whose GPU waits on the host
CUDA_GRAPH_NETWORKS = ("segmamba_compiled_cg[triton]", "segmamba_compiled_cg[cuda]", "segmamba_nomamba_compiled_cg",
                       "plainconv_compiled_cg", "resenc_m_compiled_cg")
# `segmamba_recompute`: SegMamba(recompute_mamba_branches=True), each Mamba branch recomputed in the backward
# except its scan
RECOMPUTE_NETWORKS = ("segmamba_recompute[triton]", "segmamba_recompute_compiled[triton]",
                      "segmamba_recompute_compiled_cg[triton]")
# `segmamba_cl`: weights and input in channels_last_3d, eager, compiled, or compiled with CUDA graphs (the residual
# conv blocks recompute their norms and shortcuts, the network's default on a GPU); `segmamba_cl_recompute`: with
# recomputed Mamba branches too, and compiled with CUDA graphs the trainers' setting on one GPU from 2^21 voxels per
# batch (BraTS's 2 x 128^3); `segmamba_cl_keep`: nothing recomputed, compiled with CUDA graphs the trainers' setting
# below (the hippocampus's 7 x 48 x 64 x 48); `_stacked` / `_unstacked`: every Mamba layer's directions as one scan,
# or a branch at a time, where the default would choose the other (`SegMamba(stack_mamba_directions=...)`)
CHANNELS_LAST_NETWORKS = ("segmamba_cl[cuda]", "segmamba_cl[triton]", "segmamba_cl_compiled[triton]",
                          "segmamba_cl_compiled_cg[triton]", "segmamba_cl_recompute[triton]",
                          "segmamba_cl_recompute_compiled[triton]", "segmamba_cl_recompute_compiled_cg[triton]",
                          "segmamba_cl_keep[triton]", "segmamba_cl_keep_compiled[triton]",
                          "segmamba_cl_keep_compiled_cg[triton]", "segmamba_cl_recompute_stacked[triton]",
                          "segmamba_cl_recompute_stacked_compiled_cg[triton]", "segmamba_cl_keep_unstacked[triton]",
                          "segmamba_cl_keep_unstacked_compiled_cg[triton]")
# `segmamba_cl16`: channels-last with the 3D convolutions' weights stored in float16 (what fp16 autocast casts
# them to on every call, so the same arithmetic): inference only. Compiled, the casts inside the graph are
# intermediate buffers that inductor lays out channels-first, and cuDNN converts around every convolution
HALF_CONV_NETWORKS = ("segmamba_cl16_compiled[triton]", "segmamba_cl16_compiled_cg[triton]")
EXTRA_NETWORKS = ("segmamba_ckpt[cuda]", "segmamba_ckpt[triton]", *CHANNELS_LAST_NETWORKS, *HALF_CONV_NETWORKS,
                  *COMPILED_NETWORKS, *LAYOUT_OPT_NETWORKS, *CUDA_GRAPH_NETWORKS, *RECOMPUTE_NETWORKS)
NETWORK_HELP = {
    "segmamba[cuda]": "SegMamba, scan on mamba-ssm's CUDA kernel (skipped where it does not load)",
    "segmamba[triton]": "SegMamba, scan and causal conv on our Triton kernels (skipped without triton / CUDA)",
    "segmamba_nomamba": "SegMamba with mixer='none' (identity in place of every Mamba layer)",
    "plainconv": "nnU-Net PlainConvUNet, nnU-Net's plan for the patch (at 128^3: 6 stages, 32..320 features)",
    "resenc_m": "nnU-Net ResEnc-M (ResidualEncoderUNet, blocks 1,3,4,6,6,6)",
    "swinunetr": "MONAI SwinUNETR, feature_size 48",
    "segmamba[torch]": "SegMamba, chunked PyTorch scan",
    "segmamba_ckpt[cuda]": "SegMamba with gradient checkpointing of the Mamba stages, cuda scan",
    "segmamba_ckpt[triton]": "SegMamba with gradient checkpointing of the Mamba stages, triton scan",
    "segmamba_cl[cuda]": "SegMamba with weights and input in channels_last_3d (cuDNN's NDHWC convolutions), cuda scan",
    "segmamba_cl[triton]": "SegMamba in channels_last_3d, triton scan",
    "segmamba_cl_compiled[triton]": "SegMamba in channels_last_3d under torch.compile, triton scan",
    "segmamba_cl_compiled_cg[triton]": "the same compiled with mode='reduce-overhead' (CUDA graphs)",
    "segmamba_cl_recompute[triton]": "SegMamba in channels_last_3d with recomputed Mamba branches, triton scan",
    "segmamba_cl_recompute_compiled[triton]": "the same under torch.compile",
    "segmamba_cl_recompute_compiled_cg[triton]": "the same compiled with CUDA graphs: the trainers' setting on one GPU "
                                                 "from 2^21 voxels per batch (2 x 128^3)",
    "segmamba_cl_keep[triton]": "SegMamba in channels_last_3d keeping every activation for the backward (no recomputed "
                                "Mamba branches or conv blocks), triton scan",
    "segmamba_cl_keep_compiled[triton]": "the same under torch.compile",
    "segmamba_cl_keep_compiled_cg[triton]": "the same compiled with CUDA graphs: the trainers' setting on one GPU "
                                            "below 2^21 voxels per batch (the hippocampus's 7 x 48 x 64 x 48)",
    "segmamba_cl_recompute_stacked[triton]": "segmamba_cl_recompute with each Mamba layer's directions as one scan",
    "segmamba_cl_recompute_stacked_compiled_cg[triton]": "the same compiled with CUDA graphs",
    "segmamba_cl_keep_unstacked[triton]": "segmamba_cl_keep with each Mamba layer's directions one branch at a time",
    "segmamba_cl_keep_unstacked_compiled_cg[triton]": "the same compiled with CUDA graphs",
    "segmamba_cl16_compiled[triton]": "SegMamba in channels_last_3d, 3D conv weights in float16, compiled (inference)",
    "segmamba_cl16_compiled_cg[triton]": "the same compiled with mode='reduce-overhead' (CUDA graphs; inference)",
    "segmamba_compiled[cuda]": "SegMamba under torch.compile (as nnU-Net compiles), cuda scan",
    "segmamba_compiled[triton]": "SegMamba under torch.compile, triton scan",
    "segmamba_compiled[torch]": "SegMamba under torch.compile, chunked PyTorch scan",
    "segmamba_ckpt_compiled[triton]": "SegMamba with checkpointed Mamba stages under torch.compile, triton scan",
    "segmamba_nomamba_compiled": "SegMamba with mixer='none' under torch.compile",
    "plainconv_compiled": "PlainConvUNet under torch.compile",
    "resenc_m_compiled": "ResEnc-M under torch.compile",
    "segmamba_compiled_cl[triton]": "SegMamba (triton scan) compiled with inductor's force_layout_optimization",
    "segmamba_nomamba_compiled_cl": "SegMamba with mixer='none', compiled with force_layout_optimization",
    "plainconv_compiled_cl": "PlainConvUNet compiled with force_layout_optimization",
    "resenc_m_compiled_cl": "ResEnc-M compiled with force_layout_optimization",
    "segmamba_compiled_cg[triton]": "SegMamba (triton scan) compiled with mode='reduce-overhead' (CUDA graphs)",
    "segmamba_compiled_cg[cuda]": "SegMamba (cuda scan) compiled with mode='reduce-overhead' (CUDA graphs)",
    "segmamba_nomamba_compiled_cg": "SegMamba with mixer='none', compiled with mode='reduce-overhead'",
    "plainconv_compiled_cg": "PlainConvUNet compiled with mode='reduce-overhead'",
    "resenc_m_compiled_cg": "ResEnc-M compiled with mode='reduce-overhead'",
    "segmamba_recompute[triton]": "SegMamba with recomputed Mamba branches (all but the scans), triton scan",
    "segmamba_recompute_compiled[triton]": "the same under torch.compile",
    "segmamba_recompute_compiled_cg[triton]": "the same compiled with mode='reduce-overhead' (CUDA graphs)",
}
KNOWN_NETWORKS = NETWORKS + EXTRA_NETWORKS
# nnU-Net's train_step and SGD (nnUNetTrainer.configure_optimizers)
SGD_KWARGS = {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
GRAD_CLIP = 12.0
GIB = 1024 ** 3
# how the MONAI sliding window + `mirror_mean` here relates to nnU-Net's nnUNetPredictor (2.8), recorded in the JSON
NNUNET_DIFFERENCES = (
    "same: tiles of the patch size, padding of axes smaller than the patch, tile count per axis, batch-1 tiles, "
    "Gaussian weights with sigma = patch/8, mirror TTA over all 8 flips per tile, fp16 autocast, inference mode",
    "tile positions: MONAI steps by int(patch * step) and moves the last tile back to the border; nnU-Net spreads "
    "the same number of tiles evenly (e.g. 0, 64, 112 vs 0, 56, 112 for 240 voxels)",
    "accumulation: MONAI sums the weighted logits in the input's dtype (float32); nnU-Net in float16",
)

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------- networks

def _uncompiled_name(name: str) -> str:
    """The network a `_compiled*` name wraps."""
    for suffix in ("_compiled_cl", "_compiled_cg", "_compiled"):
        name = name.replace(suffix, "")
    return name


def nnunet_stage_strides(patch: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-stage strides of the U-Net nnU-Net's planner builds for `patch` at isotropic spacing (its
    `get_pool_and_conv_props`, with the planner's minimum feature-map edge of 4): (128, 128, 128) -> 6 stages,
    strides 1, 2, 2, 2, 2, 2; the hippocampus patch (48, 64, 48) -> 4 stages, strides 1, 2, 2, 2."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, _, planned_patch, _ = get_pool_and_conv_props([1.0] * len(patch), list(patch), 4, 999)
    if [int(p) for p in planned_patch] != list(patch):
        raise ValueError(f"patch {tuple(patch)}: nnU-Net's plan needs {tuple(int(p) for p in planned_patch)} "
                         f"(each axis divisible by its total stride); benchmark that patch instead")
    return [tuple(int(s) for s in stage) for stage in strides]


def build_network(name: str, in_channels: int, out_channels: int, segmamba_width: int = 48,
                  compile_backend: str = "inductor", patch: Sequence[int] = (128, 128, 128),
                  compile_options: dict[str, Any] | None = None):
    """The network `name` (one of KNOWN_NETWORKS), without deep supervision, on the CPU. A SegMamba name's
    bracket is its scan backend (`segmamba[triton]`); without one, "auto". A `_compiled` name is the network
    without that suffix wrapped in `torch.compile(network, backend=compile_backend)`, as nnU-Net's trainer does
    (with the default backend); the compile happens in the first (warm-up) step of each phase. A `_compiled_cl`
    name is compiled with inductor's `force_layout_optimization` (channels-last buffers and convolutions inside
    the compiled graph), a `_compiled_cg` name with `mode="reduce-overhead"` (CUDA graphs; recorded in a later
    warm-up step); both are ignored by other compile backends. `compile_options` (inductor's options, e.g.
    {"max_autotune_gemm": True}) are added to those of every `_compiled` name under inductor.

    SegMamba's widths are (w, 2w, 4w, 8w) with a 16w bottleneck (w = 48 is the reference). The nnU-Net networks
    use the plan nnU-Net makes for `patch` at isotropic spacing (`nnunet_stage_strides`; for BraTS 3d_fullres's
    128^3: 6 stages, strides 1, 2, 2, 2, 2, 2), features 32, 64, 128, 256, 320, 320.., kernel 3, conv bias,
    InstanceNorm3d(affine), LeakyReLU.
    """
    import torch.nn as nn

    if "_compiled" in name:
        import torch

        plain = _uncompiled_name(name)
        inductor = compile_backend == "inductor"
        options = {"force_layout_optimization": True} if "_compiled_cl" in name and inductor else None
        mode = "reduce-overhead" if "_compiled_cg" in name and inductor else None
        if compile_options and inductor:
            from torch._inductor import list_mode_options

            # torch.compile takes a mode or options, not both: the mode's options, then these
            options = {**(list_mode_options(mode) if mode else {}), **(options or {}), **compile_options}
            mode = None
        # static shapes: the patch inference (1 tile) and batched mirroring (8) each get their own graph, rather
        # than a recompile with a dynamic batch size
        return torch.compile(build_network(plain, in_channels, out_channels, segmamba_width, patch=patch),
                             backend=compile_backend, mode=mode, options=options, dynamic=False)
    if name.startswith("segmamba"):
        from .networks.segmamba import SegMamba

        w = segmamba_width
        variant = name.split("[")[0].split("_")[1:]  # segmamba_cl_recompute[triton] -> ["cl", "recompute"]
        net = SegMamba(in_channels, out_channels, feat_size=(w, 2 * w, 4 * w, 8 * w), hidden_size=16 * w,
                        mixer="none" if "nomamba" in variant else "tom",
                        gradient_checkpointing="ckpt" in variant,
                        recompute_mamba_branches="recompute" in variant,
                        # None: the network's default, recomputed on a GPU
                        recompute_conv_blocks=False if "keep" in variant else None,
                        stack_mamba_directions=True if "stacked" in variant else False if "unstacked" in variant
                        else None,
                        scan_backend=_backend_of(name) or "auto")
        if "cl16" in variant:
            from .training.inference import half_precision_convs

            return _ChannelsLast3d(half_precision_convs(net))
        return _ChannelsLast3d(net) if "cl" in variant else net
    if name in ("plainconv", "resenc_m"):
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

        strides = nnunet_stage_strides(patch)
        n = len(strides)
        features = [min(32 * 2 ** i, 320) for i in range(n)]
        plan = dict(input_channels=in_channels, n_stages=n, features_per_stage=features, conv_op=nn.Conv3d,
                    kernel_sizes=3, strides=strides, num_classes=out_channels, conv_bias=True,
                    norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                    nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
        if name == "plainconv":
            return PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=2, **plan)
        return ResidualEncoderUNet(n_blocks_per_stage=(1, 3, 4, 6, 6, 6)[:n], n_conv_per_stage_decoder=1, **plan)
    if name == "swinunetr":
        from monai.networks.nets import SwinUNETR

        return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=48)
    raise ValueError(f"unknown network {name!r}; choose from {', '.join(KNOWN_NETWORKS)}")


def _ChannelsLast3d(net):
    """`net` with its weights, and every input, in torch.channels_last_3d."""
    import torch

    class ChannelsLast3d(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.net = inner.to(memory_format=torch.channels_last_3d)

        def forward(self, x):
            return self.net(x.contiguous(memory_format=torch.channels_last_3d))

    return ChannelsLast3d(net)


def _backend_of(name: str) -> str | None:
    return name[name.index("[") + 1:-1] if name.startswith("segmamba") and "[" in name else None


# ----------------------------------------------------------------------------------------------- timing helpers

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> dict[str, float | None]:
    import torch

    if device.type != "cuda":
        return {"peak_gib": None, "peak_reserved_gib": None}
    return {"peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_held_by(fn: Callable[[], Any], device) -> tuple[Any, int]:
    """(fn(), the bytes fn allocated on `device` and still holds when it returns): from the caching allocator on
    CUDA, from the profiler's memory events on the CPU (which has no allocator statistics). For a forward pass
    that is its output and all that is kept for the backward, whoever keeps it."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, sum(event.self_cpu_memory_usage for event in prof.key_averages())


def time_calls(fn: Callable[[], Any], device, warmup: int, iters: int,
               after_warmup: Callable[[], None] | None = None,
               after_first_call: Callable[[], None] | None = None) -> dict[str, float]:
    """Median/min/max milliseconds of `iters` calls after `warmup`: CUDA events on a GPU, perf_counter on the CPU;
    and the first warm-up call's wall time (`first_call_ms`, None without warm-up), which holds the compile of a
    torch.compile'd network. `after_first_call` runs after the first warm-up call, `after_warmup` between the
    warm-up and the timed calls."""
    import torch

    first_ms = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:  # under torch.compile the compile happens here
            _sync(device)
            first_ms = (time.perf_counter() - t0) * 1e3
            if after_first_call is not None:
                after_first_call()
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "iters": iters,
            "warmup": warmup, "first_call_ms": first_ms}


# ----------------------------------------------------------------------------------------------- phases

def uses_fused_sgd(name: str, device) -> bool:
    """Whether the network's trainer steps SGD with its fused kernel: ours do wherever a GradScaler runs (CUDA),
    nnU-Net's trainer keeps torch's default (foreach) for its networks, and so do MONAI's."""
    return device.type == "cuda" and name.startswith("segmamba")


def training_step(model, device, batch: int, patch: Sequence[int], in_channels: int, out_channels: int,
                  amp: bool, fused_sgd: bool = False) -> tuple[Callable[[], Any], Any]:
    """nnU-Net's train_step on fixed random data, as a closure (step(), the GradScaler): zero_grad, forward and
    BCE loss under fp16 autocast, scaled backward, unscale, gradient-norm clip, SGD step (`fused_sgd`: the fused
    kernel, the same update, with the unscale and clip in its pass as our trainers run it: `amp_step`)."""
    import torch

    from nnunet_segmamba.training.amp_step import scaled_sgd_step

    optimizer = torch.optim.SGD(model.parameters(), **SGD_KWARGS, **({"fused": True} if fused_sgd else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    data = torch.randn(batch, in_channels, *patch, device=device)
    target = (torch.rand(batch, out_channels, *patch, device=device) > 0.5).float()

    def step():
        # one training iteration for torch.compile's CUDA graphs (mode="reduce-overhead"); a no-op without them
        torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(model(data), target)
        scaler.scale(loss).backward()
        scaled_sgd_step(optimizer, scaler, GRAD_CLIP)  # nnU-Net's unscale_, clip, step and update
        return loss.detach()

    return step, scaler


def time_training(model, device, batch: int, patch: Sequence[int], in_channels: int, out_channels: int, amp: bool,
                  warmup: int, iters: int, fused_sgd: bool = False) -> dict[str, Any]:
    """nnU-Net's train_step on random data: step time and peak memory, over the whole run (`peak_gib`, what a GPU
    must hold, compile and cuDNN's algorithm search in the first step included), after the first step
    (`peak_after_first_step_gib`: what the training steps hold, CUDA graphs' recording included, whatever ran
    before in the process) and over the timed steps alone (`peak_after_warmup_gib`; with CUDA graphs only what
    the replays allocate outside the graphs' pool)."""
    model.train()
    step, scaler = training_step(model, device, batch, patch, in_channels, out_channels, amp, fused_sgd)
    losses = []
    first_peak, warmup_peak = {}, {}

    def close_phase(store: dict) -> Callable[[], None]:
        """The peak since the last reset into `store`, then a reset for the next phase."""
        def close():
            store.update(_peak(device))
            _reset_peak(device)
        return close

    def highest(*values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    try:
        _sync(device)
        _reset_peak(device)
        result = time_calls(lambda: losses.append(step()), device, warmup, iters,
                            after_warmup=close_phase(warmup_peak), after_first_call=close_phase(first_peak))
        timed_peak = _peak(device)
        result.update({key: highest(value, warmup_peak.get(key), first_peak.get(key))
                       for key, value in timed_peak.items()})
        result["peak_after_first_step_gib"] = (highest(timed_peak["peak_gib"], warmup_peak.get("peak_gib"))
                                               if first_peak else None)
        result["peak_after_warmup_gib"] = timed_peak["peak_gib"]
        result["loss_last"] = float(losses[-1]) if losses else None
        result["grad_scale"] = float(scaler.get_scale()) if amp else None
        result["sgd"] = "fused" if fused_sgd else "default"
        return result
    finally:
        model.zero_grad(set_to_none=True)


def tile_forward(model, device, patch: Sequence[int], in_channels: int, amp: bool,
                 batch: int = 1) -> Callable[[], Any]:
    """One forward pass of a random (batch, C, *patch) tile in eval and inference mode, under fp16 autocast when
    `amp`, as a callable (the benchmark's patch inference; `benchmarks.profile_step_gpu --inference`)."""
    import torch

    model.eval()
    x = torch.randn(batch, in_channels, *patch, device=device)

    def forward():
        torch.compiler.cudagraph_mark_step_begin()  # a new inference step for a CUDA-graph network; else a no-op
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            return model(x)

    return forward


def time_patch_inference(model, device, patch: Sequence[int], in_channels: int, amp: bool, warmup: int,
                         iters: int) -> dict[str, Any]:
    """One forward pass of a (1, C, *patch) tile, no gradients."""
    return time_calls(tile_forward(model, device, patch, in_channels, amp), device, warmup, iters)


def tile_layout(volume: Sequence[int], patch: Sequence[int], step: float = 0.5) -> dict[str, Any]:
    """Tile start positions per axis of MONAI's sliding window (overlap 1 - step) and of nnU-Net's predictor.

    Both pad an image smaller than the patch up to the patch size. MONAI steps by int(patch * step) and shifts the
    last tile back to the border; nnU-Net takes the same number of tiles per axis, ceil((size - patch) /
    (patch * step)) + 1, but spreads them evenly. The counts agree; the positions can differ by a few voxels.
    """
    from monai.data.utils import dense_patch_slices

    padded = [max(v, p) for v, p in zip(volume, patch)]
    overlap = 1.0 - step
    # monai.inferers.utils._get_scan_interval
    interval = [p if p == s else max(int(p * (1 - overlap)), 1) for p, s in zip(patch, padded)]
    slices = dense_patch_slices(padded, patch, interval, return_slice=False)
    monai_starts = [sorted({int(tile[d][0]) for tile in slices}) for d in range(len(patch))]
    try:  # for the record only: a run of the SegMamba variants alone needs no nnU-Net
        from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    except ImportError:
        nnunet_starts = None
    else:
        nnunet_starts = [[int(s) for s in axis] for axis in compute_steps_for_sliding_window(padded, patch, step)]
    return {"padded_size": padded, "monai_starts": monai_starts, "nnunet_starts": nnunet_starts,
            "tiles_monai": len(slices),
            "tiles_nnunet": math.prod(len(a) for a in nnunet_starts) if nnunet_starts else None,
            "vs_nnunet": NNUNET_DIFFERENCES}


def time_volume_inference(model, device, volume: Sequence[int], patch: Sequence[int], in_channels: int, amp: bool,
                          step: float = 0.5, warmup_passes: int = 0,
                          batched_mirroring: bool = False) -> dict[str, Any]:
    """Sliding-window inference with mirror TTA over one random (1, C, *volume) image, timed once after
    `warmup_passes` untimed passes over it: a compiled network's first pass held work beyond its forwards, most
    likely compiles (PlainConvUNet compiled took 10.4 s for it against 1.95 s eager; docs/performance.md).
    `batched_mirroring`: each tile's 8 flips in one forward pass (`mirror_mean(batched=True)`)."""
    import torch
    from monai.inferers import sliding_window_inference

    from .training.inference import mirror_mean

    model.eval()
    image = torch.randn(1, in_channels, *volume, device=device)
    tiles = 0

    def predictor(tile):
        nonlocal tiles
        tiles += tile.shape[0]
        torch.compiler.cudagraph_mark_step_begin()  # a new inference step for a CUDA-graph network; else a no-op
        return mirror_mean(model, tile, (2, 3, 4), batched=batched_mirroring)

    def sliding_window():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            return sliding_window_inference(image, list(patch), sw_batch_size=1, predictor=predictor,
                                            overlap=1.0 - step, mode="gaussian", sigma_scale=0.125)

    for _ in range(warmup_passes):
        sliding_window()
    tiles = 0
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    logits = sliding_window()
    _sync(device)
    seconds = time.perf_counter() - t0
    finite = bool(torch.isfinite(logits).all())
    return {"seconds": seconds, "tiles": tiles, "forward_passes": tiles * (1 if batched_mirroring else 8),
            "output_finite": finite, "warmup_passes": warmup_passes, "batched_mirroring": batched_mirroring,
            **_peak(device)}


def compare_backends(model, x, fast: str = "cuda", reference: str = "torch") -> dict[str, Any]:
    """One model's output on scan backend `fast` against `reference`, both under fp16 autocast, on input x.

    Differences are relative to the output scale (max |reference output|). The yardstick for "fp16 rounding" is
    the reference backend under fp16 autocast against itself in float32: the check passes when
    rel_max(fast, reference) <= 2 * rel_max(reference fp16, reference fp32) + 1e-3.
    """
    import torch

    from .nn import set_scan_backend

    outs = {}
    for key, backend, amp in (("fast", fast, True), ("reference", reference, True), ("reference_fp32", reference,
                                                                                      False)):
        set_scan_backend(model, backend)
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            outs[key] = model(x).float()

    def rel(a, b):
        return {"rel_max": float((a - b).abs().max() / b.abs().max()),
                "rel_l2": float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))}

    result = {"fast": fast, "reference": reference, "output_scale": float(outs["reference"].abs().max()),
              "fast_vs_reference": rel(outs["fast"], outs["reference"]),
              "reference_fp16_vs_fp32": rel(outs["reference"], outs["reference_fp32"]),
              "fast_vs_reference_fp32": rel(outs["fast"], outs["reference_fp32"]),
              "finite": all(bool(torch.isfinite(o).all()) for o in outs.values())}
    result["tolerance_rel_max"] = 2 * result["reference_fp16_vs_fp32"]["rel_max"] + 1e-3
    result["within_fp16_rounding"] = (result["finite"]
                                      and result["fast_vs_reference"]["rel_max"] <= result["tolerance_rel_max"])
    return result


def check_equivalence(device, patch: Sequence[int], in_channels: int, out_channels: int, segmamba_width: int,
                      log: Log = _print, fast: str = "cuda") -> dict[str, Any]:
    """SegMamba (seeded weights, one random (1, C, *patch) input): the `fast` scan backend ("cuda" or "triton")
    against `torch`.

    Skipped (status "skipped" with the reason) unless the device is CUDA and the backend's kernels load.
    See `compare_backends` for the metrics and the tolerance.
    """
    import torch

    from .ssm import dispatch

    usable, reason = dispatch.cuda_scan_status() if fast == "cuda" else dispatch.triton_scan_status()
    if device.type != "cuda" or not usable:
        why = "needs --device cuda" if device.type != "cuda" else reason
        log(f"[equivalence] skipped: {why}")
        return {"status": "skipped", "reason": why}
    log(f"[equivalence] SegMamba(width {segmamba_width}) on (1, {in_channels}, {'x'.join(map(str, patch))}): "
        f"{fast} vs torch scan backend, fp16 autocast")
    torch.manual_seed(0)
    model = build_network(f"segmamba[{fast}]", in_channels, out_channels, segmamba_width).to(device).eval()
    x = torch.randn(1, in_channels, *patch, device=device)
    result = {"status": "ok", "patch": list(patch), "segmamba_width": segmamba_width,
              **compare_backends(model, x, fast, "torch")}
    del model, x
    _free(device)
    log(f"[equivalence] {fast} vs torch rel max {result['fast_vs_reference']['rel_max']:.2e} "
        f"(tolerance {result['tolerance_rel_max']:.2e}): {'ok' if result['within_fp16_rounding'] else 'MISMATCH'}")
    return result


# ----------------------------------------------------------------------------------------------- the run

def _guarded(phase: Callable[[], dict], device, log: Log, label: str):
    """Run one phase; out-of-memory gives "OOM", another error {"error": ...}; memory is freed either way."""
    import torch

    try:
        return phase()
    except Exception as exc:  # one broken network must not cost the GPU run of the others
        # cuDNN and some kernels report an allocation failure as a plain RuntimeError
        if isinstance(exc, torch.cuda.OutOfMemoryError) or any(
                text in str(exc) for text in ("out of memory", "CUDNN_STATUS_ALLOC_FAILED")):
            log(f"{label}: out of memory")
            result: Any = "OOM"
        else:
            traceback.print_exc()
            log(f"{label}: failed ({type(exc).__name__}: {exc})")
            result = {"error": f"{type(exc).__name__}: {exc}"}
    _free(device)  # outside the except block, so the traceback's frames (and their tensors) are gone
    return result


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in ("torch", "monai", "nnunetv2", "dynamic-network-architectures", "mamba-ssm", "causal-conv1d"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _check_sizes(name: str, value: Sequence[int]) -> tuple[int, int, int]:
    value = tuple(int(v) for v in value)
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"{name} needs three positive sizes (D, H, W), got {value}")
    return value


def run_benchmark(networks: Sequence[str] = NETWORKS, device: str = "auto", batch: int = 2,
                  patch: Sequence[int] = (128, 128, 128), volume: Sequence[int] = (240, 240, 155),
                  in_channels: int = 4, out_channels: int = 3, train: bool = True, inference: bool = True,
                  warmup: int = 5, iters: int = 20, precision: str = "auto", segmamba_width: int = 48,
                  equivalence: bool = False, step: float = 0.5, command: str | None = None,
                  out: str | Path | None = None, log: Log = _print,
                  compile_backend: str = "inductor", batched_mirroring: bool = False,
                  compile_options: dict[str, Any] | None = None,
                  cudnn_benchmark_limit: int | None = None) -> dict[str, Any]:
    """Benchmark `networks` in this process; returns (and writes to `out` as JSON) the results.

    Args:
        networks: names from NETWORKS, run in this order.
        device: "cuda", "cpu" or "auto" (cuda where available).
        batch: training batch size.
        patch: training patch and inference tile size (D, H, W).
        volume: size of the image for sliding-window inference (D, H, W).
        in_channels, out_channels: input channels and region outputs.
        train, inference: run the training / the inference phases.
        warmup, iters: untimed and timed repetitions of the training step and of the patch inference.
        precision: "fp16" (autocast + GradScaler), "fp32", or "auto" (fp16 on CUDA, fp32 on the CPU, as nnU-Net).
        segmamba_width: channels of SegMamba's first stage (48 is the reference).
        equivalence: compare SegMamba's cuda and torch scan backends (CUDA only).
        step: sliding-window tile step as a fraction of the patch (nnU-Net's tile_step_size; overlap = 1 - step).
        compile_backend: torch.compile backend of the `_compiled` networks ("inductor", nnU-Net's; "aot_eager"
            traces without generating code, for quick checks).
        compile_options: inductor options added to every `_compiled` network's (`parse_compile_options`), to
            compare them in one run, e.g. {"max_autotune_gemm": True}.
        batched_mirroring: the volume inference runs each tile's 8 mirrorings as one forward pass of 8 tiles
            instead of 8 passes of one (the same mean); needed for `_compiled_cg` networks' volume inference.
        cudnn_benchmark_limit: on CUDA, how many of cuDNN's algorithms its search times per convolution
            (torch.backends.cudnn.benchmark_limit; 0: all of them); None leaves torch's setting (10 by default),
            as nnU-Net trains. cuDNN keeps a choice for the process's lifetime, so compare limits in separate runs.
        command: the command line, recorded as given.
        out: JSON file to write.
        log: progress printer.

    Returns:
        {"command", "device", "gpu", "cpu", "versions", "settings", "sliding_window", "networks": {name: {...}},
        "equivalence", "table"}. Per network: "params", and per phase ("train", "patch_inference",
        "volume_inference") a dict of numbers, "OOM", {"error": ...} or None (not run); or {"skipped": reason}.
    """
    import torch

    from .devices import check_cudnn_benchmark_limit, resolve_device
    from .ssm import dispatch, mamba_ssm_kernels

    unknown = [n for n in networks if n not in KNOWN_NETWORKS]
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}; choose from {', '.join(KNOWN_NETWORKS)}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    check_cudnn_benchmark_limit(cudnn_benchmark_limit)
    if precision not in ("auto", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, fp16 or fp32, got {precision!r}")
    if batch < 1 or warmup < 0 or iters < 1 or segmamba_width < 1 or min(in_channels, out_channels) < 1 \
            or not 0 < step <= 1:
        raise ValueError(f"need batch, iters, segmamba_width, in/out channels >= 1, warmup >= 0 and 0 < step <= 1; "
                         f"got batch={batch}, warmup={warmup}, iters={iters}, segmamba_width={segmamba_width}, "
                         f"in_channels={in_channels}, out_channels={out_channels}, step={step}")
    patch, volume = _check_sizes("patch", patch), _check_sizes("volume", volume)
    dev = resolve_device(device)
    amp = precision == "fp16" or (precision == "auto" and dev.type == "cuda")
    cuda_ok, cuda_reason = dispatch.cuda_scan_status()

    report: dict[str, Any] = {
        "command": command, "device": dev.type,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "versions": _versions(), "torch_cuda": torch.version.cuda,
        "scan_backend_cuda": {"available": cuda_ok, "reason": cuda_reason,
                              "causal_conv1d": mamba_ssm_kernels.causal_conv1d_function()[0] is not None},
        "scan_backend_triton": dict(zip(("available", "reason"), dispatch.triton_scan_status())),
        "settings": {"batch": batch, "patch": list(patch), "volume": list(volume), "in_channels": in_channels,
                     "out_channels": out_channels, "precision": "fp16" if amp else "fp32", "warmup": warmup,
                     "iters": iters, "segmamba_width": segmamba_width, "train": train, "inference": inference,
                     "optimizer": {"SGD": SGD_KWARGS, "grad_clip": GRAD_CLIP}, "loss": "BCEWithLogits",
                     "tile_step": step, "sw_batch_size": 1, "blend": "gaussian, sigma 0.125 * patch",
                     "mirror_axes": [2, 3, 4], "batched_mirroring": batched_mirroring,
                     "cudnn_benchmark": dev.type == "cuda",
                     "cudnn_benchmark_limit": (cudnn_benchmark_limit if cudnn_benchmark_limit is not None
                                               else torch.backends.cudnn.benchmark_limit),
                     "compile_backend": compile_backend, "compile_options": compile_options or {}},
        "sliding_window": tile_layout(volume, patch, step),
        "networks": {},
    }
    log(f"benchmark on {report['gpu'] or 'CPU'} (torch {torch.__version__}, precision "
        f"{report['settings']['precision']}); networks: {', '.join(networks)}")
    old_cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit
    torch.backends.cudnn.benchmark = dev.type == "cuda"  # as nnU-Net's training
    if cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = cudnn_benchmark_limit
    try:
        # first: cheap, and what the cuda backend's numbers rest on
        report["equivalence"] = (
            _guarded(lambda: check_equivalence(dev, patch, in_channels, out_channels, segmamba_width, log), dev,
                     log, "[equivalence]") if equivalence else None)
        report["equivalence_triton"] = (
            _guarded(lambda: check_equivalence(dev, patch, in_channels, out_channels, segmamba_width, log, "triton"),
                     dev, log, "[equivalence triton]") if equivalence else None)
        for name in networks:
            report["networks"][name] = _bench_one(name, dev, amp, batch, patch, volume, in_channels, out_channels,
                                                  train, inference, warmup, iters, segmamba_width, step,
                                                  report["sliding_window"]["tiles_monai"], cuda_ok, cuda_reason,
                                                  log, compile_backend, batched_mirroring, compile_options)
            if out is not None:  # partial results survive a run killed by a time limit
                _write(out, report)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = old_cudnn
    report["table"] = format_table(report)
    log(report["table"])
    if out is not None:
        _write(out, report)
        log(f"wrote {out}")
    return report


def _write(path: str | Path, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def _bench_one(name, dev, amp, batch, patch, volume, in_channels, out_channels, train, inference, warmup, iters,
               segmamba_width, step, tiles, cuda_ok, cuda_reason, log, compile_backend="inductor",
               batched_mirroring=False, compile_options=None) -> dict[str, Any]:
    import torch

    from .ssm import dispatch

    backend = _backend_of(name)
    triton_ok, triton_reason = dispatch.triton_scan_status()
    if backend in ("cuda", "triton") and (dev.type != "cuda" or not (cuda_ok if backend == "cuda" else triton_ok)):
        why = "needs --device cuda" if dev.type != "cuda" else (cuda_reason if backend == "cuda" else triton_reason)
        log(f"[{name}] skipped: {why}")
        return {"skipped": why}
    entry: dict[str, Any] = {"params": None, "scan_backend": backend, "train": None, "patch_inference": None,
                             "volume_inference": None}
    log(f"[{name}] building")
    torch.manual_seed(0)
    model = build_network(name, in_channels, out_channels, segmamba_width, compile_backend, patch, compile_options)
    entry["params"] = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {entry['params'] / 1e6:.2f} M parameters")

    # not `model.to(dev) and ...`: a compiled module's truth value asks for len(), which it refuses
    moved = _guarded(lambda: (model.to(dev), {"ok": True})[1], dev, log, f"[{name}] to {dev.type}")
    if not (isinstance(moved, dict) and moved.get("ok")):  # "OOM" or {"error": ...}: every phase gets it
        entry["train"] = entry["patch_inference"] = entry["volume_inference"] = moved
    else:
        if train and "cl16" in name:
            entry["train"] = {"skipped": "inference only (float16 weights)"}
        elif train:
            log(f"[{name}] train: {warmup} warm-up + {iters} timed steps, batch {batch}")
            entry["train"] = _guarded(lambda: time_training(model, dev, batch, patch, in_channels, out_channels,
                                                            amp, warmup, iters, uses_fused_sgd(name, dev)),
                                      dev, log, f"[{name}] train")
            _report_phase(log, name, "train", entry["train"], "ms_median", "ms/step")
        if inference:
            log(f"[{name}] patch inference: {warmup} warm-up + {iters} timed passes")
            entry["patch_inference"] = _guarded(
                lambda: time_patch_inference(model, dev, patch, in_channels, amp, warmup, iters),
                dev, log, f"[{name}] patch inference")
            _report_phase(log, name, "patch inference", entry["patch_inference"], "ms_median", "ms")
            if "_compiled_cg" in name and not batched_mirroring:
                # a CUDA-graph network's next replay overwrites the output that per-flip mirroring still adds to
                entry["volume_inference"] = {"skipped": "a CUDA-graph network needs --batched-mirroring"}
                log(f"[{name}] volume inference skipped: {entry['volume_inference']['skipped']}")
            else:
                # a compiled network's first pass over the volume is not its inference time: an untimed pass first
                volume_warmup = 1 if "_compiled" in name else 0
                log(f"[{name}] volume inference: {'x'.join(map(str, volume))}, {tiles} tiles x 8 mirrorings"
                    + (" (one forward pass of 8 per tile)" if batched_mirroring else "")
                    + (", after an untimed pass" if volume_warmup else ""))
                entry["volume_inference"] = _guarded(
                    lambda: time_volume_inference(model, dev, volume, patch, in_channels, amp, step,
                                                  warmup_passes=volume_warmup, batched_mirroring=batched_mirroring),
                    dev, log, f"[{name}] volume inference")
                _report_phase(log, name, "volume inference", entry["volume_inference"], "seconds", "s")
    del model
    _free(dev)
    return entry


def _report_phase(log: Log, name: str, phase: str, result, key: str, unit: str) -> None:
    if isinstance(result, dict) and key in result:
        peak = result.get("peak_gib")
        log(f"[{name}] {phase}: {result[key]:.4g} {unit}" + (f", peak {peak:.2f} GiB" if peak is not None else ""))


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of the results, headed by the device, versions and the command line."""
    def cell(phase, key, fmt):
        if phase is None:
            return "-"
        if phase == "OOM":
            return "OOM"
        if "error" in phase:
            return "error"
        if "skipped" in phase:
            return "skipped"
        return "n/a" if phase.get(key) is None else format(phase[key], fmt)

    sw = report["sliding_window"]
    lines = [
        f"device: {report['gpu'] or 'CPU ' + report['cpu']}; torch {report['versions']['torch']} "
        f"(CUDA {report['torch_cuda']}); monai {report['versions']['monai']}; precision "
        f"{report['settings']['precision']}",
        f"command: {report['command']}",
        f"settings: batch {report['settings']['batch']}, patch {'x'.join(map(str, report['settings']['patch']))}, "
        f"volume {'x'.join(map(str, report['settings']['volume']))}; tiles MONAI {sw['tiles_monai']} / nnU-Net "
        f"{sw['tiles_nnunet']}" + ("; each tile's 8 mirrorings in one forward pass"
                                   if report["settings"].get("batched_mirroring") else ""),
        "",
        "| network | params | train step ms | train peak GiB | same, after the first step | patch fwd ms "
        "| volume inference s | tiles | inference peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["networks"].items():
        if "skipped" in e:
            lines.append(f"| {name} | skipped: {e['skipped']} | | | | | | | |")
            continue
        vol = e["volume_inference"]
        tiles = f"{vol['tiles']} / {sw['tiles_nnunet']}" if isinstance(vol, dict) and "tiles" in vol else "-"
        lines.append(f"| {name} | {e['params'] / 1e6:.2f} M | {cell(e['train'], 'ms_median', '.1f')} | "
                     f"{cell(e['train'], 'peak_gib', '.2f')} | "
                     f"{cell(e['train'], 'peak_after_first_step_gib', '.2f')} | "
                     f"{cell(e['patch_inference'], 'ms_median', '.1f')} | "
                     f"{cell(vol, 'seconds', '.2f')} | {tiles} | {cell(vol, 'peak_gib', '.2f')} |")
    for key, fast in (("equivalence", "cuda"), ("equivalence_triton", "triton")):
        eq = report.get(key)
        if eq == "OOM" or (isinstance(eq, dict) and "error" in eq):
            lines.append(f"\nequivalence ({fast}): {eq if eq == 'OOM' else eq['error']}")
        elif eq and eq.get("status") == "ok":
            lines.append(f"\nequivalence (SegMamba {fast} vs torch scan, fp16): rel max diff "
                         f"{eq['fast_vs_reference']['rel_max']:.2e}, tolerance {eq['tolerance_rel_max']:.2e} -> "
                         f"{'within fp16 rounding' if eq['within_fp16_rounding'] else 'MISMATCH'}")
        elif eq:
            lines.append(f"\nequivalence ({fast}): {eq['status']} ({eq.get('reason', '')})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command line

def parse_sizes(text: str) -> tuple[int, int, int]:
    """"N" (a cube) or "D,H,W" (also "DxHxW") -> (D, H, W), for --patch and --volume."""
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or D,H,W (integers), got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or D,H,W (positive integers), got {text!r}")
    return tuple(values)


def parse_compile_options(text: str) -> dict[str, Any]:
    """"key=value,key=value" -> inductor's options for --compile-options: true/false as booleans, integers as
    integers, the rest as text; each key checked against inductor's config."""
    from torch._inductor import config

    known = config.get_config_copy()
    options: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {item!r}")
        if key not in known:
            raise argparse.ArgumentTypeError(f"{key!r} is not an inductor option; "
                                             "torch._inductor.list_options() names them")
        lowered = value.lower()
        options[key] = (lowered == "true" if lowered in ("true", "false")
                        else int(value) if value.lstrip("-").isdigit() else value)
    return options


def _network_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN_NETWORKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown network(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(KNOWN_NETWORKS)}")
    return names


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="time training step, peak memory and sliding-window inference of SegMamba and peers",
        description="Benchmark SegMamba (per scan backend), its no-Mamba ablation, nnU-Net's PlainConvUNet and "
                    "ResEnc-M and MONAI's SwinUNETR in one process at one setting (default: the paper's, batch 2, "
                    "4x128^3, 3 outputs, fp16). Prints a markdown table; --out writes the JSON. Out of memory is "
                    "recorded as OOM and the run goes on.")
    p.add_argument("--networks", type=_network_list, default=list(NETWORKS),
                   help="comma-separated, in run order (quote it: brackets); default all of: "
                        + "; ".join(f"{k} = {v}" for k, v in NETWORK_HELP.items()))
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="device (default auto: cuda where available)")
    p.add_argument("--batch", type=int, default=2, help="training batch size (default 2)")
    p.add_argument("--patch", type=parse_sizes, default=(128, 128, 128),
                   help="training patch and inference tile, N or D,H,W (default 128); SegMamba needs more than one "
                        "voxel after 16x downsampling, the nnU-Net networks after 32x (e.g. 64,32,32)")
    p.add_argument("--volume", type=parse_sizes, default=(240, 240, 155),
                   help="image size for sliding-window inference, D,H,W (default 240,240,155, BraTS)")
    p.add_argument("--in-channels", type=int, default=4, help="input channels (default 4)")
    p.add_argument("--out-channels", type=int, default=3, help="output channels / regions (default 3)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step phase")
    p.add_argument("--no-inference", action="store_true", help="skip the patch and volume inference phases")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up repetitions per phase (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions per phase, median reported (default 20)")
    p.add_argument("--precision", choices=("auto", "fp16", "fp32"), default="auto",
                   help="fp16 autocast + GradScaler or fp32 (default auto: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--segmamba-width", type=int, default=48,
                   help="SegMamba first-stage channels; stages w,2w,4w,8w, bottleneck 16w (default 48, the paper)")
    p.add_argument("--step", type=float, default=0.5,
                   help="sliding-window tile step as a fraction of the patch, nnU-Net's tile_step_size (default 0.5)")
    p.add_argument("--equivalence", action="store_true",
                   help="also compare SegMamba's output on the cuda and torch scan backends under fp16 (CUDA only)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the *_compiled networks (default inductor, as nnU-Net; "
                        "aot_eager traces without generating code)")
    p.add_argument("--compile-options", type=parse_compile_options, default=None, metavar="KEY=VALUE,...",
                   help="inductor options added to every *_compiled network's, e.g. max_autotune_gemm=true "
                        "(values true/false, integers or text; keys as torch._inductor.list_options() names them)")
    p.add_argument("--batched-mirroring", action="store_true",
                   help="volume inference: each tile's 8 mirrorings as one forward pass of 8 tiles (the same mean; "
                        "CUDA-graph networks need it)")
    p.add_argument("--cudnn-benchmark-limit", type=int, default=None, metavar="N",
                   help="CUDA: cuDNN's algorithms timed per convolution by its search (0: all; default torch's, 10, "
                        "as nnU-Net trains); cuDNN keeps its choice per process, so compare limits in separate runs")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = run_benchmark(
        networks=args.networks, device=args.device, batch=args.batch, patch=args.patch, volume=args.volume,
        in_channels=args.in_channels, out_channels=args.out_channels, train=not args.no_train,
        inference=not args.no_inference, warmup=args.warmup, iters=args.iters, precision=args.precision,
        segmamba_width=args.segmamba_width, equivalence=args.equivalence, step=args.step,
        command=args.command_line, out=args.out, compile_backend=args.compile_backend,
        batched_mirroring=args.batched_mirroring, compile_options=args.compile_options,
        cudnn_benchmark_limit=args.cudnn_benchmark_limit,
    )
    failed = any(isinstance(phase, dict) and "error" in phase
                 for e in report["networks"].values() for phase in e.values())
    eq_failed = any(isinstance(eq, dict) and ("error" in eq
                                              or (eq.get("status") == "ok" and not eq["within_fp16_rounding"]))
                    for eq in (report.get("equivalence"), report.get("equivalence_triton")))
    return 1 if failed or eq_failed else 0
