"""Convert a BraTS glioma training folder into an nnU-Net v2 raw dataset, validating every case first.

Input: one sub-folder per case. File names come in two styles of case ID and two styles of suffix, and the data
in circulation mixes them (BraTS 2025 glioma cases are passed around as BraTS-GLI-00000-000_flair.nii.gz):
    IDs:      BraTS-GLI-00000-000 (2023+)  or  BraTS2021_00000 (2021)
    suffixes: -t1n -t1c -t2w -t2f -seg (2023+)  or  _t1 _t1ce _t2 _flair _seg (2021), after "-" or "_"
Either suffix style goes with either ID style (one suffix style per case).
The label numbering is decided per case from the seg's values, not from the names:
    label 4 present: 2021 numbering   (1 NCR, 2 edema, 4 enhancing tumour)
    label 3 present: 2023+ numbering  (1 NCR, 2 SNFH/edema, 3 enhancing tumour)
    neither:         from the names (ID style, else suffix style); labels 1 and 2 mean the same in both.
Both 3 and 4 in one case is an error, and so is a folder mixing cases with 4 and cases with 3 (in BraTS 2024
post-treatment data 3 is ET and 4 is resection cavity, which must not become enhancing tumour).
Output: `DatasetNNN_Name/{imagesTr,labelsTr,dataset.json,conversion_report.json}` with channels in SegMamba's order
T2w, T2-FLAIR, T1n, T1c and labels 1 = necrotic core, 2 = edema, 3 = enhancing tumour (2021's 4 -> 3). The
numbering each case got is printed as a summary, counted in dataset.json ("brats_label_numbering") and listed per
case in conversion_report.json.

Unlike nnU-Net's Dataset137_BraTS21 script, labels 1 and 2 are not swapped: they keep the BraTS 2023 meaning,
so the tumour core region is (1, 3) rather than nnU-Net's (2, 3).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODALITIES = ("T2w", "FLAIR", "T1n", "T1c")  # nnU-Net channel index = position here
# file-name suffix -> channel index (or "seg"), per suffix style
SCHEMES = {
    "2023": {"t2w": 0, "t2f": 1, "t1n": 2, "t1c": 3, "seg": "seg"},
    "2021": {"t2": 0, "flair": 1, "t1": 2, "t1ce": 3, "seg": "seg"},
}
# case-ID styles: BraTS-GLI-00000-000 (2023+; also -SSA-, -PED-, ...) and BraTS2021_00000
ID_STYLES = {"2023": re.compile(r"BraTS-[A-Za-z]+-\d+-\d+"), "2021": re.compile(r"BraTS20\d\d_\d+")}
NUMBERINGS = {"2021": "1 NCR, 2 edema, 4 ET", "2023+": "1 NCR, 2 SNFH/edema, 3 ET"}
# label values a BraTS glioma seg may hold (3 or 4 for enhancing tumour, never both)
ALLOWED_LABELS = {0, 1, 2, 3, 4}

REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": [3]}
PLAIN_LABELS = {"background": 0, "NCR": 1, "edema": 2, "ET": 3}

_SPACING_RTOL = 1e-4  # spacings are float-stored; exact comparison would reject identical grids
_ORIGIN_ATOL_MM = 1e-3


@dataclass
class BratsCase:
    """One case folder: its files by channel index (and "seg"), the styles of its file names, the label numbering
    decided from its seg (and what decided it), and problems found."""
    name: str
    folder: Path
    scheme: str | None = None  # suffix style, "2023" (-t1n ...) or "2021" (_t1 ...)
    id_style: str | None = None  # "2023" (BraTS-GLI-00000-000), "2021" (BraTS2021_00000) or None (other)
    numbering: str | None = None  # "2021" or "2023+", set by validate_case
    numbering_from: str | None = None  # "label 4", "label 3" or "file names"
    files: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def naming(self) -> str:
        ids = f"{self.id_style} IDs" if self.id_style else "other IDs"
        return f"{ids}, {self.scheme} suffixes" if self.scheme else ids


def _split_token(filename: str) -> tuple[str, str, str] | None:
    """(suffix style, suffix, case ID) of a BraTS file name, the suffix after the last '-' or '_', e.g.
    'BraTS-GLI-00000-000-t1c.nii.gz' -> ('2023', 't1c', 'BraTS-GLI-00000-000'),
    'BraTS-GLI-00000-000_t1ce.nii.gz' -> ('2021', 't1ce', 'BraTS-GLI-00000-000'); None for other files."""
    for ending in (".nii.gz", ".nii"):
        if filename.endswith(ending):
            stem = filename[: -len(ending)]
            break
    else:
        return None
    cut = max(stem.rfind("-"), stem.rfind("_"))
    if cut <= 0:
        return None
    case_id, token = stem[:cut], stem[cut + 1:].lower()
    for style in ("2023", "2021"):
        if token in SCHEMES[style] and token != "seg":
            return style, token, case_id
    return (None, token, case_id) if token == "seg" else None


def _id_style(case_id: str) -> str | None:
    return next((style for style, pattern in ID_STYLES.items() if pattern.fullmatch(case_id)), None)


def scan_case(folder: Path) -> BratsCase:
    """Find the modality and seg files of one case folder and record naming problems (no image data read)."""
    case = BratsCase(folder.name, folder)
    styles, ids = set(), set()
    channel_of = {**SCHEMES["2021"], **SCHEMES["2023"]}
    for f in sorted(folder.iterdir()):
        parsed = _split_token(f.name)
        if parsed is None:
            continue
        style, token, case_id = parsed
        if style is not None:
            styles.add(style)
        ids.add(_id_style(case_id))
        key = channel_of[token]
        if key in case.files:
            case.problems.append(f"two files for {MODALITIES[key] if key != 'seg' else 'seg'}: "
                                 f"{case.files[key].name} and {f.name}")
        case.files[key] = f
    if not styles:
        case.problems.append("no BraTS image files (expected *-t1n.nii.gz ... or *_t1.nii.gz ... or *_flair.nii.gz)")
        return case
    if len(styles) > 1:
        case.problems.append("mixes 2021 (t1, t1ce, t2, flair) and 2023 (t1n, t1c, t2w, t2f) file suffixes")
        return case
    case.scheme = styles.pop()
    case.id_style = ids.pop() if len(ids) == 1 else None
    token_of = {v: k for k, v in SCHEMES[case.scheme].items()}
    missing = [token_of[k] for k in (0, 1, 2, 3, "seg") if k not in case.files]
    if missing:
        case.problems.append(f"missing {', '.join(missing)} file(s)")
    return case


def validate_case(case: BratsCase) -> BratsCase:
    """Check geometry of all files against the seg and the seg's label values; appends to `case.problems`."""
    import SimpleITK as sitk

    if case.problems:
        return case  # naming problems make the geometry check meaningless
    token_of = {v: k for k, v in SCHEMES[case.scheme].items()}
    infos = {}
    for key, f in case.files.items():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()  # header only: cheap, the images are only copied later
        except RuntimeError as e:
            case.problems.append(f"cannot read {f.name}: {str(e).strip().splitlines()[-1]}")
            continue
        infos[key] = (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    if "seg" not in infos:
        return case
    ref_size, ref_sp, ref_or, ref_dir = infos["seg"]
    for key in (0, 1, 2, 3):
        if key not in infos:
            continue
        size, sp, origin, direction = infos[key]
        tok = token_of[key]
        if size != ref_size:
            case.problems.append(f"{tok} size {size} != seg size {ref_size}")
        if not np.allclose(sp, ref_sp, rtol=_SPACING_RTOL, atol=0):
            case.problems.append(f"{tok} spacing {tuple(round(s, 4) for s in sp)} != seg spacing "
                                 f"{tuple(round(s, 4) for s in ref_sp)}")
        if not np.allclose(origin, ref_or, atol=_ORIGIN_ATOL_MM, rtol=0):
            case.problems.append(f"{tok} origin {tuple(round(o, 3) for o in origin)} != seg origin "
                                 f"{tuple(round(o, 3) for o in ref_or)}")
        if not np.allclose(direction, ref_dir, atol=1e-4):
            case.problems.append(f"{tok} orientation differs from seg")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case.files["seg"])))
    values = np.unique(seg)
    integral = np.isfinite(values) & (values == np.round(values))
    if not integral.all():  # float-stored labels are fine as long as every value is a whole number
        case.problems.append(f"seg holds non-integer values {values[~integral][:5].tolist()}; BraTS labels are "
                             "whole numbers")
        return case
    labels = {int(v) for v in values}
    bad = sorted(labels - ALLOWED_LABELS)
    if bad:
        case.problems.append(f"unexpected label value(s) {bad} in seg (BraTS labels are 0, 1, 2 and 3 (2023+) "
                             "or 4 (2021) for enhancing tumour)")
    if 3 in labels and 4 in labels:
        case.problems.append("seg holds both labels 3 and 4: the 2023+ numbering uses 3 for enhancing tumour, "
                             "2021 uses 4 (and BraTS 2024 post-treatment data 4 for resection cavity, which "
                             "this converter does not support)")
    elif 4 in labels:
        case.numbering, case.numbering_from = "2021", "label 4"
    elif 3 in labels:
        case.numbering, case.numbering_from = "2023+", "label 3"
    else:  # only 0, 1, 2: the same meaning in both numberings
        style = case.id_style or case.scheme
        case.numbering, case.numbering_from = ("2021" if style == "2021" else "2023+"), "file names"
    return case


