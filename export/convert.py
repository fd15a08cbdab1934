"""The steps behind `digits export` and `digits verify`, walking the exporter registry (export/exporters.py).

export: DIR/MODEL/checkpoint.pt -> each "logits" format's file (model.pt, model.onnx; model.pt2 with
`formats=["pt2"]`) -> parity.json, parity.md -> each asked-for "predictions" format, derived once parity
passed (model.int8.onnx with `formats=["onnx-int8"]`) and proven in its own report -> export.json.
`export.json` is written only when parity passes, so its presence means "these files are proven"; it lists a
"predictions" file only when that file's own parity passed.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..contract import CHECKPOINT_FILE, FORMATS, MANIFEST_FILE, PARITY_JSON, PARITY_MD, PARITY_REPORT, Format, normalise
from ..training.checkpoint import load_checkpoint, rebuild_model
from ..training.data import load_mnist
from ..training.models import list_models
from . import ExportError
from .exporters import Exporter, ExportJob, exporters
from .metadata import export_manifest, sha256_file
from .parity import ATOL, RTOL, check_parity, check_prediction_parity, check_tolerances
from .reports import ParityReport, PredictionParity
from .runners import eager_runner

EXAMPLE_BATCH = 2  # a batch of 1 lets the exporters bake the batch size in
BUG = "this is a bug in the export step"  # what a file that fails its check right after writing means


@dataclass
class ExportResult:
    model_dir: Path
    report: ParityReport
    seconds: dict[str, float]  # step (a format's name, "parity", "total") -> wall time
    sizes: dict[str, int]  # file name -> bytes
    # each "predictions" format written (int8), once fp32 parity passed: format name -> its own parity
    predictions: dict[str, PredictionParity] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every file written is proven: fp32 parity, and each derived file's own."""
        return self.report.passed and all(p.passed for p in self.predictions.values())


def export_model(
    artifacts_dir: Path,
    model: str,
    opset: int | None = None,
    *,
    formats: Collection[str] = (),
    device: str = "auto",
    atol: float = ATOL,
    rtol: float = RTOL,
    samples: int | None = None,
    data_dir: Path | None = None,
    log: Callable[[str], Any] = print,
) -> ExportResult:
    """Exports DIR/MODEL/checkpoint.pt to every default format and those in `formats`, and proves parity on
    MNIST test digits.

    Args:
        artifacts_dir: the folder holding MODEL/checkpoint.pt; the files are written next to it.
        opset: ai.onnx opset; None takes the exporter's default.
        formats: optional formats to write too (`contract.FORMATS` names with `export_flags`: "pt2", "onnx-int8").
        device: what model.pt2 is compiled for ("auto": CUDA when there is a GPU).
        samples: test digits for the whole-set check (None: all 10,000); tests use fewer.
    Returns:
        The result; `result.passed` says whether the files may be used.
    """
    check_tolerances(atol, rtol)
    model_dir = Path(artifacts_dir) / model
    checkpoint = find_checkpoint(model_dir, model)
    ensure_writable(model_dir)
    chosen = choose_exporters(formats, {"opset": opset, "device": device})  # bad options fail before any work
    started, seconds = time.perf_counter(), {}
    job = start_job(checkpoint, model, model_dir, {"opset": opset, "device": device}, log)
    for exporter in exporters("logits"):
        write_or_remove(exporter, exporter in chosen, job, seconds)
    with _timed(seconds, "parity"):
        job.data = load_mnist(data_dir, log=log)  # once: parity and the derived formats read the same digits
        report = prove_parity(job, atol=atol, rtol=rtol, samples=samples)
    write_report(report, model_dir)
    predictions = {
        exporter.fmt.name: prove_predictions(job, exporter, samples)
        for exporter in exporters("predictions")  # derived from proven files only
        if write_or_remove(exporter, exporter in chosen and report.passed, job, seconds)
    }
    files = proven_files(model_dir, predictions)
    _write_or_withdraw_manifest(report, job, files)
    seconds["total"] = time.perf_counter() - started
    log(f"exported {model} in {seconds['total']:.1f} s ({_steps(seconds)})")
    return ExportResult(model_dir, report, seconds, {p.name: p.stat().st_size for p in files.values()}, predictions)


