"""Predict with a trained SegMamba fold: any folder of images (`predict_folder`, `nnunet-segmamba predict`), or the
held-out 20 % test cases of the 70/10/20 split, scored (`predict_test_split`, `nnunet-segmamba predict-test`).

The test cases are labelled training cases of the raw dataset (`nnUNet_raw/<dataset>/imagesTr`) that the
SegMamba trainers never loaded. They are predicted with `SegMambaPredictor` (nnU-Net's `nnUNetPredictor`, run
fast on CUDA: predictor.py) from the trained fold (sliding window, overlap 0.5, Gaussian weighting, mirroring on
unless disabled) into
`<results>/<trainer>__<plans>__<configuration>/fold_<f>/test_predictions/` and scored against `labelsTr` with
`nnunet_segmamba.evaluation.metrics.evaluate_folder` (summary in `test_predictions/evaluation/`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nnunet_segmamba.devices import resolve_device
from nnunet_segmamba.errors import UserError
from nnunet_segmamba.training.ext_trainers import dataset_name, require_env

if TYPE_CHECKING:
    import torch

CONVENTIONS = ("brats", "reference")


def _model_folder(dataset: str | int, trainer: str, plans: str, configuration: str) -> tuple[str, Path]:
    """The dataset's name and the trained model's folder under $nnUNet_results, or a UserError naming the input."""
    results_root = require_env("nnUNet_results")
    name = dataset_name(dataset)
    return name, Path(results_root) / name / f"{trainer}__{plans}__{configuration}"


def trained_predictor(model_folder: str | os.PathLike, folds: int | Sequence[int] | None, trainer: str,
                      device: str | torch.device = "auto", use_mirroring: bool = True,
                      checkpoint_name: str = "checkpoint_final.pth"):
    """`SegMambaPredictor` (nnU-Net's predictor, run fast on CUDA; predictor.py) for the trained `folds` (one, several
    averaged, or None: every fold folder with the checkpoint), set up as `nnUNetv2_predict` does (sliding window,
    overlap 0.5, Gaussian weighting), with our trainers found by name (a failed lookup says what to export)."""
    from nnunet_segmamba.training.predictor import SegMambaPredictor
    from nnunet_segmamba.training.reliability import trainer_lookup

    device = resolve_device(device)
    predictor = SegMambaPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                  perform_everything_on_device=device.type == "cuda", device=device,
                                  verbose=False, allow_tqdm=False)
    with trainer_lookup(trainer):  # the predictor looks the trainer up by name
        predictor.initialize_from_trained_model_folder(
            str(model_folder), use_folds=(folds,) if isinstance(folds, int) else folds,
            checkpoint_name=checkpoint_name)
    return predictor


def predict_test_split(dataset: str | int, configuration: str, fold: int, trainer: str,
                       plans: str = "nnUNetPlans", device: str = "auto", use_mirroring: bool = True,
                       convention: str = "brats", checkpoint_name: str = "checkpoint_final.pth",
                       num_processes: int = 2) -> dict:
    """Predict the test cases of `fold` and evaluate them.

    Args:
        dataset: dataset id (e.g. 4) or name (Dataset004_Hippocampus).
        configuration: nnU-Net configuration, e.g. 3d_fullres.
        fold: the trained fold (its split holds the test cases).
        trainer: trainer class name used for training, e.g. nnUNetTrainerSegMamba.
        plans: plans identifier.
        device: "auto" (cuda when available, else cpu), "cuda", "cuda:N" or "cpu" (`devices.resolve_device`).
        use_mirroring: mirror test-time augmentation over the axes the trainer allowed.
        convention: empty-mask scoring of the evaluation, "brats" or "reference".
        checkpoint_name: checkpoint file in the fold folder.
        num_processes: preprocessing / export / evaluation worker processes.

    Returns:
        The evaluation summary (see `evaluate_folder`), with "prediction_folder" added.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunet_segmamba.evaluation.metrics import evaluate_folder
    from nnunet_segmamba.training.reliability import check_channel_count, check_images_finite
    from nnunet_segmamba.training.splits import read_split

    device = resolve_device(device)
    if convention not in CONVENTIONS:
        raise UserError(f"convention must be one of {CONVENTIONS} (--convention), got {convention!r}")

    preprocessed = Path(require_env("nnUNet_preprocessed"))
    name, model_folder = _model_folder(dataset, trainer, plans, configuration)
    raw_folder = Path(require_env("nnUNet_raw")) / name
    if not (model_folder / f"fold_{fold}" / checkpoint_name).is_file():
        raise FileNotFoundError(f"no {checkpoint_name} in {model_folder / f'fold_{fold}'}; train fold {fold} with "
                                f"-tr {trainer} first (or pass the checkpoint name)")
    test_ids = read_split(str(preprocessed / name), fold)["test"]

    dataset_json = load_json(str(raw_folder / "dataset.json"))
    files = get_filenames_of_train_images_and_targets(str(raw_folder), dataset_json)
    missing = [i for i in test_ids if i not in files]
    if missing:
        raise ValueError(f"test cases {missing[:5]} of the split are not in the raw dataset {raw_folder}")
    # bad input named before predicting (docs/reliability.md): channel count, NaN / Inf voxels
    problems = check_channel_count(load_json(str(model_folder / "dataset.json")), dataset_json,
                                   {i: files[i] for i in test_ids}, dataset=name, model=str(model_folder))
    problems = problems or check_images_finite(raw_folder, test_ids, dataset_json)
    if problems:
        raise ValueError(f"cannot predict the test cases of {name}:\n  " + "\n  ".join(problems))

    # the predictor loads the checkpoint and finds the trainer: its errors come before anything is written
    predictor = trained_predictor(model_folder, fold, trainer, device, use_mirroring, checkpoint_name)
    output_folder = model_folder / f"fold_{fold}" / "test_predictions"
    output_folder.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files([files[i]["images"] for i in test_ids],
                                 [str(output_folder / i) for i in test_ids], save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=num_processes,
                                 num_processes_segmentation_export=num_processes)

    # evaluate_folder scores every file of its ground-truth folder: give it the test labels only
    file_ending = dataset_json["file_ending"]
    with tempfile.TemporaryDirectory(prefix="segmamba_test_gt_") as gt_dir:
        for i in test_ids:
            target = os.path.join(gt_dir, i + file_ending)
            try:
                os.symlink(files[i]["label"], target)
            except OSError:
                shutil.copy(files[i]["label"], target)
        summary = evaluate_folder(output_folder, gt_dir, dataset_json=dataset_json, convention=convention,
                                  output_dir=output_folder / "evaluation", num_processes=num_processes,
                                  file_ending=file_ending)
    summary["prediction_folder"] = str(output_folder)
    return summary


