"""`nnunet-segmamba classify train|eval`: argument parsing only.

The work is done by `nnunet_segmamba.classification.train.train` and `.evaluate`; they are imported inside the
handlers so that `nnunet-segmamba --help` does not load torch.
"""
from __future__ import annotations

import argparse


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 2,2,4,2; got {value!r}")


def register(subparsers) -> None:
    cls = subparsers.add_parser(
        "classify", help="MedMamba image classification on MedMNIST .npz files (train, eval)",
        description="Train MedMamba (Yue & Li 2024) on a MedMNIST v2 .npz file with the paper's protocol, or score "
                    "a trained checkpoint. See docs/medmamba.md.")
    sub = cls.add_subparsers(dest="classify_command", metavar="ACTION")
    sub.required = True

    tr = sub.add_parser(
        "train", help="train MedMamba, keep the best-validation-AUC weights, score them on the test split",
        # a description is printed as written (argparse %-formats help= strings only): a single % here
        description="--recipe paper (default): AdamW, cross-entropy, MultiStepLR (x0.1 at 50% and 75% of the "
                    "epochs), random horizontal flips. --recipe strong: augmentation, label smoothing, warm-up + "
                    "cosine, weight EMA, class-balanced sampling (docs/medmamba.md). Writes config.json, "
                    "checkpoint_best.pth, checkpoint_final.pth, history.json, "
                    "metrics_test.json and confusion_matrix_test.png to --out and prints the test ACC and AUC.")
    tr.add_argument("--data", required=True, help="MedMNIST v2 .npz file, e.g. ../shared/data/medmnist/breastmnist.npz")
    tr.add_argument("--out", required=True, help="output folder (created)")
    tr.add_argument("--variant", choices=("t", "s", "b"), default="t",
                    help="MedMamba-T [2,2,4,2]@96, -S [2,2,12,2]@96 or -B [2,2,16,2]@128 (default t)")
    tr.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    tr.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default 128)")
    tr.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    tr.add_argument("--recipe", choices=("paper", "strong"), default="paper",
                    help="paper: the MedMamba paper's protocol (default); strong: augmentation, label smoothing, "
                         "warm-up + cosine, EMA, class-balanced sampling, bf16 on CUDA (docs/medmamba.md)")
    tr.add_argument("--weight-decay", type=float, default=None,
                    help="AdamW weight decay (default: the recipe's, paper 0.01, strong 0.05)")
    tr.add_argument("--image-size", type=int, default=64,
                    help="side the images are resized to, a multiple of 32 (default 64; the paper used 224)")
    tr.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    tr.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tr.add_argument("--seeds", type=_int_list, default=None,
                    help="run these seeds one after the other into OUT/seed_S and write OUT/summary.json and "
                         "OUT/summary.txt (mean +- std of every test metric), e.g. 0,1,2; overrides --seed")
    tr.add_argument("--label-smoothing", type=float, default=None, help="override the recipe's (paper 0, strong 0.1)")
    tr.add_argument("--warmup-epochs", type=float, default=None,
                    help="override the recipe's linear lr warm-up (strong 5; cosine schedule only)")
    tr.add_argument("--ema-epochs", type=float, default=None,
                    help="override the recipe's weight-EMA time constant in epochs, 0 = off (paper 0, strong 5)")
    tr.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                    help="override the recipe's class-balanced sampling of imbalanced training splits")
    tr.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                    help="override the recipe's augmentation (crop, flip, rotation, brightness, contrast)")
    tr.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                    help="override the recipe's precision on CUDA (paper fp32, strong bf16 autocast)")
    tr.add_argument("--depths", type=_int_list, default=None,
                    help="override the variant's blocks per stage, e.g. 1,1,1,1 (for quick CPU runs)")
    tr.add_argument("--dims", type=int, default=None, help="override the variant's first-stage width, e.g. 16")
    tr.add_argument("--drop-path-rate", type=float, default=0.1,
                    help="stochastic depth of the last block's SSM branch, rising linearly from 0 (default 0.1)")
    tr.add_argument("--micro-batch-size", type=int, default=None,
                    help="forward/backward each batch in chunks of this size, accumulating the gradients of one "
                         "step (for memory, e.g. 32 at --image-size 224 without mamba-ssm; default: whole batch)")
    tr.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                    help="use torch's deterministic algorithms (default on)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars (the test summary is still printed)")
    tr.set_defaults(func=_run_train)

    ev = sub.add_parser(
        "eval", help="score a trained MedMamba on one split",
        description="Writes metrics_SPLIT.json and confusion_matrix_SPLIT.png beside the checkpoint (or to --out) "
                    "and prints ACC, AUC and the macro precision, sensitivity, specificity and F1.")
    ev.add_argument("--data", default=None, help="MedMNIST .npz file (default: the file recorded at training)")
    ev.add_argument("--checkpoint", required=True,
                    help="the folder written by 'classify train', or a .pth file with config.json beside it")
    ev.add_argument("--split", choices=("train", "val", "test"), default="test", help="split to score (default test)")
    ev.add_argument("--out", default=None, help="folder for the metrics and the PNG (default: the checkpoint's)")
    ev.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    ev.add_argument("--batch-size", type=int, default=256, help="inference batch size (default 256)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_run_eval)


def _run_train(args: argparse.Namespace) -> int:
    from .train import train, train_seeds

    kwargs = dict(variant=args.variant, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, image_size=args.image_size, device=args.device,
                  depths=args.depths, dims=args.dims, drop_path_rate=args.drop_path_rate,
                  micro_batch_size=args.micro_batch_size, deterministic=args.deterministic,
                  progress=not args.quiet, recipe=args.recipe, label_smoothing=args.label_smoothing,
                  warmup_epochs=args.warmup_epochs, ema_epochs=args.ema_epochs, balance=args.balance,
                  augment=args.augment, precision=args.precision)
    if args.seeds:
        train_seeds(args.data, args.out, args.seeds, **kwargs)
    else:
        train(args.data, args.out, seed=args.seed, **kwargs)
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from .train import evaluate

    evaluate(args.checkpoint, data=args.data, split=args.split, device=args.device, out_dir=args.out,
             batch_size=args.batch_size, progress=not args.quiet)
    return 0
