"""Tests for BraTS -> nnU-Net raw conversion on tiny synthetic case folders."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_segmamba import cli
from nnunet_segmamba.data.brats import convert_brats
from nnunet_segmamba.evaluation import commands

# per scheme: file tokens in nnU-Net channel order (T2w, FLAIR, T1n, T1c), then seg; and the case name pattern
SCHEMES = {
    "2023": (("t2w", "t2f", "t1n", "t1c"), "BraTS-GLI-{:05d}-000", "-"),
    "2021": (("t2", "flair", "t1", "t1ce"), "BraTS2021_{:05d}", "_"),
}
# a distinct value band per channel so the output channel order can be read back from the data
CHANNEL_OFFSET = (1000, 2000, 3000, 4000)


def _write(arr, path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def make_case(root, scheme, index, seed=0, et_label=None):
    tokens, pattern, sep = SCHEMES[scheme]
    name = pattern.format(index)
    rng = np.random.default_rng((seed, index))
    d = root / name
    d.mkdir(parents=True)
    for tok, off in zip(tokens, CHANNEL_OFFSET):
        _write((off + rng.uniform(0, 100, (8, 8, 8))).astype(np.float32), d / f"{name}{sep}{tok}.nii.gz")
    seg = rng.choice([0, 1, 2], size=(8, 8, 8)).astype(np.uint8)
    seg[3:5, 3:5, 3:5] = et_label if et_label is not None else (3 if scheme == "2023" else 4)
    _write(seg, d / f"{name}{sep}seg.nii.gz")
    return d, name, sep


def make_folder(root, scheme, n=3):
    root.mkdir(parents=True, exist_ok=True)
    return [make_case(root, scheme, i) for i in range(n)]


@pytest.mark.parametrize("scheme", ["2023", "2021"])
def test_convert_each_scheme(tmp_path, scheme):
    cases = make_folder(tmp_path / "src", scheme)
    (tmp_path / "src" / "name_mapping.csv").write_text("ignored, not a case folder\n")
    out = convert_brats(tmp_path / "src", 501, "BraTSTest", out_root=tmp_path / "raw")
    assert out == tmp_path / "raw" / "Dataset501_BraTSTest"
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T2w", "1": "FLAIR", "2": "T1n", "3": "T1c"}
    assert ds["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3],
                            "enhancing tumor": [3]}
    assert ds["regions_class_order"] == [2, 1, 3]
    assert ds["numTraining"] == 3 and ds["file_ending"] == ".nii.gz"
    for d, name, sep in cases:
        for ch, off in enumerate(CHANNEL_OFFSET):
            img = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / f"{name}_{ch:04d}.nii.gz")))
            assert off <= img.min() and img.max() <= off + 100, f"channel {ch} holds the wrong modality"
        src_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"{name}{sep}seg.nii.gz")))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{name}.nii.gz")))
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
        expected = np.where(src_seg == 4, 3, src_seg)  # 2021: 4 -> 3; 1 and 2 keep their meaning
        np.testing.assert_array_equal(seg, expected)
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(f"{c[1]}.nii.gz" for c in cases)


def test_label_form_and_nnunet_reads_dataset_json(tmp_path):
    make_folder(tmp_path / "src", "2023", n=2)
    out = convert_brats(tmp_path / "src", 502, "BraTSLabels", out_root=tmp_path / "raw", label_form="labels")
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "NCR": 1, "edema": 2, "ET": 3}
    assert "regions_class_order" not in ds
    # nnU-Net reads both forms: its label manager parses them, its dataset checker accepts the region dataset
    # (the checker spawns a worker process, ~3 s, so it runs on the more intricate region form only)
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    assert LabelManager(ds["labels"], None).all_labels == [0, 1, 2, 3]
    regions = convert_brats(tmp_path / "src", 503, "BraTSRegions", out_root=tmp_path / "raw")
    rds = json.loads((regions / "dataset.json").read_text())
    manager = LabelManager(rds["labels"], rds["regions_class_order"])
    assert manager.has_regions and manager.foreground_regions == [(1, 2, 3), (1, 3), (3,)]
    verify_dataset_integrity(str(regions), num_processes=1)


def test_region_predictions_turn_back_into_the_original_labels(tmp_path):
    # what nnU-Net does with a region-trained model's output: regions (WT, TC, ET) -> one label map through
    # regions_class_order. A perfect prediction must give back the ground truth's labels 1 NCR, 2 edema, 3 ET.
    import numpy as np
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    make_folder(tmp_path / "src", "2023")
    ds = json.loads((convert_brats(tmp_path / "src", 505, "RoundTrip", out_root=tmp_path / "raw")
                     / "dataset.json").read_text())
    manager = LabelManager(ds["labels"], ds["regions_class_order"])
    seg = np.random.default_rng(0).integers(0, 4, size=(6, 7, 8))
    probabilities = np.stack([np.isin(seg, region) for region in manager.foreground_regions]).astype(np.float32)
    back = manager.convert_probabilities_to_segmentation(probabilities)
    np.testing.assert_array_equal(back, seg)


def _convert_expect(tmp_path, match):
    with pytest.raises(ValueError, match=match) as info:
        convert_brats(tmp_path / "src", 504, "Bad", out_root=tmp_path / "raw")
    assert not (tmp_path / "raw" / "Dataset504_Bad").exists()  # nothing written when a case is bad
    return str(info.value)


def test_missing_modality(tmp_path):
    cases = make_folder(tmp_path / "src", "2023")
    d, name, sep = cases[1]
    (d / f"{name}{sep}t2f.nii.gz").unlink()
    msg = _convert_expect(tmp_path, "1 of 3 BraTS cases are bad")
    assert f"{name}: missing t2f" in msg


def test_every_problem_is_listed(tmp_path):
    cases = make_folder(tmp_path / "src", "2021", n=4)
    d0, n0, s = cases[0]
    _write(np.zeros((8, 8, 9), np.float32), d0 / f"{n0}{s}t1ce.nii.gz")                  # size (shape) mismatch
    d1, n1, _ = cases[1]
    _write(np.zeros((8, 8, 8), np.float32), d1 / f"{n1}{s}flair.nii.gz", spacing=(1, 1, 1.5))  # spacing mismatch
    d2, n2, _ = cases[2]
    bad = np.zeros((8, 8, 8), np.uint8)
    bad[0, 0, 0] = 3  # fine: the case gets the 2023+ numbering from its values
    bad[1, 1, 1] = 7
    _write(bad, d2 / f"{n2}{s}seg.nii.gz")
    msg = _convert_expect(tmp_path, "3 of 4 BraTS cases are bad")
    assert f"{n0}: t1ce size (9, 8, 8) != seg size (8, 8, 8)" in msg
    assert f"{n1}: flair spacing (1.0, 1.0, 1.5) != seg spacing (1.0, 1.0, 1.0)" in msg
    assert f"{n2}: unexpected label value(s) [7]" in msg
    assert cases[3][1] not in msg


def test_origin_mismatch(tmp_path):
    cases = make_folder(tmp_path / "src", "2023")
    d0, n0, s = cases[0]
    _write(np.zeros((8, 8, 8), np.float32), d0 / f"{n0}{s}t1n.nii.gz", origin=(0, 5, 0))
    msg = _convert_expect(tmp_path, "1 of 3")
    assert f"{n0}: t1n origin" in msg


def test_skip_bad_cases(tmp_path):
    cases = make_folder(tmp_path / "src", "2023")
    d, name, sep = cases[0]
    (d / f"{name}{sep}seg.nii.gz").unlink()
    with pytest.warns(UserWarning, match=f"skipping 1 of 3 bad BraTS cases:\n  {name}: missing seg"):
        out = convert_brats(tmp_path / "src", 505, "Skip", out_root=tmp_path / "raw", skip_bad_cases=True)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert not (out / "labelsTr" / f"{name}.nii.gz").exists()


def test_argument_errors(tmp_path, monkeypatch):
    make_folder(tmp_path / "src", "2023", n=1)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ValueError, match="nnUNet_raw"):
        convert_brats(tmp_path / "src", 506)
    with pytest.raises(ValueError, match="label_form"):
        convert_brats(tmp_path / "src", 506, out_root=tmp_path, label_form="onehot")
    convert_brats(tmp_path / "src", 506, "First", out_root=tmp_path / "raw")
    with pytest.raises(ValueError, match="already used by Dataset506_First"):
        convert_brats(tmp_path / "src", 506, "Second", out_root=tmp_path / "raw")
    with pytest.raises(ValueError, match="already exists and is not empty; delete it, or pass --overwrite"):
        convert_brats(tmp_path / "src", 506, "First", out_root=tmp_path / "raw")
    convert_brats(tmp_path / "src", 506, "First", out_root=tmp_path / "raw", overwrite=True)
    # a bad source with overwrite=True leaves the existing dataset alone: validation comes before removal
    bad = tmp_path / "bad"
    (bad / "BraTS-GLI-00009-000").mkdir(parents=True)
    with pytest.raises(ValueError, match="1 of 1 BraTS cases are bad"):
        convert_brats(bad, 506, "First", out_root=tmp_path / "raw", overwrite=True)
    assert (tmp_path / "raw" / "Dataset506_First" / "dataset.json").is_file()


def cli_main(argv):
    # only this package's sub-commands: the test must not depend on the other modules listed in cli.py
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_and_evaluate(tmp_path, capsys):
    assert commands in cli.COMMAND_MODULES
    cases = make_folder(tmp_path / "src", "2021", n=2)
    rc = cli_main(["convert-brats", str(tmp_path / "src"), "--dataset-id", "507", "--name", "Cli",
                   "--out", str(tmp_path / "raw"), "--labels", "-np", "1"])
    assert rc == 0
    out = tmp_path / "raw" / "Dataset507_Cli"
    assert json.loads((out / "dataset.json").read_text())["labels"]["ET"] == 3
    # labels evaluated against themselves: perfect scores, BraTS regions via --brats
    rc = cli_main(["evaluate", str(out / "labelsTr"), str(out / "labelsTr"), "--brats", "-o", str(tmp_path / "ev"),
                   "-np", "1"])
    assert rc == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["metrics"]["WT"]["dice"]["mean"] == 1.0 and summary["metrics"]["ET"]["hd95_mm"]["mean"] == 0.0
    assert "WT" in capsys.readouterr().out
    assert len(cases) == summary["num_cases"]


# --- file names as BraTS data circulates, and the label numbering decided from the values -----------------------

SUFFIXES = {"2023": ("t2w", "t2f", "t1n", "t1c"), "2021": ("t2", "flair", "t1", "t1ce")}
IDS = {"2023": "BraTS-GLI-{:05d}-000", "2021": "BraTS2021_{:05d}"}


def write_case(root, id_style, suffix_style, index, labels, sep="_", dtype=np.float32):
    """One 8^3 case named with `id_style` IDs and `suffix_style` suffixes; seg drawn from `labels`, stored as dtype."""
    name = IDS[id_style].format(index)
    rng = np.random.default_rng(index)
    d = root / name
    d.mkdir(parents=True)
    for tok, off in zip(SUFFIXES[suffix_style], CHANNEL_OFFSET):
        _write((off + rng.uniform(0, 100, (8, 8, 8))).astype(np.float32), d / f"{name}{sep}{tok}.nii.gz")
    seg = rng.choice(labels, size=(8, 8, 8)).astype(dtype)
    seg[0, 0, :len(labels)] = labels  # every label present
    _write(seg, d / f"{name}{sep}seg.nii.gz")
    return name, seg


def _report(out):
    return json.loads((out / "conversion_report.json").read_text())


def test_brats2025_cases_with_2023_ids_2021_suffixes_and_float_labels(tmp_path, capsys):
    # how BraTS 2025 glioma cases circulate: BraTS-GLI-00000-000_flair.nii.gz ..., labels 0..3 stored as float32
    src = tmp_path / "src"
    segs = dict(write_case(src, "2023", "2021", i, [0, 1, 2, 3]) for i in range(2))
    out = convert_brats(src, 510, "BraTS2025", out_root=tmp_path / "raw")
    for name, src_seg in segs.items():
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{name}.nii.gz")))
        assert seg.dtype == np.uint8
        np.testing.assert_array_equal(seg, src_seg.astype(np.uint8))  # 2023+ numbering: unchanged
        for ch, off in enumerate(CHANNEL_OFFSET):  # _flair -> channel 1 (FLAIR), _t1ce -> 3 (T1c), ...
            img = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / f"{name}_{ch:04d}.nii.gz")))
            assert off <= img.min() and img.max() <= off + 100
        assert _report(out)["cases"][name] == {"label_numbering": "2023+", "decided_by": "label 3",
                                                "file_names": "2023 IDs, 2021 suffixes"}
    assert json.loads((out / "dataset.json").read_text())["brats_label_numbering"] == {"2021": 0, "2023+": 2}
    assert ("label numbering per case: 2 cases 2023+ (1 NCR, 2 SNFH/edema, 3 ET; 2 by label 3, 0 by file names), "
            "0 cases 2021 (1 NCR, 2 edema, 4 ET; 0 by label 4, 0 by file names)") in capsys.readouterr().out


def test_2021_ids_with_2023_suffixes_and_label_4(tmp_path):
    src = tmp_path / "src"
    segs = dict([write_case(src, "2021", "2023", 0, [0, 1, 2, 4], sep="_", dtype=np.uint8),
                 write_case(src, "2021", "2023", 1, [0, 1, 2, 4], sep="-", dtype=np.float32)])
    out = convert_brats(src, 511, "Mixed", out_root=tmp_path / "raw")
    for name, src_seg in segs.items():
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{name}.nii.gz")))
        np.testing.assert_array_equal(seg, np.where(src_seg == 4, 3, src_seg))  # 2021 numbering: 4 -> 3
        assert _report(out)["cases"][name] == {"label_numbering": "2021", "decided_by": "label 4",
                                                "file_names": "2021 IDs, 2023 suffixes"}


def test_label_4_decides_2021_numbering_whatever_the_names(tmp_path):
    src = tmp_path / "src"
    name, src_seg = write_case(src, "2023", "2023", 0, [0, 1, 2, 4], sep="-")
    out = convert_brats(src, 512, "Four", out_root=tmp_path / "raw")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{name}.nii.gz")))
    np.testing.assert_array_equal(seg, np.where(src_seg == 4, 3, src_seg))
    assert _report(out)["cases"][name]["label_numbering"] == "2021"


def test_neither_3_nor_4_takes_the_numbering_from_the_names(tmp_path):
    src = tmp_path / "src"
    a, seg_a = write_case(src, "2021", "2021", 0, [0, 1, 2])
    b, seg_b = write_case(src, "2023", "2021", 1, [0, 1, 2])  # the ID style decides over the suffix style
    out = convert_brats(src, 513, "NoET", out_root=tmp_path / "raw")
    cases = _report(out)["cases"]
    assert cases[a] == {"label_numbering": "2021", "decided_by": "file names", "file_names": "2021 IDs, 2021 suffixes"}
    assert cases[b] == {"label_numbering": "2023+", "decided_by": "file names", "file_names": "2023 IDs, 2021 suffixes"}
    for name, src_seg in ((a, seg_a), (b, seg_b)):  # 1 and 2 mean the same in both numberings: unchanged
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{name}.nii.gz")))
        np.testing.assert_array_equal(seg, src_seg.astype(np.uint8))


def test_both_3_and_4_and_non_integer_labels_are_bad_cases(tmp_path):
    src = tmp_path / "src"
    both, _ = write_case(src, "2023", "2021", 0, [0, 1, 3, 4])
    frac, _ = write_case(src, "2023", "2021", 1, [0, 1, 2.5])
    write_case(src, "2023", "2021", 2, [0, 1, 2, 3])
    msg = _convert_expect(tmp_path, "2 of 3 BraTS cases are bad")
    assert f"{both}: seg holds both labels 3 and 4" in msg
    assert f"{frac}: seg holds non-integer values [2.5]" in msg


def test_cases_with_4_mixed_with_cases_with_3_are_refused(tmp_path):
    # BraTS 2024 post-treatment data: 3 is ET, 4 resection cavity; a case without ET must not turn RC into ET
    src = tmp_path / "src"
    with3, _ = write_case(src, "2023", "2023", 0, [0, 1, 2, 3], sep="-")
    with4, _ = write_case(src, "2023", "2023", 1, [0, 1, 2, 4], sep="-")
    msg = _convert_expect(tmp_path, "1 cases hold label 4")
    assert with4 in msg and with3 in msg and "resection cavity" in msg
