"""CLI sub-commands of the trainer glue: `env`, `pretrained-weights`, `predict` and `predict-test`. Parsing only; the
work is in library functions."""
from __future__ import annotations

import argparse

from nnunet_segmamba.training.ext_trainers import environment_lines


def _run_env(args: argparse.Namespace) -> int:
    print("\n".join(environment_lines()))
    return 0


def _run_pretrained_weights(args: argparse.Namespace) -> int:
    from nnunet_segmamba.training.pretrained import pretrained_weights_file

    written = pretrained_weights_file(args.source, args.output, args.dataset, args.configuration, args.trainer,
                                      plans=args.plans, seed=args.seed)
    print(f"{written.path}: {written.copied} tensors from {args.source}")
    if written.initialised:
        print(f"  left at their initialisation (output heads the source cannot fill): {len(written.initialised)}, "
              f"{', '.join(written.initialised)}")
    if written.unused:
        print(f"  not used (the network has no place for them): {len(written.unused)}, {', '.join(written.unused)}")
    print(f"fine-tune with: nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr {args.trainer} "
          f"-p {args.plans} -pretrained_weights {written.path}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from nnunet_segmamba.training.prediction import predict_folder

    output = predict_folder(args.input, args.output, args.dataset, args.configuration, args.trainer,
                            folds=args.folds, plans=args.plans, device=args.device,
                            use_mirroring=not args.disable_tta, checkpoint_name=args.checkpoint,
                            save_probabilities=args.save_probabilities, num_processes=args.num_processes)
    print(f"predictions: {output}")
    return 0


def _run_predict_test(args: argparse.Namespace) -> int:
    from nnunet_segmamba.training.prediction import predict_test_split

    summary = predict_test_split(args.dataset, args.configuration, args.fold, args.trainer, plans=args.plans,
                                 device=args.device, use_mirroring=not args.disable_tta,
                                 convention=args.convention, checkpoint_name=args.checkpoint,
                                 num_processes=args.num_processes)
    print(f"test predictions and evaluation: {summary['prediction_folder']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "env", help="print the nnUNet_extTrainer export line and the current nnU-Net paths",
        description="Prints `export nnUNet_extTrainer=<folder>` (use: eval \"$(nnunet-segmamba env)\") and the "
                    "current values of nnUNet_raw, nnUNet_preprocessed and nnUNet_results as comments.")
    p.set_defaults(func=_run_env)

    p = subparsers.add_parser(
        "pretrained-weights", help="turn SegMamba weights into a file nnUNetv2_train -pretrained_weights accepts",
        description="Writes the weights to fine-tune from for a dataset: every tensor of SOURCE (an nnU-Net "
                    "checkpoint of a SegMamba trainer, or the authors' state_dict) that fits the trainer's network "
                    "for the dataset, with the output heads that do not fit (another class count, no deep "
                    "supervision in the source) left at their initialisation, as nnU-Net does for its own "
                    "networks (docs/usage.md, \"Fine-tuning\").")
    p.add_argument("source", help="checkpoint to start from (.pth / .pt); unpickled in full: use trusted files")
    p.add_argument("-o", "--output", required=True, help="file to write (must not exist)")
    p.add_argument("-d", "--dataset", required=True, help="dataset to fine-tune on (planned), e.g. 4")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerSegMamba",
                   help="trainer to fine-tune with (default: nnUNetTrainerSegMamba)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new output heads' initialisation (default: 0)")
    p.set_defaults(func=_run_pretrained_weights)

    p = subparsers.add_parser(
        "predict", help="predict a folder of images with a trained model, as nnUNetv2_predict does, faster on CUDA",
        description="Predicts every case of the input folder (nnU-Net's file names) with SegMambaPredictor: "
                    "nnU-Net's predictor (sliding window, Gaussian weighting, mirroring, fold averaging, export), "
                    "its network on CUDA channels-last, compiled with CUDA graphs and with each tile's flips in one "
                    "forward pass (docs/usage.md, \"torch.compile\").")
    p.add_argument("-i", "--input", required=True, help="folder of images, CASE_XXXX.<ending> per channel")
    p.add_argument("-o", "--output", required=True, help="folder for the segmentations (created)")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=None,
                   help="trained folds to average (default: every fold folder holding the checkpoint)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write the class probabilities (.npz) next to each segmentation")
    _add_model_and_run_arguments(p)
    p.set_defaults(func=_run_predict)

    p = subparsers.add_parser(
        "predict-test", help="predict and evaluate the held-out 20%% test cases of the 70/10/20 split",
        description="Predicts the test cases of a trained fold (from nnUNet_raw imagesTr) with SegMambaPredictor "
                    "into fold_F/test_predictions and scores them against labelsTr.")
    p.add_argument("-f", "--fold", required=True, type=int, help="the trained fold whose test cases to predict")
    p.add_argument("--convention", choices=("brats", "reference"), default="brats",
                   help="empty-mask scoring: brats (both empty = Dice 1, HD95 0) or reference (Dice 0, HD95 50)")
    _add_model_and_run_arguments(p, processes_help="worker processes for preprocessing, export and evaluation")
    p.set_defaults(func=_run_predict_test)


def _add_model_and_run_arguments(p: argparse.ArgumentParser,
                                 processes_help: str = "worker processes for preprocessing and export") -> None:
    """The arguments `predict` and `predict-test` share: which model, and how to run it."""
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 4 or Dataset004_Hippocampus")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-tr", "--trainer", required=True, help="trainer used for training, e.g. nnUNetTrainerSegMamba")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--device", default="auto",
                   help="device to predict on: auto (cuda when a CUDA device is available, else cpu), cpu, cuda or "
                        "cuda:N (default: auto)")
    p.add_argument("--disable-tta", action="store_true", help="switch off mirror test-time augmentation")
    p.add_argument("--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file in the fold folder (default: checkpoint_final.pth)")
    p.add_argument("-np", "--num-processes", type=int, default=2, help=f"{processes_help} (default: 2)")
