"""int8: `digits export --quantize int8` writes a file that is judged, and listed, on its predictions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from digits.cli import main
from export.convert import INT8_FILE, INT8_FORMAT, INT8_PARITY_JSON
from export.parity import INT8_MAX_ACCURACY_DIFF, INT8_MIN_AGREEMENT, Backend, check_prediction_parity

SAMPLES = 1000


def _one_hot(classes: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[classes]


def _parity(labels: np.ndarray, reference: np.ndarray, quantized: np.ndarray):
    """Runners that ignore their input and answer fixed predictions, chunk by chunk."""
    images = np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1, 1)

    def answer(predictions):
        return lambda x: _one_hot(predictions[x[:, 0, 0, 0].astype(int)])

    return check_prediction_parity(answer(reference), Backend("int8", None, answer(quantized)), images, labels)


@pytest.mark.parametrize("changed, passes", [(5, True), (6, False)])
def test_agreement_threshold_is_99_5_percent(changed, passes):
    assert INT8_MIN_AGREEMENT == 0.995
    labels = np.zeros(SAMPLES, dtype=int)
    reference = np.tile(np.arange(10), SAMPLES // 10)  # 10% accurate, so flips between wrong classes
    quantized = reference.copy()
    flip = np.flatnonzero(reference >= 2)[:changed]  # wrong before and after: accuracy stays put
    quantized[flip] = np.where(reference[flip] == 9, 2, reference[flip] + 1)
    result = _parity(labels, reference, quantized)
    assert result.argmax_agreement == pytest.approx(1 - changed / SAMPLES)
    assert result.accuracy == result.reference_accuracy
    assert result.passed is passes
    assert passes or f"{changed} predictions changed" in result.failure


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("moved, passes", [(2, True), (3, False)])
def test_accuracy_may_move_0_2_points_either_way(direction, moved, passes):
    assert INT8_MAX_ACCURACY_DIFF == 0.002
    labels = np.zeros(SAMPLES, dtype=int)
    reference = np.where(np.arange(SAMPLES) < 500, 0, 1)  # 50% accurate
    quantized = reference.copy()
    # `moved` of 1000 is 0.1 points each: right ones turned wrong, or wrong ones turned right
    quantized[np.flatnonzero(reference == (0 if direction < 0 else 1))[:moved]] = 1 if direction < 0 else 0
    result = _parity(labels, reference, quantized)
    assert result.accuracy - result.reference_accuracy == pytest.approx(direction * moved / SAMPLES)
    assert result.passed is passes


def test_int8_export_is_listed_with_its_parity_and_metadata(int8_artifacts):
    model_dir = int8_artifacts / "mlp"
    manifest = json.loads((model_dir / "export.json").read_text())
    parity = json.loads((model_dir / INT8_PARITY_JSON).read_text())
    assert manifest["files"][INT8_FORMAT]["path"] == INT8_FILE
    assert parity["passed"] and parity["samples"] == 10_000 and parity["argmax_agreement"] >= 0.995
    quantized, fp32 = (onnx.load(model_dir / name) for name in (INT8_FILE, "model.onnx"))
    ops = {node.op_type for node in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    # per-channel: one weight scale per output feature of the first layer, not one for the whole tensor
    scales = [t for t in quantized.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1]
    assert any(t.dims[0] == 128 for t in scales)
    assert {p.key: p.value for p in quantized.metadata_props} == {p.key: p.value for p in fp32.metadata_props}


def test_a_failed_int8_parity_exits_1_and_leaves_the_file_unlisted(checkpoint_copy, capsys):
    # mlp trained on 2,000 digits is 80% accurate: int8 changes too many of its borderline predictions
    artifacts = checkpoint_copy("mlp")
    assert main(["export", "mlp", "--artifacts", str(artifacts), "--quantize", "int8"]) == 1
    assert "int8 parity failed" in capsys.readouterr().err
    manifest = json.loads((artifacts / "mlp" / "export.json").read_text())
    assert INT8_FORMAT not in manifest["files"] and "onnx" in manifest["files"]
    assert not json.loads((artifacts / "mlp" / INT8_PARITY_JSON).read_text())["passed"]
