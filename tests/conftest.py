"""Fixtures shared across test folders."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from digits.export.convert import ExportResult, export_model
from digits.training.train import TrainConfig, train


@pytest.fixture(scope="session")
def int8_artifacts(tmp_path_factory) -> Path:
    """An artifacts folder holding mlp trained on 10,000 digits (about 90% accurate), exported with int8.

    Its int8 file passes with a margin on any x86-64 CPU: argmax agreement 0.9988 here, 12 changed
    predictions where the floor allows 50 (mlps trained on 20,000 and 60,000 digits: 0.9984, 0.9985). The
    file's integer sums are exact with and without VNNI (7-bit weights, see `export.quantize`;
    `test_the_int8_file_computes_the_same_on_a_cpu_without_vnni` checks it bit for bit), so another CPU
    changes only float rounding and, through training, the model itself. Read-only: copy before changing
    anything.
    """
    out = tmp_path_factory.mktemp("int8-artifacts")
    train(TrainConfig(model="mlp", epochs=1, limit=10_000, out=out, quiet=True), log=lambda _: None)
    result = export_model(out, "mlp", formats=["onnx-int8"], log=lambda _: None)
    assert result.passed, result.predictions
    return out


@pytest.fixture(scope="session")
def pt2_export(tmp_path_factory) -> ExportResult:
    """mlp trained on 6,000 digits, exported with --pt2: the suite's one AOTInductor compile of a registered
    model (about 30 s; the mlp compiles fastest). For the device TorchServe gives a worker here: the GPU where
    there is one, as `digits export` does. Its folder is read-only: copy it first."""
    out = tmp_path_factory.mktemp("pt2-artifacts")
    train(TrainConfig(model="mlp", epochs=1, limit=6000, out=out, quiet=True), log=lambda _: None)
    result = export_model(out, "mlp", formats=["pt2"], device="auto", samples=1000, log=lambda _: None)
    assert result.passed, result.report.failures
    return result


@pytest.fixture(scope="session")
def forge_pt2() -> Callable[..., Path]:
    """(package, copy, **changes) -> copy: the package with its extra/digits_meta.json changed, as a package
    compiled elsewhere would say it (its compiled code untouched)."""

    def forge(package: Path, copy: Path, **changes) -> Path:
        with zipfile.ZipFile(package) as source, zipfile.ZipFile(copy, "w") as target:
            for item in source.infolist():
                data = source.read(item)
                if item.filename.endswith("/extra/digits_meta.json"):
                    data = json.dumps({**json.loads(data), **changes}).encode()
                target.writestr(item, data)
        return copy

    return forge