def choose_exporters(formats: Collection[str], options: dict[str, Any]) -> list[Exporter]:
    """The default formats' exporters and those of `formats`, each having checked the options it reads."""
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ExportError(f"unknown format {', '.join(map(repr, unknown))}; known: {', '.join(FORMATS)}")
    chosen = [e for e in exporters() if not e.fmt.optional or e.fmt.name in formats]
    for exporter in chosen:
        exporter.prepare(options)
    return chosen


def start_job(checkpoint: Path, model: str, model_dir: Path, options: dict[str, Any], log) -> ExportJob:
    """The eager model rebuilt from its checkpoint, with what every exporter needs."""
    payload = load_model_checkpoint(checkpoint, model)
    meta = payload["metadata"]
    return ExportJob(
        rebuild_model(payload),
        meta,
        sha256_file(checkpoint),
        model_dir,
        example_input(meta["input_shape"]),
        options,
        log=log,
    )


def write_or_remove(exporter: Exporter, wanted: bool, job: ExportJob, seconds: dict[str, float]) -> bool:
    """Writes the format's file when `wanted`, else removes a stale one (see `remove_stale`); returns `wanted`."""
    if wanted:
        write_file(exporter, job, seconds)
    else:
        remove_stale(job.model_dir, exporter.fmt, job.log)
    return wanted


def write_file(exporter: Exporter, job: ExportJob, seconds: dict[str, float]) -> None:
    """Writes one format's file under a staging name, checks it as `verify` would, then moves it in place."""
    path = job.model_dir / exporter.fmt.file
    with _timed(seconds, exporter.fmt.name), _staged(path) as staging:
        what = exporter.write(job, staging)
        exporter.check(staging, job.meta, job.checkpoint_sha, BUG)
    job.log(_written(path, what, seconds[exporter.fmt.name]))


def _steps(seconds: dict[str, float]) -> str:
    return ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items() if step != "total")


def remove_stale(model_dir: Path, fmt: Format, log) -> None:
    """Deletes an optional format's file (and its own parity reports): it was made from the model this export
    replaced, and an export without its flag does not remake it."""
    if not fmt.optional:
        return
    stale = [model_dir / fmt.file]
    if fmt.report != PARITY_REPORT:
        stale += [model_dir / fmt.parity_json, model_dir / fmt.parity_md]
    if stale[0].exists():
        log(f"removed {stale[0]}: it was made from the model this export replaced (add {fmt.export_flags} to keep one)")
    for path in stale:
        path.unlink(missing_ok=True)


def proven_files(model_dir: Path, predictions: dict[str, PredictionParity]) -> dict[str, Path]:
    """Format name -> file, for export.json: every "logits" file there (parity.json covers each), and a
    "predictions" file only when its own parity passed."""
    files = {}
    for exporter in exporters():
        name, path = exporter.fmt.name, model_dir / exporter.fmt.file
        if path.is_file() and (exporter.fmt.proof == "logits" or (name in predictions and predictions[name].passed)):
            files[name] = path
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
) -> tuple[ParityReport, dict[str, PredictionParity]]:
    """Re-runs the checks on files already exported, without exporting; rewrites parity.json and parity.md.

    Returns:
        The fp32 parity report, and the prediction parity of each "predictions" file there is (model.int8.onnx),
        whose reports it rewrites too.
    """
    check_tolerances(atol, rtol)
    model_dir = Path(artifacts_dir) / model
    checkpoint = find_checkpoint(model_dir, model)
    rerun = f"run `digits export {model} --artifacts {artifacts_dir}`"
    for exporter in exporters():
        if not exporter.fmt.optional and not (model_dir / exporter.fmt.file).is_file():
            raise ExportError(f"no {exporter.fmt.file} in {model_dir}; {rerun} first")
    job = start_job(checkpoint, model, model_dir, {}, log)
    present = [e for e in exporters() if (model_dir / e.fmt.file).is_file()]
    for exporter in present:
        flags = f" with {exporter.fmt.export_flags}" if exporter.fmt.export_flags else ""
        exporter.check(model_dir / exporter.fmt.file, job.meta, job.checkpoint_sha, rerun + flags)
    ensure_writable(model_dir)
    job.data = load_mnist(data_dir, log=log)  # once: the fp32 and the derived checks read the same digits
    report = prove_parity(job, atol=atol, rtol=rtol, samples=samples)
    write_report(report, model_dir)
    predictions = {e.fmt.name: prove_predictions(job, e, samples) for e in present if e.fmt.proof == "predictions"}
    return report, predictions


