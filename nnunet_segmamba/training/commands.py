"""CLI sub-commands of the trainer glue: `env` and `predict-test`. Parsing only; the work is in library functions."""
from __future__ import annotations

import argparse

from nnunet_segmamba.training.ext_trainers import environment_lines


def _run_env(args: argparse.Namespace) -> int:
    print("\n".join(environment_lines()))
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
        "predict-test", help="predict and evaluate the held-out 20%% test cases of the 70/10/20 split",
        description="Predicts the test cases of a trained fold (from nnUNet_raw imagesTr) with nnU-Net's predictor "
                    "into fold_F/test_predictions and scores them against labelsTr.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 4 or Dataset004_Hippocampus")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    p.add_argument("-f", "--fold", required=True, type=int, help="the trained fold whose test cases to predict")
    p.add_argument("-tr", "--trainer", required=True, help="trainer used for training, e.g. nnUNetTrainerSegMamba")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--device", default="auto",
                   help="device to predict on: auto (cuda when a CUDA device is available, else cpu), cpu, cuda or "
                        "cuda:N (default: auto)")
    p.add_argument("--disable-tta", action="store_true", help="switch off mirror test-time augmentation")
    p.add_argument("--convention", choices=("brats", "reference"), default="brats",
                   help="empty-mask scoring: brats (both empty = Dice 1, HD95 0) or reference (Dice 0, HD95 50)")
    p.add_argument("--checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file in the fold folder (default: checkpoint_final.pth)")
    p.add_argument("-np", "--num-processes", type=int, default=2,
                   help="worker processes for preprocessing, export and evaluation (default: 2)")
    p.set_defaults(func=_run_predict_test)
