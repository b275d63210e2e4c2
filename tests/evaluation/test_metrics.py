"""Known-answer tests for nnunet_segmamba.evaluation.metrics, and a cross-check of MONAI against medpy.

How the two libraries relate (read from their sources, MONAI 1.6 / medpy 0.5): both take the surface of a
mask as `mask XOR binary_erosion(mask)` with scipy's default cross-shaped (connectivity 1) structure and zero
border, and measure exact Euclidean distances in mm from each surface voxel of one mask to the nearest surface
voxel of the other. So the directed distance sets are the same and the maximum (HD) agrees exactly. They differ
in the 95th percentile: MONAI takes the 95th percentile of each direction and returns the larger, medpy pools
both directions and takes one percentile, so medpy's hd95 lies between MONAI's two directed values. The
cross-check therefore compares like with like (directed percentiles from medpy's distance sets vs MONAI's HD95,
HD vs HD, NSD recomputed from medpy's distances) at float32 precision, and checks the bracketing for hd95.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary as mb
from scipy.ndimage import gaussian_filter

from nnunet_segmamba.evaluation.metrics import (BRATS_WORST_HD95_MM, REFERENCE_EMPTY_HD95, binary_metrics,
                                                brats_regions, dice, evaluate_folder, map_brats2021_labels)

medpy_surface_distances = getattr(mb, "__surface_distances")  # module-level "private" helper behind medpy.hd95


def box(shape, lo, hi):
    a = np.zeros(shape, bool)
    a[tuple(slice(lo_, hi_) for lo_, hi_ in zip(lo, hi))] = True
    return a


def sphere(shape, center, radius_mm, spacing):
    idx = np.indices(shape).astype(float)
    d2 = sum(((idx[i] - center[i]) * spacing[i]) ** 2 for i in range(3))
    return d2 <= radius_mm ** 2


def blob(rng, shape, sigma=2.0, thresh=0.6):
    noise = gaussian_filter(rng.standard_normal(shape), sigma)
    return noise > thresh * noise.std()


# ---------------------------------------------------------------- Dice

def test_dice_known_overlaps():
    g = box((20, 20, 20), (5, 5, 5), (15, 15, 15))
    assert dice(g, g) == 1.0
    assert dice(box((20, 20, 20), (7, 5, 5), (17, 15, 15)), g) == pytest.approx(0.8)  # 8 of 10 slabs overlap
    assert dice(box((20, 20, 20), (5, 5, 5), (10, 15, 15)), g) == pytest.approx(2 * 500 / 1500)  # half inside
    assert dice(box((20, 20, 20), (0, 0, 0), (3, 3, 3)), g) == 0.0
    assert np.isnan(dice(np.zeros((4, 4)), np.zeros((4, 4))))


# ---------------------------------------------------------------- HD95 in mm

@pytest.mark.parametrize("spacing,axis,shift,expected_mm", [
    ((1.0, 1.0, 1.0), 0, 2, 2.0),
    ((3.0, 1.0, 1.0), 0, 2, 6.0),   # SimpleITK spacing (1, 1, 3): array axis 0 (z) is 3 mm
    ((3.0, 1.0, 1.0), 2, 2, 2.0),   # the same shift along x stays 2 mm
    ((1.0, 0.5, 2.0), 1, 3, 1.5),
])
def test_hd95_of_shifted_box_is_the_shift_in_mm(spacing, axis, shift, expected_mm):
    # a box and its copy shifted by `shift` voxels: every face normal to the shift sits exactly `shift` voxels
    # from its partner (20% of the surface, more than the top 5%), so the 95th percentile equals the maximum
    lo, hi = [8, 8, 8], [18, 18, 18]
    g = box((32, 32, 32), lo, hi)
    lo[axis] += shift
    hi[axis] += shift
    p = box((32, 32, 32), lo, hi)
    m = binary_metrics(p, g, spacing)
    assert m["hd95_mm"] == pytest.approx(expected_mm, rel=1e-6)
    assert m["dice"] == pytest.approx((10 - shift) / 10)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0)])
def test_hd95_of_concentric_spheres_is_radius_difference(spacing):
    shape = (40, 64, 64)
    centre = (20, 32, 32)
    g = sphere(shape, centre, 12.0, spacing)
    p = sphere(shape, centre, 16.0, spacing)
    m = binary_metrics(p, g, spacing)
    # every surface distance is ~4 mm; voxelisation moves a surface by at most half a voxel on each sphere
    assert m["hd95_mm"] == pytest.approx(4.0, abs=max(spacing) / 2)
    # if the spacing were ignored or reversed, the anisotropic distances would be off by a factor ~3
    assert m["nsd"] == 0.0  # all boundary distances exceed the 1 mm tolerance
    assert binary_metrics(p, g, spacing, nsd_tolerance_mm=8.0)["nsd"] == 1.0


def test_nsd_tolerance_is_in_mm():
    g = box((24, 24, 24), (6, 6, 6), (16, 16, 16))
    p = box((24, 24, 24), (6, 6, 7), (16, 16, 17))  # shifted one voxel along x
    assert binary_metrics(g, g, (1, 1, 1))["nsd"] == 1.0
    assert binary_metrics(p, g, (1, 1, 1), nsd_tolerance_mm=1.0)["nsd"] == 1.0
    assert binary_metrics(p, g, (1, 1, 1), nsd_tolerance_mm=0.5)["nsd"] < 1.0
    # the same one-voxel shift is 2 mm when x voxels are 2 mm wide: 1 mm no longer suffices
    assert binary_metrics(p, g, (1, 1, 2), nsd_tolerance_mm=1.0)["nsd"] < 1.0
    assert binary_metrics(p, g, (1, 1, 2), nsd_tolerance_mm=2.0)["nsd"] == 1.0


# ---------------------------------------------------------------- empty conventions

@pytest.mark.parametrize("convention,pred_empty,gt_empty,expected", [
    ("brats", True, True, (1.0, 0.0, 1.0)),
    ("brats", True, False, (0.0, BRATS_WORST_HD95_MM, 0.0)),
    ("brats", False, True, (0.0, BRATS_WORST_HD95_MM, 0.0)),
    ("reference", True, True, (0.0, REFERENCE_EMPTY_HD95, 0.0)),
    ("reference", True, False, (0.0, REFERENCE_EMPTY_HD95, 0.0)),
    ("reference", False, True, (0.0, REFERENCE_EMPTY_HD95, 0.0)),
])
def test_empty_conventions(convention, pred_empty, gt_empty, expected):
    full = box((10, 10, 10), (2, 2, 2), (6, 6, 6))
    empty = np.zeros_like(full)
    m = binary_metrics(empty if pred_empty else full, empty if gt_empty else full, (1, 1, 1), convention)
    assert (m["dice"], m["hd95_mm"], m["nsd"]) == expected


def test_bad_arguments_raise_value_error():
    a = box((10, 10, 10), (2, 2, 2), (6, 6, 6))
    with pytest.raises(ValueError, match="convention"):
        binary_metrics(a, a, (1, 1, 1), convention="nope")
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(a, a[:5], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(a, a, (1, 1))


def test_brats_label_mapping():
    assert brats_regions() == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
    np.testing.assert_array_equal(map_brats2021_labels(np.array([0, 1, 2, 4])), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="both labels 3 and 4"):
        map_brats2021_labels(np.array([3, 4]))


# ---------------------------------------------------------------- MONAI vs medpy

def _cases():
    rng = np.random.default_rng(1234)
    shape = (24, 28, 32)
    out = [(blob(rng, shape), blob(rng, shape), (1.0, 1.0, 1.0)),
           (blob(rng, shape), blob(rng, shape), (3.0, 1.0, 1.0)),
           (blob(rng, shape, sigma=3.0), blob(rng, shape, sigma=1.5), (2.5, 0.8, 1.2))]
    g = sphere(shape, (12, 14, 16), 7.0, (1.0, 1.0, 1.0))
    out.append((box(shape, (4, 4, 4), (18, 12, 30)), g, (1.0, 1.0, 1.0)))     # box vs ball
    out.append((box(shape, (0, 0, 0), (24, 10, 32)), g, (2.0, 1.0, 1.0)))     # touches the image border
    return out


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # inside MONAI, not ours
@pytest.mark.parametrize("pred,gt,spacing", _cases())
def test_monai_matches_medpy(pred, gt, spacing):
    import torch
    from monai.metrics import compute_hausdorff_distance

    assert pred.any() and gt.any() and not np.array_equal(pred, gt)
    d_pg = medpy_surface_distances(pred, gt, spacing)
    d_gp = medpy_surface_distances(gt, pred, spacing)
    ours = binary_metrics(pred, gt, spacing, nsd_tolerance_mm=1.5)

    # Hausdorff maximum: identical surfaces and distances -> identical values (MONAI works in float32)
    hd_monai = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None],
                                          include_background=True, spacing=list(spacing)).item()
    assert hd_monai == pytest.approx(mb.hd(pred, gt, voxelspacing=spacing), rel=1e-5)
    # HD95: MONAI's = larger directed 95th percentile, both percentiles linear-interpolated
    directed = (np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    assert ours["hd95_mm"] == pytest.approx(max(directed), rel=1e-5)
    # medpy's pooled hd95 is bracketed by the two directed values
    pooled = mb.hd95(pred, gt, voxelspacing=spacing)
    assert min(directed) - 1e-4 <= pooled <= max(directed) + 1e-4
    # NSD: fraction of both surfaces within the tolerance, from medpy's distance sets
    nsd_medpy = (np.sum(d_pg <= 1.5) + np.sum(d_gp <= 1.5)) / (d_pg.size + d_gp.size)
    assert ours["nsd"] == pytest.approx(nsd_medpy, abs=1e-6)
    assert ours["dice"] == pytest.approx(mb.dc(pred, gt))


# ---------------------------------------------------------------- evaluate_folder end to end

def _write(arr, path, spacing_xyz):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))


def _make_folders(tmp_path, label_et=3):
    shape = (12, 24, 24)
    spacing_xyz = (1.0, 1.0, 3.0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    g = np.zeros(shape, np.uint8)
    g[2:10, 4:20, 4:20] = 2
    g[4:8, 8:16, 8:16] = 1
    g[5:7, 10:14, 10:14] = label_et
    p = np.roll(g, 1, axis=0)  # one slice = 3 mm off
    _write(g, gt_dir / "a.nii.gz", spacing_xyz)
    _write(p, pred_dir / "a.nii.gz", spacing_xyz)
    g2 = g.copy()
    g2[g2 == label_et] = 1  # no enhancing tumour in gt ...
    p2 = g2.copy()
    p2[0, 0, 0] = label_et  # ... but a false-positive voxel in the prediction
    _write(g2, gt_dir / "b.nii.gz", spacing_xyz)
    _write(p2, pred_dir / "b.nii.gz", spacing_xyz)
    _write(np.zeros(shape), gt_dir / "c.nii.gz", spacing_xyz)   # healthy: everything empty on both sides
    _write(np.zeros(shape), pred_dir / "c.nii.gz", spacing_xyz)
    return gt_dir, pred_dir, spacing_xyz[::-1]


@pytest.mark.parametrize("label_et", [3, 4])
def test_evaluate_folder_brats_regions(tmp_path, label_et):
    gt_dir, pred_dir, spacing = _make_folders(tmp_path, label_et)
    out = tmp_path / "eval"
    summary = evaluate_folder(pred_dir, gt_dir, regions="brats", output_dir=out, verbose=False)
    assert (out / "metrics_per_case.csv").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary and saved["convention"] == "brats" and saved["num_cases"] == 3
    rows = list(csv.DictReader((out / "metrics_per_case.csv").read_text().splitlines()))
    assert len(rows) == 9 and {r["region"] for r in rows} == {"WT", "TC", "ET"}

    # case a, region TC must equal the API on the same arrays (after 4 -> 3) and be 3 mm off along z
    g = map_brats2021_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(gt_dir / "a.nii.gz"))))
    p = map_brats2021_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "a.nii.gz"))))
    direct = binary_metrics(np.isin(p, (1, 3)), np.isin(g, (1, 3)), spacing)
    row = next(r for r in rows if r["case"] == "a" and r["region"] == "TC")
    assert float(row["dice"]) == pytest.approx(direct["dice"]) and float(row["hd95_mm"]) == pytest.approx(3.0)
    assert float(row["nsd"]) == pytest.approx(direct["nsd"])
    row_b = next(r for r in rows if r["case"] == "b" and r["region"] == "ET")
    assert (float(row_b["dice"]), float(row_b["hd95_mm"])) == (0.0, BRATS_WORST_HD95_MM)
    row_c = next(r for r in rows if r["case"] == "c" and r["region"] == "ET")
    assert (float(row_c["dice"]), float(row_c["hd95_mm"]), float(row_c["nsd"])) == (1.0, 0.0, 1.0)
    et = [float(r["dice"]) for r in rows if r["region"] == "ET"]
    assert summary["metrics"]["ET"]["dice"]["mean"] == pytest.approx(np.mean(et))
    assert summary["metrics"]["ET"]["dice"]["median"] == pytest.approx(np.median(et))
    assert summary["metrics"]["ET"]["dice"]["std"] == pytest.approx(np.std(et))


def test_evaluate_folder_reference_convention_and_dataset_json(tmp_path):
    gt_dir, pred_dir, _ = _make_folders(tmp_path)
    ds = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": [3]},
          "regions_class_order": [2, 1, 3], "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    summary = evaluate_folder(pred_dir, gt_dir, dataset_json=tmp_path / "dataset.json", convention="reference",
                              output_dir=tmp_path / "e", verbose=False)
    assert list(summary["metrics"]) == ["whole tumor", "tumor core", "enhancing tumor"]
    assert summary["convention"] == "reference"
    # ET: case b (one side empty) and case c (both empty) both score (0, 50) under the reference convention
    rows = list(csv.DictReader((tmp_path / "e" / "metrics_per_case.csv").read_text().splitlines()))
    et = {r["case"]: (float(r["dice"]), float(r["hd95_mm"])) for r in rows if r["region"] == "enhancing tumor"}
    assert et["b"] == et["c"] == (0.0, REFERENCE_EMPTY_HD95)


def test_ignore_label_is_no_structure_and_its_voxels_are_not_scored(tmp_path):
    """nnU-Net's ignore label (labels["ignore"]): not scored as a structure, and whatever is predicted where the
    reference holds it counts neither way, as in nnU-Net's own evaluation."""
    shape, spacing_xyz = (8, 16, 16), (1.0, 1.0, 1.0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    g = np.zeros(shape, np.uint8)
    g[2:6, 4:12, 4:12] = 1
    g[:, :, 14:] = 3  # unannotated strip
    p = np.where(g == 3, 0, g)
    p[:, :2, 14:] = 1  # predicted tumour inside the unannotated strip: must not count as a false positive
    _write(g, gt_dir / "a.nii.gz", spacing_xyz)
    _write(p, pred_dir / "a.nii.gz", spacing_xyz)
    ds = {"labels": {"background": 0, "tumour": 1, "oedema": 2, "ignore": 3}, "file_ending": ".nii.gz"}
    summary = evaluate_folder(pred_dir, gt_dir, dataset_json=ds, output_dir=tmp_path / "e", verbose=False)
    assert list(summary["metrics"]) == ["tumour", "oedema"] and summary["ignore_label"] == 3
    assert summary["metrics"]["tumour"]["dice"]["mean"] == 1.0
    assert summary["metrics"]["tumour"]["hd95_mm"]["mean"] == 0.0
    # without the ignore entry, label 3 is undefined: an error, not a silent fourth structure
    ds["labels"].pop("ignore")
    with pytest.raises(ValueError, match=r"label value\(s\) \[3\]"):
        evaluate_folder(pred_dir, gt_dir, dataset_json=ds, output_dir=tmp_path / "e2", verbose=False)


def test_evaluate_folder_plain_labels_and_errors(tmp_path):
    gt_dir, pred_dir, _ = _make_folders(tmp_path)
    summary = evaluate_folder(pred_dir, gt_dir, output_dir=tmp_path / "e", verbose=False)
    assert list(summary["metrics"]) == ["1", "2", "3"]  # every label found, scored on its own
    assert summary["metrics"]["3"]["dice"]["n"] == 3    # label 3 absent in c still counts (both empty)
    (pred_dir / "a.nii.gz").unlink()
    with pytest.raises(ValueError, match="no prediction"):
        evaluate_folder(pred_dir, gt_dir, verbose=False)
    with pytest.raises(ValueError, match="regions"):
        evaluate_folder(gt_dir, gt_dir, regions="liver", verbose=False)


def test_undefined_label_values_are_an_error_naming_values_and_files(tmp_path):
    gt_dir, pred_dir, _ = _make_folders(tmp_path)
    spacing_xyz = (1.0, 1.0, 3.0)  # as _make_folders writes them
    ds = {"labels": {"background": 0, "NCR": 1, "edema": 2, "ET": 3}, "file_ending": ".nii.gz"}
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "b.nii.gz")))
    pred[0, 0, 1] = 7
    _write(pred, pred_dir / "b.nii.gz", spacing_xyz)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_dir / "c.nii.gz")))
    gt[0, 0, 0] = 9
    _write(gt, gt_dir / "c.nii.gz", spacing_xyz)
    out = tmp_path / "e"
    with pytest.raises(ValueError, match=r"label value\(s\) \[7, 9\] are not defined in the dataset.json") as info:
        evaluate_folder(pred_dir, gt_dir, dataset_json=ds, output_dir=out, verbose=False)
    msg = str(info.value)
    assert f"prediction {pred_dir / 'b.nii.gz'} holds [7]" in msg
    assert f"reference {gt_dir / 'c.nii.gz'} holds [9]" in msg
    with pytest.raises(ValueError, match=r"\[7, 9\] are not BraTS labels"):
        evaluate_folder(pred_dir, gt_dir, regions="brats", output_dir=out, verbose=False)
    # without a dataset.json a reference value is a structure, but a prediction value no reference holds is not
    with pytest.raises(ValueError, match=r"\[7\] occur in predictions but in no reference"):
        evaluate_folder(pred_dir, gt_dir, output_dir=out, verbose=False)
    assert not out.exists()  # nothing written
    # an explicit regions dict selects structures; other values are left alone
    evaluate_folder(pred_dir, gt_dir, regions={"NCR": 1}, output_dir=out, verbose=False)
    assert (out / "summary.json").is_file()


def test_brats_case_with_both_3_and_4_names_the_file(tmp_path):
    gt_dir, pred_dir, _ = _make_folders(tmp_path)
    spacing_xyz = (1.0, 1.0, 3.0)  # as _make_folders writes them
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_dir / "a.nii.gz")))
    gt[0, 0, 0], gt[0, 0, 1] = 3, 4
    _write(gt, gt_dir / "a.nii.gz", spacing_xyz)
    with pytest.raises(ValueError, match=f"{gt_dir / 'a.nii.gz'} holds both labels 3 and 4"):
        evaluate_folder(pred_dir, gt_dir, regions="brats", output_dir=tmp_path / "e", verbose=False)
