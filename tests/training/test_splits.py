"""The 70/10/20 split: sizes, disjointness, determinism, fold dependence, storage next to nnU-Net's file."""
import json

import pytest

from nnunet_segmamba.training.splits import (SPLIT_FILE_NAME, load_or_create_split, make_split, read_split,
                                             split_counts)


def _ids(n):
    return [f"case_{i:04d}" for i in range(n)]


@pytest.mark.parametrize("n, expected", [(3, (1, 1, 1)), (10, (7, 1, 2)), (20, (14, 2, 4)), (100, (70, 10, 20)),
                                         (1251, (876, 125, 250))])
def test_counts(n, expected):
    assert split_counts(n) == expected


@pytest.mark.parametrize("n", [3, 4, 7, 10, 20, 57, 200])
def test_split_is_a_partition_with_the_right_sizes(n):
    split = make_split(_ids(n), fold=0)
    train, val, test = (set(split[k]) for k in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(_ids(n))
    assert (len(train), len(val), len(test)) == split_counts(n)
    assert all(split[k] == sorted(split[k]) for k in split)


def test_deterministic_and_independent_of_input_order():
    ids = _ids(50)
    assert make_split(ids, 3) == make_split(list(reversed(ids)), 3) == make_split(ids + ids[:5], 3)


def test_pinned_values_do_not_drift():
    # the split of a dataset must be the same on every machine and numpy version (RandomState is frozen)
    split = make_split(_ids(10), 0)
    assert split["val"] == ["case_0008"]
    assert split["test"] == ["case_0002", "case_0005"]


def test_folds_differ():
    tests = {tuple(make_split(_ids(50), f)["test"]) for f in range(5)}
    assert len(tests) == 5


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_cases(n):
    with pytest.raises(ValueError, match="at least 3"):
        make_split(_ids(n), 0)


@pytest.mark.parametrize("fold", [-1, "all", 1.5, None])
def test_bad_fold(fold):
    with pytest.raises(ValueError, match="fold"):
        make_split(_ids(10), fold)


def test_stored_next_to_splits_final_without_touching_it(tmp_path):
    (tmp_path / "splits_final.json").write_text("[]")
    first = load_or_create_split(str(tmp_path), _ids(20), 0)
    load_or_create_split(str(tmp_path), _ids(20), 1)
    assert (tmp_path / "splits_final.json").read_text() == "[]"
    stored = json.loads((tmp_path / SPLIT_FILE_NAME).read_text())
    assert set(stored["folds"]) == {"0", "1"}
    assert stored["folds"]["0"] == first == make_split(_ids(20), 0)
    assert read_split(str(tmp_path), 0) == first


def test_stored_fold_is_used_as_is_and_checked(tmp_path):
    load_or_create_split(str(tmp_path), _ids(20), 0)
    path = tmp_path / SPLIT_FILE_NAME
    content = json.loads(path.read_text())
    content["folds"]["0"] = {"train": _ids(20)[:10], "val": _ids(20)[10:15], "test": _ids(20)[15:]}
    path.write_text(json.dumps(content))
    assert load_or_create_split(str(tmp_path), _ids(20), 0)["test"] == _ids(20)[15:]  # hand-edited split kept
    with pytest.raises(ValueError, match="delete"):
        load_or_create_split(str(tmp_path), _ids(12), 0)  # dataset lost cases named in the file


def test_read_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train fold 0 first"):
        read_split(str(tmp_path), 0)
    load_or_create_split(str(tmp_path), _ids(20), 0)
    with pytest.raises(ValueError, match="no fold 2"):
        read_split(str(tmp_path), 2)
