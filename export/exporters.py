"""The exporter registry: how each format of `contract.FORMATS` is written, checked and run for its proof.

`digits export` and `digits verify` (export/convert.py) walk this registry and name no format themselves.
A format's `proof` (in the contract) says when it is written and how it is proven: "logits" files are written
from the eager model and compared with it in parity.json; "predictions" files (quantised) are derived once
that parity passed and judged on predictions in their own report. A format without `export_flags` is
always written; the others when asked for (`digits export --pt2`, `--quantize int8`).

Adding a format: one line in `contract.FORMATS`, an `Exporter` registered here, and the handler's loader for
its runtime (handlers/digit_model.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contract import FORMATS, NORMALISATION, ONNX, ONNX_INT8, PT2, TORCHSCRIPT, Format, normalise
from . import ExportError
from .metadata import carried_metadata, check_metadata_matches, decode_onnx_metadata, onnx_metadata_props
from .onnx import check_onnx_file, export_onnx, onnx_opset
from .pt2 import check_loadable, export_pt2, read_pt2_metadata, resolve_device
from .runners import ORT_LEVELS, Backend, onnxruntime_backend, pt2_backend, torchscript_backend
from .torchscript import export_torchscript


@dataclass
class ExportJob:
    """What every exporter is given: the eager model, its checkpoint's facts, and the export's options."""

    eager: nn.Module
    meta: dict  # the checkpoint's metadata
    checkpoint_sha: str
    model_dir: Path  # where the files go, and where a derived format finds the file it derives from
    example: torch.Tensor  # (2, *input_shape) float32: its shape matters, not its values
    options: dict[str, Any] = field(default_factory=dict)  # opset, device, ... (each exporter reads its own)
    data: Any = None  # MNIST (`training.data.load_mnist`), loaded for parity: derived formats calibrate on it
    log: Callable[[str], Any] = print


@dataclass(frozen=True)
class Exporter:
    """One format's steps.

    write: writes the format's file to the given path (a staging name with the same suffix); returns what
        the log says it wrote ("ONNX opset 18").
    check: the file against the checkpoint's metadata and digest, before any parity; raises ExportError
        whose message names `rerun` (what to run instead). Run on every export and every `digits verify`.
    backends: the ways parity runs the file; a "predictions" format is judged on the first.
    runner: the file as a serving worker runs it, on `threads` intra-op threads (None: the runtime's
        default), for the benchmarks.
    prepare: refuses bad options before any work (a --device this machine lacks).
    """

    fmt: Format
    write: Callable[[ExportJob, Path], str]
    backends: Callable[[Path], list[Backend]]
    runner: Callable[[Path, int | None], Backend]
    check: Callable[[Path, dict, str, str], None] = lambda path, meta, checkpoint_sha, rerun: None
    prepare: Callable[[dict[str, Any]], None] = lambda options: None


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    """Adds `exporter` to the registry under its format's name, which must be in `contract.FORMATS`."""
    name = exporter.fmt.name
    if FORMATS.get(name) != exporter.fmt:
        raise ValueError(f"format {name!r} is not contract.FORMATS' entry; add it there first")
    EXPORTERS[name] = exporter
    return exporter


def exporters(proof: str | None = None) -> list[Exporter]:
    """The registered exporters in `contract.FORMATS` order, those of one `proof` only when given."""
    missing = [name for name in FORMATS if name not in EXPORTERS]
    if missing:
        raise ExportError(f"no exporter registered for {', '.join(missing)} (export/exporters.py)")
    return [EXPORTERS[name] for name in FORMATS if proof in (None, FORMATS[name].proof)]


# --- TorchScript -------------------------------------------------------------------------------------


def _write_torchscript(job: ExportJob, path: Path) -> str:
    export_torchscript(job.eager, path, job.example, log=job.log)
    return "TorchScript"


# --- ONNX --------------------------------------------------------------------------------------------


def _write_onnx(job: ExportJob, path: Path) -> str:
    props = onnx_metadata_props(job.meta, job.checkpoint_sha)
    export_onnx(job.eager, path, job.example, props, opset=job.options.get("opset"))
    return f"ONNX opset {onnx_opset(check_onnx_file(path, job.meta['input_shape'], len(job.meta['labels'])))}"


def check_exported_onnx(path: Path, meta: dict, checkpoint_sha: str, rerun: str) -> None:
    """Checker, graph contract and metadata against the checkpoint."""
    proto = check_onnx_file(path, meta["input_shape"], len(meta["labels"]))
    props = {p.key: p.value for p in proto.metadata_props}
    check_metadata_matches(decode_onnx_metadata(props), meta, checkpoint_sha, where=f"{path} ({rerun})")


def _onnx_backends(path: Path) -> list[Backend]:
    # with and without graph optimisation: onnxruntime's optimiser deletes a Dropout node left by an export
    # in training mode, which would hide that bug
    return [onnxruntime_backend(path, level) for level in ORT_LEVELS]


# --- int8 ONNX, derived from the proven model.onnx ----------------------------------------------------


def _write_int8(job: ExportJob, path: Path) -> str:
    from .quantize import calibration_digits, quantize_int8

    meta = job.meta
    calibration = normalise(calibration_digits(job.data.train_images), meta["mean"], meta["std"], meta["input_shape"])
    quantize_int8(job.model_dir / ONNX.file, path, calibration)
    return f"int8 QDQ, calibrated on {len(calibration)} training digits"


# --- .pt2 (AOTInductor) ------------------------------------------------------------------------------


def _write_pt2(job: ExportJob, path: Path) -> str:
    carried = {**carried_metadata(job.meta), "checkpoint_sha256": job.checkpoint_sha, "normalisation": NORMALISATION}
    device = resolve_device(job.options.get("device", "auto"))
    export_pt2(job.eager, path, job.example, carried, device)
    written = read_pt2_metadata(path)
    return f"AOTInductor for {written['device']} {written['target']}"


def check_exported_pt2(path: Path, meta: dict, checkpoint_sha: str, rerun: str) -> None:
    """The package's metadata against the checkpoint, and whether this machine may load it."""
    written = read_pt2_metadata(path)
    check_metadata_matches(written, meta, checkpoint_sha, where=f"{path} ({rerun})")
    check_loadable(written, torch.device(written["device"]), str(path))


def _pt2_backends(path: Path) -> list[Backend]:
    return [pt2_backend(path)]


def _prepare_pt2(options: dict[str, Any]) -> None:
    resolve_device(options.get("device", "auto"))


def _onnx_runner(path: Path, threads: int | None) -> Backend:
    return onnxruntime_backend(path, "ORT_ENABLE_ALL", threads)


def _int8_runner(path: Path, threads: int | None) -> Backend:
    return replace(_onnx_runner(path, threads), name="onnxruntime-int8")


def _torch_threads(load: Callable[[Path], Backend]) -> Callable[[Path, int | None], Backend]:
    """A runner whose threads are torch's, which the caller sets (`torch.set_num_threads`)."""
    return lambda path, threads: load(path)


register_exporter(
    Exporter(
        TORCHSCRIPT, _write_torchscript, lambda path: [torchscript_backend(path)], _torch_threads(torchscript_backend)
    )
)
register_exporter(Exporter(ONNX, _write_onnx, _onnx_backends, _onnx_runner, check=check_exported_onnx))
register_exporter(Exporter(ONNX_INT8, _write_int8, lambda path: [_int8_runner(path, None)], _int8_runner))
register_exporter(
    Exporter(
        PT2, _write_pt2, _pt2_backends, _torch_threads(pt2_backend), check=check_exported_pt2, prepare=_prepare_pt2
    )
)
