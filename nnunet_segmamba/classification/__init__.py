"""MedMamba image classification on MedMNIST: data loading (`data`), training and evaluation (`train`), the
`strong` recipe's pieces (`recipe`, `augment`), and the `nnunet-segmamba classify` command (`commands`)."""
from .train import classification_metrics, evaluate, summarize_seeds, train, train_seeds

__all__ = ["classification_metrics", "evaluate", "summarize_seeds", "train", "train_seeds"]
