"""Real archives from briefly trained models, and a real TorchServe started by `digits serve`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from digits.export.convert import export_model
from digits.serving.archive import ServingSettings, archive_model
from digits.serving.server import read_state, read_token
from digits.training.data import load_mnist
from digits.training.train import TrainConfig, normalise, train
from serving_helpers import PORT_FLAGS, free_ports, port_flags

from digits.cli import main

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


@dataclass
class Server:
    url: str
    management_url: str
    metrics_url: str
    run_dir: Path
    token: str
    management_token: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="session")
def server(store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    argv = ["--run-dir", str(run_dir)]
    assert main(["serve", "--model-store", str(store), *argv, *port_flags(free_ports(len(PORT_FLAGS)))]) == 0
    state = read_state(run_dir)
    yield Server(
        state.inference_url,
        state.management_url,
        state.metrics_url,
        run_dir,
        read_token(run_dir),
        read_token(run_dir, "management"),
    )
    assert main(["stop", *argv]) == 0
