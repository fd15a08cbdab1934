"""The steps behind `digits export` and `digits verify`.

export: DIR/MODEL/checkpoint.pt -> model.pt, model.onnx -> parity.json, parity.md -> export.json.
`export.json` is written only when parity passes, so its presence means "these files are proven".
With `quantize="int8"`, model.onnx -> model.int8.onnx -> parity-int8.json, parity-int8.md, and export.json
lists the int8 file only when its own (prediction) parity passes. With `pt2=True`, also model.pt2 (AOTInductor,
compiled for the device it is exported on), proven in the same parity report as the other files.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..contract import (
    CHECKPOINT_FILE,
    MANIFEST_FILE,
    NORMALISATION,
    ONNX,
    ONNX_INT8,
    PARITY_JSON,
    PARITY_MD,
    PARITY_REPORT,
    PT2,
    TORCHSCRIPT,
    Format,
    normalise,
)
from ..training.checkpoint import load_checkpoint, rebuild_model
from ..training.data import load_mnist
from ..training.models import list_models
from . import ExportError
from .metadata import (
    carried_metadata,
    check_metadata_matches,
    decode_onnx_metadata,
    export_manifest,
    onnx_metadata_props,
    sha256_file,
)
from .onnx import check_onnx_file, export_onnx, onnx_opset
from .parity import ATOL, RTOL, check_parity, check_prediction_parity, check_tolerances
from .pt2 import check_loadable, export_pt2, read_pt2_metadata, resolve_device
from .reports import ParityReport, PredictionParity
from .runners import eager_runner, file_backends, onnxruntime_backend, pt2_backend
from .torchscript import export_torchscript

QUANTIZATIONS = {"int8": ONNX_INT8}  # --quantize value -> the format it adds
EXAMPLE_BATCH = 2  # a batch of 1 lets the exporters bake the batch size in


@dataclass
class ExportResult:
    model_dir: Path
    report: ParityReport
    seconds: dict[str, float]  # step ("torchscript", "onnx", "pt2", "parity", "int8", "total") -> wall time
    sizes: dict[str, int]  # file name -> bytes
    int8_report: PredictionParity | None = None  # with quantize="int8", once fp32 parity passed

    @property
    def passed(self) -> bool:
        """Every file written is proven: fp32 parity, and int8's when it was asked for."""
        return self.report.passed and (self.int8_report is None or self.int8_report.passed)


