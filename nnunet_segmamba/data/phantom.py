"""Synthetic, BraTS-like multi-modal brain-tumour phantoms, written as a BraTS folder for `convert_brats`.

Each case is a skull-stripped "brain" (irregular ellipsoid: white matter, a cortical grey-matter shell, sulcal
and ventricular CSF, a few enhancing vessels) holding one glioma-like tumour made of nested, noise-perturbed
ellipsoids: necrotic core (label 1) inside an enhancing rim (label 3, 2-3 voxels thick, so resolvable at 1 mm)
inside edema (label 2). The four channels get tissue contrasts qualitatively like real MRI, partial-volume blur,
a smooth multiplicative bias field and Rician noise. Why the task is not trivial on one channel: CSF is brighter
than edema on T2w but dark on FLAIR; necrosis is as dark as grey matter on FLAIR; vessels enhance on T1c like tumour
rim; noise and bias overlap the classes. Combined, the channels separate the classes well, so a small network learns
it in minutes.

Everything derives from `numpy.random.default_rng((seed, case_index))`, so a case does not depend on how many
cases are made or in which order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# tissue codes of the internal tissue map
BG, WM, GM, CSF, EDEMA, ET, NCR, VESSEL, WMH = range(9)
#: thickness of the enhancing rim around necrosis, in voxels (1 mm), drawn uniformly per case
RIM_MM = (2.0, 3.0)
# mean intensity per tissue (rows follow the codes above) for T2w, FLAIR, T1n, T1c (the nnU-Net channel order)
_CONTRAST = np.array([
    # T2w   FLAIR  T1n   T1c
    [0.00, 0.00, 0.00, 0.00],  # background (skull-stripped: exactly 0 after masking)
    [0.40, 0.45, 0.80, 0.80],  # white matter
    [0.55, 0.55, 0.60, 0.60],  # grey matter
    [1.00, 0.15, 0.20, 0.20],  # CSF: bright T2w, suppressed on FLAIR
    [0.80, 0.88, 0.50, 0.52],  # edema: bright T2w and FLAIR
    [0.65, 0.75, 0.55, 1.20],  # enhancing rim: bright T1c
    [0.90, 0.50, 0.30, 0.25],  # necrosis: bright T2w, dark T1c, grey-matter-like FLAIR
    [0.45, 0.50, 0.62, 1.10],  # vessels: enhance on T1c, not tumour
    [0.72, 0.85, 0.68, 0.68],  # white-matter hyperintensities: FLAIR/T2w-bright like edema, not tumour
], dtype=np.float64)

FILE_TOKENS = {
    "2023": ("t2w", "t2f", "t1n", "t1c", "seg"),
    "2021": ("t2", "flair", "t1", "t1ce", "seg"),
}


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return n / (n.std() + 1e-12)


def _ellipsoid_radius(shape, centre, radii) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside the ellipsoid of `radii` (voxels) around `centre`."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    return np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)))


def make_brats_phantom_case(rng: np.random.Generator, shape=(48, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case.

    Args:
        rng: the random generator (all randomness comes from it).
        shape: array shape (Z, Y, X), each at least 24; voxels are 1 mm.

    Returns:
        images: float32 (4, Z, Y, X), channels T2w, FLAIR, T1n, T1c, 0 outside the brain.
        seg: uint8 (Z, Y, X), 0 background, 1 necrotic core, 2 edema, 3 enhancing tumour.
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 24:
        raise ValueError(f"shape={shape} must be three sizes of at least 24 voxels, e.g. (48, 48, 48)")
    size = np.array(shape, dtype=np.float64)
    centre = size / 2 + rng.uniform(-0.03, 0.03, 3) * size

    # brain: an ellipsoid with a wobbly outline
    brain_r = _ellipsoid_radius(shape, centre, size * rng.uniform(0.38, 0.45, 3))
    brain_r = brain_r + 0.05 * _smooth_noise(rng, shape, 5.0)
    brain = brain_r < 1.0
    tissue = np.where(brain, WM, BG).astype(np.uint8)
    # cortical grey matter shell of varying thickness, sulcal CSF in its outer part
    tissue[brain & (brain_r > 0.72 + 0.07 * _smooth_noise(rng, shape, 2.0))] = GM
    tissue[brain & (brain_r > 0.88) & (_smooth_noise(rng, shape, 1.5) > 0.9)] = CSF
    # two ventricles beside the midline (last array axis is left-right)
    for side in (-1, 1):
        v_centre = centre + np.array([0.02, 0.0, side * 0.07]) * size
        v_radii = size * np.array([0.12, 0.2, 0.04]) * rng.uniform(0.8, 1.2, 3)
        tissue[brain & (_ellipsoid_radius(shape, v_centre, v_radii) < 1.0)] = CSF

    # tumour: one perturbed distance field; nested thresholds make necrosis ⊂ core ⊂ whole tumour
    inner = np.argwhere(brain_r < 0.55)
    t_centre = inner[rng.integers(len(inner))].astype(np.float64)
    wt_radii = min(shape) * rng.uniform(0.16, 0.26) * rng.uniform(0.75, 1.25, 3)
    wt_field = _ellipsoid_radius(shape, t_centre, wt_radii) + rng.uniform(0.15, 0.3) * _smooth_noise(rng, shape, 2.5)
    core_shift = rng.uniform(-0.15, 0.15, 3) * wt_radii  # the core is rarely centred in the edema
    core_field = (_ellipsoid_radius(shape, t_centre + core_shift, wt_radii)
                  + 0.12 * _smooth_noise(rng, shape, 1.5))
    whole = brain & (wt_field < 1.0)
    core_thresh = rng.uniform(0.6, 0.8)
    core = whole & (core_field < core_thresh)
    if not core.any():  # tiny tumours: keep at least a small enhancing core
        core = whole & (core_field <= np.min(core_field[whole]) + 0.15)
    # the enhancing rim: the core minus its interior deeper than `rim` voxels (2-3 mm, so it stays resolvable at
    # 1 mm as in real scans; a fraction of the core radius made it 1 voxel thin in small tumours)
    rim = rng.uniform(RIM_MM[0], RIM_MM[1])
    has_necrosis = rng.random() > 0.15  # some gliomas have no necrosis: a solid enhancing core
    necrosis = (distance_transform_edt(core) > rim) if has_necrosis else np.zeros(shape, bool)
    seg = np.zeros(shape, np.uint8)
    seg[whole] = 2
    seg[core] = 3
    seg[necrosis] = 1
    tissue[whole] = EDEMA
    tissue[core] = ET
    tissue[necrosis] = NCR
    # small enhancing vessels elsewhere in the brain
    tissue[brain & ~whole & (tissue != CSF) & (_smooth_noise(rng, shape, 1.2) > 2.7)] = VESSEL
    # white-matter hyperintensities (small-vessel disease): FLAIR-bright blobs that are not tumour
    tissue[(tissue == WM) & (_smooth_noise(rng, shape, 2.0) > rng.uniform(1.7, 2.2))] = WMH

    images = np.empty((4,) + shape, dtype=np.float32)
    fade = np.clip(0.4 + 2.0 * (1.0 - wt_field), 0.4, 1.0)
    contrast = _CONTRAST * rng.uniform(0.93, 1.07, _CONTRAST.shape)  # per-case contrast jitter
    for ch in range(4):
        signal = contrast[tissue, ch]
        # edema fades into white matter towards its outer border, so its edge is not a sharp intensity step
        signal = np.where(tissue == EDEMA, fade * signal + (1 - fade) * contrast[WM, ch], signal)
        signal = gaussian_filter(signal, 0.6)  # partial-volume blur across tissue borders
        signal *= 1.0 + 0.05 * _smooth_noise(rng, shape, 1.0)  # tissue texture
        # smooth multiplicative bias field: exp of a random low-order polynomial, about +-15 %
        grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
        poly = sum(rng.normal(0, 1) * g for g in grids) + sum(rng.normal(0, 0.5) * g * h
                                                               for i, g in enumerate(grids) for h in grids[i:])
        signal *= np.exp(0.15 * poly / (np.abs(poly).max() + 1e-12))
        # Rician noise: magnitude of a complex signal with Gaussian noise on both parts
        sigma = rng.uniform(0.03, 0.06)
        noisy = np.sqrt((signal + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
        noisy *= rng.uniform(600, 1400)  # arbitrary scanner scale, as in real (un-normalised) MRI
        images[ch] = np.where(brain, noisy, 0.0)
    return images, seg


def _case_name(index: int, naming: str) -> str:
    return f"BraTS-GLI-{index:05d}-000" if naming == "2023" else f"BraTS2021_{index:05d}"


def _write_case(out_dir: Path, index: int, seed: int, shape, naming: str) -> None:
    import SimpleITK as sitk

    images, seg = make_brats_phantom_case(np.random.default_rng((seed, index)), shape)
    name = _case_name(index, naming)
    sep = "-" if naming == "2023" else "_"
    case_dir = out_dir / name
    case_dir.mkdir(parents=True, exist_ok=True)
    if naming == "2021":
        seg = np.where(seg == 3, 4, seg).astype(np.uint8)  # 2021 stores enhancing tumour as 4
    tokens = FILE_TOKENS[naming]
    for arr, token in zip([*images, seg], tokens):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(img, str(case_dir / f"{name}{sep}{token}.nii.gz"), useCompression=True)


def make_brats_phantom_folder(out_dir: str | os.PathLike, num_cases: int = 8, shape=(48, 48, 48), seed: int = 0,
                              naming: str = "2023") -> Path:
    """Write `num_cases` synthetic cases as a BraTS training folder (one sub-folder per case).

    Args:
        out_dir: folder to create (may exist); cases go into sub-folders named like BraTS cases.
        num_cases: number of cases, >= 1.
        shape: array shape (Z, Y, X) of every case, each >= 24; spacing is 1 mm.
        seed: case i is generated from `default_rng((seed, i))`: same seed, same data.
        naming: "2023" (BraTS-GLI-xxxxx-000-{t1n,t1c,t2w,t2f,seg}, labels 1/2/3) or
            "2021" (BraTS2021_xxxxx_{t1,t1ce,t2,flair,seg}, enhancing tumour stored as 4).

    Returns:
        out_dir as a Path, ready for `convert_brats(out_dir, ...)`.
    """
    from tqdm import tqdm

    if naming not in FILE_TOKENS:
        raise ValueError(f"naming={naming!r}; use '2023' or '2021'")
    if int(num_cases) < 1:
        raise ValueError(f"num_cases={num_cases} must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(int(num_cases)), desc="phantoms", disable=num_cases < 4):
        _write_case(out_dir, i, int(seed), shape, naming)
    return out_dir
