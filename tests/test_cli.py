"""User errors of the `nnunet-segmamba` command: one line `nnunet-segmamba CMD: error: ...`, exit code 2, no
traceback, nothing written. One case per error class, each run as a real process (`python -m
nnunet_segmamba.cli`) so that the exit code and the absence of a traceback are what a user sees."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_segmamba import cli

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\d+/\d+ \[")  # tqdm progress-bar lines, which are not part of the error


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nnunet_segmamba.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _write_nifti(arr, path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def setup_undefined_label(tmp: Path) -> tuple[list[str], str]:
    (tmp / "gt").mkdir()
    (tmp / "pred").mkdir()
    gt = np.zeros((6, 6, 6))
    gt[1:3, 1:3, 1:3], gt[3:5, 3:5, 3:5] = 1, 2
    pred = gt.copy()
    pred[0, 0, 0] = 7  # no label of the dataset
    _write_nifti(gt, tmp / "gt" / "case1.nii.gz")
    _write_nifti(pred, tmp / "pred" / "case1.nii.gz")
    (tmp / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2},
                                                  "file_ending": ".nii.gz"}))
    return (["evaluate", "pred", "gt", "-d", "dataset.json", "-np", "1"],
            r"nnunet-segmamba evaluate: error: label value\(s\) \[7\] are not defined in the dataset.json labels "
            r"\(defined: 0, 1, 2\): prediction pred/case1.nii.gz holds \[7\]\. .*-d.*nothing was written")


def setup_not_npz(tmp: Path) -> tuple[list[str], str]:
    (tmp / "notes.txt").write_text("not an array file\n")
    return (["classify", "train", "--data", "notes.txt", "--out", "run"],
            r"nnunet-segmamba classify train: error: notes.txt is not a MedMNIST \.npz file")


def setup_overwrite(tmp: Path) -> tuple[list[str], str]:
    (tmp / "src" / "BraTS-GLI-00000-000").mkdir(parents=True)
    (tmp / "raw" / "Dataset501_BraTS").mkdir(parents=True)
    (tmp / "raw" / "Dataset501_BraTS" / "dataset.json").write_text("{}")
    return (["convert-brats", "src", "--dataset-id", "501", "--out", "raw", "-np", "1"],
            r"nnunet-segmamba convert-brats: error: raw/Dataset501_BraTS already exists and is not empty; "
            r"delete it, or pass --overwrite")


def setup_missing_input(tmp: Path) -> tuple[list[str], str]:
    (tmp / "gt").mkdir()
    return (["evaluate", "no_such_folder", "gt", "-np", "1"],
            r"nnunet-segmamba evaluate: error: prediction folder no_such_folder does not exist")


def setup_missing_npz(tmp: Path) -> tuple[list[str], str]:
    return (["classify", "train", "--data", "missing.npz", "--out", "run"],
            r"nnunet-segmamba classify train: error: MedMNIST file missing.npz not found")


def setup_usage(tmp: Path) -> tuple[list[str], str]:
    return (["convert-brats", "src"],
            r"nnunet-segmamba convert-brats: error: the following arguments are required: --dataset-id "
            r"\(see nnunet-segmamba convert-brats --help\)")


@pytest.mark.parametrize("setup", [setup_undefined_label, setup_not_npz, setup_overwrite, setup_missing_input,
                                   setup_missing_npz, setup_usage],
                         ids=["undefined-label", "not-npz", "overwrite", "missing-folder", "missing-file", "usage"])
def test_user_error_is_one_line_exit_2_nothing_written(tmp_path, setup):
    args, pattern = setup(tmp_path)
    before = files_under(tmp_path)
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1, proc.stderr
    assert re.match(pattern, lines[0]), lines[0]
    assert files_under(tmp_path) == before  # nothing written (no out folder, no CSV/JSON, no dataset folder)


def test_debug_reraises_with_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--debug", "evaluate", str(tmp_path / "none"), str(tmp_path), "-np", "1"])


def test_a_device_that_is_neither_cpu_nor_cuda_is_one_line(capsys):
    rc = cli.main(["predict-test", "-d", "4", "-c", "3d_fullres", "-f", "0", "-tr", "T", "--device", "tpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("nnunet-segmamba predict-test: error: device 'tpu' (--device) is not a device this "
                               "package runs on; use auto, cpu, cuda or cuda:N")


def test_predict_test_device_defaults_to_auto_which_is_cpu_without_cuda(monkeypatch, capsys):
    import torch

    from nnunet_segmamba.devices import resolve_device

    args = cli.build_parser().parse_args(["predict-test", "-d", "4", "-c", "3d_fullres", "-f", "0", "-tr", "T"])
    assert args.device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu" and resolve_device().type == "cpu"
    # an explicit --device cuda without CUDA: one line naming the fix
    rc = cli.main(["predict-test", "-d", "4", "-c", "3d_fullres", "-f", "0", "-tr", "T", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("nnunet-segmamba predict-test: error: device 'cuda' was asked for but no "
                                      "CUDA device is available; use --device cpu")
    assert "\n" not in err


def test_predict_names_a_missing_input_folder_or_model_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    (tmp_path / "Dataset004_X").mkdir()
    args = ["predict", "-o", str(tmp_path / "out"), "-d", "Dataset004_X", "-c", "3d_fullres", "-tr", "T",
            "--device", "cpu"]
    assert cli.main(args + ["-i", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnunet-segmamba predict: error: input folder ") and "(-i) does not exist" in err
    (tmp_path / "in").mkdir()
    assert cli.main(args + ["-i", str(tmp_path / "in")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nnunet-segmamba predict: error: no trained model at ") and "check -d, -tr" in err
    (tmp_path / "Dataset004_X" / "T__nnUNetPlans__3d_fullres" / "fold_0").mkdir(parents=True)
    errors = []
    for folds in ([], ["-f", "0"]):
        assert cli.main(args + ["-i", str(tmp_path / "in")] + folds) == 2
        errors.append(capsys.readouterr().err.strip())
    assert "no fold folder of " in errors[0] and "no checkpoint_final.pth in " in errors[1]
    assert all(e.count("\n") == 0 for e in errors) and not (tmp_path / "out").exists()


def test_classify_train_help_has_no_doubled_percent(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["classify", "train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "%%" not in out and "50% and" in out.replace("\n", " ").replace("  ", " ")


def test_evaluate_finds_a_dataset_json_by_id_or_name_under_nnunet_raw(tmp_path, monkeypatch):
    pytest.importorskip("nnunetv2")
    from nnunet_segmamba.evaluation.commands import _resolve_dataset_json

    dataset = tmp_path / "raw" / "Dataset004_Liver"
    dataset.mkdir(parents=True)
    (dataset / "dataset.json").write_text("{}")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    for value in ("4", "Dataset004_Liver", str(dataset), str(dataset / "dataset.json")):
        assert _resolve_dataset_json(value) == dataset / "dataset.json", value
    with pytest.raises(ValueError, match=r"--dataset '9' is neither a dataset.json, a folder holding one, nor"):
        _resolve_dataset_json("9")
