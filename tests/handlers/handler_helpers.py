"""Helpers of the handler's unit tests: a tiny real model, archive-shaped model dirs, a stand-in context.

A module of its own (not conftest.py) so that test modules import it by a name no other test folder uses.
The constants below build fixtures only; the handler reads its copies from the metadata file.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from ts.context import Context, RequestProcessor

from digits import contract

HANDLERS_DIR = Path(__file__).resolve().parents[2] / "handlers"

MEAN, STD = 0.1307, 0.3081
LABELS = [str(d) for d in range(10)]
# one model file per runtime the handler loads, named as the contract names the fp32 files
MODEL_FILES = {fmt.runtime: fmt.file for fmt in contract.FORMATS.values() if fmt.proof == "logits"}


class TinyNet(nn.Module):
    """A small CNN ending in log_softmax, like the guide models; random weights are enough for parity."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, kernel_size=3, stride=2)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.fc(torch.relu(self.conv(x)).flatten(1)), dim=1)


def save_model(model: nn.Module, path: Path, device: str = "cpu") -> None:
    """Writes `model` as TorchScript (.pt), ONNX with a dynamic batch (.onnx), or an AOTInductor package
    compiled for `device` (.pt2, as `digits export --pt2` writes it)."""
    model = model.eval()
    example = torch.zeros(2, 1, 28, 28)
    if path.suffix == ".pt2":
        from digits.export.pt2 import export_pt2  # fixture data only: the handler itself never imports export

        export_pt2(model, path, example, {}, torch.device(device))
        return
    with warnings.catch_warnings():
        # TorchScript and the TorchScript-based ONNX exporter are deprecated; the issue asks for both
        # formats, and this exporter is 30x faster than the dynamo one for fixtures
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if path.suffix == ".pt":
            torch.jit.script(model).save(str(path))
            return
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["log_probs"],
            dynamic_axes={"input": {0: "batch"}, "log_probs": {0: "batch"}},
            dynamo=False,
        )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metadata_for(model_path: Path, fmt: str) -> dict[str, Any]:
    """The metadata the archive step writes, as its contract says."""
    return {
        "model": "tiny",
        "model_file": model_path.name,
        "format": fmt,
        "sha256": sha256_of(model_path),
        "mean": MEAN,
        "std": STD,
        "labels": LABELS,
        "input_shape": [1, 28, 28],
        "layout": "NCHW",
        "test_accuracy": 0.99,
    }


def write_model_dir(
    directory: Path, model: nn.Module, fmt: str, *, with_handler_files: bool = False, device: str = "cpu"
) -> Path:
    """Lays out a model dir as TorchServe unpacks an archive: model file, metadata, MAR-INF/MANIFEST.json."""
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILES[fmt]
    save_model(model, model_path, device)
    (directory / "digits_meta.json").write_text(json.dumps(metadata_for(model_path, fmt)))
    (directory / "MAR-INF").mkdir(exist_ok=True)
    manifest = {"model": {"modelName": "tiny", "serializedFile": model_path.name, "handler": "digit_handler.py"}}
    (directory / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    if with_handler_files:
        for source in HANDLERS_DIR.glob("*.py"):  # flat, as torch-model-archiver packs extra files
            shutil.copy(source, directory / source.name)
    return directory


def make_context(model_dir: Path, *, gpu_id: int | None = None, manifest: dict | None = None) -> Context:
    """TorchServe's own Context, filled as ts/service.py fills it for a worker."""
    if manifest is None:
        manifest_path = model_dir / "MAR-INF" / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    return Context("tiny", str(model_dir), manifest, 8, gpu_id, "0.12.0", model_yaml_config={})


@dataclass
class Answer:
    """What TorchServe would send back for one request of a batch."""

    status: int
    phrase: str | None
    content_type: str | None
    body: Any  # the JSON body, parsed as a client would


def run_batch(handler: Any, context: Context, rows: list[Any], headers: list[dict] | None = None) -> list[Answer]:
    """Calls `handler.handle` as ts/service.py does: one RequestProcessor per request, then reads them back."""
    context.request_processor = [RequestProcessor(dict(h)) for h in headers or [{}] * len(rows)]
    context.request_ids = {index: f"request-{index}" for index in range(len(rows))}
    outputs = handler.handle(rows, context)
    assert isinstance(outputs, list) and len(outputs) == len(rows)
    answers = []
    for index, body in enumerate(outputs):
        assert isinstance(body, bytes), f"answer {index} is {type(body).__name__}; the handler sends JSON bytes"
        status, phrase = context.get_response_status(index)
        answers.append(Answer(status, phrase, context.get_response_content_type(index), json.loads(body)))
    return answers


def model_inputs(handler: Any, context: Context, rows: list[Any]) -> tuple[list[Answer], torch.Tensor]:
    """Runs `rows` through `handle`, as TorchServe does, and returns the answers and the one tensor the
    model was called with: (readable requests, C, H, W) float32, normalised."""
    seen = []
    model = handler.model

    def recording(images: torch.Tensor) -> torch.Tensor:
        seen.append(images.clone())
        return model(images)

    handler.model = recording
    try:
        answers = run_batch(handler, context, rows)
    finally:
        handler.model = model
    assert len(seen) <= 1, "the handler runs one forward pass a batch"
    return answers, seen[0] if seen else torch.empty(0)


def assert_same_answer(answer: dict[str, Any], expected: dict[str, Any]) -> None:
    """The same prediction for the same digit, sent in another batch or another row.

    Not the same bytes: a CPU's matrix kernels block a batch by its size, so the last of the seven printed
    digits can differ with the batch (seen with TorchScript on AVX2 code paths); far below any tolerance.
    """
    assert answer.keys() == expected.keys() and answer["label"] == expected["label"], (answer, expected)
    for key in ("confidence", "probabilities"):
        assert np.allclose(answer[key], expected[key], rtol=1e-5, atol=1e-8), (key, answer[key], expected[key])


def png_bytes(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG", **save_args: Any) -> bytes:
    """Encodes an array (or converts it to `mode` first) as an image file."""
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def expected_tensor(digit: np.ndarray) -> torch.Tensor:
    """(1, 1, 28, 28): how training normalised an MNIST digit."""
    return ((torch.from_numpy(np.array(digit)).float() / 255.0 - MEAN) / STD).reshape(1, 1, 28, 28)
