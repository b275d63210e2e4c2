"""MedMamba image classification on MedMNIST: training and evaluation (`train`) and the `nnunet-segmamba classify`
command (`commands`). The MedMNIST files are read by `nnunet_segmamba.data.medmnist`."""
from .train import classification_metrics, evaluate, train

__all__ = ["classification_metrics", "evaluate", "train"]
