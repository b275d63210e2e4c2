"""The `nnunet-segmamba` command. It only parses arguments and calls typed library functions.

Each sub-command lives beside the code it drives, in a module with a `register(subparsers)` function that
adds its parser and sets `func` (called with the parsed namespace, returning an exit code).

User errors are reported here, in one place: the library raises `ValueError` (or `FileNotFoundError` & co.,
see `errors.USER_ERRORS`) with a message that names the input; `main` prints it as the single line
`nnunet-segmamba <command>: error: <message>` and returns 2. `--debug` re-raises instead, with the traceback.
"""
from __future__ import annotations

import argparse
import shlex
import sys

# the modules that contribute sub-commands, imported and listed in the order `--help` shows them; each imports
# its heavy dependencies (torch, nnU-Net, SimpleITK) inside its handlers, so `--help` stays fast
from . import doctor
from .errors import USER_ERRORS
from .evaluation import commands as evaluation_commands
from .training import commands as training_commands
from .classification import commands as classification_commands
from . import benchmark
from . import demo

COMMAND_MODULES = (doctor, evaluation_commands, training_commands, classification_commands, benchmark, demo)
PROG = "nnunet-segmamba"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="SegMamba and MedMamba for nnU-Net v2: diagnostics, evaluation, demo, classification.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, raise it with its traceback instead of printing one line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")  # sub-parsers are _Parser too
    subparsers.required = True
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (multi-line messages, e.g. lists of problems, joined by '; ')."""
    parts = [p.strip() for p in str(exc).splitlines() if p.strip()]
    text = "; ".join(p[:-1] if p.endswith(":") and i + 1 < len(parts) else p for i, p in enumerate(parts))
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the command as a user types it, for the records commands write (not the interpreter and script path that
    # `python -m` or the entry point put in sys.argv)
    args.command_line = shlex.join([PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        command = " ".join(c for c in (args.command, getattr(args, "classify_command", None)) if c)
        print(f"{PROG} {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
