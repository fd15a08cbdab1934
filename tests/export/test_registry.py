"""The exporter registry: export and verify walk it, so a new format is one line in the contract plus its
exporter, and export/convert.py does not change."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from digits.contract import FORMATS, Format
from digits.export import ExportError
from digits.export.convert import export_model, verify_model
from digits.export.exporters import EXPORTERS, Exporter, ExportJob, exporters, register_exporter
from digits.export.metadata import sha256_file
from digits.export.runners import Backend, torchscript_backend
from digits.export.torchscript import export_torchscript

SAMPLES = 300  # test digits for the whole-set check
# a second TorchScript file, traced again: a format digits does not have, written by its own exporter
COPY = Format("torchscript-copy", "model.copy.pt", "torchscript", export_flags="--also-a-copy")


def _write_copy(job: ExportJob, path: Path) -> str:
    export_torchscript(job.eager, path, job.example, log=lambda _: None)
    return "a traced copy"


def _check_copy(path: Path, meta: dict, checkpoint_sha: str, rerun: str) -> None:
    if path.stat().st_size < 1000:
        raise ExportError(f"{path} is too small to be a model; {rerun}")


def _copy_runner(path: Path, threads: int | None) -> Backend:
    return replace(torchscript_backend(path), name="copy")


@pytest.fixture
def throwaway_format(monkeypatch):
    """COPY as one more line of the contract's FORMATS, and its exporter registered, for one test."""
    monkeypatch.setitem(FORMATS, COPY.name, COPY)
    copy = Exporter(COPY, _write_copy, lambda path: [_copy_runner(path, None)], _copy_runner, check=_check_copy)
    register_exporter(copy)
    yield COPY
    del EXPORTERS[COPY.name]


def test_every_contract_format_has_an_exporter_in_contract_order():
    assert [e.fmt for e in exporters()] == list(FORMATS.values())
    assert {e.fmt.proof for e in exporters()} == {"logits", "predictions"}


def test_an_exporter_for_a_format_outside_the_contract_is_refused():
    with pytest.raises(ValueError, match="not contract.FORMATS' entry"):
        register_exporter(Exporter(COPY, _write_copy, lambda path: [], _copy_runner))


def test_a_registered_format_is_exported_verified_and_reported(throwaway_format, checkpoint_copy, capsys):
    artifacts = checkpoint_copy("mlp")
    model_dir = artifacts / "mlp"
    logged: list[str] = []
    result = export_model(artifacts, "mlp", formats=[COPY.name], samples=SAMPLES, log=logged.append)

    assert result.passed and (model_dir / COPY.file).is_file()
    assert any("a traced copy" in line and COPY.file in line for line in logged)
    assert COPY.name in result.seconds and result.sizes[COPY.file] > 0
    copies = [c for c in result.report.checks if c.backend == "copy"]
    assert copies and all(c.passed for c in copies)
    manifest = json.loads((model_dir / "export.json").read_text())
    assert manifest["files"][COPY.name] == {"path": COPY.file, "sha256": sha256_file(model_dir / COPY.file)}
    assert "copy" in (model_dir / "parity.md").read_text()

    report, _ = verify_model(artifacts, "mlp", samples=SAMPLES, log=lambda _: None)
    assert [c.batch_size for c in report.checks if c.backend == "copy"] == [c.batch_size for c in copies]

    (model_dir / COPY.file).write_bytes(b"not a model")  # the format's own check runs in verify too
    with pytest.raises(
        ExportError, match=f"too small to be a model; run `digits export mlp .* with {COPY.export_flags}"
    ):
        verify_model(artifacts, "mlp", samples=SAMPLES, log=lambda _: None)

    export_model(artifacts, "mlp", samples=SAMPLES, log=logged.append)  # not asked for: the stale copy goes
    assert not (model_dir / COPY.file).exists()
    assert COPY.name not in json.loads((model_dir / "export.json").read_text())["files"]


def test_an_unknown_format_fails_before_any_work(checkpoint_copy):
    artifacts = checkpoint_copy("mlp")
    before = sorted(p.name for p in (artifacts / "mlp").iterdir())
    with pytest.raises(ExportError, match="unknown format 'tflite'; known: torchscript, onnx"):
        export_model(artifacts, "mlp", formats=["tflite"], log=lambda _: None)
    assert sorted(p.name for p in (artifacts / "mlp").iterdir()) == before