def export_model(
    artifacts_dir: Path,
    model: str,
    opset: int | None = None,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    samples: int | None = None,
    data_dir: Path | None = None,
    quantize: str | None = None,
    pt2: bool = False,
    device: str = "auto",
    log: Callable[[str], Any] = print,
) -> ExportResult:
    """Exports DIR/MODEL/checkpoint.pt to TorchScript and ONNX and proves parity on MNIST test digits.

    Args:
        artifacts_dir: the folder holding MODEL/checkpoint.pt; the files are written next to it.
        opset: ai.onnx opset; None takes the exporter's default.
        samples: test digits for the whole-set check (None: all 10,000); tests use fewer.
        quantize: "int8" also writes model.int8.onnx (once fp32 parity passes) and proves it on predictions.
        pt2: also writes model.pt2, compiled by AOTInductor for `device` ("auto": CUDA when there is a GPU).
    Returns:
        The result; `result.passed` says whether the files may be used.
    """
    check_tolerances(atol, rtol)
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantisation {quantize!r}; known: {', '.join(QUANTIZATIONS)}")
    model_dir = Path(artifacts_dir) / model
    checkpoint = find_checkpoint(model_dir, model)
    ensure_writable(model_dir)
    compile_for = resolve_device(device) if pt2 else None  # a wrong --device fails before any work
    started = time.perf_counter()
    payload = load_model_checkpoint(checkpoint, model)
    eager, meta, checkpoint_sha = rebuild_model(payload), payload["metadata"], sha256_file(checkpoint)
    example = example_input(meta["input_shape"])
    seconds: dict[str, float] = {}
    with _timed(seconds, "torchscript"), _staged(model_dir / TORCHSCRIPT.file) as path:
        export_torchscript(eager, path, example, log=log)
    log(_written(model_dir / TORCHSCRIPT.file, "TorchScript", seconds["torchscript"]))
    with _timed(seconds, "onnx"):
        opset_used = _write_onnx(eager, model_dir / ONNX.file, example, meta, checkpoint_sha, opset)
    log(_written(model_dir / ONNX.file, f"ONNX opset {opset_used}", seconds["onnx"]))
    if compile_for is not None:
        with _timed(seconds, "pt2"):
            target = _write_pt2(eager, model_dir / PT2.file, example, meta, checkpoint_sha, compile_for)
        log(_written(model_dir / PT2.file, f"AOTInductor for {target}", seconds["pt2"]))
    else:
        remove_stale(model_dir, PT2, log)
    with _timed(seconds, "parity"):
        data = load_mnist(data_dir, log=log)  # once: the fp32 and the int8 checks read the same digits
        report = prove_parity(eager, model_dir, meta, data, atol=atol, rtol=rtol, samples=samples)
    write_report(report, model_dir)
    int8_report = None
    if quantize == "int8" and report.passed:
        with _timed(seconds, "int8"):
            int8_report = export_int8(eager, model_dir, meta, data, samples=samples, log=log)
    else:
        remove_stale(model_dir, ONNX_INT8, log)
    files = _proven_files(model_dir, int8_report)
    _write_or_withdraw_manifest(report, model_dir, meta, checkpoint_sha, files, log)
    sizes = {path.name: path.stat().st_size for path in files.values()}
    seconds["total"] = time.perf_counter() - started
    log(f"exported {model} in {seconds['total']:.1f} s ({_steps(seconds)})")
    return ExportResult(model_dir, report, seconds, sizes, int8_report)


def _steps(seconds: dict[str, float]) -> str:
    return ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items() if step != "total")


def _write_pt2(
    eager: nn.Module, path: Path, example: torch.Tensor, meta: dict, checkpoint_sha: str, device: torch.device
) -> str:
    """Exports, compiles and packages for `device`, then reads the metadata back as `verify` would; returns
    what it was compiled for, for the log."""
    carried = {**carried_metadata(meta), "checkpoint_sha256": checkpoint_sha, "normalisation": NORMALISATION}
    # the staged name keeps the .pt2 suffix that torch's packager expects
    staging = path.with_name(f".partial{path.name}")
    try:
        export_pt2(eager, staging, example, carried, device)
        written = check_exported_pt2(staging, meta, checkpoint_sha, "this is a bug in the export step")
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)
    return f"{written['device']} {written['target']}"


def check_exported_pt2(path: Path, meta: dict, checkpoint_sha: str, rerun: str) -> dict:
    """The package's metadata against the checkpoint, and whether this machine may load it; returns it."""
    written = read_pt2_metadata(path)
    check_metadata_matches(written, meta, checkpoint_sha, where=f"{path} ({rerun})")
    check_loadable(written, torch.device(written["device"]), str(path))
    return written


def export_int8(eager: nn.Module, model_dir: Path, meta: dict, data, *, samples: int | None, log) -> PredictionParity:
    """model.onnx -> model.int8.onnx, calibrated on training digits; proves it and writes parity-int8.*."""
    from .quantize import calibration_digits, quantize_int8

    calibration = normalise(calibration_digits(data.train_images), meta["mean"], meta["std"], meta["input_shape"])
    start = time.perf_counter()
    with _staged(model_dir / ONNX_INT8.file) as path:
        quantize_int8(model_dir / ONNX.file, path, calibration)
    log(
        _written(
            model_dir / ONNX_INT8.file,
            f"int8 QDQ, calibrated on {len(calibration)} training digits",
            time.perf_counter() - start,
        )
    )
    return prove_int8(eager, model_dir, meta, data, samples)


