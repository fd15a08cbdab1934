"""The command line as a shell user meets it."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `digits models | head -0`: the pipe's reader is gone before digits writes
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "digits.cli", "models"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write)
    assert done.returncode == 141  # 128 + SIGPIPE, what a shell tool killed by SIGPIPE reports
    assert done.stderr == ""  # no traceback, no "Exception ignored"


def test_every_family_s_commands_are_dispatched_and_a_new_family_is_one_line(monkeypatch):
    import argparse
    import types

    from digits import cli

    def add_hello(sub: argparse._SubParsersAction) -> None:
        sub.add_parser("hello", help="a family added in one line").set_defaults(func=lambda args: 7)

    listed = {add.__name__.removeprefix("add_") for family in cli.FAMILIES for add in family.COMMANDS}
    assert {"train", "export", "verify", "archive", "serve", "bench"} <= listed
    monkeypatch.setattr(cli, "FAMILIES", [*cli.FAMILIES, types.SimpleNamespace(COMMANDS=[add_hello])])
    assert cli.main(["hello"]) == 7
