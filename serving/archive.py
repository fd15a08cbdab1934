"""`digits archive`: packs an exported model, its metadata and our handler into a TorchServe `.mar`.

The archive carries everything the worker needs and nothing from this repo's other layers:
  - the model file (`model.pt`, `model.onnx`, `model.int8.onnx` or `model.pt2`) as TorchServe's serialized file;
  - `handlers/digit_*.py` (the handler module plus its helper modules, flat in the model dir);
  - `digits_meta.json`: normalisation, labels, input shape and the model file's SHA-256, copied from
    the export's `export.json`, for the handler to read, and the export's parity verdict (`parity`: passed,
    the report's file name and SHA-256), for `digits rollout` to check before it registers the archive;
  - `model-config.yaml`: batchSize, maxBatchDelay, workers and responseTimeout, which `digits serve`
    reads back to write the `models=` entry of config.properties, and the handler's own section
    (`handler: {threads: N, max_response_size: B}`: intra-op threads per worker, and the largest answer body
    the handler builds, which `digits serve` writes as TorchServe's max_response_size).

The model's version is the manifest's (`--version`, default 1.0). The file is `<store>/NAME.mar` for the
default version and `<store>/NAME-vVERSION.mar` for any other, so that versions of one model sit side by
side in a store; what a file holds is read from its manifest, never from its name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..contract import (
    ARCHIVE_MANIFEST,
    ARCHIVE_META_KEYS,
    CARRIED_KEYS,
    CONFIG_FILE,
    DEFAULT_VERSION,
    FORMATS,
    HANDLER_SECTION,
    MANIFEST_FILE,
    META_FILE,
    PARITY_JSON,
    PARITY_KEY,
    RESPONSE_LIMIT_KEY,
    THREADS_KEY,
    TORCHSERVE_MAX_RESPONSE,
)
from ..export.metadata import sha256_file
from ..handlers import handler_dir

HANDLER_DIR = handler_dir()  # the installed package's files, or the checkout's
HANDLER_MODULE = "digit_handler.py"
NOOP_HANDLER = "noop_handler.py"  # the benchmarks' ceiling; archived alone, never inside a model's archive
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")  # the archiver's own rule for model names
# a version is a path segment of /predictions/NAME/VERSION and part of a file name: no slash, no `..`
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_\-]|\.(?!\.)){0,63}$")


class ArchiveError(ValueError):
    """An archive that cannot or must not be made; the message says why and what to run."""


@dataclass(frozen=True)
class ServingSettings:
    """Per-model TorchServe settings, stored in the archive's model-config.yaml."""

    # 16: per-batch costs (metrics, the forward pass's fixed part) are shared by more requests, and at 16
    # requests in flight one batch of 16 beats two of 8 on a small machine (`digits bench http --concurrency
    # 16 --batch-size 8`, then 16, compares them; docs/tuning.md); a lone request still waits at most
    # max_batch_delay
    batch_size: int = 16
    max_batch_delay: int = 5  # ms
    workers: int = 1
    response_timeout: int = 120  # s
    # intra-op threads per worker (torch and onnxruntime). One: TorchServe's frontend and the clients need
    # the other cores, and on small batches a second thread costs more in spinning than it saves in compute
    threads: int = 1

    def validate(self) -> None:
        limits = (("batch_size", 1), ("max_batch_delay", 0), ("workers", 1), ("response_timeout", 1), ("threads", 1))
        for name, low in limits:
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise ArchiveError(f"{flag} must be at least {low}, got {getattr(self, name)}")

    def to_yaml(self) -> dict:
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay,
            "responseTimeout": self.response_timeout,
            # read by the handler itself (context.model_yaml_config); the response limit also by `digits serve`
            HANDLER_SECTION: {THREADS_KEY: self.threads, RESPONSE_LIMIT_KEY: TORCHSERVE_MAX_RESPONSE},
        }

    @classmethod
    def from_yaml(cls, raw: dict) -> ServingSettings:
        """The settings a model-config.yaml holds (`to_yaml`'s keys; a key left out takes the default)."""
        default = cls()
        return cls(
            raw.get("batchSize", default.batch_size),
            raw.get("maxBatchDelay", default.max_batch_delay),
            raw.get("minWorkers", default.workers),
            raw.get("responseTimeout", default.response_timeout),
            (raw.get(HANDLER_SECTION) or {}).get(THREADS_KEY, default.threads),
        )