def prove_int8(eager: nn.Module, model_dir: Path, meta: dict, data, samples: int | None) -> PredictionParity:
    """Prediction parity of model.int8.onnx with eager on the test digits; writes parity-int8.json and .md."""
    n = len(data.test_labels) if samples is None else samples
    images = normalise(data.test_images[:n], meta["mean"], meta["std"], meta["input_shape"])
    backend = replace(onnxruntime_backend(model_dir / ONNX_INT8.file, "ORT_ENABLE_ALL"), name="onnxruntime-int8")
    report = check_prediction_parity(eager_runner(eager), backend, images, data.test_labels[:n], model=meta["model"])
    with _staged(model_dir / ONNX_INT8.parity_json) as path:
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with _staged(model_dir / ONNX_INT8.parity_md) as path:
        path.write_text(report.to_markdown())
    return report


def remove_stale(model_dir: Path, fmt: Format, log) -> None:
    """Deletes an optional format's file (and its own parity reports): it was made from the model this export
    replaced, and an export without its flag does not remake it."""
    stale = [model_dir / fmt.file]
    if fmt.report != PARITY_REPORT:
        stale += [model_dir / fmt.parity_json, model_dir / fmt.parity_md]
    if stale[0].exists():
        log(f"removed {stale[0]}: it was made from the model this export replaced (add {fmt.export_flags} to keep one)")
    for path in stale:
        path.unlink(missing_ok=True)


def _proven_files(model_dir: Path, int8_report: PredictionParity | None) -> dict[str, Path]:
    """Format name -> file, for export.json: the int8 file only when its parity passed."""
    files = {fmt.name: model_dir / fmt.file for fmt in (TORCHSCRIPT, ONNX)}
    if (model_dir / PT2.file).is_file():  # in the parity report that decides whether export.json is written
        files[PT2.name] = model_dir / PT2.file
    if int8_report is not None and int8_report.passed:
        files[ONNX_INT8.name] = model_dir / ONNX_INT8.file
    return files


def verify_model(
    artifacts_dir: Path,
    model: str,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    samples: int | None = None,
    data_dir: Path | None = None,
    log: Callable[[str], Any] = print,
) -> tuple[ParityReport, PredictionParity | None]:
    """Re-runs the checks on files already exported, without exporting; rewrites parity.json and parity.md.

    Returns:
        The fp32 parity report, and model.int8.onnx's prediction parity when there is one (rewriting
        parity-int8.json and .md), else None.
    """
    check_tolerances(atol, rtol)
    model_dir = Path(artifacts_dir) / model
    checkpoint = find_checkpoint(model_dir, model)
    rerun = f"run `digits export {model} --artifacts {artifacts_dir}`"
    for name in (TORCHSCRIPT.file, ONNX.file):
        if not (model_dir / name).is_file():
            raise ExportError(f"no {name} in {model_dir}; {rerun} first")
    payload = load_model_checkpoint(checkpoint, model)
    eager, meta = rebuild_model(payload), payload["metadata"]
    check_exported_onnx(model_dir / ONNX.file, meta, sha256_file(checkpoint), rerun)
    if (model_dir / PT2.file).is_file():
        check_exported_pt2(model_dir / PT2.file, meta, sha256_file(checkpoint), f"{rerun} with --pt2")
    ensure_writable(model_dir)
    data = load_mnist(data_dir, log=log)  # once: the fp32 and the int8 checks read the same digits
    report = prove_parity(eager, model_dir, meta, data, atol=atol, rtol=rtol, samples=samples)
    write_report(report, model_dir)
    int8_report = None
    if (model_dir / ONNX_INT8.file).is_file():
        int8_report = prove_int8(eager, model_dir, meta, data, samples)
    return report, int8_report


def find_checkpoint(model_dir: Path, model: str) -> Path:
    """DIR/MODEL/checkpoint.pt, or an error saying which `digits train` makes it."""
    path = model_dir / CHECKPOINT_FILE
    if path.is_file():
        return path
    if model not in list_models():
        raise ExportError(f"unknown model {model!r} and no checkpoint at {path}; known: {', '.join(list_models())}")
    raise ExportError(f"no checkpoint at {path}; train one first: digits train {model} --out {model_dir.parent}")


