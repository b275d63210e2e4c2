"""The 70/10/20 train/validation/test split of the SegMamba paper (Xing et al. 2024, Sec. 4.1).

nnU-Net trains 5-fold cross-validation on all labelled cases. The SegMamba paper instead holds out 20 % of the
labelled cases as a test set and splits the rest 70/10 (percent of all cases) into training and validation.
Every SegMamba trainer uses this split (see `nnUNetTrainerSegMambaBase.do_split`); the held-out test cases are
predicted and scored afterwards by `nnunet-segmamba predict-test`.

The split of a fold is a pure function of the sorted case identifiers and the fold:
`numpy.random.RandomState(SPLIT_SEED + fold)` permutes the sorted identifiers (that generator is
stable across platforms and numpy versions), the first `n_train` go to training, the next `n_val` to
validation and the rest to test. Different folds therefore give different splits of the same dataset.

It is stored in `SPLIT_FILE_NAME` next to nnU-Net's `splits_final.json` (which is never touched), as
`{"fractions": [...], "seed": ..., "folds": {"0": {"train": [...], "val": [...], "test": [...]}, ...}}`.
A fold already in the file is used as stored, so a split can be pinned or edited by hand like nnU-Net's.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

SPLIT_FILE_NAME = "splits_segmamba_70_10_20.json"
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, validation, test (fractions of all labelled cases)
SPLIT_SEED = 12345  # the seed of fold f is SPLIT_SEED + f (nnU-Net seeds its own splits with 12345 too)
MIN_CASES = 3  # one case each for train, validation and test


def _check_fold(fold: int | str) -> int:
    if isinstance(fold, str) and fold.isdigit():
        fold = int(fold)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 0:
        raise ValueError(
            f"The 70/10/20 split needs a non-negative integer fold (it seeds the shuffle), got {fold!r}. "
            f"Fold 'all' is not supported because it would train on the held-out test cases: "
            f"pass an integer fold such as 0."
        )
    return int(fold)


def split_counts(n_cases: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> tuple[int, int, int]:
    """Number of (train, val, test) cases for `n_cases` labelled cases.

    Validation and test get `round(fraction * n)` cases but at least one each, training gets the rest (so
    1,251 BraTS cases give 876/125/250 and 20 cases 14/2/4).

    Raises:
        ValueError: fewer than `MIN_CASES` cases, or fractions that are not three positive numbers summing to 1.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers (train, val, test) summing to 1, got {fractions}")
    if n_cases < MIN_CASES:
        raise ValueError(
            f"The 70/10/20 split needs at least {MIN_CASES} labelled cases (one each for training, validation and "
            f"test), but the dataset has {n_cases}. Add cases or train with nnU-Net's own trainers."
        )
    n_val = max(1, round(fractions[1] * n_cases))
    n_test = max(1, round(fractions[2] * n_cases))
    n_train = n_cases - n_val - n_test
    if n_train < 1:  # only reachable for tiny n with unusual fractions
        raise ValueError(f"{n_cases} cases leave no training case with fractions {fractions}; add cases.")
    return n_train, n_val, n_test


def make_split(identifiers: Iterable[str], fold: int,
               fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, list[str]]:
    """The split of one fold: `{"train": [...], "val": [...], "test": [...]}`, each list sorted.

    Args:
        identifiers: case identifiers (order and duplicates do not matter; they are sorted and de-duplicated).
        fold: non-negative integer; the shuffle is seeded with `SPLIT_SEED + fold`.
        fractions: (train, val, test) fractions, default 70/10/20.
    """
    fold = _check_fold(fold)
    keys = sorted(set(identifiers))
    n_train, n_val, _ = split_counts(len(keys), fractions)
    order = np.random.RandomState(SPLIT_SEED + fold).permutation(len(keys))
    shuffled = [keys[i] for i in order]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train:n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val:]),
    }


def split_file_path(preprocessed_dataset_folder_base: str) -> str:
    """Where the split of a dataset lives: next to nnU-Net's splits_final.json."""
    return os.path.join(preprocessed_dataset_folder_base, SPLIT_FILE_NAME)


def _read(path: str) -> dict:
    with open(path) as f:
        content = json.load(f)
    if not isinstance(content, dict) or not isinstance(content.get("folds"), dict):
        raise ValueError(f"{path} is not a SegMamba split file (no 'folds' mapping). Delete it to regenerate it.")
    return content


def _write_atomically(path: str, content: dict) -> None:
    # several processes (DDP ranks, a parallel fold) may write at once: never leave a half-written file
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_split_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)


def load_or_create_split(preprocessed_dataset_folder_base: str, identifiers: Iterable[str],
                         fold: int) -> dict[str, list[str]]:
    """The split of `fold`, read from the split file or created (and added to the file) when absent.

    Raises:
        ValueError: a stored fold names cases that are not in the dataset (the dataset changed: delete the file
            to regenerate it), or the dataset is too small (see `split_counts`).
    """
    fold = _check_fold(fold)
    identifiers = sorted(set(identifiers))
    path = split_file_path(preprocessed_dataset_folder_base)
    content = _read(path) if os.path.isfile(path) else {
        "fractions": list(SPLIT_FRACTIONS),
        "seed": f"numpy RandomState({SPLIT_SEED} + fold) permutation of the sorted identifiers",
        "folds": {},
    }
    stored = content["folds"].get(str(fold))
    if stored is not None:
        unknown = sorted(set().union(*(stored[k] for k in ("train", "val", "test"))) - set(identifiers))
        if unknown:
            raise ValueError(
                f"{path}, fold {fold}, lists {len(unknown)} case(s) that are not in the preprocessed dataset "
                f"(first: {unknown[:3]}). The dataset changed since the split was made: delete {path} to regenerate it."
            )
        return {k: list(stored[k]) for k in ("train", "val", "test")}
    split = make_split(identifiers, fold)
    content["folds"][str(fold)] = split
    _write_atomically(path, content)
    return split


def read_split(preprocessed_dataset_folder_base: str, fold: int) -> dict[str, list[str]]:
    """The stored split of `fold` (for prediction on the test cases after training).

    Raises:
        FileNotFoundError: no split file yet (nothing was trained with a SegMamba trainer).
        ValueError: the file has no entry for this fold.
    """
    fold = _check_fold(fold)
    path = split_file_path(preprocessed_dataset_folder_base)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No SegMamba split file at {path}. It is written when a SegMamba trainer starts training; "
            f"train fold {fold} first (nnUNetv2_train ... -tr nnUNetTrainerSegMamba)."
        )
    folds = _read(path)["folds"]
    if str(fold) not in folds:
        raise ValueError(f"{path} has no fold {fold} (it has folds {sorted(folds, key=int)}); train that fold first.")
    return {k: list(folds[str(fold)][k]) for k in ("train", "val", "test")}
