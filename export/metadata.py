"""What travels with the exported files: the checkpoint's preprocessing facts, provenance and versions.

Training decided mean, std, input shape, layout and labels; they reach ONNX apps through the file's
`metadata_props` and the archive step through `export.json`. Nothing here re-decides them.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..contract import CARRIED_KEYS, NORMALISATION
from . import ExportError

PRODUCER_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def producer_versions() -> dict[str, str]:
    """Installed versions of the packages that made (and check) the files."""
    versions = {}
    for package in PRODUCER_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            raise ExportError(f"{package} is not installed; it is needed to export") from None
    return versions


def carried_metadata(checkpoint_meta: dict) -> dict:
    missing = [k for k in CARRIED_KEYS if k not in checkpoint_meta]
    if missing:
        raise ExportError(f"checkpoint metadata lacks {', '.join(missing)}; retrain with `digits train`")
    return {k: checkpoint_meta[k] for k in CARRIED_KEYS}


def onnx_metadata_props(checkpoint_meta: dict, checkpoint_sha256: str) -> dict[str, str]:
    """The ONNX `metadata_props`: strings as they are, numbers as text, lists and dicts as JSON."""
    props = {**carried_metadata(checkpoint_meta), "checkpoint_sha256": checkpoint_sha256}
    props["normalisation"] = NORMALISATION
    props |= {f"{package}_version": v for package, v in producer_versions().items()}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()}


def decode_onnx_metadata(props: dict[str, str]) -> dict:
    """Inverse of `onnx_metadata_props` for the carried keys; raises ExportError naming a missing key."""
    missing = [k for k in (*CARRIED_KEYS, "checkpoint_sha256") if k not in props]
    if missing:
        raise ExportError(f"ONNX metadata_props lack {', '.join(missing)}; re-export with `digits export`")
    decoded = {k: props[k] if k in ("model", "layout") else _json_value(props, k) for k in CARRIED_KEYS}
    return decoded | {"checkpoint_sha256": props["checkpoint_sha256"]}


def _json_value(props: dict[str, str], key: str):
    try:
        return json.loads(props[key])
    except json.JSONDecodeError:
        raise ExportError(
            f"ONNX metadata_props {key}={props[key]!r} is not JSON; re-export with `digits export`"
        ) from None


def check_metadata_matches(onnx_meta: dict, checkpoint_meta: dict, checkpoint_sha256: str, where: str) -> None:
    """Fails when the ONNX file was exported from another checkpoint or carries different facts.

    Args:
        where: the ONNX file and what to run about it, for the message.
    """
    if onnx_meta["checkpoint_sha256"] != checkpoint_sha256:
        other = onnx_meta["checkpoint_sha256"][:12]
        raise ExportError(f"{where}: exported from another checkpoint (sha256 {other}...)")
    for key, value in carried_metadata(checkpoint_meta).items():
        # JSON round trip, so that a tuple in the checkpoint equals the list read back
        if json.loads(json.dumps(value)) != onnx_meta[key]:
            raise ExportError(f"{where}: metadata says {key}={onnx_meta[key]!r}, the checkpoint {value!r}")


def export_manifest(checkpoint_meta: dict, checkpoint_sha256: str, files: dict[str, Path]) -> dict:
    """`export.json`, read by the archive step: facts, provenance and the exported files with their hashes.

    Args:
        files: format name ("torchscript", "onnx") -> path of the file, inside the model folder.
    """
    return {
        **carried_metadata(checkpoint_meta),
        "checkpoint_sha256": checkpoint_sha256,
        "files": {fmt: {"path": path.name, "sha256": sha256_file(path)} for fmt, path in files.items()},
        "versions": producer_versions(),
    }
