"""Helpers of the rollout tests: a TorchServe of a test's own, forged candidate archives, TorchServe's view."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import requests
from digits.serving.ledger import read_events
from digits.serving.server import ServerState, read_state, read_token
from digits.training.train import normalise
from serving_helpers import PORT_FLAGS, free_ports, port_flags

from digits.cli import main


@dataclass(frozen=True)
class Served:
    """A TorchServe started by `digits serve` for one test, with its keys and the store it serves."""

    run_dir: Path
    store: Path
    state: ServerState

    @property
    def argv(self) -> list[str]:
        return ["--run-dir", str(self.run_dir)]

    def management(self, method: str, path: str, **params) -> requests.Response:
        headers = {"Authorization": f"Bearer {read_token(self.run_dir, 'management')}"}
        url = f"{self.state.management_url}{path}"
        return requests.request(method, url, params=params or None, headers=headers, timeout=30)

    def registered(self, model: str = "cnn") -> list[str]:
        response = self.management("GET", f"/models/{model}/all")
        return sorted(entry["modelVersion"] for entry in response.json()) if response.status_code == 200 else []

    def default(self, model: str = "cnn") -> str:
        return self.management("GET", f"/models/{model}").json()[0]["modelVersion"]

    def predict_version(self, payload: bytes, model: str = "cnn") -> tuple[int, str | None]:
        """A /predictions answer's status and the version that gave it (the handler's Model-Version)."""
        headers = {"Authorization": f"Bearer {read_token(self.run_dir)}", "Content-Type": "image/png"}
        response = requests.post(f"{self.state.inference_url}/predictions/{model}", data=payload, headers=headers)
        return response.status_code, response.headers.get("Model-Version")

    def steps(self, model: str = "cnn") -> list[tuple[str, str]]:
        return [(e.version, e.step) for e in read_events(self.run_dir, self.store, model)]


def serve(store: Path, run_dir: Path) -> Served:
    assert (
        main(
            ["serve", "--model-store", str(store), "--run-dir", str(run_dir), *port_flags(free_ports(len(PORT_FLAGS)))]
        )
        == 0
    )
    return Served(run_dir, store.resolve(), read_state(run_dir))


@contextmanager
def serving(store: Path, run_dir: Path) -> Iterator[Served]:
    served = serve(store, run_dir)
    try:
        yield served
    finally:
        main(["stop", *served.argv])


def onnx_labels(model_onnx: Path, digits: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": normalise(digits).numpy()})[0].argmax(1)


def forge(
    mar: Path,
    out: Path,
    version: str,
    meta: Callable[[dict], dict] = lambda m: m,
    files: dict[str, bytes] | None = None,
) -> Path:
    """A copy of `mar` with its manifest's version set, its digits_meta.json changed by `meta`, and entries
    replaced by `files` (name -> bytes)."""
    files = files or {}
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            elif item.filename == "digits_meta.json":
                data = json.dumps(meta(json.loads(data))).encode()
            target.writestr(item, files.get(item.filename, data))
    return out


def copy_store(store: Path, out: Path, names: tuple[str, ...] = ("cnn.mar",)) -> Path:
    out.mkdir(parents=True)
    for name in names:
        shutil.copy(store / name, out / name)
    return out
