"""SegMamba trainers for nnU-Net's `-tr` option (found through nnUNet_extTrainer; classes live in
nnunet_segmamba.training.trainers, this module only re-exports them)."""
from nnunet_segmamba.training.trainers import *  # noqa: F401,F403
from nnunet_segmamba.training.trainers import __all__  # noqa: F401