def _write_case(case: BratsCase, images_dir: Path, labels_dir: Path) -> None:
    import SimpleITK as sitk

    for ch in range(4):
        src, dst = case.files[ch], images_dir / f"{case.name}_{ch:04d}.nii.gz"
        if src.name.endswith(".nii.gz"):
            shutil.copyfile(src, dst)  # byte copy: no re-encoding, no loss of the original header
        else:
            sitk.WriteImage(sitk.ReadImage(str(src)), str(dst), useCompression=True)
    seg_img = sitk.ReadImage(str(case.files["seg"]))
    seg = sitk.GetArrayFromImage(seg_img)
    out = np.zeros(seg.shape, np.uint8)
    for v in (1, 2, 3):
        out[seg == v] = v
    out[seg == 4] = 3  # 2021 numbering's enhancing tumour (a case holding 3 and 4 was rejected above)
    out_img = sitk.GetImageFromArray(out)
    out_img.CopyInformation(seg_img)
    sitk.WriteImage(out_img, str(labels_dir / f"{case.name}.nii.gz"), useCompression=True)


def _check_case(folder: Path) -> BratsCase:
    return validate_case(scan_case(folder))


def _write_job(args) -> None:
    _write_case(*args)


def convert_brats(src_dir: str | os.PathLike, dataset_id: int, dataset_name: str = "BraTS",
                  out_root: str | os.PathLike | None = None, label_form: str = "regions",
                  num_processes: int = 1, skip_bad_cases: bool = False, overwrite: bool = False,
                  verbose: bool = True) -> Path:
    """Convert a BraTS glioma training folder into `out_root/DatasetNNN_Name` for nnU-Net v2.

    Args:
        src_dir: folder with one sub-folder per case (2021 or 2023+ IDs and suffixes, see module doc).
        dataset_id: nnU-Net dataset id, 1..999.
        dataset_name: name part of `DatasetNNN_Name`.
        out_root: nnU-Net raw folder; default the `nnUNet_raw` environment variable.
        label_form: "regions" (dataset.json with WT/TC/ET regions and regions_class_order, nnU-Net's
            region-based training) or "labels" (plain labels NCR=1, edema=2, ET=3). The label files are the same.
        num_processes: worker processes for validation and writing.
        skip_bad_cases: False: raise listing every bad case; True: leave them out with a warning listing them.
        overwrite: replace an existing non-empty dataset folder (after every case has been validated).
        verbose: print which label numbering the cases got (a summary line with counts).

    Returns:
        The dataset folder. Its dataset.json counts the cases per label numbering ("brats_label_numbering");
        conversion_report.json gives each case's numbering, what decided it, its file naming, and skipped cases.

    Raises:
        ValueError: bad arguments, bad cases with skip_bad_cases=False (the message lists 'case: problems'), or
            cases with label 4 mixed with cases with label 3. Nothing is written or removed then.
    """
    from tqdm import tqdm

    if label_form not in ("regions", "labels"):
        raise ValueError(f"label_form={label_form!r}; use 'regions' (WT/TC/ET) or 'labels' (NCR/edema/ET)")
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset id {dataset_id} (--dataset-id) must be in 1..999 (nnU-Net names folders "
                         "Dataset%03d_Name)")
    if not dataset_name or any(c in dataset_name for c in "/\\ ") or dataset_name.startswith("Dataset"):
        raise ValueError(f"dataset name {dataset_name!r} (--name) must be a plain name without spaces or slashes, "
                         "e.g. 'BraTS2023'")
    src_dir = Path(src_dir)
    if not src_dir.exists():
        raise FileNotFoundError(f"BraTS source folder {src_dir} does not exist")
    if not src_dir.is_dir():
        raise ValueError(f"BraTS source folder {src_dir} is not a folder; pass the folder holding one "
                         "sub-folder per case")
    if out_root is None:
        out_root = os.environ.get("nnUNet_raw")
        if not out_root:
            raise ValueError("no output folder: pass out_root (--out) or set the nnUNet_raw environment variable")
    out_root = Path(out_root)
    folder_name = f"Dataset{int(dataset_id):03d}_{dataset_name}"
    if out_root.is_dir():
        clash = [p.name for p in out_root.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != folder_name]
        if clash:
            raise ValueError(f"dataset id {dataset_id} is already used by {clash[0]} in {out_root}; nnU-Net needs "
                             "unique ids, pick another --dataset-id")
    out_dir = out_root / folder_name
    replace = out_dir.exists() and any(out_dir.iterdir())
    if replace and not overwrite:
        raise ValueError(f"{out_dir} already exists and is not empty; delete it, or pass --overwrite "
                         "(overwrite=True in Python) to replace it")

    folders = sorted(p for p in src_dir.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{src_dir} has no case sub-folders; expected one folder per case, e.g. BraTS-GLI-00000-000/")
    cases = _parallel_map(_check_case, folders, num_processes, "validating", tqdm)
    bad = [c for c in cases if c.problems]
    if bad:
        if not skip_bad_cases:
            listed = " | ".join(f"{c.name}: {'; '.join(c.problems)}" for c in bad[:50])
            more = f" | ... and {len(bad) - 50} more" if len(bad) > 50 else ""
            raise ValueError(f"{len(bad)} of {len(cases)} BraTS cases are bad; nothing was written. Fix them or "
                             f"pass --skip-bad (skip_bad_cases=True) to leave them out: {listed}{more}")
        report = "\n".join(f"  {c.name}: {'; '.join(c.problems)}" for c in bad)
        warnings.warn(f"skipping {len(bad)} of {len(cases)} bad BraTS cases:\n{report}")
    good = [c for c in cases if not c.problems]
    if not good:
        raise ValueError(f"no valid case in {src_dir}; nothing to convert")
    by_label = {n: [c.name for c in good if c.numbering_from == f"label {v}"] for n, v in (("2021", 4), ("2023+", 3))}
    if by_label["2021"] and by_label["2023+"]:
        raise ValueError(
            f"{len(by_label['2021'])} cases hold label 4 (2021 numbering, e.g. {', '.join(by_label['2021'][:3])}) "
            f"and {len(by_label['2023+'])} hold label 3 (2023+ numbering, e.g. {', '.join(by_label['2023+'][:3])}); "
            "a BraTS release uses one numbering, and in BraTS 2024 post-treatment data 3 is enhancing tumour and "
            "4 resection cavity, which must not be merged. Nothing was written; convert the two groups from "
            "separate folders if they really are 2021 and 2023+ cases")
    counts = {n: sum(c.numbering == n for c in good) for n in NUMBERINGS}
    if verbose:
        parts = []
        for n, et in (("2023+", 3), ("2021", 4)):
            by_label = sum(c.numbering == n and c.numbering_from == f"label {et}" for c in good)
            parts.append(f"{counts[n]} cases {n} ({NUMBERINGS[n]}; {by_label} by label {et}, "
                         f"{counts[n] - by_label} by file names)")
        print(f"label numbering per case: {', '.join(parts)}; written as 1 NCR, 2 edema, 3 ET; per case in "
              "conversion_report.json")

    if replace:
        shutil.rmtree(out_dir)  # only now: a failed validation above leaves the old dataset in place
    images_dir, labels_dir = out_dir / "imagesTr", out_dir / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    _parallel_map(_write_job, [(c, images_dir, labels_dir) for c in good], num_processes, "writing", tqdm)

    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    regions = label_form == "regions"
    generate_dataset_json(
        str(out_dir),
        channel_names={str(i): m for i, m in enumerate(MODALITIES)},
        labels=dict(REGION_LABELS if regions else PLAIN_LABELS),
        num_training_cases=len(good),
        file_ending=".nii.gz",
        # nnU-Net turns region outputs back into labels by painting WT, then TC, then ET with these values: the
        # part of WT outside TC is edema (2), of TC outside ET necrosis (1), ET is 3. (1, 2, 3) would swap 1 and 2.
        regions_class_order=(2, 1, 3) if regions else None,
        dataset_name=folder_name,
        description="BraTS glioma, converted by nnunet-segmamba convert-brats; labels 1 NCR, 2 edema, 3 ET",
        reference="https://www.synapse.org/brats",
        license="see the BraTS data use agreement",
        converted_by="nnunet-segmamba convert-brats",
        brats_label_numbering=counts,
    )
    report = {
        "label_numbering_rule": "label 4 present: 2021; label 3 present: 2023+; neither: from the file names",
        "label_numbering_counts": counts,
        "cases": {c.name: {"label_numbering": c.numbering, "decided_by": c.numbering_from, "file_names": c.naming}
                  for c in good},
        "skipped": {c.name: c.problems for c in bad},
    }
    (out_dir / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir


def _parallel_map(fn, items, num_processes, desc, tqdm):
    if num_processes > 1 and len(items) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(num_processes, len(items)), mp_context=multiprocessing.get_context("spawn")) as ex:
            return list(tqdm(ex.map(fn, items), total=len(items), desc=desc))
    return [fn(i) for i in tqdm(items, desc=desc)]
