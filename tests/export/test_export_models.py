"""Every registered model exports to files that pass parity and carry what apps and the archive step need."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from digits.export.metadata import sha256_file
from digits.export.parity import BATCH_SIZES
from digits.export.runners import torchscript_backend
from digits.training.checkpoint import load_checkpoint, rebuild_model
from digits.training.models import list_models

CHECK_FIELDS = {
    "backend",
    "ort_optimization",
    "batch_size",
    "samples",
    "max_abs_diff",
    "max_rel_diff",
    "mean_abs_diff",
    "argmax_agreement",
    "accuracy",
}


def test_every_registered_model_has_a_recipe(tiny_training):
    # The tests below are parametrised over the registry; this makes a new model fail here, by name,
    # until it has a tiny-training recipe in conftest.py, instead of training with a guess.
    assert sorted(tiny_training) == list_models()


@pytest.mark.parametrize("model", list_models())
def test_export_writes_the_files_and_parity_passes(exported, model):
    result = exported(model)
    names = {p.name for p in result.model_dir.iterdir()}
    assert {"model.pt", "model.onnx", "parity.json", "parity.md", "export.json"} <= names
    assert not [n for n in names if n.endswith(".data") or n.startswith(".partial")]  # one self-contained ONNX file
    assert result.report.passed, result.report.to_markdown()
    parity = json.loads((result.model_dir / "parity.json").read_text())
    assert parity["passed"] is True and (parity["atol"], parity["rtol"]) == (1e-5, 1e-4)
    # three backends (TorchScript, ORT without and with optimisation), each per batch size and whole set
    assert len(parity["checks"]) == 3 * (len(BATCH_SIZES) + 1)
    assert all(CHECK_FIELDS <= check.keys() and check["argmax_agreement"] == 1.0 for check in parity["checks"])
    assert "PASSED" in (result.model_dir / "parity.md").read_text()


@pytest.mark.parametrize("model", list_models())
def test_export_json_is_what_the_archive_step_reads(exported, model):
    model_dir = exported(model).model_dir
    manifest = json.loads((model_dir / "export.json").read_text())
    meta = load_checkpoint(model_dir / "checkpoint.pt")["metadata"]
    for key in ("model", "mean", "std", "labels", "input_shape", "layout", "test_accuracy"):
        assert manifest[key] == meta[key], key
    assert manifest["checkpoint_sha256"] == sha256_file(model_dir / "checkpoint.pt")
    for fmt, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        assert manifest["files"][fmt] == {"path": name, "sha256": sha256_file(model_dir / name)}
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime", "onnxscript"}


@pytest.mark.parametrize("model", list_models())
def test_onnx_file_has_the_contract_and_its_metadata(exported, model):
    model_dir = exported(model).model_dir
    proto = onnx.load(model_dir / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, _dims(inp), out.name, _dims(out)) == ("input", ["batch", 1, 28, 28], "logits", ["batch", 10])
    props = {p.key: p.value for p in proto.metadata_props}
    assert all(isinstance(v, str) for v in props.values())
    meta = load_checkpoint(model_dir / "checkpoint.pt")["metadata"]
    assert (float(props["mean"]), float(props["std"])) == (meta["mean"], meta["std"])
    assert json.loads(props["labels"]) == meta["labels"] and json.loads(props["input_shape"]) == [1, 28, 28]
    assert (props["layout"], props["model"]) == ("NCHW", model)
    assert float(props["test_accuracy"]) == meta["test_accuracy"]
    assert props["checkpoint_sha256"] == sha256_file(model_dir / "checkpoint.pt")
    assert {"torch_version", "onnx_version", "onnxruntime_version", "onnxscript_version"} <= props.keys()


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("model", list_models())
def test_exported_files_run_in_eval_mode_at_any_batch_size(exported, model):
    model_dir = exported(model).model_dir
    eager = rebuild_model(load_checkpoint(model_dir / "checkpoint.pt"))
    batch = torch.randn(33, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = eager(batch).numpy()
    # twice the same input gives the same answer: no dropout, BatchNorm on running statistics
    scripted = torchscript_backend(model_dir / "model.pt").run
    np.testing.assert_array_equal(scripted(batch.numpy()), scripted(batch.numpy()))
    np.testing.assert_allclose(scripted(batch.numpy()), expected, rtol=1e-4, atol=1e-5)
    session = ort.InferenceSession(model_dir / "model.onnx", providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": batch.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
