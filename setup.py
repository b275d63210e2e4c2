# Metadata lives in setup.cfg. This file exists for one thing setup.cfg cannot say: the top-level `trainers/`
# folder (what nnUNet_extTrainer points at) is installed as the package `nnunet_segmamba.ext_trainers`, so
# that it also exists after a non-editable `pip install`.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["nnunet_segmamba", "nnunet_segmamba.*"]) + ["nnunet_segmamba.ext_trainers"],
    package_dir={"nnunet_segmamba.ext_trainers": "trainers"},
)
