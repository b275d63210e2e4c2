"""`nnunet-segmamba benchmark` on the CPU at tiny settings: JSON structure, finite numbers, tile counts, OOM handling.

No timing thresholds: the numbers are only checked to be positive and finite.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch

from nnunet_segmamba import benchmark, cli
from nnunet_segmamba.ssm import dispatch

PHASES = ("train", "patch_inference", "volume_inference")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # two OpenMP threads on a shared two-core machine run these tiny convolutions up to 10x slower than one
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cli_cpu_run_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # 64x32x32: nnU-Net's plan for it has 4 stages (three halvings of every axis)
    rc = cli.main(["benchmark", "--device", "cpu", "--batch", "1", "--patch", "64,32,32", "--volume", "64,32,24",
                   "--warmup", "1", "--iters", "2", "--segmamba-width", "4", "--equivalence",
                   "--networks", "segmamba[cuda],segmamba[torch],segmamba_nomamba,plainconv", "--out", str(out),
                   "--compile-options", "max_autotune_gemm=true"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert {"command", "device", "gpu", "versions", "settings", "sliding_window", "networks", "equivalence",
            "table"} <= set(report)
    assert report["device"] == "cpu" and report["gpu"] is None
    # the command as typed, whatever the interpreter's own argv (pytest's here)
    assert report["command"].startswith("nnunet-segmamba benchmark --device cpu --batch 1 --patch 64,32,32 ")
    assert report["command"].endswith(f"--out {out} --compile-options max_autotune_gemm=true")
    assert report["settings"]["precision"] == "fp32"
    assert report["settings"]["compile_options"] == {"max_autotune_gemm": True}  # recorded (no _compiled here)
    assert report["settings"]["cudnn_benchmark_limit"] == torch.backends.cudnn.benchmark_limit  # torch's, untouched
    assert report["settings"]["patch"] == [64, 32, 32] and report["settings"]["volume"] == [64, 32, 24]
    sw = report["sliding_window"]
    assert sw["tiles_monai"] == sw["tiles_nnunet"] == 1  # 24 is padded to the patch's 32 (several tiles: below)
    assert report["equivalence"]["status"] == "skipped"

    networks = report["networks"]
    assert list(networks) == ["segmamba[cuda]", "segmamba[torch]", "segmamba_nomamba", "plainconv"]  # as given
    assert "skipped" in networks["segmamba[cuda]"]  # CPU device (and no mamba-ssm here)
    params = {name: networks[name]["params"] for name in ("segmamba[torch]", "segmamba_nomamba", "plainconv")}
    plan_for_the_patch = benchmark.build_network("plainconv", 4, 3, patch=(64, 32, 32))
    assert params["plainconv"] == sum(p.numel() for p in plan_for_the_patch.parameters())
    assert 0 < params["segmamba_nomamba"] < params["segmamba[torch]"]
    for name in params:
        entry = networks[name]
        for phase in PHASES:
            assert isinstance(entry[phase], dict), (name, phase, entry[phase])
        train, patch, volume = entry["train"], entry["patch_inference"], entry["volume_inference"]
        assert train["iters"] == 2 and train["warmup"] == 1
        assert all(_positive(train[k]) for k in ("ms_median", "ms_min", "ms_max", "loss_last"))
        assert train["ms_min"] <= train["ms_median"] <= train["ms_max"]
        assert train["peak_gib"] is None and train["grad_scale"] is None  # CPU, fp32
        assert _positive(patch["ms_median"])
        assert _positive(volume["seconds"]) and volume["output_finite"]
        assert volume["tiles"] == sw["tiles_monai"] and volume["forward_passes"] == 8 * volume["tiles"]
        assert volume["peak_gib"] is None
        assert f"| {name} |" in printed
    for phase in ("train:", "patch inference:", "volume inference:"):
        assert f"[plainconv] {phase}" in printed
    assert report["table"] in printed


def test_brats_volume_tiles_match_nnunet():
    layout = benchmark.tile_layout((240, 240, 155), (128, 128, 128), 0.5)
    assert layout["tiles_monai"] == layout["tiles_nnunet"] == 18
    assert layout["monai_starts"] == [[0, 64, 112], [0, 64, 112], [0, 27]]
    assert layout["nnunet_starts"] == [[0, 56, 112], [0, 56, 112], [0, 27]]


def test_volume_inference_counts_monai_tiles():
    net = torch.nn.Conv3d(4, 3, 1)
    result = benchmark.time_volume_inference(net, torch.device("cpu"), (40, 40, 24), (32, 32, 32), 4, amp=False)
    layout = benchmark.tile_layout((40, 40, 24), (32, 32, 32), 0.5)
    assert result["tiles"] == layout["tiles_monai"] == layout["tiles_nnunet"] == 4
    assert result["forward_passes"] == 32 and result["output_finite"] and _positive(result["seconds"])


def test_volume_inference_times_one_pass_after_its_warmup():
    calls = []

    class Counting(torch.nn.Conv3d):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    net = Counting(4, 3, 1)
    result = benchmark.time_volume_inference(net, torch.device("cpu"), (40, 40, 24), (32, 32, 32), 4, amp=False,
                                             warmup_passes=1)
    assert len(calls) == 2 * 32  # the untimed pass and the timed one, 4 tiles x 8 flips each
    assert result["tiles"] == 4 and result["forward_passes"] == 32 and result["warmup_passes"] == 1
    calls.clear()
    result = benchmark.time_volume_inference(net, torch.device("cpu"), (40, 40, 24), (32, 32, 32), 4, amp=False,
                                             batched_mirroring=True)
    assert len(calls) == 4 and result["forward_passes"] == 4 and result["batched_mirroring"]


def test_compiled_networks_warm_up_the_volume_inference(monkeypatch):
    warmups = []

    def volume_inference(*args, warmup_passes=0, **kwargs):
        warmups.append(warmup_passes)
        return {"seconds": 1.0}

    monkeypatch.setattr(benchmark, "build_network", lambda name, *a, **k: torch.nn.Conv3d(4, 3, 1))
    monkeypatch.setattr(benchmark, "time_patch_inference", lambda *a, **k: {"ms_median": 1.0})
    monkeypatch.setattr(benchmark, "time_volume_inference", volume_inference)
    benchmark.run_benchmark(networks=["plainconv", "plainconv_compiled"], device="cpu", batch=1, patch=(32, 32, 32),
                            volume=(32, 32, 32), warmup=0, iters=1, train=False, log=lambda line: None)
    assert warmups == [0, 1]


def test_cuda_graph_networks_need_batched_mirroring_for_the_volume(monkeypatch):
    batched = []

    def volume_inference(*args, batched_mirroring=False, **kwargs):
        batched.append(batched_mirroring)
        return {"seconds": 1.0}

    monkeypatch.setattr(benchmark, "build_network", lambda name, *a, **k: torch.nn.Conv3d(4, 3, 1))
    monkeypatch.setattr(benchmark, "time_patch_inference", lambda *a, **k: {"ms_median": 1.0})
    monkeypatch.setattr(benchmark, "time_volume_inference", volume_inference)
    args = dict(device="cpu", batch=1, patch=(32, 32, 32), volume=(32, 32, 32), warmup=0, iters=1, train=False,
                log=lambda line: None)
    report = benchmark.run_benchmark(networks=["plainconv_compiled_cg"], **args)
    assert batched == [] and "needs --batched-mirroring" in report["networks"]["plainconv_compiled_cg"][
        "volume_inference"]["skipped"]
    assert "| skipped |" in report["table"]
    report = benchmark.run_benchmark(networks=["plainconv_compiled_cg"], batched_mirroring=True, **args)
    assert batched == [True] and report["settings"]["batched_mirroring"]
    assert "8 mirrorings in one forward pass" in report["table"]


def test_oom_and_errors_are_recorded_and_the_run_continues(monkeypatch):
    failures = iter([torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"),
                     RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED (simulated)")])

    def train_fails(*args, **kwargs):
        raise next(failures)

    def patch_fails(*args, **kwargs):
        raise ValueError("a bug (simulated)")

    monkeypatch.setattr(benchmark, "time_training", train_fails)
    monkeypatch.setattr(benchmark, "time_patch_inference", patch_fails)
    monkeypatch.setattr(benchmark, "time_volume_inference", lambda *a, **k: {"seconds": 1.0, "tiles": 1,
                                                                             "peak_gib": None})
    lines = []
    report = benchmark.run_benchmark(networks=["segmamba_nomamba", "segmamba[torch]"], device="cpu", batch=1,
                                     patch=(32, 32, 32), volume=(32, 32, 32), warmup=0, iters=1,
                                     segmamba_width=2, log=lines.append)
    for name in ("segmamba_nomamba", "segmamba[torch]"):
        entry = report["networks"][name]
        assert entry["params"] > 0
        assert entry["train"] == "OOM"
        assert entry["patch_inference"] == {"error": "ValueError: a bug (simulated)"}
        assert entry["volume_inference"]["seconds"] == 1.0  # the phases after a failure still run
    assert "| segmamba[torch] |" in report["table"] and "OOM" in report["table"]
    assert sum("out of memory" in line for line in lines) == 2


class _OffsetWhenFast(torch.nn.Module):
    """Stands in for a network whose `fast` backend is off by `offset` (relative to an output scale of 1)."""

    def __init__(self, fast: str, offset: float):
        super().__init__()
        from nnunet_segmamba.nn import TriOrientedMamba

        self.mixer, self.fast, self.offset = TriOrientedMamba(4), fast, offset  # set_scan_backend switches it

    def forward(self, x):
        return torch.tanh(x) * 0 + 1 + (self.offset if self.mixer.scan_backend == self.fast else 0.0)


@pytest.mark.parametrize("offset, agrees", [(0.0, True), (1e-4, True), (0.05, False)])
def test_compare_backends_measures_the_difference(offset, agrees):
    # the GPU backends cannot run here; the check's arithmetic and verdict can, on a model that the backend
    # switch really changes
    result = benchmark.compare_backends(_OffsetWhenFast("cuda", offset), torch.randn(1, 4, 8, 8, 8), fast="cuda",
                                        reference="torch")
    assert result["fast_vs_reference"]["rel_max"] == pytest.approx(offset, abs=1e-6)
    assert result["within_fp16_rounding"] is agrees


def test_compare_backends_on_a_real_segmamba_on_cpu():
    torch.manual_seed(0)
    model = benchmark.build_network("segmamba[torch]", 4, 3, segmamba_width=2).eval()
    result = benchmark.compare_backends(model, torch.randn(1, 4, 32, 32, 32), fast="torch", reference="torch")
    assert result["finite"] and result["within_fp16_rounding"]
    assert 0 < result["reference_fp16_vs_fp32"]["rel_max"] < 0.1  # CPU fp16 autocast does round
    assert result["tolerance_rel_max"] > 1e-3


def test_compile_options_are_added_to_each_compiled_names_options(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    options = benchmark.parse_compile_options("max_autotune_gemm=true, coordinate_descent_tuning=False")
    assert options == {"max_autotune_gemm": True, "coordinate_descent_tuning": False}
    benchmark.build_network("segmamba_compiled_cg[triton]", 1, 2, segmamba_width=4, compile_options=options)
    benchmark.build_network("segmamba_compiled_cl[triton]", 1, 2, segmamba_width=4, compile_options=options)
    benchmark.build_network("segmamba_compiled[triton]", 1, 2, segmamba_width=4, compile_backend="eager",
                            compile_options=options)
    assert [(c["options"], c["mode"]) for c in calls] == [
        ({"triton.cudagraphs": True, **options}, None),
        ({"force_layout_optimization": True, **options}, None),
        (None, None)]  # other backends take no inductor options
    with pytest.raises(argparse.ArgumentTypeError, match="'max_autotune_gem' is not an inductor option"):
        benchmark.parse_compile_options("max_autotune_gem=true")
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        benchmark.parse_compile_options("max_autotune_gemm")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown network"):
        benchmark.run_benchmark(networks=["unet"], device="cpu")
    with pytest.raises(ValueError, match="patch needs three"):
        benchmark.run_benchmark(networks=[], device="cpu", patch=(32, 32))
    with pytest.raises(ValueError, match="precision"):
        benchmark.run_benchmark(networks=[], device="cpu", precision="bf16")
    for wrong in (-1, True, 2.0):  # True would pass as the limit 1
        with pytest.raises(ValueError, match=r"cudnn_benchmark_limit must be None or an int >= 0 .*got"):
            benchmark.run_benchmark(networks=[], device="cpu", cudnn_benchmark_limit=wrong)
    assert benchmark.parse_sizes("128") == (128, 128, 128)
    assert benchmark.parse_sizes("240,240,155") == (240, 240, 155)
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark.parse_sizes("32,32")
    assert benchmark._network_list("segmamba[torch], plainconv") == ["segmamba[torch]", "plainconv"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown network"):
        benchmark._network_list("segmamba,plainconv")


def test_import_needs_no_torch():
    code = ("import sys, argparse, nnunet_segmamba.benchmark as b; "
            "b.register(argparse.ArgumentParser().add_subparsers()); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nnunet_networks_follow_nnunets_plan_for_the_patch():
    assert benchmark.nnunet_stage_strides((128, 128, 128)) == [(1, 1, 1)] + [(2, 2, 2)] * 5
    # the hippocampus patch: the 4 stages of nnUNetTrainer's own plan (hippo_cudagraphs_training_log.txt)
    assert benchmark.nnunet_stage_strides((48, 64, 48)) == [(1, 1, 1)] + [(2, 2, 2)] * 3
    with pytest.raises(ValueError, match=r"patch \(48, 64, 44\): nnU-Net's plan needs"):
        benchmark.nnunet_stage_strides((48, 64, 44))
    brats = benchmark.build_network("plainconv", 4, 3)
    assert sum(p.numel() for p in brats.parameters()) == 31_198_991  # BraTS's plan: 31.2 M as in the reference
    hippocampus = benchmark.build_network("plainconv", 1, 3, patch=(48, 64, 48)).eval()
    with torch.no_grad():
        assert hippocampus(torch.randn(1, 1, 48, 64, 48)).shape == (1, 3, 48, 64, 48)
    assert len(benchmark.build_network("resenc_m", 1, 3, patch=(48, 64, 48)).encoder.stages) == 4


def test_compiled_cl_and_cg_names_set_inductors_options_and_mode(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    benchmark.build_network("segmamba_compiled_cl[triton]", 1, 2, segmamba_width=4)
    benchmark.build_network("segmamba_compiled[triton]", 1, 2, segmamba_width=4)
    benchmark.build_network("segmamba_compiled_cl[triton]", 1, 2, segmamba_width=4, compile_backend="eager")
    benchmark.build_network("segmamba_compiled_cg[triton]", 1, 2, segmamba_width=4)
    benchmark.build_network("plainconv_compiled_cg", 1, 2, compile_backend="eager")
    assert [(c["options"], c["mode"]) for c in calls] == [
        ({"force_layout_optimization": True}, None), (None, None), (None, None), (None, "reduce-overhead"),
        (None, None)]


def test_training_peak_is_reported_with_and_without_the_warmup(monkeypatch):
    """The whole run's peak (what a GPU must hold), the peak after the first step (without the compile and cuDNN's
    algorithm search, which depend on what ran earlier in the process; with a CUDA graph's recording) and the timed
    steps' own."""
    peaks = iter([{"peak_gib": 9.0, "peak_reserved_gib": 9.5},    # after the first step: compile, search
                  {"peak_gib": 5.0, "peak_reserved_gib": 6.0},    # the rest of the warm-up: recording
                  {"peak_gib": 3.0, "peak_reserved_gib": 7.0}])   # the timed steps
    resets = []
    monkeypatch.setattr(benchmark, "_peak", lambda device: next(peaks))
    monkeypatch.setattr(benchmark, "_reset_peak", lambda device: resets.append(device))
    result = benchmark.time_training(torch.nn.Conv3d(1, 2, 1), torch.device("cpu"), 1, (4, 4, 4), 1, 2, False,
                                     warmup=2, iters=1)
    assert (result["peak_gib"], result["peak_reserved_gib"]) == (9.0, 9.5)
    assert (result["peak_after_first_step_gib"], result["peak_after_warmup_gib"]) == (5.0, 3.0)
    assert len(resets) == 3