def read_export(model_dir: Path, model: str) -> dict:
    """The export's metadata, refusing a model whose parity report is missing or failed."""
    export_json, parity_json = model_dir / MANIFEST_FILE, model_dir / PARITY_JSON
    if not export_json.is_file():
        raise ArchiveError(f"no export at {export_json}; run `digits export {model}` first")
    check_proven(parity_json, f"run `digits export {model}` (or `digits verify`)")
    return json.loads(export_json.read_text())


def check_proven(report: Path, remedy: str) -> None:
    """Refuses a model whose parity report is missing (saying how to write it, `remedy`) or failed."""
    if not report.is_file():
        raise ArchiveError(f"no parity report at {report}; {remedy}")
    if json.loads(report.read_text()).get("passed") is not True:
        raise ArchiveError(f"{report} says parity FAILED; refusing to archive a model that is not proven")


def parity_record(model_dir: Path, fmt: str) -> dict:
    """digits_meta.json's `parity`: the verdict of the report that proves `fmt` (fp32 files: parity.json;
    int8: its own), its file name and SHA-256, so that an archive carries its proof wherever it goes."""
    report = model_dir / FORMATS[fmt].parity_json
    check_proven(report, f"run `digits export {model_dir.name} {FORMATS[fmt].export_flags}`")
    return {"passed": True, "report": report.name, "sha256": sha256_file(report)}


def handler_files() -> tuple[Path, list[Path]]:
    """The handler module and its sibling helper modules (`digit_*.py`), all shipped flat in the archive.

    Only the `digit_` modules: other files in handlers/ (the no-op handler) are not the model's code.
    """
    handler = HANDLER_DIR / HANDLER_MODULE
    extras = sorted(p for p in HANDLER_DIR.glob("digit_*.py") if p.name != HANDLER_MODULE)
    return handler, extras


def build_meta(export: dict, fmt: str, model_file: Path, parity: dict | None = None) -> dict:
    """digits_meta.json: the file's runtime (an int8 file is ONNX to the handler) and digest, and the facts
    the export carried from the checkpoint."""
    missing = [key for key in CARRIED_KEYS if key not in export]
    if missing:
        raise ArchiveError(
            f"export.json lacks {', '.join(missing)}; run `digits export {export.get('model', 'MODEL')}`"
        )
    meta = {
        "format": FORMATS[fmt].runtime,
        "sha256": export["files"][fmt]["sha256"],
        "model_file": model_file.name,
        **{key: export[key] for key in CARRIED_KEYS},
    }
    return {**{key: meta[key] for key in ARCHIVE_META_KEYS}, **({PARITY_KEY: parity} if parity else {})}


def archive_model(
    model: str,
    fmt: str,
    artifacts: Path,
    store: Path,
    name: str | None = None,
    settings: ServingSettings | None = None,
    log=print,
    version: str = DEFAULT_VERSION,
) -> Path:
    """Writes `<store>/<name>.mar` (`<name>-v<version>.mar` for a version other than 1.0); returns its path."""
    settings = settings or ServingSettings()
    settings.validate()
    name = name or model
    if fmt not in FORMATS:
        raise ArchiveError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    check_name(name)
    check_version(version)
    export = read_export(Path(artifacts) / model, model)
    if fmt not in export["files"]:
        command = f"digits export {model} {FORMATS[fmt].export_flags}".rstrip()
        raise ArchiveError(f"{model}'s {MANIFEST_FILE} lists no {fmt} file; run `{command}`")
    model_file = Path(artifacts) / model / export["files"][fmt]["path"]
    if not model_file.is_file():
        raise ArchiveError(f"{model_file} is missing; run `digits export {model}` again")
    handler, extras = handler_files()
    with tempfile.TemporaryDirectory(prefix="digits-archive-") as tmp:
        meta_path = Path(tmp) / META_FILE
        meta = build_meta(export, fmt, model_file, parity_record(Path(artifacts) / model, fmt))
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        mar = package(name, handler, [*extras, meta_path], store, settings, serialized_file=model_file, version=version)
    log(
        f"wrote {mar} ({fmt}, {model_file.name}, version {version}, batch {settings.batch_size}, "
        f"delay {settings.max_batch_delay} ms, {settings.workers} worker(s))"
    )
    return mar


