"""examples/onnx_app.py classifies real digit images with nothing but onnxruntime, numpy, Pillow and the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from export.parity import normalise
from training.samples import drawn_large

APP = Path(__file__).resolve().parents[2] / "examples" / "onnx_app.py"


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
