"""nnunet-segmamba: SegMamba (Xing et al. 2024) and MedMamba (Yue & Li 2024) for nnU-Net v2.

Where things are:
    nnunet_segmamba.ssm             the selective scan (reference, torch and CUDA backends) and the causal conv
    nnunet_segmamba.nn              the Mamba mixers (TriOrientedMamba)
    nnunet_segmamba.networks        SegMamba (2D/3D) and MedMamba
    nnunet_segmamba.training        nnU-Net trainer glue (one base class, variants, the 70/10/20 split)
    nnunet_segmamba.evaluation      Dice / HD95 / NSD
    nnunet_segmamba.data            data converters and generators: BraTS, MSD hippocampus, MedMNIST, the phantom
    nnunet_segmamba.classification  MedMamba training and evaluation on MedMNIST
    nnunet_segmamba.cli             the `nnunet-segmamba` command
"""

__version__ = "0.1.0"