def test_training_peak_without_warmup_has_no_first_step_figure(monkeypatch):
    peaks = iter([{"peak_gib": 2.0, "peak_reserved_gib": 2.0}, {"peak_gib": 3.0, "peak_reserved_gib": 4.0}])
    monkeypatch.setattr(benchmark, "_peak", lambda device: next(peaks))
    monkeypatch.setattr(benchmark, "_reset_peak", lambda device: None)
    result = benchmark.time_training(torch.nn.Conv3d(1, 2, 1), torch.device("cpu"), 1, (4, 4, 4), 1, 2, False,
                                     warmup=0, iters=1)
    assert result["peak_gib"] == 3.0 and result["peak_after_first_step_gib"] is None


def test_sgd_is_fused_where_the_networks_trainer_fuses_it(monkeypatch):
    """SegMamba's trainers step SGD fused on CUDA; nnU-Net's trainer keeps torch's default for its networks. The
    fused kernel is the same update: three steps of each end at the same weights."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert benchmark.uses_fused_sgd("segmamba_cl_recompute_compiled_cg[triton]", cuda)
    assert benchmark.uses_fused_sgd("segmamba_nomamba_compiled", cuda)
    assert not benchmark.uses_fused_sgd("resenc_m_compiled", cuda)
    assert not benchmark.uses_fused_sgd("swinunetr", cuda)
    assert not benchmark.uses_fused_sgd("segmamba[torch]", cpu)
    weights = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 2, 1))
        step, _ = benchmark.training_step(model, cpu, 2, (8, 8, 8), 1, 2, amp=False, fused_sgd=fused)
        for _ in range(3):
            step()
        weights[fused] = [p.detach().clone() for p in model.parameters()]
    for default, fused in zip(weights[False], weights[True]):
        torch.testing.assert_close(fused, default)
    monkeypatch.setattr(benchmark, "_peak", lambda device: {"peak_gib": 1.0, "peak_reserved_gib": 1.0})
    monkeypatch.setattr(benchmark, "_reset_peak", lambda device: None)
    result = benchmark.time_training(torch.nn.Conv3d(1, 2, 1), cpu, 1, (4, 4, 4), 1, 2, False, warmup=0, iters=1,
                                     fused_sgd=True)
    assert result["sgd"] == "fused"


def test_compiled_networks_build_and_train(tmp_path):
    """`_compiled` names wrap the network in torch.compile (backend "eager" here: dynamo only; the compile itself
    is tested in tests/ssm/test_ops.py); the first warm-up step holds the compile and is reported."""
    from torch._dynamo import OptimizedModule

    assert set(benchmark.COMPILED_NETWORKS) <= set(benchmark.KNOWN_NETWORKS)
    for name in (*benchmark.COMPILED_NETWORKS, *benchmark.LAYOUT_OPT_NETWORKS, *benchmark.CUDA_GRAPH_NETWORKS,
                 *benchmark.CHANNELS_LAST_NETWORKS):
        assert name in benchmark.NETWORK_HELP, name
        assert benchmark._uncompiled_name(name) in benchmark.KNOWN_NETWORKS, name
    assert isinstance(benchmark.build_network("segmamba_compiled[triton]", 1, 2, segmamba_width=4), OptimizedModule)
    channels_last = benchmark.build_network("segmamba_cl_compiled_cg[triton]", 1, 2, segmamba_width=4)
    assert isinstance(channels_last, OptimizedModule)
    assert next(channels_last.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    trainers_setting = benchmark.build_network("segmamba_cl_recompute_compiled_cg[triton]", 1, 2, segmamba_width=4)
    assert next(trainers_setting.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    below_voxel_rule = benchmark.build_network("segmamba_cl_keep_compiled_cg[triton]", 1, 2, segmamba_width=4)
    assert next(below_voxel_rule.parameters()).is_contiguous(memory_format=torch.channels_last_3d)

    def recomputes(network, attribute):
        return {getattr(m, attribute) for m in network.modules() if hasattr(m, attribute)}

    # the Mamba branches as the name says; the conv blocks at the network's default (None: on a GPU) unless "keep"
    assert recomputes(trainers_setting, "recompute_branches") == {True}
    assert recomputes(trainers_setting, "recompute_activations") == {None}
    assert recomputes(channels_last, "recompute_branches") == {False}
    assert recomputes(channels_last, "recompute_activations") == {None}
    assert recomputes(below_voxel_rule, "recompute_branches") == {False}
    assert recomputes(below_voxel_rule, "recompute_activations") == {False}
    # the Mamba layers' directions stacked at the layers' default (None) unless the name says otherwise
    assert recomputes(trainers_setting, "stack_directions") == {None}
    for name, stacked in (("segmamba_cl_recompute_stacked_compiled_cg[triton]", True),
                          ("segmamba_cl_keep_unstacked_compiled_cg[triton]", False)):
        assert recomputes(benchmark.build_network(name, 1, 2, segmamba_width=4), "stack_directions") == {stacked}
    torch._dynamo.reset()
    report = benchmark.run_benchmark(
        networks=["segmamba_compiled[cuda]", "segmamba_compiled[torch]"], device="cpu", batch=1, patch=(32, 16, 16),
        volume=(32, 16, 16), in_channels=1, out_channels=2, inference=False, warmup=1, iters=1,
        segmamba_width=4, compile_backend="eager", out=tmp_path / "bench.json", log=lambda message: None)
    torch._dynamo.reset()
    assert report["settings"]["compile_backend"] == "eager"
    assert "skipped" in report["networks"]["segmamba_compiled[cuda]"]
    train = report["networks"]["segmamba_compiled[torch]"]["train"]
    assert _positive(train["ms_median"]) and _positive(train["loss_last"])
    assert train["first_call_ms"] >= train["ms_min"]


def test_kernels_are_traced_to_the_operators_that_launched_them():
    """profile_step_gpu --launchers: each kernel's time goes to the chain of the operator that launched it and its
    parents (up to the depth), per step, largest first."""
    from types import SimpleNamespace as Event

    from benchmarks.profile_step_gpu import kernel_launchers

    def kernel(name, us):
        return Event(name=name, duration=us)

    step = Event(name="step", kernels=[], cpu_parent=None)
    backward = Event(name="aten::convolution_backward", kernels=[], cpu_parent=step)
    contiguous = Event(name="aten::contiguous", kernels=[], cpu_parent=backward)
    events = [step, backward, contiguous,
              Event(name="aten::copy_", kernels=[kernel("copy", 3000), kernel("copy", 1000)], cpu_parent=contiguous),
              Event(name="aten::copy_", kernels=[kernel("copy", 500)], cpu_parent=step),
              Event(name="aten::cudnn_convolution", kernels=[kernel("fprop", 2000)], cpu_parent=None),
              Event(name="scan_op", input_shapes=[[7, 96, 18432], [], [7, 96, 18432]],
                    kernels=[kernel("_bwd_chunk", 4000)], cpu_parent=step)]
    found = kernel_launchers(events, steps=2, depth=3)
    assert found["copy"] == [
        {"ops": "aten::copy_ < aten::contiguous < aten::convolution_backward", "ms_per_step": 2.0,
         "calls_per_step": 1.0},
        {"ops": "aten::copy_ < step", "ms_per_step": 0.25, "calls_per_step": 0.5}]
    assert found["fprop"] == [{"ops": "aten::cudnn_convolution", "ms_per_step": 1.0, "calls_per_step": 0.5}]
    # the innermost operator's first two non-scalar input shapes, where recorded
    assert found["_bwd_chunk"] == [{"ops": "scan_op [[7, 96, 18432], [7, 96, 18432]] < step", "ms_per_step": 2.0,
                                    "calls_per_step": 0.5}]


def test_tile_forward_is_one_inference_pass_of_the_tile():
    seen = []

    class Recording(torch.nn.Conv3d):
        def forward(self, x):
            seen.append((tuple(x.shape), torch.is_inference_mode_enabled(), self.training))
            return super().forward(x)

    benchmark.tile_forward(Recording(2, 3, 1).train(), torch.device("cpu"), (8, 6, 4), 2, amp=True, batch=1)()
    assert seen == [((1, 2, 8, 6, 4), True, False)]


def test_memory_peak_finds_what_is_alive_at_the_trace_maximum():
    from benchmarks.memory_peak_gpu import group_by_frame, live_at_peak

    def frames(*files):
        return [{"filename": f, "line": 7, "name": "forward"} for f in files]

    # the allocator's C++ frames come first where the trace records them ('??' without symbols)
    ours = frames("??", "/x/torch/nn/modules/conv.py", "/repo/nnunet_segmamba/networks/segmamba.py")
    optimizer = frames("/x/torch/optim/sgd.py", "/repo/benchmark.py")
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ours},
        {"action": "alloc", "addr": 2, "size": 300, "frames": ours},
        {"action": "free_requested", "addr": 1, "size": 100, "frames": ours},  # counted until free_completed
        {"action": "alloc", "addr": 3, "size": 50, "frames": optimizer},  # the peak: 450
        {"action": "free_completed", "addr": 1, "size": 100, "frames": ours},
        {"action": "free_completed", "addr": 2, "size": 300, "frames": ours},
        {"action": "alloc", "addr": 4, "size": 400, "frames": []},  # 450 again, not higher
    ]
    peak, index, live = live_at_peak(trace)
    assert (peak, index) == (450, 3) and sorted(e["addr"] for e in live) == [1, 2, 3]
    groups = group_by_frame(live, top=5)
    assert [(g["frame"], g["allocations"]) for g in groups] == [
        ("/repo/nnunet_segmamba/networks/segmamba.py:7 (forward)", 2), ("/repo/benchmark.py:7 (forward)", 1)]
    assert groups[0]["gib"] * 1024 ** 3 == 400
    # the peak from an index on (after a first step): what is alive still counts from the trace's beginning
    peak, index, live = live_at_peak(trace, start=4)
    assert (peak, index) == (450, 6) and sorted(e["addr"] for e in live) == [3, 4]
    assert group_by_frame([{"size": 8, "frames": frames("??")}], top=5)[0]["frame"] == "torch internals"


def test_memory_peak_names_the_kernel_that_fills_a_generated_buffer(tmp_path):
    from benchmarks.memory_peak_gpu import generated_code_context, group_by_frame

    code = tmp_path / "cabc123.py"  # as inductor writes a compiled graph
    code.write_text("def partition_0(args):\n"
                    "    buf7 = empty_strided_cuda((2, 48, 128, 128, 128), (1, 2, 3, 4, 5), torch.float32)\n"
                    "    # Topologically Sorted Source Nodes: [var_mean], Original ATen: [aten.var_mean]\n"
                    "    stream0 = get_raw_stream(0)\n"
                    "    triton_red_fused__to_copy_var_mean_3.run(buf6, buf7, 48, stream=stream0)\n")
    assert generated_code_context(str(code), 2) == \
        "(2, 48, 128, 128, 128) torch.float32 -> triton_red_fused__to_copy_var_mean_3"
    assert generated_code_context(str(code), 4) is None  # not an allocation
    assert generated_code_context(str(tmp_path / "gone.py"), 2) is None
    frames = [{"filename": "??", "line": 0, "name": "unwind"},
              {"filename": str(code), "line": 2, "name": "partition_0"}]
    [group] = group_by_frame([{"size": 8, "frames": frames}], top=5)
    assert group["frame"] == f"{code}:2 (partition_0)"
    assert group["generated_code"].endswith("-> triton_red_fused__to_copy_var_mean_3")


def test_hippocampus_study_copies_the_latest_training_log_next_to_its_json(tmp_path):
    """The study copies the fold's newest nnU-Net training log beside its JSON, named after the JSON and trainer."""
    import os

    from benchmarks.hippocampus_study import copy_training_log

    fold = tmp_path / "fold_0"
    fold.mkdir()
    # nnU-Net's names do not sort by time (months and days are not zero-padded): the newer file wins by its time
    older, newer = fold / "training_log_2026_12_2_10_00_00.txt", fold / "training_log_2026_9_30_10_00_00.txt"
    older.write_text("first run")
    newer.write_text("second run")
    os.utime(older, (1_000, 1_000))
    out_json = tmp_path / "study.json"
    assert copy_training_log(fold, out_json, "nnUNetTrainer_5epochs") == "study_log_nnUNetTrainer_5epochs.txt"
    assert (tmp_path / "study_log_nnUNetTrainer_5epochs.txt").read_text() == "second run"
    assert copy_training_log(fold, None, "t") is None
    assert copy_training_log(tmp_path / "missing", out_json, "t") is None