def predict_folder(input_folder: str | os.PathLike, output_folder: str | os.PathLike, dataset: str | int,
                   configuration: str, trainer: str, folds: Sequence[int] | None = None,
                   plans: str = "nnUNetPlans", device: str = "auto", use_mirroring: bool = True,
                   checkpoint_name: str = "checkpoint_final.pth", save_probabilities: bool = False,
                   num_processes: int = 2) -> Path:
    """What `nnUNetv2_predict` does, with `SegMambaPredictor`: predict every case of `input_folder` (nnU-Net's file
    names, CASE_XXXX.<ending> per channel) into `output_folder`, averaging the folds.

    Args:
        input_folder: images to predict.
        output_folder: where the segmentations go (created).
        dataset: dataset id (e.g. 4) or name (Dataset004_Hippocampus).
        configuration: nnU-Net configuration, e.g. 3d_fullres.
        trainer: trainer class name used for training, e.g. nnUNetTrainerSegMamba.
        folds: trained folds to average; None: every fold folder that holds the checkpoint.
        plans: plans identifier.
        device: "auto" (cuda when available, else cpu), "cuda", "cuda:N" or "cpu".
        use_mirroring: mirror test-time augmentation over the axes the trainer allowed.
        checkpoint_name: checkpoint file in the fold folders.
        save_probabilities: also write the class probabilities (.npz) next to each segmentation.
        num_processes: preprocessing and export worker processes.

    Returns:
        The output folder.
    """
    device = resolve_device(device)
    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if not input_folder.is_dir():
        raise UserError(f"input folder {input_folder} (-i) does not exist; pass a folder of images named "
                        "CASE_0000.<ending> as nnU-Net expects")
    _, model_folder = _model_folder(dataset, trainer, plans, configuration)
    if not model_folder.is_dir():
        raise UserError(f"no trained model at {model_folder}; check -d, -tr, -p and -c (train with nnUNetv2_train "
                        f"... -tr {trainer} first)")
    for fold in folds or ():
        if not (model_folder / f"fold_{fold}" / checkpoint_name).is_file():
            raise UserError(f"no {checkpoint_name} in {model_folder / f'fold_{fold}'}; train fold {fold} (-f) first, "
                            "or pass the folds that were trained")
    if folds is None and not any(model_folder.glob(f"fold_*/{checkpoint_name}")):
        raise UserError(f"no fold folder of {model_folder} holds {checkpoint_name}; finish training a fold first "
                        "(or pass --checkpoint)")
    predictor = trained_predictor(model_folder, folds, trainer, device, use_mirroring, checkpoint_name)
    output_folder.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(str(input_folder), str(output_folder), save_probabilities=save_probabilities,
                                 overwrite=True, num_processes_preprocessing=num_processes,
                                 num_processes_segmentation_export=num_processes)
    return output_folder
