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


def add_serving_settings(p: argparse.ArgumentParser, *, of: str = "", default=None) -> None:
    """--batch-size, --max-batch-delay, --workers and --threads, their defaults from `default` (a
    serving.ServingSettings), else from ServingSettings' own."""
    from .serving.archive import ServingSettings

    default = default or ServingSettings()
    p.add_argument(
        "--batch-size",
        type=int,
        default=default.batch_size,
        help=f"TorchServe batch size{of} (default {default.batch_size})",
    )
    p.add_argument(
        "--max-batch-delay",
        type=int,
        default=default.max_batch_delay,
        help=f"ms to wait to fill a batch (default {default.max_batch_delay})",
    )
    p.add_argument(
        "--workers", type=int, default=default.workers, help=f"worker processes{of} (default {default.workers})"
    )
    p.add_argument(
        "--threads", type=int, default=default.threads, help=f"intra-op threads per worker (default {default.threads})"
    )
