"""The `digits` command line: one parser per subcommand, each wiring one layer's public functions."""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import add_artifacts, add_data_dir
from .bench_commands import BENCH_COMMANDS
from .contract import MANIFEST_FILE, ONNX_INT8
from .rollout_commands import ROLLOUT_COMMANDS
from .serving_commands import SERVING_COMMANDS

if TYPE_CHECKING:
    from .export.reports import ParityReport

EXIT_USAGE = 2  # bad input of any kind: one line on stderr, no traceback


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a registered model on MNIST",
        description="Train MODEL on MNIST; writes checkpoint.pt, metrics.json, history.png "
        "to OUT/MODEL/. Defaults per model: see `digits models`.",
    )
    p.add_argument("model", metavar="MODEL", help="a registered model (see `digits models`)")
    p.add_argument("--epochs", type=int, help="epochs (default: the model's, see `digits models`)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the model's)")
    p.add_argument("--lr", type=float, help="peak Adam learning rate of the one-cycle schedule (default 1e-3)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value (default: off)")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="output folder (default: artifacts/)")
    add_data_dir(p)
    p.add_argument("--limit", type=int, help="use only the first N training and test images (smoke runs)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same machine, same model")
    p.add_argument(
        "--weights",
        type=Path,
        help="resnet18 only: ImageNet state_dict file to start from; the backbone is frozen and only fc trains",
    )
    p.add_argument("--finetune", action="store_true", help="with --weights: train every layer, not only fc")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.out,
        data_dir=args.data_dir,
        limit=args.limit,
        device=args.device,
        seed=args.seed,
        grad_clip=args.grad_clip,
        weights=args.weights,
        finetune=args.finetune,
        quiet=args.quiet,
    )
    train(config)
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models and their training defaults")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from .training.models import get_model, list_models

    print(f"{'model':10} {'epochs':>6} {'batch':>5} {'lr':>7}  description")
    for name in list_models():
        spec = get_model(name)
        print(f"{name:10} {spec.epochs:>6} {spec.batch_size:>5} {spec.lr:>7g}  {spec.description}")
    return 0


EXIT_PARITY_FAILED = 1  # files written, but they do not compute what the eager model computes


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

    result = export_model(
        args.artifacts,
        args.model,
        args.opset,
        quantize=args.quantize,
        pt2=args.pt2,
        device=args.device,
        **_tolerances(args),
    )
    status = _print_report(args, result.report, result.model_dir)
    return _print_int8_report(
        args, result.int8_report, result.model_dir, status, f"{ONNX_INT8.file} is not listed in {MANIFEST_FILE}; "
    )


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

    report, int8_report = verify_model(args.artifacts, args.model, **_tolerances(args))
    status = _print_report(args, report, args.artifacts / args.model)
    return _print_int8_report(args, int8_report, args.artifacts / args.model, status)


def _print_int8_report(args: argparse.Namespace, report, model_dir: Path, status: int, consequence: str = "") -> int:
    """Prints the int8 file's prediction parity, if one was checked; exit 1 when it failed, else `status`."""
    if report is None:
        return status
    print(report.to_markdown(), end="")
    if report.passed:
        return status
    print(
        f"digits {args.command}: int8 parity failed; {consequence}see {model_dir / ONNX_INT8.parity_md}",
        file=sys.stderr,
    )
    return EXIT_PARITY_FAILED


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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train,
    add_models,
    add_export,
    add_verify,
    *SERVING_COMMANDS,
    *ROLLOUT_COMMANDS,
    *BENCH_COMMANDS,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digits", description="Train, export, prove and serve the PyTorch MNIST guide models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
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
