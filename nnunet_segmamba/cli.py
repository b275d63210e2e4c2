"""The `nnunet-segmamba` command. It only parses arguments and calls typed library functions.

Each sub-command lives beside the code it drives, in a module with a `register(subparsers)` function that
adds its parser and sets `func` (called with the parsed namespace, returning an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that contribute sub-commands, in the order `--help` lists them
COMMAND_MODULES = [
    "nnunet_segmamba.doctor",
    "nnunet_segmamba.evaluation.commands",
    "nnunet_segmamba.training.commands",
    "nnunet_segmamba.classification.commands",
    "nnunet_segmamba.benchmark",
    "nnunet_segmamba.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-segmamba",
        description="SegMamba and MedMamba for nnU-Net v2: diagnostics, evaluation, demo, classification.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