def test_hippocampus_study_table_marks_a_trainer_without_test_figures():
    """benchmarks/hippocampus_study.py writes a trainer's training figures before its test prediction; a run
    stopped in between leaves "test": None, which the table shows as "-"."""
    from benchmarks.hippocampus_study import markdown

    timing = {"epoch_seconds_mean": 47.42, "epoch_seconds_median_after_first": 12.26, "peak_memory_gib": 3.4}
    evaluated = {**timing, "test": {"Anterior": {"dice": 0.88327, "hd95_mm": 1.3418}}}
    rows = markdown({"trainers": {"a": evaluated, "b": {**timing, "test": None}}}).splitlines()
    assert rows[0] == ("| trainer | Dice Anterior | HD95 Anterior (mm) | s/epoch (mean) | s/epoch (median of 2+) "
                       "| peak GiB |")
    assert rows[1] == "|---|---|---|---|---|---|"
    assert rows[2] == "| a | 0.8833 | 1.34 | 47.4 | 12.26 | 3.4 |"
    assert rows[3] == "| b | - | - | 47.4 | 12.26 | 3.4 |"
    assert markdown({"trainers": {"b": {**timing, "test": None}}}).splitlines()[2] == "| b | 47.4 | 12.26 | 3.4 |"


def test_half_conv_network_stores_only_its_3d_convolutions_in_float16():
    net = benchmark.build_network("segmamba_cl16_compiled[triton]", 4, 3, segmamba_width=2,
                                  compile_backend="eager")
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert convs and all(m.weight.dtype == torch.float16 for m in convs)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs if m.weight.dim() == 5)
    conv_params = {id(p) for m in convs for p in m.parameters()}
    others = [p for p in net.parameters() if id(p) not in conv_params]
    assert others and all(p.dtype == torch.float32 for p in others)  # the Mamba layers' (and Conv1d's) stay


