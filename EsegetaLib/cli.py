"""The `esegeta` command line (also `python -m EsegetaLib`).

Each subcommand is its own module in `EsegetaLib/commands/` that exposes

    def add_parser(subparsers, common) -> argparse.ArgumentParser

which adds its parser with `subparsers.add_parser(NAME, parents=[common], help=...)` and sets
`parser.set_defaults(handler=run)`, where `run(args) -> int` returns the exit status.  `common`
carries `--quiet` and `--debug`.  Modules are found by listing that folder, so adding a command
(`view`, `study`, `bench`) means adding a file, not editing this one; `add_parser` must be cheap
(import torch and friends inside `run`), so `esegeta --help` stays fast.

Exit status: 0 success; 2 bad input (`EsegetaError` or a bad argument: one line on stderr saying
what is wrong and what to do, traceback only with --debug); 1 internal error; 130 cancelled
(Ctrl-C or SIGTERM; nothing is left behind).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import traceback
import warnings
from typing import List, Optional

from . import __version__
from .errors import EsegetaCancelled, EsegetaError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


class UsageError(EsegetaError):
    """A malformed command line (argparse's complaint, kept to one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error and exits; we want one line and our exit codes."""

    def error(self, message: str):
        raise UsageError(f"{message}. See '{self.prog} --help'.")


def command_modules() -> List[str]:
    """Names of the modules in EsegetaLib/commands (listed without importing them)."""
    from . import commands

    return sorted(info.name for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress or notes (warnings and errors are still shown)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of any error")
    parser = _Parser(prog="esegeta", parents=[common],
                     description="Explain 3D medical image segmentation models with attribution maps.")
    parser.add_argument("--version", action="version", version=f"esegeta {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in command_modules():
        module = importlib.import_module(f"{__package__}.commands.{name}")
        module.add_parser(subparsers, common)
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM (e.g. a Slicer Cancel killing the process) unwinds like Ctrl-C, so cleanup runs."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread
        pass


def _quiet_library_warnings() -> None:
    """Captum's and torch's notes to developers (inputs made to require grad, TorchScript
    deprecation) say nothing a command-line user can act on; --debug shows them."""
    for module in (r"captum(\..*)?", r"torch(\..*)?", r"monai(\..*)?"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.quiet = getattr(args, "quiet", False)
        args.debug = getattr(args, "debug", False)
        args.argv = argv
        if getattr(args, "handler", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        _interrupt_on_sigterm()
        with warnings.catch_warnings():
            if not args.debug:
                _quiet_library_warnings()
            return int(args.handler(args) or EXIT_OK)
    except (KeyboardInterrupt, EsegetaCancelled):
        if debug:
            traceback.print_exc()
        print("esegeta: cancelled; the output directory was left as it was.", file=sys.stderr)
        return EXIT_CANCELLED
    except EsegetaError as exc:
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())  # one line, whatever the raiser wrote
        print(f"esegeta: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if debug:
            traceback.print_exc()
            print(f"esegeta: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            summary = " ".join(str(exc).split())[:300]
            print(f"esegeta: internal error: {type(exc).__name__}: {summary} "
                  "(run again with --debug for the traceback, and please report it).", file=sys.stderr)
        return EXIT_INTERNAL


def console_main() -> None:  # pragma: no cover - thin wrapper for tools that want sys.exit
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
