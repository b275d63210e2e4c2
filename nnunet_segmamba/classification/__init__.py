"""MedMamba image classification on MedMNIST: data loading (`data`), training and evaluation (`train`), and the
`nnunet-segmamba classify` command (`commands`)."""
from .train import classification_metrics, evaluate, train

__all__ = ["classification_metrics", "evaluate", "train"]