def test_predictor_volume_runs_both_predictors_and_writes_json(tmp_path, capsys):
    """benchmarks.predictor_volume_gpu on the CPU at toy sizes: each run through its predictor, a table, the JSON
    (on the CPU both predictors are nnU-Net's path: nothing compiled, no batched flips)."""
    from benchmarks import predictor_volume_gpu

    out = tmp_path / "volume.json"
    assert predictor_volume_gpu.main(["--device", "cpu", "--volume", "36,32,32", "--patch", "32",
                                      "--segmamba-width", "4", "--warmup", "0", "--repeats", "1", "--out", str(out),
                                      "--runs", "segmamba:segmamba,segmamba_stacked:segmamba,"
                                      "segmamba_nomamba:segmamba,plainconv:nnunet"]) == 0
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["segmamba:segmamba", "segmamba_stacked:segmamba", "segmamba_nomamba:segmamba",
                                    "plainconv:nnunet"]
    for run in report["runs"].values():
        assert run["output_finite"] and run["seconds_median"] > 0 and not run["cuda_graphs"]
    assert "plainconv:nnunet" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        predictor_volume_gpu.main(["--device", "cpu", "--runs", "resnet:nnunet"])


def test_predictor_volume_networks_stack_the_directions_only_where_named():
    """benchmarks.predictor_volume_gpu's `segmamba_stacked` is SegMamba with every Mamba layer's directions forced into
    one scan; `segmamba` leaves the layer's default (a branch at a time without gradients)."""
    from nnunet_segmamba.benchmark import build_network
    from nnunet_segmamba.nn.mamba import TriOrientedMamba

    for name, stacked in (("segmamba", None), ("segmamba_stacked", True)):
        layers = [m for m in build_network(name, 1, 3, 4, patch=(32, 32, 32)).modules()
                  if isinstance(m, TriOrientedMamba)]
        assert layers and all(m.stack_directions is stacked for m in layers)


