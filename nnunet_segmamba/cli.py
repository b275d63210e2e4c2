"""The `nnunet-segmamba` command. It only parses arguments and calls typed library functions.

Each sub-command lives beside the code it drives, in a module with a `register(subparsers)` function that
adds its parser and sets `func` (called with the parsed namespace, returning an exit code).
"""
from __future__ import annotations

import argparse
import sys

# the modules that contribute sub-commands, imported and listed in the order `--help` shows them; each imports
# its heavy dependencies (torch, nnU-Net, SimpleITK) inside its handlers, so `--help` stays fast
from . import doctor
from .evaluation import commands as evaluation_commands
from .training import commands as training_commands
from .classification import commands as classification_commands
from . import benchmark
from . import demo

COMMAND_MODULES = (doctor, evaluation_commands, training_commands, classification_commands, benchmark, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet-segmamba",
        description="SegMamba and MedMamba for nnU-Net v2: diagnostics, evaluation, demo, classification.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
