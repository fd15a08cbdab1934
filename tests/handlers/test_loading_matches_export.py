"""The handler's loading checks refuse what export's refuse, for the same reason.

The handler ships alone inside a `.mar`, so handlers/digit_model.py keeps its own copy of the checks that
export/pt2.py and export/runners.py make before loading a `.pt2` package or an ONNX file. Each forged or
foreign file here goes through both production paths (the handler's `load_predictor`, export's `load_pt2` and
`onnxruntime_backend`), and both must refuse it naming the same reason.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import digit_model
import onnx
import pytest
import torch
from digit_model import ModelLoadError
from digits.contract import PT2_META_ENTRY
from digits.export import ExportError
from digits.export.pt2 import load_pt2 as export_load_pt2
from digits.export.runners import onnxruntime_backend
from onnx import TensorProto, helper

CPU = torch.device("cpu")


def refusals(path: Path, export_load) -> tuple[str, str]:
    """What export's loader and the handler's say when each refuses `path`."""
    with pytest.raises(ExportError) as by_export:
        export_load(path)
    with pytest.raises(ModelLoadError) as by_handler:
        digit_model.load_predictor(path, CPU)
    return str(by_export.value), str(by_handler.value)


def with_facts(package: Path, copy: Path, facts: bytes | None) -> Path:
    """The package with its facts entry replaced by `facts` (None: removed), its compiled code untouched."""
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(copy, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("/" + PT2_META_ENTRY):
                target.writestr(item, source.read(item))
            elif facts is not None:
                target.writestr(item, facts)
    return copy


def merged_facts(package: Path, **changes) -> bytes:
    with zipfile.ZipFile(package) as source:
        [name] = [n for n in source.namelist() if n.endswith("/" + PT2_META_ENTRY)]
        return json.dumps({**json.loads(source.read(name)), **changes}).encode()


PT2_FORGERIES = {
    # name: (facts entry from the real package -> the forged entry, the reason both must give)
    "another torch": (lambda real: merged_facts(real, torch_version="2.0.0"), "compiled by torch 2.0.0"),
    "another device": (lambda real: merged_facts(real, device="cuda", target="sm_90"), "compiled for cuda"),
    "another cpu isa": (lambda real: merged_facts(real, target="neon"), "compiled for cpu neon"),
    "no facts": (lambda real: None, f"carries no {PT2_META_ENTRY}"),
    "facts not json": (lambda real: b'{"torch_version": ', f"{PT2_META_ENTRY} is not JSON"),
    "facts a list": (lambda real: b"[]", f"{PT2_META_ENTRY} lacks torch_version, device, target"),
    "facts lacking keys": (
        lambda real: json.dumps({"device": "cpu", "target": "avx2"}).encode(),
        f"{PT2_META_ENTRY} lacks torch_version, min_batch, max_batch",
    ),
}


@pytest.mark.parametrize("forgery", PT2_FORGERIES)
def test_a_forged_pt2_is_refused_by_both_for_the_same_reason(model_dirs, tmp_path, forgery) -> None:
    forge, reason = PT2_FORGERIES[forgery]
    real = model_dirs["pt2"] / "model.pt2"
    package = with_facts(real, tmp_path / "model.pt2", forge(real))
    by_export, by_handler = refusals(package, lambda path: export_load_pt2(path, CPU))
    assert reason in by_export and reason in by_handler, (by_export, by_handler)


def test_a_file_that_is_no_package_is_refused_by_both_for_the_same_reason(tmp_path) -> None:
    package = tmp_path / "model.pt2"
    package.write_bytes(b"an ELF, a pickle, anything but a zip")
    by_export, by_handler = refusals(package, lambda path: export_load_pt2(path, CPU))
    assert "is not a .pt2 package" in by_export and "is not a .pt2 package" in by_handler


def two_inputs_model(path: Path) -> Path:
    """A valid ONNX model that adds two (N, 1, 28, 28) inputs: not a digit model."""
    shape = ["batch", 1, 28, 28]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("input", "other")]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Add", ["input", "other"], ["logits"])], "two", inputs, [output])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def not_protobuf(path: Path) -> Path:
    path.write_bytes(b"not an onnx model at all")
    return path


ONNX_FORGERIES = {
    # name: (the file, written into a folder; the reason both must give)
    "not protobuf": (not_protobuf, "INVALID_PROTOBUF"),
    "two inputs": (two_inputs_model, "takes 2 inputs; a digit model takes one"),
}


@pytest.mark.parametrize("forgery", [*ONNX_FORGERIES, "truncated"])
def test_a_forged_onnx_file_is_refused_by_both_for_the_same_reason(model_dirs, tmp_path, forgery) -> None:
    path = tmp_path / "model.onnx"
    if forgery == "truncated":
        real = (model_dirs["onnx"] / "model.onnx").read_bytes()
        path.write_bytes(real[: len(real) // 2])
        reason = "INVALID_PROTOBUF"
    else:
        write, reason = ONNX_FORGERIES[forgery]
        write(path)
    by_export, by_handler = refusals(path, lambda path: onnxruntime_backend(path, "ORT_ENABLE_ALL"))
    assert reason in by_export and reason in by_handler, (by_export, by_handler)