def load_model_checkpoint(path: Path, model: str) -> dict:
    """The checkpoint at `path`, which must be one of `model`."""
    payload = load_checkpoint(path)
    found = payload["metadata"]["model"]
    if found != model:
        raise ExportError(f"{path} holds a {found!r} checkpoint, not {model!r}")
    return payload


def ensure_writable(folder: Path) -> None:
    # Probe with a real file: permission bits alone do not tell (root, read-only mounts, ACLs)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ExportError(f"cannot write to {folder}: {err.strerror or err}") from None


def example_input(input_shape: list[int]) -> torch.Tensor:
    """(EXAMPLE_BATCH, *input_shape) float32; its values do not matter, only its shape."""
    return torch.randn(EXAMPLE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))


def _write_onnx(
    eager: nn.Module, path: Path, example: torch.Tensor, meta: dict, checkpoint_sha: str, opset: int | None
) -> int:
    """Exports, then checks the written file as `verify` would; returns the opset used."""
    with _staged(path) as staging:
        export_onnx(eager, staging, example, onnx_metadata_props(meta, checkpoint_sha), opset=opset)
        proto = check_exported_onnx(staging, meta, checkpoint_sha, rerun="this is a bug in the export step")
    return onnx_opset(proto)


def check_exported_onnx(path: Path, meta: dict, checkpoint_sha: str, rerun: str) -> onnx.ModelProto:
    """Checker, graph contract and metadata against the checkpoint; returns the loaded onnx.ModelProto."""
    proto = check_onnx_file(path, meta["input_shape"], len(meta["labels"]))
    props = {p.key: p.value for p in proto.metadata_props}
    check_metadata_matches(decode_onnx_metadata(props), meta, checkpoint_sha, where=f"{path} ({rerun})")
    return proto


def prove_parity(
    eager: nn.Module,
    model_dir: Path,
    meta: dict,
    data,
    *,
    atol: float,
    rtol: float,
    samples: int | None,
) -> ParityReport:
    """Eager against model.pt and model.onnx from `model_dir`, on the first `samples` of MNIST's test digits
    (`data`, from `training.data.load_mnist`)."""
    n = len(data.test_labels) if samples is None else samples
    images = normalise(data.test_images[:n], meta["mean"], meta["std"], meta["input_shape"])
    backends = file_backends(model_dir / TORCHSCRIPT.file, model_dir / ONNX.file)
    if (model_dir / PT2.file).is_file():
        backends.append(pt2_backend(model_dir / PT2.file))
    return check_parity(
        eager_runner(eager), backends, images, data.test_labels[:n], model=meta["model"], atol=atol, rtol=rtol
    )


def write_report(report: ParityReport, model_dir: Path) -> None:
    with _staged(model_dir / PARITY_JSON) as path:
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with _staged(model_dir / PARITY_MD) as path:
        path.write_text(report.to_markdown())


def _write_or_withdraw_manifest(
    report: ParityReport, model_dir: Path, meta: dict, checkpoint_sha: str, files: dict[str, Path], log
) -> None:
    # The archive step trusts export.json; a failed export must not leave one behind, old or new.
    manifest = model_dir / MANIFEST_FILE
    if not report.passed:
        manifest.unlink(missing_ok=True)
        log(f"parity failed: {MANIFEST_FILE} not written; see {model_dir / PARITY_MD}")
        return
    with _staged(manifest) as path:
        path.write_text(json.dumps(export_manifest(meta, checkpoint_sha, files), indent=2) + "\n")
    log(f"wrote {model_dir / PARITY_JSON}, {PARITY_MD}, {MANIFEST_FILE}")


def _written(path: Path, what: str, seconds: float) -> str:
    return f"wrote {path} ({what}, {path.stat().st_size / 1e6:.2f} MB, {seconds:.1f} s)"


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """Yields a temporary name next to `path` and moves it into place only if the block succeeds, so an
    interrupted export never leaves a half-written file under the real name."""
    staging = path.with_name(f".{path.name}.partial")
    try:
        yield staging
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start
