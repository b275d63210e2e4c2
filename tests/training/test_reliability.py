"""Reliability of the SegMamba trainers (docs/reliability.md): non-finite steps skipped, counted and finally fatal;
checkpoints written atomically; kill and resume with --c through nnU-Net's command line; identical losses of two
seeded runs on CPU; a float16 scan over a long sequence stays finite; bad input found before prediction; the
scan kernel's run-time fallback.

Uses a tiny synthetic dataset planned and preprocessed by nnU-Net in-process (a few seconds); the kill-and-resume
test runs `nnUNetv2_train` twice (about a minute on a 2-core CPU).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_segmamba.training import reliability, trainers

REPO = Path(__file__).resolve().parents[2]
DATASET_ID = 984
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SegMambaReliability"
CONFIGURATIONS = ("3d_fullres",)  # for the nnunet_dirs fixture (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = trainers.nnUNetTrainerSegMamba_tiny


def _initialised(trainer, seed: int = 0):
    torch.manual_seed(seed)
    trainer.initialize()
    return trainer


def _batch(trainer, seed: int, nan: bool = False) -> dict:
    """A deep-supervision batch of 2 random patches (targets at strides 1, 2, 4, 8)."""
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 1, *patch, generator=g)
    if nan:
        data[0, 0, 0, 0, 0] = float("nan")
    target = [torch.randint(0, 3, (2, 1, *[p // s for p in patch]), generator=g).float() for s in (1, 2, 4, 8)]
    return {"data": data, "target": target}


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}


def _assert_first_of_two_steps_left_out(trainer, good: dict) -> None:
    """After an epoch of a NaN-loss step and a good one: the epoch's mean is the good loss; both are logged."""
    assert trainer.logger.get_value("train_losses", step=-1) == pytest.approx(float(good["loss"]))
    log = Path(trainer.log_file).read_text()
    assert "non-finite loss (nan) at epoch 0, iteration 1: step skipped" in log
    assert "non-finite steps skipped in epoch 0: 1 of 2 (in this run: 1)" in log


# ---- numerical faults ---------------------------------------------------------------------------------------
def test_nan_input_step_is_skipped_counted_and_logged(make_trainer):
    t = _initialised(make_trainer(TINY))
    t.on_train_epoch_start()
    before = _weights(t)
    out = t.train_step(_batch(t, 1, nan=True))
    assert np.isnan(out["loss"])
    after = _weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert all(p.grad is None for p in t.network.parameters())
    assert (t._non_finite_consecutive, t._non_finite_in_epoch, t.num_non_finite_steps) == (1, 1, 1)

    good = t.train_step(_batch(t, 2))
    assert np.isfinite(good["loss"]) and t._non_finite_consecutive == 0
    assert all(torch.isfinite(v).all() for v in t.network.state_dict().values() if v.is_floating_point())
    assert not all(torch.equal(after[k], v) for k, v in t.network.state_dict().items())

    t.on_train_epoch_end([out, good])
    _assert_first_of_two_steps_left_out(t, good)


def test_non_finite_gradient_of_a_finite_loss_is_skipped(make_trainer):
    t = _initialised(make_trainer(TINY))
    loss = t.loss
    first = next(t.network.parameters())

    def loss_with_nan_gradient(output, target):  # value unchanged, d/dw of 0 * sqrt(0 * w) is NaN
        return loss(output, target) + 0.0 * torch.sqrt(first.flatten()[0] * 0.0)

    t.loss = loss_with_nan_gradient
    before = _weights(t)
    out = t.train_step(_batch(t, 1))
    assert np.isnan(out["loss"]) and t.num_non_finite_steps == 1
    assert all(torch.equal(before[k], v) for k, v in t.network.state_dict().items())
    assert "non-finite gradient norm" in Path(t.log_file).read_text()


def test_repeated_non_finite_steps_stop_training_with_a_clear_message(make_trainer):
    t = _initialised(make_trainer(TINY))
    t.max_consecutive_non_finite_steps = 3
    t.on_train_epoch_start()
    t.train_step(_batch(t, 1, nan=True))
    t.train_step(_batch(t, 2))  # a good step resets the run of failures
    t.train_step(_batch(t, 3, nan=True))
    t.train_step(_batch(t, 4, nan=True))
    with pytest.raises(RuntimeError, match=r"after 3 consecutive training steps with a non-finite loss") as info:
        t.train_step(_batch(t, 5, nan=True))
    message = str(info.value)
    assert "iteration 5" in message and "learning rate" in message and "float16" in message
    assert "check_images_finite" in message and "--c" in message
    assert all(torch.isfinite(v).all() for v in t.network.state_dict().values() if v.is_floating_point())


