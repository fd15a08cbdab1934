"""The parity check passes good exports and fails the broken ones a user could plausibly produce."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from digits.contract import normalise
from digits.export.convert import example_input
from digits.export.metadata import onnx_metadata_props
from digits.export.onnx import export_onnx
from digits.export.parity import check_parity, compare
from digits.export.runners import Backend, eager_runner, file_backends, onnxruntime_backend
from digits.export.torchscript import export_torchscript
from digits.training.checkpoint import load_checkpoint, rebuild_model
from onnx import numpy_helper

SAMPLES = 300


@pytest.fixture(scope="module")
def digits(mnist):
    """(300, 1, 28, 28) normalised real test digits and their labels."""
    return normalise(mnist.test_images[:SAMPLES], 0.1307, 0.3081, [1, 28, 28]), mnist.test_labels[:SAMPLES]


def _parity(model_dir, torchscript=None, onnx_file=None, digits=None):
    eager = rebuild_model(load_checkpoint(model_dir / "checkpoint.pt"))
    backends = file_backends(torchscript or model_dir / "model.pt", onnx_file or model_dir / "model.onnx")
    return check_parity(eager_runner(eager), backends, *digits)


def _by_backend(report):
    """(backend, ort_optimization) -> [passed per check]"""
    result = {}
    for check in report.checks:
        result.setdefault((check.backend, check.ort_optimization), []).append(check.passed)
    return result


def test_a_model_exported_in_training_mode_fails(trained, tmp_path, digits):
    checkpoint = trained("mlp") / "mlp" / "checkpoint.pt"
    payload = load_checkpoint(checkpoint)
    model = rebuild_model(payload).train()  # the bug: dropout stays active in the exported files
    example = example_input([1, 28, 28])
    export_torchscript(model, tmp_path / "model.pt", example)
    with pytest.warns(UserWarning, match="training mode"):  # torch's exporter notices; nothing stops it
        export_onnx(model, tmp_path / "model.onnx", example, onnx_metadata_props(payload["metadata"], "0" * 64))
    report = _parity(checkpoint.parent, tmp_path / "model.pt", tmp_path / "model.onnx", digits)
    assert not report.passed
    checks = _by_backend(report)
    assert not any(checks[("torchscript", None)])
    assert not any(checks[("onnxruntime", "ORT_DISABLE_ALL")])
    # why both optimisation levels run: the optimiser deletes the Dropout node and hides the bug
    assert all(checks[("onnxruntime", "ORT_ENABLE_ALL")])
    assert any("onnxruntime (ORT_DISABLE_ALL) at batch size 17" in f for f in report.failures)


def test_an_onnx_file_with_a_tampered_weight_fails(exported, tmp_path, digits):
    model_dir = exported("cnn").model_dir
    proto = onnx.load(model_dir / "model.onnx")
    (bias,) = [t for t in proto.graph.initializer if list(t.dims) == [10]]  # the output layer's
    values = numpy_helper.to_array(bias).copy()
    values[3] += 1e-3  # one number nudged: every sample's logit 3 moves by 1e-3, argmax rarely
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, tmp_path / "model.onnx")
    report = _parity(model_dir, onnx_file=tmp_path / "model.onnx", digits=digits)
    checks = _by_backend(report)
    assert all(checks[("torchscript", None)])
    assert not any(checks[("onnxruntime", "ORT_DISABLE_ALL")] + checks[("onnxruntime", "ORT_ENABLE_ALL")])
    failed = next(c for c in report.checks if not c.passed and c.samples == SAMPLES)
    assert len(failed.worst_index) == 2 and failed.worst_value != failed.worst_reference
    assert f"logits[{failed.worst_index[0]}, {failed.worst_index[1]}]" in failed.failure


def test_a_batch_size_baked_in_at_export_fails_instead_of_crashing(trained, tmp_path, digits):
    model_dir = trained("mlp") / "mlp"
    eager = rebuild_model(load_checkpoint(model_dir / "checkpoint.pt"))
    program = torch.onnx.export(
        eager,
        (example_input([1, 28, 28]),),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        external_data=False,
        verbose=False,
    )
    program.save(tmp_path / "fixed.onnx")
    backend = onnxruntime_backend(tmp_path / "fixed.onnx", "ORT_ENABLE_ALL")
    report = check_parity(eager_runner(eager), [backend], *digits)
    assert [c.passed for c in report.checks] == [False, True, False, False, False]  # only batch 2 runs
    assert "at batch size 17" in report.failures[1] and report.checks[2].max_abs_diff is None


def _backend(logits: np.ndarray) -> Backend:
    return Backend("onnxruntime", "ORT_DISABLE_ALL", lambda images: logits[: len(images)])


def test_tolerance_is_elementwise_atol_plus_rtol_times_reference():
    expected = np.array([[10.0, 0.0, -2.0], [1.0, 5.0, 0.5]])
    labels = np.array([0, 1])
    inside = expected + np.array([[10.0 * 1e-4 + 0.9e-5, 0.9e-5, 0.0], [0.0, 0.0, 0.0]])
    outside = expected + np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.5 * 1e-4 + 1.1e-5]])
    check = compare(_backend(inside), expected, inside, labels, 2, atol=1e-5, rtol=1e-4)
    assert check.passed and check.tolerance_used == pytest.approx((1e-3 + 0.9e-5) / (1e-5 + 1e-3), rel=1e-6)
    check = compare(_backend(outside), expected, outside, labels, 2, atol=1e-5, rtol=1e-4)
    assert not check.passed and check.worst_index == [1, 2] and check.worst_reference == 0.5
    assert check.tolerance_used == pytest.approx((0.5e-4 + 1.1e-5) / (1e-5 + 0.5e-4), rel=1e-6)
    assert "logits[1, 2]" in check.failure and "batch size 2" in check.failure
    assert compare(_backend(outside), expected, outside, labels, 2, atol=1e-4, rtol=1e-4).passed


def test_a_changed_prediction_fails_even_within_tolerance():
    expected = np.array([[1.0, 1.0 + 1e-6], [3.0, 0.0]])
    swapped = np.array([[1.0 + 1e-6, 1.0], [3.0, 0.0]])  # within 1e-5 everywhere, argmax flips on sample 0
    check = compare(_backend(swapped), expected, swapped, np.array([1, 0]), 2, atol=1e-5, rtol=1e-4)
    assert not check.passed and check.argmax_agreement == 0.5
    assert "argmax differs on 1 of 2 samples (first: sample 0)" in check.failure and "logits[" not in check.failure


def test_bad_arguments_fail_loudly(digits):
    images, labels = digits
    run = _backend(np.zeros((SAMPLES, 10), np.float32)).run
    with pytest.raises(ValueError, match="non-negative"):
        check_parity(run, [], images, labels, atol=-1.0)
    with pytest.raises(ValueError, match="batch size 256 needs"):
        check_parity(run, [], images[:100], labels[:100])
