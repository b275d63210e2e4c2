"""What the SegMamba trainers and `predict-test` do when something goes wrong (policies: docs/reliability.md).

* numerical faults: `non_finite_steps_error` is the error the base trainer raises after too many consecutive
  non-finite training steps (the steps themselves are skipped in `nnUNetTrainerSegMambaBase.train_step`);
* interruption: `atomic_write_path` gives checkpoints a temporary name in the target folder and renames it over
  the target only once it is completely written (`nnUNetTrainerSegMambaBase.save_checkpoint`);
* bad input before prediction: `check_images_finite` (NaN / Inf voxels), `check_channel_count` (the dataset has
  another number of channels than the trained model), `trainer_lookup_error` and `trainer_lookup` (a trainer nnU-Net
  cannot find).
"""
from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from nnunet_segmamba.training.ext_trainers import add_ext_trainer_folder, ext_trainer_folder

NON_FINITE_CAUSES = (
    "Likely causes: a learning rate too high for this network or batch (the loss diverged); float16 overflow "
    "under CUDA autocast (activations above 65504); or bad input, e.g. NaN/Inf voxels in a preprocessed case. "
    "What to try: a smaller learning rate (a variant with a lower `initial_lr`); "
    "`nnunet_segmamba.training.reliability.check_images_finite` on the raw dataset; re-running "
    "nnUNetv2_plan_and_preprocess with --verify_dataset_integrity; resuming from the last good checkpoint with "
    "--c (checkpoint_latest.pth is written atomically, so it is never a half-written file)."
)


def non_finite_steps_error(count: int, epoch: int, iteration: int, what: str, trainer: str) -> RuntimeError:
    """The error that stops training after `count` consecutive non-finite steps (the last at `iteration`)."""
    return RuntimeError(
        f"{trainer}: training stopped after {count} consecutive training steps with a non-finite {what} "
        f"(NaN or Inf; last at epoch {epoch}, iteration {iteration}). Each of these steps was skipped without "
        f"updating the weights, so the last checkpoint is still usable. {NON_FINITE_CAUSES}"
    )


# ---- atomic checkpoints ---------------------------------------------------------------------------------------
def _temporary_name(filename: str, pid: int | str) -> str:
    folder, base = os.path.split(os.path.abspath(filename))
    return os.path.join(folder, f".{base}.{pid}.tmp")


