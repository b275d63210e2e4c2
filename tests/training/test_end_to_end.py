"""End to end through nnU-Net's own command line on CPU: plan and preprocess 20 real hippocampus cases, train
nnUNetTrainerSegMamba_tiny on fold 0 of the 70/10/20 split, predict the held-out test cases with mirroring
through nnUNetv2_predict and through `nnunet-segmamba predict`, which on the CPU must give the same labels.

About 2-3 minutes on a 2-core CPU. Needs ../shared/data/hippocampus next to the repository (skipped without).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import pytest

from nnunet_segmamba.data.hippocampus import convert_hippocampus
from nnunet_segmamba.demo import nnunet_command

REPO = Path(__file__).resolve().parents[2]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "hippocampus"
N_CASES = 20
DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_HippocampusSegMambaE2E"
TRAINER = "nnUNetTrainerSegMamba_tiny"


class _Started(NamedTuple):
    cmd: list[str]
    process: subprocess.Popen
    log: IO[str]


def _start(cmd: list[str], env: dict) -> _Started:
    # the output goes to a file, not a pipe: a command started beside others must not stall on a full pipe while
    # the test waits for another one
    log = tempfile.TemporaryFile(mode="w+")
    return _Started(cmd, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log)


def _wait(started: _Started, timeout: float) -> None:
    try:
        started.process.wait(timeout=timeout)
    finally:
        started.process.kill()
    started.log.seek(0)
    output = started.log.read()
    started.log.close()
    if started.process.returncode != 0:
        raise AssertionError(f"{' '.join(started.cmd)} failed ({started.process.returncode}):\n{output[-8000:]}")


def _run(cmd: list[str], env: dict, timeout: float) -> None:
    _wait(_start(cmd, env), timeout)


@pytest.mark.slow
def test_plan_train_predict_through_nnunet_command_line(tmp_path):
    if not (HIPPOCAMPUS / "images").is_dir():
        pytest.skip(f"hippocampus data not found at {HIPPOCAMPUS} (expected ../shared/data/hippocampus "
                    f"relative to the repository root)")
    import SimpleITK as sitk

    raw_dataset = convert_hippocampus(HIPPOCAMPUS, tmp_path / "raw", DATASET_ID, DATASET_NAME.split("_", 1)[1], N_CASES)
    env = {**os.environ,
           "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_extTrainer": str(REPO / "trainers"),
           "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f",
           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}

    # The fingerprint first, as the demo extracts it (10^6 intensity draws per channel instead of nnU-Net's 10^8),
    # which the planner then reuses: 15 s less on 2 cores. The draws' statistics set CT normalisation only; these
    # MRI images are z-scored per image, so the preprocessed data are the same.
    _run([sys.executable, "-c", f"from nnunet_segmamba.demo import extract_fingerprint; "
                                f"extract_fingerprint({DATASET_ID}, num_processes=2)"], env, timeout=300)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0: plan with 1
    _run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
          "-np", "2", "--verify_dataset_integrity"], {**env, "nnUNet_n_proc_DA": "1"}, timeout=300)
    # nnUNet_n_proc_DA=0: augmentation in the training process (no worker processes on a 2-core machine)
    _run([nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER,
          "-device", "cpu"], env, timeout=600)

    # the 70/10/20 split: written next to (not over) nnU-Net's splits_final.json, 14/2/4 of 20 cases
    preprocessed = tmp_path / "preprocessed" / DATASET_NAME
    split = json.loads((preprocessed / "splits_segmamba_70_10_20.json").read_text())["folds"]["0"]
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (14, 2, 4)
    assert not (preprocessed / "splits_final.json").exists()

    model_dir = tmp_path / "results" / DATASET_NAME / f"{TRAINER}__nnUNetPlans__3d_fullres"
    fold_dir = model_dir / "fold_0"
    assert (fold_dir / "checkpoint_final.pth").is_file()
    # nnU-Net's final validation ran on exactly the 10 % validation cases
    validated = sorted(p.name[: -len(".nii.gz")] for p in (fold_dir / "validation").glob("*.nii.gz"))
    assert validated == split["val"]
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    # the patch was rounded up to multiples of 16 in the plans the trainer saved (read back by predict)
    saved_plans = json.loads((model_dir / "plans.json").read_text())
    assert all(p % 16 == 0 for p in saved_plans["configurations"]["3d_fullres"]["patch_size"])

    # Three independent commands side by side (each spends seconds importing and starting workers): nnU-Net's model
    # selection, which reads the fold's validation results like those of its own trainers; the held-out test cases
    # predicted through nnUNetv2_predict (trainer looked up by name again), mirroring on; and the same through our
    # predictor (on the CPU: nnU-Net's predictor, batched flips off), which must give the same labels.
    test_in, test_out, ours = tmp_path / "test_in", tmp_path / "test_out", tmp_path / "test_out_ours"
    test_in.mkdir()
    for case in split["test"]:
        shutil.copy(raw_dataset / "imagesTr" / f"{case}_0000.nii.gz", test_in)
    one_thread = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    commands = [
        _start([nnunet_command("nnUNetv2_find_best_configuration"), str(DATASET_ID), "-c", "3d_fullres", "-tr",
                TRAINER, "-f", "0", "--disable_ensembling", "-np", "1"], one_thread),
        _start([nnunet_command("nnUNetv2_predict"), "-i", str(test_in), "-o", str(test_out), "-d", str(DATASET_ID),
                "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1"],
               one_thread),
        _start([sys.executable, "-m", "nnunet_segmamba.cli", "predict", "-i", str(test_in), "-o", str(ours), "-d",
                str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "--device", "cpu", "-np", "1"],
               one_thread),
    ]
    try:
        for started in commands:
            _wait(started, timeout=300)
    finally:
        for started in commands:
            started.process.kill()
    inference_information = json.loads(
        (tmp_path / "results" / DATASET_NAME / "inference_information.json").read_text())
    assert inference_information["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == TRAINER

    for case in split["test"]:
        prediction_file = test_out / f"{case}.nii.gz"
        assert prediction_file.is_file(), f"no prediction for test case {case}"
        prediction = sitk.ReadImage(str(prediction_file))
        image = sitk.ReadImage(str(raw_dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        assert prediction.GetSize() == image.GetSize()
        np.testing.assert_allclose(prediction.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(prediction.GetOrigin(), image.GetOrigin(), atol=1e-4)
        labels = np.unique(sitk.GetArrayFromImage(prediction))
        assert set(labels.tolist()) <= {0, 1, 2}

    for case in split["test"]:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(ours / f"{case}.nii.gz"))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(test_out / f"{case}.nii.gz"))))
