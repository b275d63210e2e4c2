"""MedMamba image classification on MedMNIST: training and evaluation (`train`), the `strong` recipe's pieces
(`recipe`, `augment`) and the `nnunet-segmamba classify` command (`commands`). The MedMNIST files are read by
`nnunet_segmamba.data.medmnist`.

Nothing is imported here: `train` loads torch, and the command line imports this package for `--help`."""