def _trainer_with_grad_scaler(make_trainer, seed: int = 0):
    """The tiny trainer with a GradScaler, as on CUDA, here on the CPU (torch's CPU GradScaler and fused SGD):
    its steps take the path without host syncs."""
    t = _initialised(make_trainer(TINY), seed=seed)
    t.grad_scaler = torch.amp.GradScaler("cpu")
    t.optimizer, t.lr_scheduler = t.configure_optimizers()
    return t


def test_step_without_host_syncs_is_nnunets_step(make_trainer):
    """With a GradScaler the step queues a fused SGD update behind a scaled backward: the same weights as the
    plain step (scaling by a power of two is exact), and the loss comes back for the epoch's mean."""
    plain, scaled = _initialised(make_trainer(TINY), seed=3), _trainer_with_grad_scaler(make_trainer, seed=3)
    assert scaled.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    assert scaled.optimizer.param_groups[0]["momentum"] == plain.optimizer.param_groups[0]["momentum"] == 0.99
    for t in (plain, scaled):
        t.on_train_epoch_start()
        outs = [t.train_step(_batch(t, seed)) for seed in (1, 2)]
        t.on_train_epoch_end(outs)
    for (name, a), b in zip(plain.network.state_dict().items(), scaled.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert scaled.logger.get_value("train_losses", step=-1) == pytest.approx(
        plain.logger.get_value("train_losses", step=-1), rel=1e-6)


def test_step_without_host_syncs_skips_a_non_finite_loss_on_the_device(make_trainer):
    t = _trainer_with_grad_scaler(make_trainer)
    t.on_train_epoch_start()
    before, scale = _weights(t), t.grad_scaler.get_scale()
    out = t.train_step(_batch(t, 1, nan=True))
    after = _weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert t.grad_scaler.get_scale() == scale / 2  # as for overflowing gradients
    assert t.num_non_finite_steps == 0  # checked at the next step, when the loss has reached the host

    good = t.train_step(_batch(t, 2))
    assert (t._non_finite_consecutive, t._non_finite_in_epoch, t.num_non_finite_steps) == (1, 1, 1)
    assert not all(torch.equal(after[k], v) for k, v in t.network.state_dict().items())
    t.on_train_epoch_end([out, good])
    assert t._non_finite_consecutive == 0
    _assert_first_of_two_steps_left_out(t, good)


def test_step_without_host_syncs_stops_after_repeated_non_finite_losses(make_trainer):
    t = _trainer_with_grad_scaler(make_trainer)
    t.max_consecutive_non_finite_steps = 2
    t.on_train_epoch_start()
    outs = [t.train_step(_batch(t, seed, nan=True)) for seed in (1, 2)]
    with pytest.raises(RuntimeError, match=r"after 2 consecutive training steps with a non-finite loss"
                                           r" \(NaN or Inf; last at epoch 0, iteration 2\)"):
        t.on_train_epoch_end(outs)  # the epoch's last step is checked at its end


def test_resumed_checkpoint_keeps_the_trainers_optimizer_kernel(make_trainer):
    """A checkpoint's optimizer state carries `fused` in its param groups; loading one written without the fused
    kernel must not switch it off (GradScaler hands the fused SGD its found-inf flag, which the others reject)."""
    written = _initialised(make_trainer(TINY))
    path = Path(written.output_folder) / "checkpoint_unfused.pth"
    written.save_checkpoint(str(path))
    t = _trainer_with_grad_scaler(make_trainer)
    t.load_checkpoint(str(path))
    assert all(group["fused"] for group in t.optimizer.param_groups)
    t.on_train_epoch_start()
    assert math.isfinite(float(t.train_step(_batch(t, 1))["loss"]))


def test_float16_scan_over_a_long_sequence_is_finite():
    """The torch scan computes in float32 whatever the input dtype: no overflow of the state at L = 65536."""
    from nnunet_segmamba.ssm import selective_scan_torch

    g = torch.Generator().manual_seed(0)
    batch, dim, n, length = 1, 4, 8, 65536
    u = (torch.randn(batch, dim, length, generator=g) * 4).half()
    delta = (torch.rand(batch, dim, length, generator=g) * 0.01).half()  # slow decay: the state accumulates
    A = -torch.rand(dim, n, generator=g) * 0.1
    B = torch.randn(batch, n, length, generator=g).half()
    C = torch.randn(batch, n, length, generator=g).half()
    out, last = selective_scan_torch(u, delta, A, B, C, D=torch.ones(dim), return_last_state=True)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and torch.isfinite(last).all()
    reference = selective_scan_torch(u.float(), delta.float(), A, B.float(), C.float(), D=torch.ones(dim))
    torch.testing.assert_close(out.float(), reference, rtol=2e-3, atol=2e-3 * reference.abs().max().item())


# ---- atomic checkpoints -------------------------------------------------------------------------------------
def test_failed_checkpoint_write_leaves_the_previous_checkpoint(make_trainer, monkeypatch):
    t = _initialised(make_trainer(TINY))
    path = Path(t.output_folder) / "checkpoint_latest.pth"
    t.save_checkpoint(str(path))
    good = path.read_bytes()
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint) == {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                               "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    assert checkpoint["current_epoch"] == 1 and checkpoint["trainer_name"] == TINY.__name__

    real_save = torch.save

    def save_then_crash(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_then_crash)
    t.current_epoch = 7
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint(str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    stale = tmp_path / ".checkpoint_latest.pth.12345.tmp"
    stale.write_bytes(b"partial")
    other = tmp_path / ".checkpoint_best.pth.12345.tmp"
    other.write_bytes(b"partial")
    with reliability.atomic_write_path(target) as tmp:
        Path(tmp).write_bytes(b"complete")
    assert target.read_bytes() == b"complete" and not stale.exists() and other.exists()


RESUME_TRAINER_MODULE = '''
import os

import torch

from nnunet_segmamba.training.trainers import nnUNetTrainerSegMamba_tiny


class nnUNetTrainerSegMamba_resumeTest(nnUNetTrainerSegMamba_tiny):
    """Test only: 3 epochs of 2 iterations, checkpoint_latest.pth after every epoch; records what training
    starts from (after --c loaded the checkpoint) in train_start_<pid>.pth."""

    epochs = 3
    iterations_per_epoch = 2
    val_iterations_per_epoch = 1

    def on_train_start(self):
        # nnUNetv2_train -device cpu sets torch to use every core; on a shared 2-core test machine the
        # oversubscribed OpenMP threads make an epoch 10-50x slower
        torch.set_num_threads(1)
        super().on_train_start()
        self.save_every = 1
        torch.save({"current_epoch": self.current_epoch, "optimizer_state": self.optimizer.state_dict()},
                   os.path.join(self.output_folder, f"train_start_{os.getpid()}.pth"))
'''


@pytest.mark.slow
def test_kill_and_resume_through_the_command_line(nnunet_dirs, tmp_path):
    from nnunet_segmamba.demo import nnunet_command
    from nnunet_segmamba.training.ext_trainers import ext_trainer_folder

    trainer = "nnUNetTrainerSegMamba_resumeTest"
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "resume_test_trainers.py").write_text(RESUME_TRAINER_MODULE)
    env = {**os.environ, "nnUNet_extTrainer": os.pathsep.join([str(tmp_path / "ext"), ext_trainer_folder()]),
           "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    fold = Path(os.environ["nnUNet_results"]) / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    latest = fold / "checkpoint_latest.pth"
    split_file = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME / "splits_segmamba_70_10_20.json"

    # run 1: SIGKILL as soon as the first checkpoint_latest.pth is there (it only appears complete)
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not latest.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    output = first.communicate()[0]
    assert latest.exists(), f"no checkpoint_latest.pth from the first run:\n{output[-4000:]}"
    assert not (fold / "checkpoint_final.pth").exists(), "the first run finished before it was killed"
    killed_at = torch.load(latest, weights_only=False)
    epoch = killed_at["current_epoch"]
    assert 1 <= epoch < 3
    split_before = split_file.read_bytes()

    # run 2: --c continues from checkpoint_latest.pth and finishes
    second = subprocess.run(cmd + ["--c"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, f"resume failed:\n{second.stdout[-4000:]}\n{second.stderr[-4000:]}"
    (start_file,) = [p for p in fold.glob("train_start_*.pth") if p.name != f"train_start_{first.pid}.pth"]
    start = torch.load(start_file, weights_only=False)
    assert start["current_epoch"] == epoch
    saved, resumed = killed_at["optimizer_state"], start["optimizer_state"]
    assert resumed["param_groups"] == saved["param_groups"]
    assert saved["state"] and resumed["state"].keys() == saved["state"].keys()
    for k in saved["state"]:
        assert torch.equal(resumed["state"][k]["momentum_buffer"], saved["state"][k]["momentum_buffer"])
    assert split_file.read_bytes() == split_before

    final = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 3
    lrs, old_lrs = final["logging"]["lrs"], killed_at["logging"]["lrs"]
    assert len(lrs) == 3 and lrs[:epoch] == old_lrs[:epoch]
    assert "Epoch 0\n" not in second.stdout and f"Epoch {epoch}" in second.stdout
    assert not latest.exists() and not list(fold.glob(".*.tmp"))


# ---- determinism --------------------------------------------------------------------------------------------
def test_two_seeded_runs_give_identical_losses_on_cpu(make_trainer, monkeypatch):
    monkeypatch.setenv("NNUNET_SEGMAMBA_SCAN_BACKEND", "torch")
    runs = []
    for _ in range(2):
        t = _initialised(make_trainer(TINY), seed=123)
        t.on_train_epoch_start()
        runs.append([float(t.train_step(_batch(t, s))["loss"]) for s in range(3)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3  # the steps did change the network


# ---- bad input ----------------------------------------------------------------------------------------------
def test_check_images_finite_names_case_and_channel(write_nnunet_case, tmp_path):
    # .mha: SimpleITK's NIfTI reader (nnU-Net's default for .nii.gz) already reads NaN and Inf as 0
    raw = tmp_path / "Dataset001_Bad"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0,
                                                  "a": 1}, "numTraining": 2, "file_ending": ".mha"}))
    image, label = np.zeros((4, 5, 6), np.float32), np.zeros((4, 5, 6), np.uint8)
    bad = image.copy()
    bad[0, 0, :3] = np.nan
    bad[1, 1, 1] = np.inf
    write_nnunet_case(raw, "good", [image, image], label, ".mha")
    write_nnunet_case(raw, "bad", [image, bad], label, ".mha")
    problems = reliability.check_images_finite(raw)
    assert problems == ["bad channel 1 (T2, bad_0001.mha): 3 NaN and 1 Inf voxels of 120"]
    assert reliability.check_images_finite(raw, case_ids=["good"]) == []


def test_check_channel_count():
    model = {"channel_names": {"0": "T1", "1": "T2"}}
    files = {"a": {"images": ["a_0000.nii.gz", "a_0001.nii.gz"]}, "b": {"images": ["b_0000.nii.gz"]}}
    assert reliability.check_channel_count(model, model, {"a": files["a"]}) == []
    problems = reliability.check_channel_count(model, {"channel_names": {"0": "T1"}}, files,
                                               dataset="Dataset001_X", model="the model in results/Y")
    assert problems[0].startswith("Dataset001_X has 1 channels {'0': 'T1'} in its dataset.json, but the model "
                                  "in results/Y was trained on 2")
    assert problems[1] == ("case b has 1 image files (_0000 ... _0000), but the model in results/Y needs 2 "
                           "channels: {'0': 'T1', '1': 'T2'}")


def test_unknown_trainer_message_says_what_to_export(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_segmamba.training.ext_trainers import ext_trainer_folder

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError) as info:
        recursive_find_trainer_class_by_name("nnUNetTrainerSegMamba_tiny")
    assert reliability.is_trainer_lookup_error(info.value)
    message = str(reliability.trainer_lookup_error(info.value, "nnUNetTrainerSegMamba_tiny"))
    assert "nnUNet_extTrainer is not set" in message
    assert f"export nnUNet_extTrainer={ext_trainer_folder()}" in message
    assert not reliability.is_trainer_lookup_error(RuntimeError("CUDA out of memory"))


def _fake_trained_model(channel_names: dict, trainer: str = "nnUNetTrainerSegMamba_fake") -> None:
    """A results folder that passes predict-test's checks before prediction (the checkpoint is never read)."""
    from nnunet_segmamba.training.splits import load_or_create_split

    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    load_or_create_split(str(preprocessed), [f"case_{i:03d}" for i in range(6)], 0)
    model = Path(os.environ["nnUNet_results"]) / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True, exist_ok=True)
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    (model / "dataset.json").write_text(json.dumps({"channel_names": channel_names, "labels": {"background": 0},
                                                    "file_ending": ".nii.gz"}))


def test_predict_test_names_a_channel_mismatch(nnunet_dirs):
    from nnunet_segmamba.training.prediction import predict_test_split

    _fake_trained_model({"0": "T1", "1": "T2"})
    with pytest.raises(ValueError, match=r"(?s)Dataset984_SegMambaReliability has 1 channels .* trained on 2.*"
                                         r"case case_\d{3} has 1 image files"):
        predict_test_split(DATASET_ID, "3d_fullres", 0, "nnUNetTrainerSegMamba_fake", device="cpu")


# ---- the scan kernel's run-time failure ---------------------------------------------------------------------
@pytest.fixture
def failing_kernel(monkeypatch):
    """mamba-ssm's kernel as if importable but failing when called (no GPU needed: the fallback is CPU logic)."""
    from nnunet_segmamba.ssm import dispatch, mamba_ssm_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(mamba_ssm_kernels, "_runtime_failure", None)
    monkeypatch.setattr(mamba_ssm_kernels, "load_extension", lambda name: (object(), ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mamba_ssm_kernels.MambaSelectiveScan, "apply", broken)
    monkeypatch.delenv("NNUNET_SEGMAMBA_SCAN_BACKEND", raising=False)
    return dispatch


def _scan_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(1, 4, 32, generator=g), delta=torch.rand(1, 4, 32, generator=g),
                A=-torch.rand(4, 3, generator=g), B=torch.randn(1, 3, 32, generator=g),
                C=torch.randn(1, 3, 32, generator=g), D=torch.ones(4), z=None, delta_bias=None,
                delta_softplus=True, return_last_state=False)


def test_kernel_failure_falls_back_to_torch_once(failing_kernel):
    from nnunet_segmamba.ssm import selective_scan_torch

    backends = failing_kernel
    assert backends.resolve("auto", torch.device("cuda")) == "cuda"
    inputs = _scan_inputs()
    with pytest.warns(RuntimeWarning, match="no kernel image.*redone with the torch scan.*next backend"):
        out = backends._run_mamba_ssm(**inputs, explicit=False)
    torch.testing.assert_close(out, selective_scan_torch(**inputs))
    # from now on the kernel counts as unusable: auto picks the next backend (no second warning), doctor sees why
    assert backends.resolve("auto", torch.device("cuda")) == ("triton" if backends.triton_scan_status()[0]
                                                              else "torch")
    usable, reason = backends.cuda_scan_status()
    assert not usable and "no kernel image" in reason
    with pytest.raises(RuntimeError, match="unavailable"):
        backends.resolve("cuda", torch.device("cuda"))


def test_kernel_failure_is_an_error_when_cuda_was_requested(failing_kernel, monkeypatch):
    backends = failing_kernel
    monkeypatch.setenv("NNUNET_SEGMAMBA_SCAN_BACKEND", "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=r"NNUNET_SEGMAMBA_SCAN_BACKEND=cuda, but .*no kernel image"):
            backends._run_mamba_ssm(**_scan_inputs(), explicit=False)


def test_kernel_failure_is_an_error_when_the_caller_named_the_cuda_backend(failing_kernel):
    # selective_scan(..., backend="cuda") must never quietly run the torch scan (the GPU tests rely on it)
    backends = failing_kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=r"scan_backend='cuda' was requested, but .*no kernel image"):
            backends._run_mamba_ssm(**_scan_inputs(), explicit=True)


@pytest.fixture
def failing_triton(monkeypatch):
    """Our Triton kernels as if usable on a CUDA device but failing when called (e.g. a GPU Triton cannot compile
    for); no GPU needed, the policy is CPU logic."""
    from nnunet_segmamba.ssm import dispatch, triton_common, triton_scan

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_61")

    monkeypatch.setattr(dispatch, "_triton_failure", None)
    monkeypatch.setattr(dispatch, "cuda_scan_status", lambda: (False, "mamba-ssm not installed"))
    monkeypatch.setattr(triton_common, "interpreting", lambda: True)  # CPU tensors may take the triton path
    monkeypatch.setattr(triton_scan, "selective_scan_triton", broken)
    monkeypatch.setenv("NNUNET_SEGMAMBA_SCAN_BACKEND", "triton")
    return dispatch


def test_triton_failure_falls_back_to_torch_once(failing_triton, monkeypatch):
    from nnunet_segmamba.ssm import selective_scan, selective_scan_torch

    backends = failing_triton
    inputs = _scan_inputs()
    # the environment variable asks for triton: an error, not a fallback
    with pytest.raises(RuntimeError, match="sm_61"):
        selective_scan(**inputs)
    monkeypatch.setattr(backends, "_triton_failure", None)
    monkeypatch.delenv("NNUNET_SEGMAMBA_SCAN_BACKEND")
    monkeypatch.setattr(backends, "resolve", lambda backend, device: "triton" if backend == "auto" else backend)
    with pytest.warns(RuntimeWarning, match="Triton kernels failed.*sm_61.*torch scan from now on"):
        out = selective_scan(**inputs)
    torch.testing.assert_close(out, selective_scan_torch(**inputs))
    usable, reason = backends.triton_scan_status()
    assert not usable and "sm_61" in reason
    with pytest.raises(RuntimeError, match="sm_61"):
        selective_scan(**inputs, backend="triton")  # by name: raises
