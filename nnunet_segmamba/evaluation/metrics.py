"""Segmentation metrics: Dice, HD95 (mm) and normalised surface distance (NSD) per case and per label/region.

Distances come from MONAI (`monai.metrics.compute_hausdorff_distance` and `compute_surface_dice`) so that no
distance transform is hand-written here; the tests cross-check them against medpy. Empty masks never reach
MONAI: they are scored by an explicit, selectable convention (see `CONVENTIONS`), because libraries and papers
disagree on them and that disagreement moves BraTS means by several points.

Arrays are in SimpleITK/numpy order (z, y, x); spacings passed around here are in that same order, i.e. the
reverse of `sitk.Image.GetSpacing()`.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# BraTS "worst" HD95: the diagonal of the 240 x 240 x 155 mm BraTS volume, used by the BraTS challenge for a
# structure present on one side only (sqrt(240^2 + 240^2 + 155^2) = 373.13 mm).
BRATS_WORST_HD95_MM = 373.13
# the SegMamba authors' evaluation code returns (Dice 0, HD95 50) whenever prediction or ground truth is empty
REFERENCE_EMPTY_HD95 = 50.0

CONVENTIONS = {
    "brats": (
        "BraTS: both empty -> Dice 1, HD95 0 mm, NSD 1; exactly one empty -> Dice 0, "
        f"HD95 {BRATS_WORST_HD95_MM} mm (volume diagonal), NSD 0"
    ),
    "reference": (
        "SegMamba reference code: prediction or ground truth empty (both empty included) -> Dice 0, "
        f"HD95 {REFERENCE_EMPTY_HD95}, NSD 0"
    ),
}

METRIC_NAMES = ("dice", "hd95_mm", "nsd")


def brats_regions() -> dict[str, tuple[int, ...]]:
    """BraTS evaluation regions on labels 1 = necrotic core, 2 = edema, 3 = enhancing tumour (2021's 4 -> 3).

    Returns:
        {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)} -- whole tumour, tumour core, enhancing tumour.
    """
    return {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def map_brats2021_labels(seg: np.ndarray) -> np.ndarray:
    """Map BraTS 2021 label 4 (enhancing tumour) to 3, the 2023+ value. Any shape; returns a new array.

    Raises:
        ValueError: when both 3 and 4 occur, which no BraTS release produces (mapping would merge two classes).
    """
    has4 = np.any(seg == 4)
    if has4 and np.any(seg == 3):
        raise ValueError("segmentation holds both labels 3 and 4; BraTS uses one or the other for enhancing "
                         "tumour. Check the files, or pass explicit regions instead of BraTS regions.")
    out = np.array(seg, copy=True)
    if has4:
        out[out == 4] = 3
    return out


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|P & G| / (|P| + |G|) of two boolean masks of equal shape; NaN when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    denom = int(pred.sum()) + int(gt.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, gt).sum()) / denom


def _empty_scores(pred_empty: bool, gt_empty: bool, convention: str) -> dict[str, float]:
    if convention == "reference":
        return {"dice": 0.0, "hd95_mm": REFERENCE_EMPTY_HD95, "nsd": 0.0}
    if pred_empty and gt_empty:
        return {"dice": 1.0, "hd95_mm": 0.0, "nsd": 1.0}
    return {"dice": 0.0, "hd95_mm": BRATS_WORST_HD95_MM, "nsd": 0.0}


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown empty-mask convention {convention!r}; use one of {sorted(CONVENTIONS)}")


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], convention: str = "brats",
                   nsd_tolerance_mm: float = 1.0) -> dict[str, float]:
    """Dice, HD95 and NSD of one binary structure.

    Args:
        pred: prediction mask, shape (Z, Y, X) (or 2D (Y, X)); nonzero = inside.
        gt: reference mask of the same shape.
        spacing: voxel size in mm per array axis, same order as the array (reverse of SimpleITK's GetSpacing()).
        convention: how empty masks are scored, a key of `CONVENTIONS` ("brats" or "reference").
        nsd_tolerance_mm: boundary tolerance of the NSD, in mm.

    Returns:
        {"dice": float, "hd95_mm": float, "nsd": float}. HD95 is MONAI's symmetric 95th percentile: the larger of
        the two directed 95th percentiles of surface distances (medpy instead pools both directions first).
    """
    _check_convention(convention)
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; "
                         "resample the prediction onto the reference grid first")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {pred.ndim}D mask; "
                         "give one spacing per array axis")
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty or gt_empty:
        return _empty_scores(pred_empty, gt_empty, convention)

    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    # MONAI wants one-hot, batch-first tensors: (B=1, C=1, *spatial); include_background keeps our one channel
    p = torch.from_numpy(pred)[None, None]
    g = torch.from_numpy(gt)[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI's own internal call passes a deprecated argument (always_return_as_numpy); not ours to fix
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)
        # with `spacing` the surface distances (and therefore the threshold) are in mm, not voxels
        nsd = compute_surface_dice(p, g, class_thresholds=[float(nsd_tolerance_mm)], include_background=True,
                                   spacing=spacing)
    return {"dice": dice(pred, gt), "hd95_mm": float(hd95.item()), "nsd": float(nsd.item())}


def _dataset_labels(dataset_json: Mapping | str | os.PathLike) -> tuple[dict, Mapping]:
    if not isinstance(dataset_json, Mapping):
        with open(dataset_json) as f:
            dataset_json = json.load(f)
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("dataset.json has no 'labels' dict; it must map names to label values, "
                         "e.g. {'background': 0, 'tumour': 1}")
    return dict(dataset_json), labels


def regions_from_dataset_json(dataset_json: Mapping | str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Structures to evaluate, from an nnU-Net v2 dataset.json (dict or path).

    Region datasets (any label given as a list, plus `regions_class_order`) give one entry per region, e.g.
    {"whole tumor": (1, 2, 3), ...}; plain label datasets give one entry per foreground label, e.g. {"liver": (1,)}.
    nnU-Net's ignore label (the entry named "ignore") is not a structure: see `ignore_label_from_dataset_json`.
    """
    dataset_json, labels = _dataset_labels(dataset_json)
    has_regions = any(isinstance(v, (list, tuple)) for v in labels.values())
    if has_regions and "regions_class_order" not in dataset_json:
        raise ValueError("dataset.json defines regions (list-valued labels) but no 'regions_class_order'; "
                         "add it as nnU-Net requires for region-based datasets")
    out: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if values == (0,) or (not has_regions and 0 in values):
            continue  # background is not scored
        out[name] = values
    return out


def ignore_label_from_dataset_json(dataset_json: Mapping | str | os.PathLike) -> int | None:
    """nnU-Net v2's ignore label: the value of the "ignore" entry of `labels` (one integer), or None.

    As in nnU-Net's own evaluation, reference voxels with this value are left out of every structure's scores:
    nothing predicted there counts as right or wrong."""
    _, labels = _dataset_labels(dataset_json)
    if "ignore" not in labels:
        return None
    value = labels["ignore"]
    if isinstance(value, (list, tuple)) or not float(value).is_integer():
        raise ValueError(f"dataset.json labels: 'ignore' must be one integer label value, got {value!r}")
    return int(value)


@dataclass
class _CaseJob:
    name: str
    pred_file: str
    gt_file: str
    regions: dict[str, tuple[int, ...]] | None  # None: every nonzero label found in this case
    map_brats2021: bool
    convention: str
    nsd_tolerance_mm: float
    defined: tuple[int, ...] | None = None  # the label values the maps may hold; None: not checked per case
    ignore_label: int | None = None  # reference voxels with this value are not scored (nnU-Net's ignore label)


def _label_values(arr: np.ndarray) -> list:
    """The distinct values of a label map, as ints where integral (floats otherwise, NaN included)."""
    return [int(v) if float(v).is_integer() else float(v) for v in np.unique(arr).tolist()]


def _undefined_labels_error(bad: list[tuple[str, str, list]], defined: Sequence[int] | None, what: str,
                            fix: str) -> ValueError:
    """One message naming the undefined values and the files holding them (at most 10 files listed)."""
    values = sorted({v for _, _, vs in bad for v in vs}, key=float)
    files = "; ".join(f"{side} {path} holds {vs}" for side, path, vs in bad[:10])
    more = f"; ... and {len(bad) - 10} more files" if len(bad) > 10 else ""
    known = f" (defined: {', '.join(str(v) for v in defined)})" if defined is not None else ""
    return ValueError(f"label value(s) {values} {what}{known}: {files}{more}. {fix}; nothing was written")


def _score_case(job: _CaseJob) -> tuple[list[dict], list, list]:
    """(rows, reference label values, prediction label values) of one case. A case holding values outside
    `job.defined` is not scored (no rows): `evaluate_folder` reports it with every other such case."""
    import SimpleITK as sitk

    gt_img, pred_img = sitk.ReadImage(job.gt_file), sitk.ReadImage(job.pred_file)
    gt, pred = sitk.GetArrayFromImage(gt_img), sitk.GetArrayFromImage(pred_img)
    if gt.shape != pred.shape:
        raise ValueError(f"case {job.name}: prediction shape {pred.shape} != ground truth {gt.shape}")
    if not np.allclose(gt_img.GetSpacing(), pred_img.GetSpacing(), rtol=1e-3):
        raise ValueError(f"case {job.name}: prediction spacing {pred_img.GetSpacing()} != ground truth "
                         f"{gt_img.GetSpacing()}; predictions must be on the reference grid")
    spacing = gt_img.GetSpacing()[::-1]  # SimpleITK gives (x, y, z), the array is (z, y, x)
    gt_values, pred_values = _label_values(gt), _label_values(pred)
    if job.defined is not None and (set(gt_values) | set(pred_values)) - set(job.defined):
        return [], gt_values, pred_values
    if job.map_brats2021:
        for path, values in ((job.gt_file, gt_values), (job.pred_file, pred_values)):
            if 3 in values and 4 in values:
                raise ValueError(f"{path} holds both labels 3 and 4; BraTS uses one or the other for enhancing "
                                 "tumour (2023+: 3, 2021: 4). Fix the file, or score it with -d DATASET "
                                 "(dataset_json) instead of --brats")
        gt, pred = map_brats2021_labels(gt), map_brats2021_labels(pred)
    regions = job.regions
    if regions is None:
        found = sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) - {0})
        regions = {str(int(v)): (int(v),) for v in found}
    scored = gt != job.ignore_label if job.ignore_label is not None else None
    rows = []
    for region, values in regions.items():
        g, p = np.isin(gt, values), np.isin(pred, values)
        if scored is not None:
            p &= scored  # g cannot hold the ignore label: it is in no structure
        scores = binary_metrics(p, g, spacing, job.convention, job.nsd_tolerance_mm)
        rows.append({"case": job.name, "region": region, **scores,
                     "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum())})
    return rows, gt_values, pred_values


def evaluate_case(job: _CaseJob) -> list[dict]:
    """Score one case; returns one row per structure: case, region, dice, hd95_mm, nsd, gt_voxels, pred_voxels.

    Raises:
        ValueError: a label map holds values outside `job.defined` (when given).
    """
    rows, gt_values, pred_values = _score_case(job)
    if job.defined is not None:
        bad = [(side, path, [v for v in values if v not in job.defined])
               for side, path, values in (("reference", job.gt_file, gt_values),
                                          ("prediction", job.pred_file, pred_values))]
        bad = [b for b in bad if b[2]]
        if bad:
            raise _undefined_labels_error(bad, job.defined, "are not defined", "Fix the label maps")
    return rows


def _summarise(rows: list[dict], region_names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for region in region_names:
        sel = [r for r in rows if r["region"] == region]
        out[region] = {}
        for m in METRIC_NAMES:
            vals = np.array([r[m] for r in sel], dtype=float)
            out[region][m] = {"mean": float(np.mean(vals)), "median": float(np.median(vals)),
                              "std": float(np.std(vals)), "n": int(len(vals))}
    return out


def _format_table(summary: dict) -> str:
    lines = [f"convention: {summary['convention']}  |  NSD tolerance {summary['nsd_tolerance_mm']} mm  |  "
             f"{summary['num_cases']} cases",
             f"{'region':<20}{'Dice':>16}{'HD95 mm':>18}{'NSD':>16}"]
    for region, ms in summary["metrics"].items():
        cells = [f"{ms[m]['mean']:.4f}±{ms[m]['std']:.4f}" if m != "hd95_mm" else
                 f"{ms[m]['mean']:.2f}±{ms[m]['std']:.2f}" for m in METRIC_NAMES]
        lines.append(f"{region:<20}{cells[0]:>16}{cells[1]:>18}{cells[2]:>16}")
    return "\n".join(lines)


# label values BraTS label maps may hold: background, NCR, edema, ET (2023+: 3, 2021: 4)
BRATS_LABEL_VALUES = (0, 1, 2, 3, 4)


def _resolve_regions(dataset_json, regions) -> tuple[dict[str, tuple[int, ...]] | None, bool, tuple[int, ...] | None,
                                                   int | None]:
    """Returns (regions or None for 'every label found', whether to map BraTS 2021 label 4 -> 3, the label values
    the maps may hold or None when nothing defines them, nnU-Net's ignore label or None). An explicit `regions`
    dict selects structures, it does not say which other labels exist; the ignore label comes from a dataset.json
    even then."""
    if dataset_json is not None:
        dataset_json = _dataset_labels(dataset_json)[0]  # a path is read once, for the regions and the ignore label
    ignore = ignore_label_from_dataset_json(dataset_json) if dataset_json is not None else None
    if isinstance(regions, str):
        if regions.lower() != "brats":
            raise ValueError(f"regions={regions!r} is not understood; pass 'brats', a dict name -> labels, or None")
        return brats_regions(), True, BRATS_LABEL_VALUES, None
    if regions is not None:
        if not regions:
            raise ValueError("regions is empty; pass at least one name -> label values entry, or None")
        return {str(k): tuple(int(v) for v in (vs if isinstance(vs, (list, tuple)) else (vs,)))
                for k, vs in regions.items()}, False, None, ignore
    if dataset_json is not None:
        region_map = regions_from_dataset_json(dataset_json)
        defined = {0} | {v for vs in region_map.values() for v in vs} | ({ignore} if ignore is not None else set())
        return region_map, False, tuple(sorted(defined)), ignore
    return None, False, None, None


def evaluate_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                    dataset_json: Mapping | str | os.PathLike | None = None,
                    regions: Mapping[str, Sequence[int] | int] | str | None = None, convention: str = "brats",
                    nsd_tolerance_mm: float = 1.0, output_dir: str | os.PathLike | None = None,
                    num_processes: int = 1, file_ending: str = ".nii.gz", verbose: bool = True) -> dict:
    """Evaluate every ground-truth case against the prediction of the same file name.

    Args:
        pred_dir: folder of predicted label maps (`CASE.nii.gz`).
        gt_dir: folder of reference label maps with the same file names; every one needs a prediction.
        dataset_json: nnU-Net dataset.json (dict or path) naming the labels/regions to score. Its ignore label
            (labels["ignore"]) is no structure, and reference voxels holding it are left out of every score.
        regions: overrides dataset_json: "brats" (WT/TC/ET, BraTS 2021 label 4 read as 3) or a dict
            name -> label values. With neither, every nonzero label found is scored on its own.
            Label values outside those the dataset.json defines (or outside BraTS's 0-4 with "brats") are an
            error naming the values and files; so, with neither, is a prediction value that no reference holds.
            An explicit regions dict selects structures and leaves other label values unchecked.
        convention: empty-mask scoring, "brats" or "reference" (see `CONVENTIONS`).
        nsd_tolerance_mm: NSD boundary tolerance in mm.
        output_dir: where `metrics_per_case.csv` and `summary.json` go; default `<pred_dir>/evaluation` (not
            pred_dir itself, which would overwrite nnU-Net's own summary.json in validation folders).
        num_processes: worker processes (spawned, so torch/OpenMP state is never forked).
        file_ending: file ending of the label maps.
        verbose: print the summary table.

    Returns:
        The summary dict also written to summary.json: convention, its description, tolerance, regions,
        num_cases and metrics[region][metric] = {mean, median, std, n} for metric in dice, hd95_mm, nsd.

    Raises:
        ValueError / FileNotFoundError: bad arguments, missing folders or predictions, mismatched grids,
            undefined label values; raised before anything is written.
    """
    from tqdm import tqdm

    _check_convention(convention)
    if not nsd_tolerance_mm >= 0 or not math.isfinite(nsd_tolerance_mm):
        raise ValueError(f"nsd_tolerance_mm={nsd_tolerance_mm} must be a finite number >= 0 (in mm)")
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for what, d in (("prediction folder", pred_dir), ("reference folder", gt_dir)):
        if not d.exists():
            raise FileNotFoundError(f"{what} {d} does not exist; pass the folder holding the {file_ending} label maps")
        if not d.is_dir():
            raise ValueError(f"{what} {d} is not a folder; pass the folder holding the {file_ending} label maps")
    names = sorted(p.name[: -len(file_ending)] for p in gt_dir.iterdir() if p.name.endswith(file_ending))
    if not names:
        raise ValueError(f"no '*{file_ending}' files in ground-truth folder {gt_dir}")
    missing = [n for n in names if not (pred_dir / (n + file_ending)).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} ground-truth cases have no prediction in {pred_dir}: "
                         f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    region_map, map4, defined, ignore_label = _resolve_regions(dataset_json, regions)
    jobs = [_CaseJob(n, str(pred_dir / (n + file_ending)), str(gt_dir / (n + file_ending)), region_map, map4,
                     convention, float(nsd_tolerance_mm), defined, ignore_label) for n in names]

    if num_processes > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(num_processes, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(tqdm(ex.map(_score_case, jobs), total=len(jobs), desc="evaluating", disable=not verbose))
    else:
        results = [_score_case(j) for j in tqdm(jobs, desc="evaluating", disable=not verbose)]
    per_case = [rows for rows, _, _ in results]
    # label values nothing defines: an error naming the values and files, never silently ignored or scored
    if defined is not None:
        bad = [(side, path, [v for v in values if v not in defined])
               for job, (_, gt_values, pred_values) in zip(jobs, results)
               for side, path, values in (("reference", job.gt_file, gt_values),
                                          ("prediction", job.pred_file, pred_values))]
        what = "are not BraTS labels (--brats)" if map4 else "are not defined in the dataset.json labels"
        fix = ("Fix these label maps, or score them with -d DATASET (dataset_json) instead of --brats" if map4 else
               "Fix these label maps, or pass the dataset.json that defines these values (-d)")
        bad = [b for b in bad if b[2]]
        if bad:
            raise _undefined_labels_error(bad, defined, what, fix)
    elif region_map is None:
        in_references = {v for _, gt_values, _ in results for v in gt_values}
        bad = [("prediction", job.pred_file, [v for v in pred_values if v not in in_references and v != 0])
               for job, (_, _, pred_values) in zip(jobs, results)]
        bad = [b for b in bad if b[2]]
        if bad:
            raise _undefined_labels_error(
                bad, None, "occur in predictions but in no reference label map, and no dataset.json says which "
                "labels exist", "Pass the dataset.json that defines the labels (-d DATASET, dataset_json=...), "
                "or fix the predictions")

    if region_map is None:
        # a label absent from a case on both sides is a "both empty" structure there, scored by the convention
        found = sorted({r["region"] for rows in per_case for r in rows}, key=int)
        region_map = {k: (int(k),) for k in found}
        for name, rows in zip(names, per_case):
            have = {r["region"] for r in rows}
            rows.extend({"case": name, "region": k, **_empty_scores(True, True, convention), "gt_voxels": 0,
                         "pred_voxels": 0} for k in found if k not in have)
            rows.sort(key=lambda r: int(r["region"]))
    if not region_map:
        warnings.warn("no foreground label in any case; nothing was scored")
    rows = [r for case_rows in per_case for r in case_rows]

    out_dir = Path(output_dir) if output_dir is not None else pred_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["case", "region", *METRIC_NAMES, "gt_voxels", "pred_voxels"]
    with open(out_dir / "metrics_per_case.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "convention": convention,
        "convention_description": CONVENTIONS[convention],
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "hd95_definition": "max of the two directed 95th percentiles of surface distances (MONAI), in mm",
        "std": "population standard deviation (ddof=0) over cases",
        "regions": {k: list(v) for k, v in region_map.items()},
        "ignore_label": ignore_label,
        "num_cases": len(names),
        "metrics": _summarise(rows, list(region_map)),
        "per_case_csv": "metrics_per_case.csv",
    }
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    if verbose:
        print(_format_table(summary))
        print(f"written: {out_dir / 'summary.json'}, {out_dir / 'metrics_per_case.csv'}")
    return summary