def archive_noop(store: Path, name: str = "noop", settings: ServingSettings | None = None) -> Path:
    """Writes `<store>/<name>.mar` holding only the no-op handler: the frame's ceiling for benchmarks."""
    settings = settings or ServingSettings()
    settings.validate()
    check_name(name)
    return package(name, HANDLER_DIR / NOOP_HANDLER, [], store, settings)


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ArchiveError(f"--name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")


def check_version(version: str) -> None:
    if not VERSION_PATTERN.match(version):
        raise ArchiveError(
            f"--version {version!r}: use at most 64 letters, digits, '_', '-' and single '.', "
            "starting with a letter or digit (it becomes part of a URL and a file name)"
        )


def archive_file_name(name: str, version: str) -> str:
    """`NAME.mar` for the default version, `NAME-vVERSION.mar` for any other (see the module docstring)."""
    return f"{name}.mar" if version == DEFAULT_VERSION else f"{name}-v{version}.mar"


def package(
    name: str,
    handler: Path,
    extras: list[Path],
    store: Path,
    settings: ServingSettings,
    serialized_file: Path | None = None,
    version: str = DEFAULT_VERSION,
) -> Path:
    """Runs torch-model-archiver's packaging with the settings as model-config.yaml; returns the .mar path.

    The archiver writes into a hidden folder of the store, and the archive takes its place by a rename: a
    server reading the store never sees half an archive.
    """
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    target = store / archive_file_name(name, version)
    with tempfile.TemporaryDirectory(prefix=".digits-archive-", dir=store) as tmp:
        config_path = Path(tmp) / CONFIG_FILE
        config_path.write_text(yaml.safe_dump(settings.to_yaml(), sort_keys=False))
        config = ModelArchiverConfig(
            model_name=name,
            handler=str(handler),
            version=version,
            serialized_file=str(serialized_file) if serialized_file else None,
            extra_files=",".join(str(p) for p in extras) or None,
            export_path=tmp,
            force=True,
            config_file=str(config_path),
        )
        package_model(config, manifest=ModelExportUtils.generate_manifest_json(config))
        os.replace(Path(tmp) / f"{name}.mar", target)
    return target


def response_limit(settings: dict) -> int:
    """The largest answer body an archive's handler builds (model-config.yaml `handler: {max_response_size}`),
    TorchServe's default for an archive without it, as the handler itself reads it."""
    value = (settings.get(HANDLER_SECTION) or {}).get(RESPONSE_LIMIT_KEY, TORCHSERVE_MAX_RESPONSE)
    if type(value) is not int or value < 1:
        raise ArchiveError(f"model-config.yaml handler.{RESPONSE_LIMIT_KEY} is {value!r}, expected a positive integer")
    return value


def read_archive_settings(mar: Path) -> dict:
    """The model-config.yaml inside an archive (TorchServe's own per-model keys)."""
    try:
        with zipfile.ZipFile(mar) as archive:
            return yaml.safe_load(archive.read(CONFIG_FILE)) or {}
    except KeyError:
        return {}  # an archive made elsewhere: TorchServe's defaults apply
    except zipfile.BadZipFile as err:
        raise ArchiveError(f"{mar} is not a model archive: {err}") from None


def read_manifest(mar: Path) -> dict:
    """The archive's MAR-INF/MANIFEST.json (the archiver's: model name, version, handler, serialized file)."""
    return json.loads(_read_entry(mar, ARCHIVE_MANIFEST, "it was not made by torch-model-archiver"))


def read_archive_meta(mar: Path) -> dict:
    """The archive's digits_meta.json (see the module docstring)."""
    return json.loads(_read_entry(mar, META_FILE, "it is not a digits archive (`digits archive` writes one)"))


def _read_entry(mar: Path, entry: str, missing: str) -> bytes:
    try:
        with zipfile.ZipFile(mar) as archive:
            return archive.read(entry)
    except KeyError:
        raise ArchiveError(f"{mar} holds no {entry}: {missing}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f"{mar} is not a model archive: {err}") from None
