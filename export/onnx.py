"""ONNX: one self-contained file that onnxruntime runs anywhere, carrying its own preprocessing facts.

The graph's contract, which apps rely on: input `input` (batch, 1, 28, 28) float32, normalised; output
`logits` (batch, 10) float32; `batch` is a dynamic dimension.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data
from torch import nn

from . import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


def export_onnx(
    model: nn.Module, path: Path, example: torch.Tensor, metadata_props: dict[str, str], opset: int | None = None
) -> Path:
    """Writes `model` (in the mode the caller chose) to `path` as a single ONNX file.

    Args:
        example: (N, 1, 28, 28) float32 with N >= 2: an example batch of 1 lets the exporter bake the
            batch size into the graph.
        metadata_props: string keys and values stored in the file's `metadata_props`.
        opset: the ai.onnx opset to target; None takes the exporter's default.
    """
    if example.dim() < 1 or len(example) < 2:
        raise ValueError(f"export needs an example batch of at least 2, got shape {tuple(example.shape)}")
    if opset is not None and not 1 <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"--opset {opset}: this onnx package knows opsets 1 to {onnx.defs.onnx_opset_version()}")
    proto = _dynamo_export(model, example, opset)
    _check_opset(proto, opset)
    onnx.helper.set_model_props(proto, metadata_props)
    # weights inside the protobuf: our models are far below the 2 GB limit, and one file is one thing to ship
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return Path(path)


def _dynamo_export(model: nn.Module, example: torch.Tensor, opset: int | None) -> onnx.ModelProto:
    # any batch from 1 up; torch.export specialises dimensions whose example size is 0 or 1, hence a batch of 2
    batch = torch.export.Dim(BATCH_DIM, min=1)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    except torch.onnx.errors.OnnxExporterError as err:
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {str(err).strip().splitlines()[0]}") from None
    return program.model_proto


def _check_opset(proto: onnx.ModelProto, requested: int | None) -> None:
    # The exporter implements opset 18 and up; asked for another, it tries a version conversion and, when
    # that fails, logs it and keeps its own opset. Refuse rather than hand back an opset nobody asked for.
    actual = onnx_opset(proto)
    if requested is not None and actual != requested:
        newest = onnx.defs.onnx_opset_version()
        raise ExportError(
            f"--opset {requested}: the exporter could not convert to it (it produced opset {actual}); "
            f"choose an opset from 18 to {newest}"
        )


def onnx_opset(proto: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def check_onnx_file(path: Path, input_shape: list[int], num_classes: int) -> onnx.ModelProto:
    """Loads an exported file and proves it is one we ship; raises ExportError saying what is wrong.

    Checks: it parses, holds its weights itself, passes `onnx.checker.check_model(full_check=True)`, and
    has the input and output contract above.
    """
    proto = _load_self_contained(Path(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{path} fails the ONNX checker: {_first_line(err)}") from None
    _check_io(proto, path, [BATCH_DIM, *input_shape], [BATCH_DIM, num_classes])
    return proto


def _load_self_contained(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ExportError(f"no ONNX file at {path}")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except DecodeError as err:
        raise ExportError(f"{path} is not an ONNX model: {_first_line(err)}") from None
    external = [t.name for t in proto.graph.initializer if uses_external_data(t)]
    if external:
        raise ExportError(f"{path} keeps {len(external)} weights in external data files; it must be self-contained")
    return proto


def _check_io(proto: onnx.ModelProto, path: Path, input_dims: list, output_dims: list) -> None:
    graph = proto.graph
    for kind, values, name, dims in (
        ("input", graph.input, INPUT_NAME, input_dims),
        ("output", graph.output, OUTPUT_NAME, output_dims),
    ):
        found = [(v.name, _dims(v)) for v in values]
        if found != [(name, dims)]:
            raise ExportError(f"{path}: graph {kind}s are {found}, expected [({name!r}, {dims})]")
        if values[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"{path}: graph {kind} {name!r} is not float32")


def _dims(value: onnx.ValueInfoProto) -> list:
    """A value's shape: ints for fixed dimensions, names for dynamic ones."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
