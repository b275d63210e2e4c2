"""`nnunet-segmamba evaluate` and `nnunet-segmamba convert-brats`: argument parsing only.

The work is done by `metrics.evaluate_folder` and `nnunet_segmamba.data.brats.convert_brats`; they are imported
inside the handlers so that `nnunet-segmamba --help` does not load torch, MONAI or SimpleITK.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from nnunet_segmamba.errors import UserError
from nnunet_segmamba.training.ext_trainers import dataset_name


def _default_processes() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="Dice, HD95 (mm) and NSD of predicted label maps against references",
        description="Score every reference label map in GT_DIR against the prediction of the same file name in "
                    "PRED_DIR. Writes metrics_per_case.csv and summary.json (mean/median/std per structure) and "
                    "prints a table. Distances are computed by MONAI, in mm from the image spacing.")
    ev.add_argument("pred_dir", help="folder of predicted label maps (CASE.nii.gz)")
    ev.add_argument("gt_dir", help="folder of reference label maps with the same file names")
    ev.add_argument("-d", "--dataset", default=None,
                    help="nnU-Net dataset.json to take the labels/regions from: a path to the file or to its "
                         "dataset folder, or a dataset id/name resolved under $nnUNet_raw")
    ev.add_argument("--brats", action="store_true",
                    help="score BraTS regions WT={1,2,3}, TC={1,3}, ET={3} (BraTS 2021 label 4 read as 3); "
                         "overrides --dataset")
    ev.add_argument("--convention", choices=("brats", "reference"), default="brats",
                    help="scores for empty structures: 'brats' (both empty: Dice 1, HD95 0; one empty: Dice 0, "
                         "HD95 373.13 mm) or 'reference' (SegMamba authors' code: either empty -> Dice 0, HD95 50)")
    ev.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD boundary tolerance in mm (default 1)")
    ev.add_argument("-o", "--output", default=None,
                    help="folder for metrics_per_case.csv and summary.json (default PRED_DIR/evaluation)")
    ev.add_argument("-np", "--num-processes", type=int, default=_default_processes(),
                    help="worker processes (default: CPU cores - 1, at most 8)")
    ev.set_defaults(func=_run_evaluate)

    cb = subparsers.add_parser(
        "convert-brats", help="BraTS glioma training folder -> nnU-Net v2 raw dataset",
        description="Validate every case of a BraTS training folder (2021 or 2023+ file names), then write "
                    "DatasetNNN_NAME with channels T2w, FLAIR, T1n, T1c and labels 1 NCR, 2 edema, 3 ET "
                    "(2021's 4 -> 3). Bad cases are all listed; the conversion stops unless --skip-bad.")
    cb.add_argument("src_dir", help="BraTS folder with one sub-folder per case")
    cb.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id, 1..999")
    cb.add_argument("--name", default="BraTS", help="dataset name, the NAME of DatasetNNN_NAME (default BraTS)")
    cb.add_argument("--labels", action="store_true",
                    help="write plain labels (NCR, edema, ET) to dataset.json instead of the WT/TC/ET regions "
                         "used for nnU-Net's region-based training")
    cb.add_argument("--skip-bad", action="store_true", help="leave out bad cases (with a warning) instead of failing")
    cb.add_argument("--out", default=None, help="nnU-Net raw folder to write into (default $nnUNet_raw)")
    cb.add_argument("--overwrite", action="store_true", help="replace an existing non-empty dataset folder")
    cb.add_argument("-np", "--num-processes", type=int, default=_default_processes(),
                    help="worker processes (default: CPU cores - 1, at most 8)")
    cb.set_defaults(func=_run_convert_brats)


def _resolve_dataset_json(value: str) -> Path:
    """A dataset.json path, a dataset folder, or an nnU-Net dataset id/name under $nnUNet_raw."""
    p = Path(value)
    if p.is_file():
        return p
    if (p / "dataset.json").is_file():
        return p / "dataset.json"
    raw = os.environ.get("nnUNet_raw")
    if raw:
        try:
            candidate = Path(raw) / dataset_name(value) / "dataset.json"
        except UserError:  # no such id or name: the message below covers the file and folder forms too
            candidate = None
        if candidate is not None and candidate.is_file():
            return candidate
    raise ValueError(f"--dataset {value!r} is neither a dataset.json, a folder holding one, nor a dataset "
                     "id/name found under $nnUNet_raw")


def _run_evaluate(args: argparse.Namespace) -> int:
    from nnunet_segmamba.evaluation.metrics import evaluate_folder

    dataset_json = None if args.brats or args.dataset is None else _resolve_dataset_json(args.dataset)
    evaluate_folder(args.pred_dir, args.gt_dir, dataset_json=dataset_json, regions="brats" if args.brats else None,
                    convention=args.convention, nsd_tolerance_mm=args.nsd_tolerance, output_dir=args.output,
                    num_processes=args.num_processes)
    return 0


def _run_convert_brats(args: argparse.Namespace) -> int:
    from nnunet_segmamba.data.brats import convert_brats

    out = convert_brats(args.src_dir, args.dataset_id, args.name, out_root=args.out,
                        label_form="labels" if args.labels else "regions", num_processes=args.num_processes,
                        skip_bad_cases=args.skip_bad, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
