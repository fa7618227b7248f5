"""The `erasekit` command. Subcommands live in erasekit/commands/, one module each, found there
at start-up: a module defines ``register(subparsers, parent)`` and sets ``func`` on its parser.

Conventions for every subcommand: bad input prints one line ``erasekit: error: ...`` on stderr
and exits with code 2; no traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from erasekit import __version__
from erasekit.distributed import close_process_group
from erasekit.errors import ErasekitError, first_line
from erasekit.outputs import os_error_line
from erasekit.signals import exit_code, interrupt_on_termination, signal_name

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error convention."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"erasekit: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def quiet_libraries() -> None:
    """Offline mode and no library progress bars or warnings: erasekit prints its own."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - optional quieting only
        pass


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser = _Parser(
        prog="erasekit",
        description="Erase concepts from text-to-image diffusion models and audit them.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"erasekit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    import erasekit.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"erasekit.commands.{info.name}")
        module.register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    quiet_libraries()
    try:
        with interrupt_on_termination():
            result = args.func(args)
        close_process_group()
    except ErasekitError as e:
        if debug:
            raise
        sys.stderr.write(f"erasekit: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # SIGINT, SIGTERM, SIGHUP: the writers have cleaned up
        sys.stderr.write(f"erasekit: interrupted ({signal_name(e)})\n")
        return exit_code(e)
    except Exception as e:
        if debug:
            raise
        line = os_error_line(e)
        if line is not None:  # a full disk or read-only folder met outside the writers
            sys.stderr.write(f"erasekit: error: {line}\n")
            return EXIT_USAGE
        first = first_line(e, default="")
        sys.stderr.write(
            f"erasekit: internal error: {type(e).__name__}: {first} (rerun with --debug)\n"
        )
        return 1
    return int(result or 0)
