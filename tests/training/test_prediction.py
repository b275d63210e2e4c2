"""The argument checks of `predict_test_split` (what `nnunet-segmamba predict-test` runs)."""
import pytest

from nnunet_segmamba.training.prediction import predict_test_split


@pytest.mark.parametrize("kwargs, match", [({"device": "tpu"}, "device"), ({"convention": "x", "device": "cpu"},
                                                                            "convention")])
def test_predict_test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict_test_split(4, "3d_fullres", 0, "nnUNetTrainerSegMamba", **kwargs)