@contextlib.contextmanager
def atomic_write_path(filename: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in `filename`'s folder; on success, fsync it and rename it over `filename`.

    `os.replace` within one folder (one file system) is atomic: readers see the old file or the new one, never a
    partial one, also when the process is killed mid-write. On an exception the temporary file is removed and
    `filename` is left as it was. Temporary files left by a killed earlier writer of the same target
    (`.<name>.<pid>.tmp`) are removed first.
    """
    filename = os.fspath(filename)
    tmp = _temporary_name(filename, os.getpid())
    folder, base = os.path.split(os.path.abspath(filename))
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{base}.") + "*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(stale)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # persist the rename itself (POSIX; not possible on every platform)
        fd = os.open(os.path.dirname(os.path.abspath(filename)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- bad input ------------------------------------------------------------------------------------------------
def _case_files(raw_dataset_folder: Path, dataset_json: Mapping | None) -> tuple[dict, dict]:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if dataset_json is None:
        dataset_json = load_json(str(raw_dataset_folder / "dataset.json"))
    dataset_json = dict(dataset_json)
    return dataset_json, get_filenames_of_train_images_and_targets(str(raw_dataset_folder), dataset_json)


def check_images_finite(raw_dataset_folder: str | os.PathLike, case_ids: Sequence[str] | None = None,
                        dataset_json: Mapping | None = None) -> list[str]:
    """Problems with NaN or Inf voxels in the images of a raw nnU-Net dataset, one line per case and channel.

    Args:
        raw_dataset_folder: `nnUNet_raw/DatasetXXX_Name` (with dataset.json and imagesTr).
        case_ids: only these cases (default: all of imagesTr / the dataset.json's "dataset" entry).
        dataset_json: the dataset.json contents (default: read from the folder).

    Returns:
        e.g. ["case_003 channel 1 (T1c, case_003_0001.nii.gz): 12 NaN and 0 Inf voxels of 110592"]; empty when
        every image is finite. nnU-Net's preprocessing does not catch these: they turn into NaN losses in
        training and NaN logits (an arbitrary argmax) at inference.
    """
    import numpy as np
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    folder = Path(raw_dataset_folder)
    dataset_json, files = _case_files(folder, dataset_json)
    names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    ids = list(files) if case_ids is None else list(case_ids)
    problems = []
    reader = None
    for case in ids:
        if case not in files:
            problems.append(f"{case}: not in {folder}")
            continue
        for channel, path in enumerate(files[case]["images"]):
            if reader is None:
                reader = determine_reader_writer_from_dataset_json(dataset_json, path)()
            image, _ = reader.read_images((path,))
            n_nan, n_inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
            if n_nan or n_inf:
                label = names.get(str(channel), "?")
                problems.append(f"{case} channel {channel} ({label}, {os.path.basename(path)}): {n_nan} NaN and "
                                f"{n_inf} Inf voxels of {image.size}")
    return problems


def check_channel_count(model_dataset_json: Mapping, dataset_json: Mapping, case_files: Mapping[str, Mapping],
                        dataset: str = "the dataset", model: str = "the model") -> list[str]:
    """Problems where the images to predict have another number of channels than the trained model.

    Args:
        model_dataset_json: the dataset.json saved with the trained model (its "channel_names").
        dataset_json: the dataset.json of the raw dataset to predict.
        case_files: {case id: {"images": [one file per channel], ...}} of the cases to predict.
        dataset, model: names for the messages.

    Returns:
        One line for a dataset.json mismatch and one per case whose file count is off (the first 5); empty if
        everything matches.
    """
    def channels(js: Mapping) -> dict:
        return dict(js.get("channel_names", js.get("modality", {})))

    expected = channels(model_dataset_json)
    problems = []
    if len(channels(dataset_json)) != len(expected):
        problems.append(f"{dataset} has {len(channels(dataset_json))} channels {channels(dataset_json)} in its "
                        f"dataset.json, but {model} was trained on {len(expected)}: {expected}")
    wrong = [(case, len(f["images"])) for case, f in case_files.items() if len(f["images"]) != len(expected)]
    for case, n in wrong[:5]:
        problems.append(f"case {case} has {n} image files (_0000 ... _{n - 1:04d}), but {model} needs "
                        f"{len(expected)} channels: {expected}")
    if len(wrong) > 5:
        problems.append(f"... and {len(wrong) - 5} more cases with the wrong number of image files")
    return problems


def trainer_lookup_error(exc: BaseException, trainer: str) -> RuntimeError:  # a SetupError: one CLI line
    """nnU-Net's 'Could not find requested nnunet trainer' RuntimeError, restated with what to export."""
    current = os.environ.get("nnUNet_extTrainer")
    hint = ("nnUNet_extTrainer is not set" if not current else f"nnUNet_extTrainer={current} does not contain it")
    from nnunet_segmamba.errors import SetupError

    return SetupError(
        f"nnU-Net cannot find the trainer class {trainer!r} ({hint}). The SegMamba trainers are found through "
        f"`export nnUNet_extTrainer={ext_trainer_folder()}` (printed by `nnunet-segmamba env`); a trainer of "
        f"your own must be in a .py file under a folder listed in nnUNet_extTrainer (folders separated by "
        f"{os.pathsep!r}), with the class name spelled as in -tr. nnU-Net said: {exc}"
    )


def is_trainer_lookup_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "Could not find requested nnunet trainer" in str(exc)


@contextlib.contextmanager
def trainer_lookup(trainer: str) -> Iterator[None]:
    """Around nnU-Net code that looks `trainer` up by name: adds our trainer folder to nnUNet_extTrainer before the
    lookup, and restates a failed lookup as `trainer_lookup_error`."""
    add_ext_trainer_folder()
    try:
        yield
    except RuntimeError as exc:
        if is_trainer_lookup_error(exc):
            raise trainer_lookup_error(exc, trainer) from exc
        raise
