"""The `digits` command line: one module per command family, each wiring one layer's public functions; this
module only dispatches.

A family is a module `digits/<family>_commands.py` whose `COMMANDS` lists functions that each add one
subcommand's parser (its `set_defaults(func=...)` names the function that runs it). Adding a family is one
import and one line in `FAMILIES`.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from collections.abc import Sequence

from . import bench_commands, export_commands, rollout_commands, serving_commands, training_commands

EXIT_USAGE = 2  # bad input of any kind: one line on stderr, no traceback

FAMILIES = [
    training_commands,
    export_commands,
    serving_commands,
    rollout_commands,
    bench_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digits", description="Train, export, prove and serve the PyTorch MNIST guide models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in FAMILIES:
        for add in family.COMMANDS:
            add(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from .serving.server import ServeError
    from .training.checkpoint import CheckpointError
    from .training.data import DataError

    return (ValueError, DataError, CheckpointError, ServeError, FileNotFoundError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, in the handler below, not as a traceback at exit
        return status
    except BrokenPipeError:  # `digits serve | head`: the reader closed the pipe; stop quietly, as a shell tool does
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except _known_errors() as err:
        message = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror}: {err.filename}"
        print(f"digits {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"digits {args.command}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that Python's final flush does not raise again (Python's docs, SIGPIPE)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is not a file descriptor (a test's capture): nothing will flush into the closed pipe


if __name__ == "__main__":
    sys.exit(main())
