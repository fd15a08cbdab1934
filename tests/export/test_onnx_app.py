"""examples/onnx_app.py classifies real digit images with nothing but onnxruntime, numpy, Pillow and the file."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from digits.contract import normalise
from digits.serving.archive import archive_model
from digits.serving.samples import drawn_large
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "onnx_app.py"
# the handler's modules, imported as a TorchServe worker imports them, and the handler tests' stand-in context
sys.path[:0] = [str(ROOT / "handlers"), str(ROOT / "tests" / "handlers")]


@pytest.fixture
def no_torch(tmp_path) -> dict[str, str]:
    """An environment where `import torch` fails, as on a machine that never installed it."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked for this test')\n")
    return {**os.environ, "PYTHONPATH": str(blocker.parent)}


def _run_app(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APP), *args], env=env, capture_output=True, text=True, timeout=120)


def _confident_digits(onnx_path: Path, mnist, count: int = 6) -> list[int]:
    """Indices of the test digits the exported model gets right most confidently, so that the test is
    about the app's preprocessing and not about a briefly trained model's weak spots."""
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": normalise(mnist.test_images[:200], 0.1307, 0.3081, [1, 28, 28])})
    right = np.flatnonzero(logits.argmax(1) == mnist.test_labels[:200])
    margin = np.sort(logits[right], axis=1)[:, -1] - np.sort(logits[right], axis=1)[:, -2]
    return [int(i) for i in right[np.argsort(-margin)][:count]]


def test_the_blocker_really_keeps_torch_out(no_torch):
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch, capture_output=True, text=True)
    assert probe.returncode != 0 and "torch is blocked" in probe.stderr


def test_the_app_classifies_real_test_digits_without_torch(exported, mnist, tmp_path, no_torch):
    onnx_path = exported("cnn").model_dir / "model.onnx"
    images, expected = [], []
    for i in _confident_digits(onnx_path, mnist):
        path = tmp_path / f"test-{i}.png"
        Image.fromarray(mnist.test_images[i]).save(path)
        images.append(path)
        expected.append(str(mnist.test_labels[i]))
    # a dark digit on white paper, photographed larger: the app inverts and resizes it
    scan = tmp_path / "scan.png"
    first = int(images[0].stem.split("-")[1])
    Image.fromarray(255 - mnist.test_images[first]).resize((112, 112)).save(scan)
    # drawn large in black on a white canvas, off-centre: the app crops, scales and centres it as MNIST did
    drawn = tmp_path / "drawn.png"
    drawn_large(mnist.test_images[first], np.random.default_rng(1)).save(drawn)
    result = _run_app(no_torch, *map(str, [*images, scan, drawn]), "--model", str(onnx_path))
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == [str(p) for p in [*images, scan, drawn]]
    assert [row[1] for row in rows] == [*expected, expected[0], expected[0]]
    assert all(0.0 < float(row[2]) <= 1.0 for row in rows)


def test_the_app_says_when_the_model_is_missing(tmp_path, no_torch):
    result = _run_app(no_torch, "digit.png", "--model", str(tmp_path / "model.onnx"))
    assert result.returncode != 0 and "no model at" in result.stderr


def _load_app():
    spec = importlib.util.spec_from_file_location("onnx_app", APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def _served_handler(exported_dir: Path, tmp_path: Path):
    """The cnn's ONNX archive, unpacked as TorchServe unpacks it, and its handler initialised on it."""
    from digit_handler import DigitHandler
    from handler_helpers import make_context

    mar = archive_model("cnn", "onnx", exported_dir.parent, tmp_path / "store", log=lambda _: None)
    model_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(model_dir)
    handler = DigitHandler()
    handler.initialize(make_context(model_dir))
    return handler, make_context(model_dir)


def test_the_app_and_the_server_see_and_answer_1000_drawn_digits_alike(exported, mnist, tmp_path):
    """One way to frame a digit: the same drawings give bit-identical model inputs and the same labels."""
    from handler_helpers import model_inputs

    model_dir = exported("cnn").model_dir
    rng = np.random.default_rng(7)
    bodies = []
    for digit in mnist.test_images[:1000]:
        buffer = io.BytesIO()
        drawn_large(digit, rng).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    paths = []
    for index, body in enumerate(bodies):
        paths.append(tmp_path / f"drawn-{index}.png")
        paths[-1].write_bytes(body)
    app = _load_app()
    session, meta = app.load_model(model_dir / "model.onnx")
    app_inputs = app.preprocess(paths, meta)
    app_labels = [label for label, _ in app.classify(session, meta, app_inputs)]
    handler, context = _served_handler(model_dir, tmp_path)
    answers, seen = [], []
    for start in range(0, len(bodies), 16):  # batches as `digits archive` configures them
        batch_answers, batch_inputs = model_inputs(handler, context, [{"body": b} for b in bodies[start : start + 16]])
        answers += batch_answers
        seen.append(batch_inputs)
    assert [a.status for a in answers] == [200] * len(bodies)
    assert np.array_equal(torch.cat(seen).numpy(), app_inputs)
    assert [str(a.body["label"]) for a in answers] == app_labels
