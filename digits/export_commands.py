"""`digits export` and `digits verify`: exported files and the parity that proves them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import add_artifacts
from .contract import FORMATS, MANIFEST_FILE, ONNX_INT8, PT2

if TYPE_CHECKING:
    from .export.reports import ParityReport, PredictionParity


EXIT_PARITY_FAILED = 1  # files written, but they do not compute what the eager model computes
QUANTIZED = {"int8": ONNX_INT8.name}  # --quantize value -> the format it adds


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model to TorchScript and ONNX (and .pt2, int8) and prove parity",
        description="Export DIR/MODEL/checkpoint.pt to model.pt (TorchScript) and model.onnx (and with --pt2 "
        "model.pt2, AOTInductor), compare each with the eager model on the MNIST test set, and write parity.json, "
        "parity.md and, when parity passes, export.json. Logs each step's time. Exits 1 when parity fails.",
    )
    p.add_argument("model", metavar="MODEL", help="a registered model (see `digits models`)")
    add_artifacts(p)
    p.add_argument("--opset", type=int, help="ONNX opset to target (default: the exporter's)")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write model.int8.onnx (static QDQ, calibrated on training digits) and prove its predictions",
    )
    p.add_argument(
        "--pt2",
        action="store_true",
        help="also write model.pt2: torch.export + AOTInductor, compiled for --device, in the same parity report",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda|cuda:N",
        help="what model.pt2 is compiled for: auto (CUDA when there is a GPU, else CPU), cpu, cuda or cuda:N",
    )
    _add_tolerances(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from .export.convert import export_model

    formats = [QUANTIZED[args.quantize]] if args.quantize else []
    formats += [PT2.name] if args.pt2 else []
    result = export_model(
        args.artifacts, args.model, args.opset, formats=formats, device=args.device, **_tolerances(args)
    )
    status = _print_report(args, result.report, result.model_dir)
    return _print_prediction_reports(args, result.predictions, result.model_dir, status, unlisted=True)


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="re-run the parity checks on exported files",
        description="Check DIR/MODEL/model.onnx (ONNX checker, inputs, outputs, metadata) and model.pt2 when "
        "there is one (metadata, built for this torch and machine), compare model.pt, model.onnx and model.pt2 "
        "with the eager model again, without exporting; rewrites parity.json and parity.md, and for "
        "model.int8.onnx, when there is one, parity-int8.json and .md. Exits 1 when parity fails.",
    )
    p.add_argument("model", metavar="MODEL", help="a registered model (see `digits models`)")
    add_artifacts(p)
    _add_tolerances(p)
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from .export.convert import verify_model

    report, predictions = verify_model(args.artifacts, args.model, **_tolerances(args))
    status = _print_report(args, report, args.artifacts / args.model)
    return _print_prediction_reports(args, predictions, args.artifacts / args.model, status)


def _print_prediction_reports(
    args: argparse.Namespace, reports: dict[str, PredictionParity], model_dir: Path, status: int, unlisted=False
) -> int:
    """Prints each derived file's prediction parity (int8); exit 1 when one failed, else `status`.

    unlisted: say that a failed file is left out of export.json (what `digits export` does)."""
    for name, report in reports.items():
        print(report.to_markdown(), end="")
        if report.passed:
            continue
        fmt = FORMATS[name]
        consequence = f"{fmt.file} is not listed in {MANIFEST_FILE}; " if unlisted else ""
        print(
            f"digits {args.command}: {name} parity failed; {consequence}see {model_dir / fmt.parity_md}",
            file=sys.stderr,
        )
        status = EXIT_PARITY_FAILED
    return status


def _add_tolerances(p: argparse.ArgumentParser) -> None:
    # no numeric defaults here: the tolerances live with the parity check, and the report prints them
    p.add_argument("--atol", type=float, help="absolute tolerance per logit (default: export.parity.ATOL)")
    p.add_argument("--rtol", type=float, help="relative tolerance per logit (default: export.parity.RTOL)")


def _tolerances(args: argparse.Namespace) -> dict[str, float]:
    return {k: getattr(args, k) for k in ("atol", "rtol") if getattr(args, k) is not None}


def _print_report(args: argparse.Namespace, report: ParityReport, model_dir: Path) -> int:
    print(report.to_markdown(), end="")
    if report.passed:
        return 0
    failed = sum(not c.passed for c in report.checks)
    print(
        f"digits {args.command}: parity failed in {failed} of {len(report.checks)} checks; "
        f"see {model_dir / 'parity.md'}",
        file=sys.stderr,
    )
    return EXIT_PARITY_FAILED


COMMANDS = [add_export, add_verify]
