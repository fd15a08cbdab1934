"""`digits export` and `digits verify` as a user meets them: a table on success, one line and exit 2 on bad input."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from digits.export import convert
from digits.training.checkpoint import load_checkpoint, rebuild_model, save_checkpoint
from onnx import numpy_helper

from digits.cli import main


def _one_error_line(capsys, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"digits {command}: error: ")
    return lines[0]


def _nudge_output_bias(onnx_path) -> None:
    proto = onnx.load(onnx_path)
    (bias,) = [t for t in proto.graph.initializer if list(t.dims) == [10]]
    values = numpy_helper.to_array(bias).copy()
    values[3] += 1e-3
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, onnx_path)


def test_export_then_verify_prints_the_parity_table(checkpoint_copy, capsys):
    artifacts = checkpoint_copy("mlp")
    assert main(["export", "mlp", "--artifacts", str(artifacts)]) == 0
    out = capsys.readouterr().out
    assert "# Parity: mlp PASSED" in out and "on 10000 MNIST test digits" in out
    assert out.count("| onnxruntime |") == 10 and out.count("| torchscript |") == 5
    assert (artifacts / "mlp" / "export.json").is_file()
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 0
    assert "# Parity: mlp PASSED" in capsys.readouterr().out


def test_verify_exits_1_and_names_the_failure_when_parity_fails(exported_copy, capsys):
    artifacts = exported_copy("mlp")
    _nudge_output_bias(artifacts / "mlp" / "model.onnx")
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 1
    captured = capsys.readouterr()
    assert "# Parity: mlp FAILED" in captured.out and "logits[0, 3]" in captured.out
    assert "parity failed in 10 of 15 checks" in captured.err
    assert "FAILED" in (artifacts / "mlp" / "parity.md").read_text()


def test_no_checkpoint_says_which_train_command_to_run(tmp_path, capsys):
    assert main(["export", "cnn", "--artifacts", str(tmp_path)]) == 2
    line = _one_error_line(capsys, "export")
    assert f"no checkpoint at {tmp_path}/cnn/checkpoint.pt" in line and f"digits train cnn --out {tmp_path}" in line


def test_an_unknown_model_name_lists_the_known_ones(tmp_path, capsys):
    assert main(["export", "vgg", "--artifacts", str(tmp_path)]) == 2
    line = _one_error_line(capsys, "export")
    assert "unknown model 'vgg'" in line and "known: cnn, mlp, resnet18" in line


def test_a_checkpoint_of_an_unknown_architecture(trained, tmp_path, capsys):
    payload = load_checkpoint(trained("mlp") / "mlp" / "checkpoint.pt")
    (tmp_path / "vgg").mkdir()
    save_checkpoint(tmp_path / "vgg" / "checkpoint.pt", rebuild_model(payload), payload["metadata"] | {"model": "vgg"})
    assert main(["export", "vgg", "--artifacts", str(tmp_path)]) == 2
    line = _one_error_line(capsys, "export")
    assert "unknown model 'vgg'" in line and "cnn, mlp, resnet18" in line


def test_a_checkpoint_of_another_model(trained, tmp_path, capsys):
    (tmp_path / "cnn").mkdir()
    (tmp_path / "cnn" / "checkpoint.pt").write_bytes((trained("mlp") / "mlp" / "checkpoint.pt").read_bytes())
    assert main(["export", "cnn", "--artifacts", str(tmp_path)]) == 2
    assert "holds a 'mlp' checkpoint, not 'cnn'" in _one_error_line(capsys, "export")


def test_an_onnx_file_that_fails_the_checker(exported_copy, capsys):
    artifacts = exported_copy("mlp")
    proto = onnx.load(artifacts / "mlp" / "model.onnx")
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save(proto, artifacts / "mlp" / "model.onnx")
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 2
    assert "model.onnx fails the ONNX checker" in _one_error_line(capsys, "verify")


def test_a_file_that_is_not_onnx(exported_copy, capsys):
    artifacts = exported_copy("mlp")
    (artifacts / "mlp" / "model.onnx").write_bytes(b"\x00not an onnx model\xff" * 10)
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 2
    assert "model.onnx is not an ONNX model" in _one_error_line(capsys, "verify")


def test_verify_before_export_says_to_export(checkpoint_copy, capsys):
    artifacts = checkpoint_copy("mlp")
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 2
    assert f"run `digits export mlp --artifacts {artifacts}` first" in _one_error_line(capsys, "verify")


def test_verify_after_retraining_says_the_files_are_stale(exported_copy, capsys):
    artifacts = exported_copy("mlp")
    payload = load_checkpoint(artifacts / "mlp" / "checkpoint.pt")
    model = rebuild_model(payload)
    with torch.no_grad():
        model.fc2.bias[0] += 1.0
    save_checkpoint(artifacts / "mlp" / "checkpoint.pt", model, payload["metadata"])
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 2
    assert "exported from another checkpoint" in _one_error_line(capsys, "verify")


def test_an_unwritable_output_folder(checkpoint_copy, capsys, monkeypatch):
    artifacts = checkpoint_copy("mlp")
    (artifacts / "mlp").chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: make the probe meet what a user would
        monkeypatch.setattr(convert.tempfile, "TemporaryFile", _permission_denied)
    try:
        assert main(["export", "mlp", "--artifacts", str(artifacts)]) == 2
    finally:
        (artifacts / "mlp").chmod(0o755)
    line = _one_error_line(capsys, "export")
    assert f"cannot write to {artifacts}/mlp: Permission denied" in line
    assert sorted(p.name for p in (artifacts / "mlp").iterdir()) == ["checkpoint.pt"]


def _permission_denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


def test_an_opset_outside_onnx(checkpoint_copy, capsys):
    artifacts = checkpoint_copy("mlp")
    assert main(["export", "mlp", "--artifacts", str(artifacts), "--opset", "99"]) == 2
    assert "--opset 99: this onnx package knows opsets 1 to" in _one_error_line(capsys, "export")


def test_an_opset_the_exporter_cannot_reach_is_refused_not_replaced(checkpoint_copy, capsys):
    # asked for opset 7, torch's exporter logs a failed conversion and hands back opset 18
    artifacts = checkpoint_copy("mlp")
    assert main(["export", "mlp", "--artifacts", str(artifacts), "--opset", "7"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("digits export: error: --opset 7: the exporter could not convert to it")
    assert not (artifacts / "mlp" / "model.onnx").exists() and not (artifacts / "mlp" / "export.json").exists()


@pytest.mark.parametrize("command", ["export", "verify"])
def test_negative_tolerances_are_refused(exported_copy, capsys, command):
    artifacts = exported_copy("mlp")
    assert main([command, "mlp", "--artifacts", str(artifacts), "--atol", "-1"]) == 2
    assert "tolerances must be non-negative" in _one_error_line(capsys, command)


@pytest.mark.parametrize(
    ("value", "message"),
    [("0.5", "metadata says mean=0.5, the checkpoint 0.1307"), ("zero", "metadata_props mean='zero' is not JSON")],
)
def test_onnx_metadata_that_would_mislead_an_app(exported_copy, capsys, value, message):
    artifacts = exported_copy("mlp")
    proto = onnx.load(artifacts / "mlp" / "model.onnx")
    onnx.helper.set_model_props(proto, {p.key: p.value for p in proto.metadata_props} | {"mean": value})
    onnx.save(proto, artifacts / "mlp" / "model.onnx")
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 2
    assert message in _one_error_line(capsys, "verify")
