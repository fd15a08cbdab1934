"""Real archives from briefly trained models, and a real TorchServe started by `digits serve`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from digits.export.convert import export_model
from digits.serving.archive import ServingSettings, archive_model
from digits.training.data import load_mnist
from digits.training.train import TrainConfig, normalise, train
from serving_helpers import PORT_FLAGS, free_ports, serving

ARCHIVED = {"cnn": "onnx", "mlp": "torchscript"}  # what `make demo` serves


@pytest.fixture
def ports() -> list[int]:
    """Free loopback ports for inference, management, metrics, gRPC inference and gRPC management."""
    return free_ports(len(PORT_FLAGS))


@pytest.fixture(scope="session")
def mnist():
    return load_mnist(log=lambda _: None)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """cnn and mlp trained briefly (enough to be mostly right), exported with parity proven."""
    out = tmp_path_factory.mktemp("artifacts")
    for model in ARCHIVED:
        train(TrainConfig(model=model, epochs=1, limit=6000, out=out, quiet=True), log=lambda _: None)
        assert export_model(out, model, samples=256, log=lambda _: None).report.passed
    return out


@pytest.fixture(scope="session")
def store(artifacts, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    for model, fmt in ARCHIVED.items():
        archive_model(
            model, fmt, artifacts, store, settings=ServingSettings(batch_size=8, max_batch_delay=20), log=lambda _: None
        )
    return store


@pytest.fixture(scope="session")
def expected_labels(artifacts, mnist) -> dict[str, np.ndarray]:
    """What each archived model must answer for the first 200 test digits (from the exported ONNX)."""
    x = normalise(mnist.test_images[:200]).numpy()
    labels = {}
    for model in ARCHIVED:
        session = ort.InferenceSession(str(artifacts / model / "model.onnx"), providers=["CPUExecutionProvider"])
        labels[model] = session.run(None, {"input": x})[0].argmax(1)
    return labels


@pytest.fixture(scope="session")
def server(store, tmp_path_factory):
    with serving(store, tmp_path_factory.mktemp("run")) as started:
        yield started