def prove_parity(job: ExportJob, *, atol: float, rtol: float, samples: int | None) -> ParityReport:
    """Eager against every "logits" file in the model's folder, on the first `samples` MNIST test digits."""
    images, labels = _test_digits(job, samples)
    backends = [
        backend
        for exporter in exporters("logits")
        if (job.model_dir / exporter.fmt.file).is_file()
        for backend in exporter.backends(job.model_dir / exporter.fmt.file)
    ]
    meta = job.meta
    return check_parity(eager_runner(job.eager), backends, images, labels, model=meta["model"], atol=atol, rtol=rtol)


def prove_predictions(job: ExportJob, exporter: Exporter, samples: int | None) -> PredictionParity:
    """A derived file's prediction parity with eager on the test digits; writes its own report (.json, .md)."""
    images, labels = _test_digits(job, samples)
    [backend, *_] = exporter.backends(job.model_dir / exporter.fmt.file)
    report = check_prediction_parity(eager_runner(job.eager), backend, images, labels, model=job.meta["model"])
    write_report(report, job.model_dir, exporter.fmt.report)
    return report


def _test_digits(job: ExportJob, samples: int | None):
    """The first `samples` MNIST test digits (all by default), normalised as the checkpoint says, and labels."""
    n = len(job.data.test_labels) if samples is None else samples
    meta = job.meta
    return normalise(job.data.test_images[:n], meta["mean"], meta["std"], meta["input_shape"]), job.data.test_labels[:n]


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


def write_report(report: ParityReport | PredictionParity, model_dir: Path, stem: str = PARITY_REPORT) -> None:
    """`<stem>.json` and `<stem>.md` in `model_dir`, each replaced whole."""
    with _staged(model_dir / f"{stem}.json") as path:
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with _staged(model_dir / f"{stem}.md") as path:
        path.write_text(report.to_markdown())


def _write_or_withdraw_manifest(report: ParityReport, job: ExportJob, files: dict[str, Path]) -> None:
    # The archive step trusts export.json; a failed export must not leave one behind, old or new.
    model_dir, log = job.model_dir, job.log
    manifest = model_dir / MANIFEST_FILE
    if not report.passed:
        manifest.unlink(missing_ok=True)
        log(f"parity failed: {MANIFEST_FILE} not written; see {model_dir / PARITY_MD}")
        return
    with _staged(manifest) as path:
        path.write_text(json.dumps(export_manifest(job.meta, job.checkpoint_sha, files), indent=2) + "\n")
    log(f"wrote {model_dir / PARITY_JSON}, {PARITY_MD}, {MANIFEST_FILE}")


def _written(path: Path, what: str, seconds: float) -> str:
    return f"wrote {path} ({what}, {path.stat().st_size / 1e6:.2f} MB, {seconds:.1f} s)"


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """Yields a temporary name next to `path` and moves it into place only if the block succeeds, so an
    interrupted export never leaves a half-written file under the real name."""
    staging = path.with_name(f".partial-{path.name}")  # the same suffix: some writers go by it (torch's .pt2)
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
