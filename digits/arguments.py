"""Arguments that several subcommands share, defined once so their help cannot drift apart."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="MNIST folder (default: $DIGITS_DATA, else ~/.cache/digits/data)")


def add_artifacts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifacts", type=Path, default=Path("artifacts"), help="folder holding MODEL/ (default: artifacts/)"
    )
