"""A tiny synthetic nnU-Net dataset, planned and preprocessed in-process, shared by the trainer tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def write_case(folder: Path, case: str, channels: list[np.ndarray], label: np.ndarray | None = None,
               ending: str = ".nii.gz") -> None:
    """imagesTr/CASE_000c.<ending> for each channel and labelsTr/CASE.<ending> of an nnU-Net raw dataset."""
    import SimpleITK as sitk

    for c, image in enumerate(channels):
        sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "imagesTr" / f"{case}_{c:04d}{ending}"))
    if label is not None:
        sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "labelsTr" / f"{case}{ending}"))


def plan_tiny_dataset(root: Path, dataset_id: int, dataset_name: str, configurations: tuple[str, ...]) -> None:
    """Six one-channel cases of about 20 x 28 x 24 voxels with two spherical labels, planned and preprocessed
    for `configurations` under root/{raw, preprocessed, results} (the nnUNet_* variables must point there)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments, preprocess

    from nnunet_segmamba.demo import extract_fingerprint

    raw = root / "raw" / dataset_name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.RandomState(0)
    for i in range(6):
        shape = (20 + i, 28, 24)
        zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        label = np.zeros(shape, np.uint8)
        label[((zz - 10) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2) < 25] = 1
        label[((zz - 10) ** 2 + (yy - 20) ** 2 + (xx - 12) ** 2) < 9] = 2
        write_case(raw, f"case_{i:03d}", [(label * 100 + rng.normal(0, 20, shape)).astype(np.float32)], label)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"},
                                                  "labels": {"background": 0, "a": 1, "b": 2},
                                                  "numTraining": 6, "file_ending": ".nii.gz"}))
    # the channel is MRI: nnU-Net's 10^8 intensity draws would change nothing but the time
    extract_fingerprint(dataset_id, num_processes=1, check_dataset_integrity=True)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=configurations, num_processes=(1,) * len(configurations))


@pytest.fixture(scope="module")
def nnunet_dirs(request, tmp_path_factory):
    """nnU-Net's three folders with the module's tiny dataset (module attributes DATASET_ID, DATASET_NAME and
    CONFIGURATIONS) planned and preprocessed; the nnUNet_* variables point there for the module's tests."""
    module = request.module
    root = tmp_path_factory.mktemp("nnunet")
    mp = pytest.MonkeyPatch()
    for name in ("raw", "preprocessed", "results"):
        mp.setenv(f"nnUNet_{name}", str(root / name))
    mp.setenv("nnUNet_n_proc_DA", "1")
    mp.setenv("nnUNet_def_n_proc", "1")
    plan_tiny_dataset(root, module.DATASET_ID, module.DATASET_NAME, module.CONFIGURATIONS)
    yield root
    mp.undo()


@pytest.fixture
def write_nnunet_case():
    """`write_case` for tests that build their own small raw datasets."""
    return write_case


@pytest.fixture
def make_trainer(request, nnunet_dirs):
    """A function (cls, configuration="3d_fullres", device="cpu", extra_configurations=None) -> nnU-Net trainer
    `cls` for the module's tiny dataset, constructed as nnUNetv2_train constructs it (not initialised);
    extra_configurations are added to the plans' configurations first."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    folder = nnunet_dirs / "preprocessed" / request.module.DATASET_NAME

    def make(cls, configuration: str = "3d_fullres", device: str = "cpu", extra_configurations: dict | None = None):
        plans = load_json(str(folder / "nnUNetPlans.json"))
        plans["continue_training"] = False  # nnUNetv2_train's get_trainer_from_args sets it; the plans file has none
        plans["configurations"].update(extra_configurations or {})
        return cls(plans, configuration, 0, load_json(str(folder / "dataset.json")), torch.device(device))

    return make
