"""The MSD hippocampus data set as an nnU-Net raw dataset (for tests, the GPU studies and users who want a quick
start)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def convert_hippocampus(src_dir: str | os.PathLike, raw_root: str | os.PathLike, dataset_id: int = 4,
                        dataset_name: str = "Hippocampus", num_cases: int | None = None) -> Path:
    """MSD Task04 hippocampus (`images/CASE.nii.gz`, `labels/CASE.nii.gz`) -> nnU-Net raw dataset.

    Args:
        src_dir: folder with `images/` and `labels/` (e.g. shared/data/hippocampus).
        raw_root: nnU-Net's raw folder; the dataset goes to `raw_root/DatasetNNN_<dataset_name>`.
        dataset_id: nnU-Net dataset id.
        num_cases: the first `num_cases` cases in sorted order (None: all).
    Returns:
        The dataset folder. Labels are cast to uint8 (the release stores some as float32).
    """
    import SimpleITK as sitk

    src = Path(src_dir)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (src / "labels").glob("*.nii.gz"))
    if not cases:
        raise FileNotFoundError(f"no labels/*.nii.gz under {src}; expected the MSD hippocampus layout")
    missing = [c for c in cases if not (src / "images" / f"{c}.nii.gz").is_file()]
    if missing:
        raise FileNotFoundError(f"images missing for {missing[:5]} in {src / 'images'}")
    cases = cases[:num_cases] if num_cases is not None else cases
    out = Path(raw_root) / f"Dataset{dataset_id:03d}_{dataset_name}"
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    for case in cases:
        shutil.copy(src / "images" / f"{case}.nii.gz", out / "imagesTr" / f"{case}_0000.nii.gz")
        label = sitk.ReadImage(str(src / "labels" / f"{case}.nii.gz"))
        sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), str(out / "labelsTr" / f"{case}.nii.gz"))
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                    "numTraining": len(cases), "file_ending": ".nii.gz",
                    "licence": "CC BY-SA 4.0 (Medical Segmentation Decathlon, Task04)"}
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return out
