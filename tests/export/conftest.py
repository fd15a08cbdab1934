"""Tiny checkpoints and their exports, made once per test session and copied where a test changes them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from digits.export.convert import ExportResult, export_model
from digits.training.data import MnistData, load_mnist
from digits.training.train import TrainConfig, train

# One brief training per registered model: enough for parity (which compares a model with itself), far from
# the accuracy targets. test_every_registered_model_has_a_recipe fails when a new model has no entry.
TINY_TRAINING = {"mlp": 2000, "cnn": 1000, "resnet18": 512}  # model -> train/test images, 1 epoch
PARITY_SAMPLES = 300  # test digits for the whole-set check in tests; the CLI uses all 10,000


def _quiet(*_args) -> None:
    pass


@pytest.fixture(scope="session")
def tiny_training() -> dict[str, int]:
    return dict(TINY_TRAINING)


@pytest.fixture(scope="session")
def mnist() -> MnistData:
    return load_mnist(log=_quiet)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Callable[[str], Path]:
    """model -> artifacts folder holding MODEL/checkpoint.pt (trained on first use, then shared)."""
    artifacts, done = tmp_path_factory.mktemp("trained"), set()

    def get(model: str) -> Path:
        if model not in done:
            config = TrainConfig(model=model, epochs=1, limit=TINY_TRAINING[model], out=artifacts, quiet=True)
            train(config, log=_quiet)
            done.add(model)
        return artifacts

    return get


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory) -> Callable[[str], ExportResult]:
    """model -> the ExportResult of a session-wide export. Read-only: copy before changing anything."""
    results: dict[str, ExportResult] = {}

    def get(model: str) -> ExportResult:
        if model not in results:
            artifacts = tmp_path_factory.mktemp(f"exported-{model}")
            copy_model_dir(trained(model) / model, artifacts, only=["checkpoint.pt"])
            results[model] = export_model(artifacts, model, samples=PARITY_SAMPLES, log=_quiet)
        return results[model]

    return get


def copy_model_dir(model_dir: Path, artifacts: Path, only: list[str] | None = None) -> Path:
    """Copies MODEL/ (or some of its files) into `artifacts`; returns the new MODEL/ folder."""
    target = artifacts / model_dir.name
    target.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if only is None or path.name in only:
            shutil.copy2(path, target / path.name)
    return target


@pytest.fixture
def checkpoint_copy(trained, tmp_path) -> Callable[[str], Path]:
    """model -> a private artifacts folder holding only MODEL/checkpoint.pt."""
    return lambda model: copy_model_dir(trained(model) / model, tmp_path / "artifacts", only=["checkpoint.pt"]).parent


@pytest.fixture
def exported_copy(exported, tmp_path) -> Callable[[str], Path]:
    """model -> a private artifacts folder holding a copy of the exported MODEL/ folder."""
    return lambda model: copy_model_dir(exported(model).model_dir, tmp_path / "artifacts").parent