def test_conv_cpu_benchmark_times_every_pass_and_writes_json(tmp_path, capsys):
    """benchmarks.bench_conv_cpu at toy sizes: a row per shape with torch's and cpu_conv's time for each pass, the
    table, the JSON; a malformed shape is a usage error that shows the expected form."""
    from benchmarks import bench_conv_cpu

    out = tmp_path / "conv.json"
    assert bench_conv_cpu.main(["--shapes", "4x3k3b1s6,5x2k1b2s4,2x4k2t2b1s6", "--runs", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["shape"] for row in rows] == ["4 -> 3, 3^3 kernel, 1 x 6^3", "5 -> 2, 1^3 kernel, 2 x 4^3",
                                              "2 -> 4, 2^3 kernel, stride 2, 1 x 6^3"]
    for row in rows:
        for name in ("forward", "input gradient", "weight gradient"):
            assert row[name]["torch_ms"] > 0 and row[name]["cpu_conv_ms"] > 0
    assert "| 4 -> 3, 3^3 kernel, 1 x 6^3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_conv_cpu.main(["--shapes", "4x3k3"])
    assert "INxOUTkKERNEL[tSTRIDE]bBATCHsSIDE" in capsys.readouterr().err


@pytest.mark.parametrize("train", [False, True], ids=["prediction", "training-step"])
def test_tile_cpu_benchmark_compares_both_convolution_paths(tmp_path, train):
    """benchmarks.bench_tile_cpu at a 32^3 tile: both convolution paths timed on the same weights, their outputs (or
    gradients) as close as float32 sums in another order, and for a training step the parameter where they differ
    most, with both values."""
    from benchmarks import bench_tile_cpu

    out = tmp_path / "tile.json"
    assert bench_tile_cpu.main(["--side", "32", "--warmup", "0", "--runs", "1", "--out", str(out)]
                               + (["--train"] if train else [])) == 0
    report = json.loads(out.read_text())
    assert len(report["results"]) == 2 and all(r["median_ms"] > 0 for r in report["results"].values())
    assert report["max_abs_difference"] <= 1e-3 * report["max_abs_value"]
    at = report["largest_difference_at"]
    if train:
        assert at["parameter"].endswith(("weight", "bias"))
        assert abs(at["torch"] - at["cpu_conv"]) == pytest.approx(report["max_abs_difference"], rel=1e-5, abs=1e-12)
    else:
        assert at is None


def test_tile_flops_on_the_meta_device_are_those_of_a_real_forward():
    """benchmarks/tile_flops.py counts on the meta device (shapes only): the same count as a real CPU forward of
    the same network, and the skeleton of SegMamba (no Mamba layers) counted too."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.tile_flops import tile_flops

    patch = (16, 16, 32)
    torch.manual_seed(0)
    net = benchmark.build_network("plainconv", 1, 2, patch=patch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, 1, *patch))
    assert tile_flops("plainconv", patch, 1, 2) == counter.get_total_flops() > 0
    assert tile_flops("segmamba_nomamba", patch, 1, 2) > 0


@pytest.mark.parametrize("kernel, category", [
    ("sm90_xmma_wgrad_indexed_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize64x64x64", "convolution"),
    ("sm80_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize256x64x32_stage3", "convolution"),
    ("cutlass_tensorop_f16_s16816fprop_optimized_f16_128x128_32x3_nhwc_align8", "convolution"),
    ("nvjet_sm90_hsh_512x40_64x3_2x1_v_bz_NNT", "GEMM"),
    ("void cutlass::Kernel2<cutlass_75_wmma_tensorop_f16_s161616gemm_f16_32x32_128x1_tn_align1>", "GEMM"),
    ("sm80_xmma_gemm_f16f16_f32f32_f32_nn_n_tilesize32x128x8_stage3_warpsize1x2x1_ffma", "GEMM"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true>", "layout copy (cuDNN)"),
    ("_bwd_chunk", "scan (ours)"),
    ("_causal_conv1d_fwd_kernel", "scan (ours)"),
    ("_sum_parts_into_columns_kernel", "scan (ours)"),
    ("_input_conv_fwd", "convolution"),
    ("_input_conv_wgrad", "convolution"),
    ("triton_red_fused__to_copy_var_mean_93", "norm (inductor, fused)"),
])
def test_profile_categories_tell_cudnn_convolutions_from_cublas_gemms(kernel, category):
    """Kernel names from the H200 profiles: cuDNN's implicit-GEMM convolutions and cuBLAS's GEMMs (the Mamba
    projections) land in their own categories."""
    from benchmarks.profile_step_gpu import categorize

    assert categorize(kernel) == category


def test_profile_step_sets_and_records_the_cudnn_limit_and_refuses_a_wrong_one(monkeypatch, tmp_path, capsys):
    """profile_step_gpu --cudnn-benchmark-limit 0 profiles the step with cuDNN's search as our trainers set it and
    says so in its JSON; a negative limit stops with the option named, before any network is built."""
    from benchmarks import profile_step_gpu

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    monkeypatch.setattr(torch.backends.cudnn, "benchmark_limit", 10)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "no GPU: profile_network replaced")
    seen = []

    def profile_network(name, *args, **kwargs):
        seen.append((name, torch.backends.cudnn.benchmark_limit))
        return {"wall_ms_median": 1.0, "kernel_ms_per_step": 1.0, "peak_gib": 0.0, "warmup_s": 0.0,
                "by_category_ms": {}, "top_kernels": []}

    monkeypatch.setattr(profile_step_gpu, "profile_network", profile_network)
    out = tmp_path / "profile.json"
    assert profile_step_gpu.main(["--networks", "plainconv", "--cudnn-benchmark-limit", "0", "--out", str(out)]) == 0
    assert seen == [("plainconv", 0)]
    assert json.loads(out.read_text())["cudnn_benchmark_limit"] == 0

    with pytest.raises(SystemExit):
        profile_step_gpu.main(["--networks", "plainconv", "--cudnn-benchmark-limit", "-1"])
    assert "--cudnn-benchmark-limit must be None or an int >= 0" in capsys.readouterr().err
    assert seen == [("plainconv", 0)]


NVDISASM_LISTING = """
\t//## File "/src/kernel.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
.L_x_0:
\t//## File "/src/kernel.py", line 20
        /*0020*/                   FFMA R2, R3, R4, R5 ;
        /*0030*/                   FFMA R2, R3, R4, R2 ;
\t//## File "/lib/triton/language/standard.py", line 309
        /*0040*/                   SHFL.BFLY PT, R6, R2, 0x1, 0x1f ;
        /*0050*/               @P0 BRA `(.L_x_0) ;
\t//## File "/src/kernel.py", line 30
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   LDG.E.128 R8, desc[UR4][R10.64] ;
        /*0080*/                   LDG.E.U16 R9, desc[UR4][R10.64+0x10] ;
        /*0090*/                   STG.E.U16 desc[UR4][R12.64], R2 ;
        /*00a0*/                   EXIT ;
"""


def test_triton_registers_attributes_the_innermost_loop_to_source_lines():
    """The nested loop's inner body (0x20-0x50) only, counted and by file name and line, most instructions
    first; the kernel's global loads and stores, and which of them are 8 or 16 bytes wide."""
    pytest.importorskip("triton")
    from benchmarks.triton_registers import loop_body, loop_lines, parse_listing

    code = parse_listing(NVDISASM_LISTING)
    assert loop_lines(code) == [
        {"source": "kernel.py:20", "instructions": 2, "top_opcodes": {"FFMA": 2}},
        {"source": "standard.py:309", "instructions": 2, "top_opcodes": {"SHFL": 1, "BRA": 1}},
    ]
    assert loop_body(code) == {"instructions": 11, "loop_instructions": 4, "loop_shuffles": 1, "global_loads": 2,
                               "global_stores": 1, "wide_accesses": 1}
    no_loop = parse_listing(NVDISASM_LISTING.replace("BRA `(.L_x_0)", "NOP").replace("BRA `(.L_x_1)", "NOP"))
    assert loop_lines(no_loop) == [] and loop_body(no_loop)["loop_instructions"] == 0


def test_triton_registers_names_the_architecture_as_triton_compiles_for_it():
    pytest.importorskip("triton")
    from benchmarks.triton_registers import gpu_name

    assert [gpu_name(arch) for arch in (80, 89, 90, 100, 120)] == ["sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120a"]


def test_triton_registers_reads_registers_and_spills_from_the_ptxas_report():
    pytest.importorskip("triton")
    from benchmarks.triton_registers import register_usage

    report = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
              "ptxas info    : Function properties for k\n"
              "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
              "ptxas info    : Used 168 registers, used 1 barriers\n")
    assert register_usage(report) == {"registers": 168, "spill_stores": 16, "spill_loads": 8}


def test_cpu_benchmarks_main_times_the_runs_and_writes_the_report(tmp_path, capsys):
    from benchmarks import cpu_timing

    calls = []
    parser = argparse.ArgumentParser()
    cpu_timing.add_run_arguments(parser, runs=3)
    args = parser.parse_args(["--threads", str(torch.get_num_threads()), "--out", str(tmp_path / "r.json")])

    def bench(args):
        timing = cpu_timing.time_runs(lambda: calls.append(1), warmup=2, runs=args.runs)
        return {"system": cpu_timing.system_info(), "results": {"case": timing}}

    assert cpu_timing.run(args, bench, lambda report: print("table of", list(report["results"]))) == 0
    assert len(calls) == 5  # two warm-ups, then the three timed runs of --runs' default
    report = json.loads((tmp_path / "r.json").read_text())
    case = report["results"]["case"]
    assert case["runs"] == 3 and case["min_ms"] <= case["median_ms"] <= case["max_ms"]
    assert report["system"]["torch_threads"] == torch.get_num_threads()
    assert "table of ['case']" in capsys.readouterr().out


def test_conv_gpu_benchmark_says_it_needs_cuda(capsys, monkeypatch):
    """benchmarks.bench_conv_gpu without a CUDA device: exit status 2 and one line that says what it needs (its
    timings run on the GPU machine); its default shapes are SegMamba's four stages at the 128^3 patch."""
    from benchmarks import bench_conv_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_conv_gpu.main([]) == 2
    assert capsys.readouterr().err.strip() == "bench_conv_gpu: needs a CUDA device; run it on a machine with one"
    assert bench_conv_gpu.build_parser().parse_args([]).shapes == [(262144, 96), (32768, 192), (4096, 384),
                                                                    (512, 768)]


def test_scan_sweep_sums_a_settings_repeats_and_applies_the_fastest(monkeypatch):
    """benchmarks.bench_scan_gpu's sweep (`tune`) with the GPU's timing replaced: a setting that the grid lists twice
    (the backward's scans in rows or not, alternating) is scored by its times summed over shapes and repeats, and the
    fastest setting is left in triton_scan.TUNING."""
    from benchmarks import bench_scan_gpu
    from nnunet_segmamba.ssm import triton_scan

    monkeypatch.setitem(triton_scan.TUNING, "bwd_rows", False)
    graphed = {(False, "a"): [1.0, 1.3], (True, "a"): [0.9, 0.95], (False, "b"): [2.0, 2.0], (True, "b"): [2.0, 2.2]}
    calls = []

    def fake_bench_scan(base, backend, warmup, runs):
        key = (triton_scan.TUNING["bwd_rows"], base)
        calls.append(key)
        return {"fwd+bwd graphed": {"mean_ms": graphed[key][calls.count(key) - 1]}}

    monkeypatch.setattr(bench_scan_gpu, "bench_scan", fake_bench_scan)
    result = bench_scan_gpu.tune({"a": "a", "b": "b"}, 0, 1, bench_scan_gpu.ROWS_TUNE_GRID)
    assert len(calls) == 8
    assert result["score"] == {"(False,)": pytest.approx(6.3), "(True,)": pytest.approx(6.05)}
    assert triton_scan.TUNING["bwd_rows"] is True and result["chosen"]["bwd_rows"] is True


def test_cudnn_benchmark_limit_is_set_for_the_run_recorded_and_restored(monkeypatch):
    """--cudnn-benchmark-limit: in effect while the networks run, in the report's settings, torch's own after."""
    before = torch.backends.cudnn.benchmark_limit
    seen = []
    monkeypatch.setattr(benchmark, "_bench_one", lambda *a, **k: seen.append(torch.backends.cudnn.benchmark_limit)
                        or {"skipped": "not run in this test"})
    report = benchmark.run_benchmark(networks=["plainconv"], device="cpu", cudnn_benchmark_limit=before + 7)
    assert report["settings"]["cudnn_benchmark_limit"] == before + 7
    assert seen == [before + 7]
    assert torch.backends.cudnn.benchmark_limit == before


def test_input_convs_benchmark_pads_without_changing_the_arithmetic():
    """benchmarks.bench_input_convs on the CPU: its cases parse, and each of SegMamba's input convolutions gives the
    same weight gradient on the input zero-padded to 8 channels (the weight padded inside the call) as on the input
    itself, from a channels-last padded input."""
    from benchmarks import bench_input_convs as bench

    assert bench.parse_case("7x1x48,64,48") == (7, 1, (48, 64, 48))
    x = torch.randn(2, 4, 9, 8, 7).to(memory_format=torch.channels_last_3d)
    padded = bench.padded_input(x, 8)
    assert padded.shape[1] == 8 and padded.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(padded[:, :4], x) and not padded[:, 4:].any()
    for _, size, stride, padding in bench.CONVS:
        weight = torch.randn(6, 4, size, size, size, requires_grad=True)
        out_shape = bench.conv_forward(x, weight, stride, padding).shape
        dout = torch.randn(out_shape)
        assert bench.conv_forward(padded, weight, stride, padding).shape == out_shape
        torch.testing.assert_close(bench.conv_step(padded, weight, stride, padding, dout),
                                   bench.conv_step(x, weight, stride, padding, dout), rtol=1e-5, atol=1e-5)


def test_full_res_convs_benchmark_input_gradient_as_forward_equals_autograds():
    """benchmarks.bench_full_res_convs on the CPU: its cases parse, and for both of its convolutions the input's
    gradient as a forward convolution with the mirrored kernel equals autograd's, in float64 and channels-last."""
    from benchmarks import bench_full_res_convs as bench

    assert bench.parse_case("7x48,64,48") == (7, (48, 64, 48))
    for cin, cout in bench.CONVS:
        x = torch.randn(2, cin, 5, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
        weight = torch.randn(cout, cin, 3, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
        dout = torch.randn(2, cout, 5, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
        x.requires_grad_()
        (want,) = torch.autograd.grad(bench.forward(x, weight), x, dout)
        torch.testing.assert_close(bench.input_gradient(dout, x, weight), want)
        torch.testing.assert_close(bench.input_gradient_as_forward(dout, weight), want)
        (want_w,) = torch.autograd.grad(bench.forward(x, weight.requires_grad_()), weight, dout)
        torch.testing.assert_close(bench.weight_gradient(dout, x, weight), want_w)


def test_settings_applied_holds_the_values_in_the_block_and_restores_the_dict_after_it():
    """benchmarks.gpu_timing.settings_applied, as the benchmarks sweep a Triton module's TUNING: the values inside the
    block, the dict as it was after it, also when the block raises."""
    from benchmarks.gpu_timing import settings_applied

    tuning = {"block_m": 128, "warps": 4}
    with settings_applied(tuning, warps=8, extra=1):
        assert tuning == {"block_m": 128, "warps": 8, "extra": 1}
    assert tuning == {"block_m": 128, "warps": 4}
    with pytest.raises(RuntimeError):
        with settings_applied(tuning, block_m=64):
            raise RuntimeError("a launch that does not fit")
    assert tuning == {"block_m": 128, "warps": 4}


def test_tuning_option_takes_known_keys_with_non_negative_integers_in_both_triton_benchmarks(capsys):
    """benchmarks.gpu_timing.settings_parser, the `--tuning` of bench_directions_batched and bench_packed_backward:
    'KEY=INT[,KEY=INT]' of triton_scan.TUNING -> a dict; an unknown key, a negative or missing value stops argparse
    with a one-line message naming the option's text, before either benchmark asks for a GPU."""
    from benchmarks import bench_directions_batched, bench_packed_backward
    from benchmarks.gpu_timing import settings_parser
    from nnunet_segmamba.ssm import triton_scan

    parse = settings_parser(triton_scan.TUNING)
    assert parse("bwd_programs_per_sm=32,block_l=128") == {"bwd_programs_per_sm": 32, "block_l": 128}
    for bad in ("bwd_programs_per_sm=-8", "no_such_key=1", "block_l", "block_l=x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--tuning '{bad}'"):
            parse(bad)
        for bench in (bench_directions_batched, bench_packed_backward):
            with pytest.raises(SystemExit) as stopped:
                bench.main(["--tuning", bad])
            assert stopped.value.code == 2
            assert f"--tuning '{bad}': each item must be KEY=INTEGER" in capsys.readouterr().err


def test_triton_registers_by_line_takes_an_optional_positive_count_of_lines(monkeypatch, capsys):
    """--by-line alone lists 12 source lines, --by-line N lists N; 0, negative or non-numeric counts are refused
    with argparse's one-line error before anything compiles."""
    pytest.importorskip("triton")
    from benchmarks import triton_registers

    seen = []
    monkeypatch.setattr(triton_registers, "compile_stats", lambda *args: seen.append(args[7]) or {
        "registers": 1, "spill_stores": 0, "spill_loads": 0, "instructions": 1, "loop_instructions": 1,
        "loop_shuffles": 0, "global_loads": 0, "global_stores": 0, "wide_accesses": 0, "loop_by_line": []})
    for argv, lines in ((["--by-line"], 12), (["--by-line", "30"], 30), ([], 0)):
        monkeypatch.setattr(sys, "argv", ["triton_registers", "--kernels", "bwd_chunk", "--block-l", "64",
                                          "--warps", "1", "--dtypes", "fp16", *argv])
        assert triton_registers.main() == 0 and seen.pop() == lines
    for bad in ("0", "-3", "many"):
        monkeypatch.setattr(sys, "argv", ["triton_registers", "--by-line", bad])
        with pytest.raises(SystemExit):
            triton_registers.main()
        assert "positive number of source lines" in capsys.readouterr().err
    assert not seen
