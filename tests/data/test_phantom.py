"""Tests for the synthetic BraTS phantom generator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_segmamba.data.brats import convert_brats
from nnunet_segmamba.evaluation.metrics import dice
from nnunet_segmamba.data.phantom import make_brats_phantom_case, make_brats_phantom_folder

REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


@pytest.fixture(scope="module")
def cases():
    return [make_brats_phantom_case(np.random.default_rng((0, i)), (40, 44, 48)) for i in range(4)]


def test_shapes_labels_and_nesting(cases):
    for images, seg in cases:
        assert images.shape == (4, 40, 44, 48) and images.dtype == np.float32
        assert seg.shape == (40, 44, 48) and seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        assert {2, 3} <= set(np.unique(seg).tolist())  # every case has edema and an enhancing part
        wt, tc, et = (np.isin(seg, r) for r in REGIONS.values())
        assert not np.any(tc & ~wt) and not np.any(et & ~tc)
        brain = images[0] > 0
        assert np.all(images[:, ~brain] == 0)  # skull-stripped: background exactly 0 in all channels
        assert not np.any(wt & ~brain)        # tumour lies inside the brain
        assert 0.2 < brain.mean() < 0.6 and 0.01 < wt.sum() / brain.sum() < 0.5


def test_enhancing_rim_is_resolvable(cases):
    # necrosis lies at least 2 voxels inside the tumour core, so the enhancing rim around it is >= 2 voxels thick
    from scipy.ndimage import distance_transform_edt

    for images, seg in cases:
        tc = np.isin(seg, REGIONS["TC"])
        depth = distance_transform_edt(tc)
        if (seg == 1).any():
            assert depth[seg == 1].min() > 2.0
        assert (seg == 3).sum() >= 0.3 * tc.sum()  # the rim is a sizeable part of the core, not a sliver


def test_modality_contrasts(cases):
    # relative contrasts the generator promises (averaged over cases, each channel normalised by white matter)
    images, seg = cases[0]
    brain = images[0] > 0
    normal = brain & (seg == 0)
    ratios = {}
    for name, ch in (("T2w", 0), ("FLAIR", 1), ("T1c", 3)):
        ref = np.median(images[ch][normal])
        ratios[name] = {v: np.median(images[ch][seg == v]) / ref for v in (2, 3)}
    assert ratios["FLAIR"][2] > 1.2 and ratios["T2w"][2] > 1.2  # edema bright on FLAIR and T2w
    assert ratios["T1c"][3] > 1.3                                # enhancing rim bright on T1c


def test_not_trivial_on_a_single_channel(cases):
    # the best threshold on any one channel must not reproduce a region: the channels have to be combined
    best = {r: [] for r in REGIONS}
    for images, seg in cases:
        brain = images[0] > 0
        for region, values in REGIONS.items():
            g = np.isin(seg, values)[brain]
            scores = []
            for ch in range(4):
                x = images[ch][brain]
                for q in np.quantile(x, np.linspace(0.01, 0.99, 99)):
                    scores += [dice(x > q, g), dice(x < q, g)]
            best[region].append(max(scores))
    for region, values in best.items():
        assert max(values) < 0.97 and np.mean(values) < 0.92, (region, values)


def test_deterministic_and_seed_dependent(tmp_path):
    a = make_brats_phantom_folder(tmp_path / "a", num_cases=2, shape=(32, 32, 32), seed=5)
    b = make_brats_phantom_folder(tmp_path / "b", num_cases=2, shape=(32, 32, 32), seed=5)
    c = make_brats_phantom_folder(tmp_path / "c", num_cases=2, shape=(32, 32, 32), seed=6)
    case = "BraTS-GLI-00001-000"
    for token in ("t1c", "seg"):
        arr = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(d / case / f"{case}-{token}.nii.gz")))
               for k, d in (("a", a), ("b", b), ("c", c))}
        np.testing.assert_array_equal(arr["a"], arr["b"])
        assert not np.array_equal(arr["a"], arr["c"])
    # case i depends only on (seed, i), not on how many cases are generated
    one = make_brats_phantom_case(np.random.default_rng((5, 1)), (32, 32, 32))[1]
    np.testing.assert_array_equal(one, sitk.GetArrayFromImage(sitk.ReadImage(str(a / case / f"{case}-seg.nii.gz"))))


@pytest.mark.parametrize("naming", ["2023", "2021"])
def test_phantom_folder_passes_convert_brats(tmp_path, naming):
    src = make_brats_phantom_folder(tmp_path / "src", num_cases=3, shape=(32, 32, 32), seed=1, naming=naming)
    out = convert_brats(src, 990, "Phantom", out_root=tmp_path / "raw")
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 3
    labels = sorted(out.glob("labelsTr/*.nii.gz"))
    assert len(labels) == 3 and len(list(out.glob("imagesTr/*.nii.gz"))) == 12
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(labels[0])))
    assert {2, 3} <= set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
    assert sitk.ReadImage(str(labels[0])).GetSpacing() == (1.0, 1.0, 1.0)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="naming"):
        make_brats_phantom_folder(tmp_path, naming="2019")
    with pytest.raises(ValueError, match="shape"):
        make_brats_phantom_case(np.random.default_rng(0), (8, 8, 8))
