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
