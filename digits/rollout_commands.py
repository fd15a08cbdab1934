"""Subcommands that replace a served model without dropping a request: rollout, rollback, versions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .contract import FORMATS
from .serving_commands import _add_run_dir, _run_dir

EXIT_NOT_LIVE = 1  # the candidate was withdrawn: the version that was live still is


def _add_tolerance(p: argparse.ArgumentParser) -> None:
    from .serving.gate import DEFAULT_TOLERANCE

    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="how far below the reference the candidate's golden-set accuracy may be, as a fraction "
        f"(default {DEFAULT_TOLERANCE}: {DEFAULT_TOLERANCE * 100:.1f} points)",
    )


def add_rollout(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollout",
        help="put a new version of a served model live without dropping a request, behind a gate",
        description="Archive DIR/ARCH's export as a new version of MODEL (or take --archive FILE.mar), refuse it "
        "if its name, labels, input shape, layout or normalisation differ from the live version's, if its parity "
        "is not recorded as passed or its model file's SHA-256 is not its metadata's; register it beside the "
        "live version, wait until it answers, run the gate on /predictions/MODEL/VERSION (the golden set: 625 MNIST "
        "test digits as 28x28 PNGs and 125 of them drawn large, 750 requests; its accuracy must reach the live "
        "version's minus --tolerance), make "
        "it the default, drain the old version and unregister it. Every step goes to the run folder's ledger. "
        "Exit 0: the new version is live; 1: it was withdrawn and the old one still serves; 2: refused before "
        "TorchServe was touched. See docs/serving.md, Replacing a served model.",
    )
    p.add_argument("model", metavar="MODEL", help="the served model's name")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--archive", type=Path, metavar="FILE.mar", help="a .mar made by `digits archive`")
    source.add_argument(
        "--artifacts", type=Path, help="folder holding ARCH/ with an export to archive (default: artifacts/)"
    )
    p.add_argument(
        "--architecture", metavar="ARCH", help="which export in --artifacts (default: the live version's model)"
    )
    p.add_argument("--format", choices=list(FORMATS), help="which exported file (default: the live version's)")
    p.add_argument("--version", help="the new version (default: one major past the highest known, e.g. 2.0)")
    _add_tolerance(p)
    _add_run_dir(p)
    p.set_defaults(func=run_rollout)


def run_rollout(args: argparse.Namespace) -> int:
    from .serving.rollout import Candidate, RolloutFailed, rollout

    candidate = Candidate(args.archive, args.artifacts, args.architecture, args.format, args.version)
    try:
        rollout(_run_dir(args), args.model, candidate, args.tolerance, log=_progress)
    except RolloutFailed as err:
        print(f"digits rollout: {err}", file=sys.stderr)
        return EXIT_NOT_LIVE
    return 0


def add_rollback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rollback",
        help="put the version that was live before back live, the same way as a rollout",
        description="Make the version of MODEL that was live before the current one (from the run folder's "
        "ledger) the default again: registered again from the store if it was retired, gated (its golden-set "
        "accuracy must reach what it had when it was live, minus --tolerance), made the default, the current "
        "version drained and unregistered. Exit 0: it is live; 1: it was withdrawn; 2: refused.",
    )
    p.add_argument("model", metavar="MODEL", help="the served model's name")
    _add_tolerance(p)
    _add_run_dir(p)
    p.set_defaults(func=run_rollback)


def run_rollback(args: argparse.Namespace) -> int:
    from .serving.rollout import RolloutFailed, rollback

    try:
        rollback(_run_dir(args), args.model, args.tolerance, log=_progress)
    except RolloutFailed as err:
        print(f"digits rollback: {err}", file=sys.stderr)
        return EXIT_NOT_LIVE
    return 0


def add_versions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "versions",
        help="list a model's versions: archive, checksum, golden-set accuracy, gate, when live, state",
        description="Every version of MODEL the model store or the run folder's ledger knows: its archive and "
        "SHA-256, its golden-set accuracy, its last gate's verdict, when it last went live, and its state "
        "(default: what /predictions/MODEL answers with; registered; retired; withdrawn; ...).",
    )
    p.add_argument("model", metavar="MODEL", help="the served model's name")
    _add_run_dir(p)
    p.set_defaults(func=run_versions)


def run_versions(args: argparse.Namespace) -> int:
    from .serving.rollout import versions

    rows = versions(_run_dir(args), args.model)
    print(f"{'version':10} {'archive':26} {'sha256':12}  {'accuracy':>8}  {'gate':6}  {'live since':25}  state")
    for row in rows:
        accuracy = "-" if row.accuracy is None else f"{row.accuracy:.2%}"
        print(
            f"{row.version:10} {row.archive:26} {row.sha256:12}  {accuracy:>8}  {row.gate:6}  "
            f"{row.live_since or '-':25}  {row.state}"
        )
    return 0


def _progress(line: str) -> None:
    print(line, flush=True)


COMMANDS = [add_rollout, add_rollback, add_versions]
