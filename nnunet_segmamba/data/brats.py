"""Convert a BraTS glioma training folder into an nnU-Net v2 raw dataset, validating every case first.

Input: one sub-folder per case, named in either scheme
    2023/2024/2025: BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz   labels {0, 1, 2, 3}
    2021:           BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz            labels {0, 1, 2, 4}
Output: `DatasetNNN_Name/{imagesTr,labelsTr,dataset.json}` with channels in SegMamba's order
T2w, T2-FLAIR, T1n, T1c and labels 1 = necrotic core, 2 = edema, 3 = enhancing tumour (2021's 4 -> 3).

Unlike nnU-Net's Dataset137_BraTS21 script, labels 1 and 2 are not swapped: they keep the BraTS 2023 meaning,
so the tumour core region is (1, 3) rather than nnU-Net's (2, 3).
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODALITIES = ("T2w", "FLAIR", "T1n", "T1c")  # nnU-Net channel index = position here
# file-name token -> channel index (or "seg"), per naming scheme
SCHEMES = {
    "2023": {"t2w": 0, "t2f": 1, "t1n": 2, "t1c": 3, "seg": "seg"},
    "2021": {"t2": 0, "flair": 1, "t1": 2, "t1ce": 3, "seg": "seg"},
}
# label values each scheme may contain. A 2023-style case holding label 4 is rejected, not mapped: in BraTS 2024
# post-treatment data 4 is resection cavity, and folding it into enhancing tumour would corrupt the dataset.
ALLOWED_LABELS = {"2023": {0, 1, 2, 3}, "2021": {0, 1, 2, 4}}

REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": [3]}
PLAIN_LABELS = {"background": 0, "NCR": 1, "edema": 2, "ET": 3}

_SPACING_RTOL = 1e-4  # spacings are float-stored; exact comparison would reject identical grids
_ORIGIN_ATOL_MM = 1e-3


@dataclass
class BratsCase:
    """One case folder: its files by channel index (and "seg"), the scheme, and problems found."""
    name: str
    folder: Path
    scheme: str | None = None
    files: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _split_token(filename: str) -> tuple[str, str] | None:
    """'BraTS-GLI-00000-000-t1c.nii.gz' -> ('2023', 't1c'); 'BraTS2021_00000_t1ce.nii.gz' -> ('2021', 't1ce')."""
    for ending in (".nii.gz", ".nii"):
        if filename.endswith(ending):
            stem = filename[: -len(ending)]
            break
    else:
        return None
    dash, under = stem.rsplit("-", 1)[-1].lower(), stem.rsplit("_", 1)[-1].lower()
    if "-" in stem and dash in SCHEMES["2023"]:
        return "2023", dash
    if "_" in stem and under in SCHEMES["2021"]:
        return "2021", under
    return None


def scan_case(folder: Path) -> BratsCase:
    """Find the modality and seg files of one case folder and record naming problems (no image data read)."""
    case = BratsCase(folder.name, folder)
    schemes = set()
    for f in sorted(folder.iterdir()):
        parsed = _split_token(f.name)
        if parsed is None:
            continue
        scheme, token = parsed
        schemes.add(scheme)
        key = SCHEMES[scheme][token]
        if key in case.files:
            case.problems.append(f"two files for {token}: {case.files[key].name} and {f.name}")
        case.files[key] = f
    if not schemes:
        case.problems.append("no BraTS image files (expected *-t1n.nii.gz ... or *_t1.nii.gz ...)")
        return case
    if len(schemes) > 1:
        case.problems.append("mixes 2021 (_t1, _flair) and 2023 (-t1n, -t2f) file names")
        return case
    case.scheme = schemes.pop()
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
    if not np.all(values == np.round(values)):
        case.problems.append(f"seg holds non-integer values {values[values != np.round(values)][:5].tolist()}")
    bad = sorted(set(int(v) for v in values) - ALLOWED_LABELS[case.scheme])
    if bad:
        case.problems.append(f"unexpected label value(s) {bad} in seg (a {case.scheme}-style case may only "
                             f"hold {sorted(ALLOWED_LABELS[case.scheme])})")
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
    out[seg == 4] = 3  # only reachable for 2021-style cases (validated above): enhancing tumour
    out_img = sitk.GetImageFromArray(out)
    out_img.CopyInformation(seg_img)
    sitk.WriteImage(out_img, str(labels_dir / f"{case.name}.nii.gz"), useCompression=True)


def _check_case(folder: Path) -> BratsCase:
    return validate_case(scan_case(folder))


def _write_job(args) -> None:
    _write_case(*args)


def convert_brats(src_dir: str | os.PathLike, dataset_id: int, dataset_name: str = "BraTS",
                  out_root: str | os.PathLike | None = None, label_form: str = "regions",
                  num_processes: int = 1, skip_bad_cases: bool = False, overwrite: bool = False) -> Path:
    """Convert a BraTS glioma training folder into `out_root/DatasetNNN_Name` for nnU-Net v2.

    Args:
        src_dir: folder with one sub-folder per case (files named in the 2021 or 2023+ scheme, see module doc).
        dataset_id: nnU-Net dataset id, 1..999.
        dataset_name: name part of `DatasetNNN_Name`.
        out_root: nnU-Net raw folder; default the `nnUNet_raw` environment variable.
        label_form: "regions" (dataset.json with WT/TC/ET regions and regions_class_order, nnU-Net's
            region-based training) or "labels" (plain labels NCR=1, edema=2, ET=3). The label files are the same.
        num_processes: worker processes for validation and writing.
        skip_bad_cases: False: raise listing every bad case; True: leave them out with a warning listing them.
        overwrite: replace an existing non-empty dataset folder.

    Returns:
        The dataset folder.

    Raises:
        ValueError: bad arguments, or bad cases with skip_bad_cases=False (message lists case: problem lines).
    """
    from tqdm import tqdm

    if label_form not in ("regions", "labels"):
        raise ValueError(f"label_form={label_form!r}; use 'regions' (WT/TC/ET) or 'labels' (NCR/edema/ET)")
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id={dataset_id} must be in 1..999 (nnU-Net names folders Dataset%03d_Name)")
    if not dataset_name or any(c in dataset_name for c in "/\\ ") or dataset_name.startswith("Dataset"):
        raise ValueError(f"dataset_name={dataset_name!r} must be a plain name without spaces or slashes, "
                         "e.g. 'BraTS2023'")
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise ValueError(f"BraTS source folder {src_dir} does not exist")
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
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} already exists and is not empty; delete it or pass overwrite=True")
        shutil.rmtree(out_dir)

    folders = sorted(p for p in src_dir.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{src_dir} has no case sub-folders; expected one folder per case, e.g. BraTS-GLI-00000-000/")
    cases = _parallel_map(_check_case, folders, num_processes, "validating", tqdm)
    bad = [c for c in cases if c.problems]
    if bad:
        report = "\n".join(f"  {c.name}: {'; '.join(c.problems)}" for c in bad)
        if not skip_bad_cases:
            raise ValueError(f"{len(bad)} of {len(cases)} BraTS cases are bad; nothing was written. Fix them or "
                             f"pass skip_bad_cases=True (--skip-bad) to leave them out:\n{report}")
        warnings.warn(f"skipping {len(bad)} of {len(cases)} bad BraTS cases:\n{report}")
    good = [c for c in cases if not c.problems]
    if not good:
        raise ValueError(f"no valid case in {src_dir}; nothing to convert")

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
    )
    return out_dir


def _parallel_map(fn, items, num_processes, desc, tqdm):
    if num_processes > 1 and len(items) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(num_processes, len(items)), mp_context=multiprocessing.get_context("spawn")) as ex:
            return list(tqdm(ex.map(fn, items), total=len(items), desc=desc))
    return [fn(i) for i in tqdm(items, desc=desc)]
