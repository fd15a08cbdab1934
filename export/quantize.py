"""int8: the ONNX file statically quantised with onnxruntime's tools, calibrated on MNIST training digits.

QDQ format (QuantizeLinear/DequantizeLinear pairs around each op, which onnxruntime fuses into integer
kernels such as QLinearConv and QGemm), int8 activations and per-channel int8 weights in 7 bits
(`reduce_range`, see `WEIGHT_LIMIT`), MinMax calibration, and float32 logits (`keep_outputs_float`).
Before quantising, `rewrite_for_int8` lays the same maths out for onnxruntime's int8 kernels: the
convolution that reads the image (1 channel) stays float32 with its ReLU and max pool, and the flatten
before the first fully connected layer reads the feature map channels-last. Its parity with eager is
judged on predictions, not values (see `export.parity.check_prediction_parity`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from . import ExportError
from .onnx import INPUT_NAME

CALIBRATION_SAMPLES = 1024  # training digits; MinMax ranges settle well before this
CALIBRATION_BATCH = 128
CALIBRATION_SEED = 0

# On x86, onnxruntime runs these files' integer products as uint8 activations times int8 weights (it turns
# int8 activations into uint8). Its kernels for CPUs without VNNI (AVX2, and AVX-512 before VNNI) multiply
# with vpmaddubsw, which adds each two neighbouring products in a saturating int16; VNNI's vpdpbusd adds in
# int32. With 8-bit weights a pair reaches 2 * 255 * 127 = 64,770 and is clipped to 32,767, so the same file
# predicts differently on such a CPU (docs/export.md, int8). onnxruntime's quantisation
# guide names the remedy, reduce_range: weights in [-64, 64], so a pair is at most 2 * 255 * 64 = 32,640 and
# the sums are exact on every x86 kernel, VNNI or not.
ACTIVATION_MAX = 255  # uint8, as onnxruntime runs the activations
WEIGHT_LIMIT = 64  # |int8 weight| with reduce_range
INT16_MAX = 32767


def calibration_digits(train_images: np.ndarray, count: int = CALIBRATION_SAMPLES) -> np.ndarray:
    """A seeded random choice of `count` uint8 (N, 28, 28) training digits: the same on every run."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    return train_images[rng.choice(len(train_images), size=min(count, len(train_images)), replace=False)]


def quantize_int8(onnx_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """Writes the int8 QDQ model of `onnx_path` to `out_path`, with the fp32 file's metadata_props.

    Args:
        calibration: (N, 1, 28, 28) float32, normalised as the model expects.
    """
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ExportError(f"calibration digits must be (N, 1, H, W) with N > 0, got shape {calibration.shape}")
    with tempfile.TemporaryDirectory(prefix="digits-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and graph clean-up first, as onnxruntime's quantisation guide asks
        quant_pre_process(str(onnx_path), str(prepared))
        fp32_nodes = rewrite_for_int8(prepared)
        quantize_static(
            str(prepared),
            str(out_path),
            _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,  # exact on CPUs without VNNI too: see WEIGHT_LIMIT
            # S8S8 and U8S8 measured alike: on x86 onnxruntime turns int8 activations into uint8 anyway
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=fp32_nodes,
        )
    keep_outputs_float(out_path)
    check_no_saturation(out_path)
    _copy_metadata(onnx_path, out_path)
    return Path(out_path)


def keep_outputs_float(path: Path) -> list[str]:
    """Removes the QuantizeLinear -> DequantizeLinear pair quantize_static puts on each graph output.

    The pair rounds the logits to 256 levels, so two classes tie where the float model tells them apart and
    argmax takes the first: about half the predictions int8 changed, on the test fixture's mlp. Without it
    onnxruntime's last QGemm writes float32 logits. Returns the outputs that were freed.
    """
    model = onnx.load_model(str(path))
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    freed, removed, constants = [], [], set()
    for output in graph.output:
        dequantize = producers.get(output.name)
        quantize = producers.get(dequantize.input[0]) if dequantize is not None else None
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or quantize is None:
            continue
        if quantize.op_type != "QuantizeLinear" or len(_consumers(graph).get(quantize.output[0], [])) != 1:
            continue
        source = producers.get(quantize.input[0])
        if source is None or len(_consumers(graph).get(quantize.input[0], [])) != 1:
            continue  # a graph input, or a value something else reads too: leave it be
        source.output[list(source.output).index(quantize.input[0])] = output.name
        removed += [quantize, dequantize]
        constants |= {*quantize.input[1:], *dequantize.input[1:]}
        freed.append(output.name)
    if not freed:
        return []
    _replace_nodes(graph, [n for n in graph.node if all(n is not r for r in removed)])
    still_read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name not in constants or t.name in still_read]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    onnx.save_model(model, str(path))
    return freed


def largest_pair_sum(path: Path) -> int:
    """The largest |a1 * w1 + a2 * w2| a uint8 activation pair can make with the file's integer weights.

    The weights are the int8 initializers that DequantizeLinear nodes read for the weight input of a Conv,
    Gemm or MatMul.
    """
    model = onnx.load_model(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    weight_inputs = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    largest = 0
    for node in model.graph.node:
        tensor = weights.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if node.output[0] in weight_inputs and tensor is not None and tensor.data_type == onnx.TensorProto.INT8:
            values = onnx.numpy_helper.to_array(tensor).astype(np.int64)
            largest = max(largest, 2 * ACTIVATION_MAX * int(np.abs(values).max(initial=0)))
    return largest


def check_no_saturation(path: Path) -> None:
    """Refuses an int8 file whose products could be clipped by x86 kernels without VNNI (see WEIGHT_LIMIT)."""
    largest = largest_pair_sum(path)
    if largest > INT16_MAX:
        raise ExportError(
            f"{path.name}: two products can sum to {largest}, beyond int16 ({INT16_MAX}): x86 CPUs without "
            f"VNNI would clip them and predict differently; weights must stay within +-{WEIGHT_LIMIT}"
        )


def rewrite_for_int8(path: Path) -> list[str]:
    """Rewrites the float32 ONNX file at `path` into the same maths laid out for onnxruntime's int8 kernels.

    Two rewrites, each a no-op for a graph without its pattern (the mlp has neither); see their docstrings.
    Without them the int8 cnn ran no faster than fp32 on a VNNI machine; with them it is well ahead
    (`digits bench offline cnn` measures both files: its onnxruntime-int8 / onnxruntime ratios).

    Returns:
        The names of the nodes to leave in float32.
    """
    model = onnx.load_model(str(path))
    flatten_channels_last(model.graph)  # reads the shapes recorded by quant_pre_process: first
    fp32_nodes = keep_image_block_fp32(model.graph)
    onnx.save_model(onnx.shape_inference.infer_shapes(model), str(path))
    return fp32_nodes


def keep_image_block_fp32(graph: onnx.GraphProto) -> list[str]:
    """Puts the MaxPool of the image block ahead of its ReLU; returns the block's nodes, to stay float32.

    The image block is Conv -> Relu -> MaxPool reading the graph input with fewer than 4 channels. onnxruntime
    runs that conv slowly in int8: its fast kernel (MLAS ConvSym) needs input channels in multiples of 4, so
    with 1 channel it takes im2col and a K=9 GEMM per image, most of the int8 cnn's time in a profile, several
    times what fp32 takes for that conv. Widening it to 4 channels of which 3 are zero reaches ConvSym but
    stays slower than fp32. Keeping the block float32 as it is does not help either: onnxruntime's QDQ
    propagation moves conv2's QuantizeLinear above the MaxPool, which then runs as a generic int8 NCHW
    MaxPool, slower still. With the pool ahead of the ReLU (the same maths: max commutes with
    ReLU) the propagation stops at the ReLU, the pool stays a float32 NCHWc one and the ReLU folds into the
    QuantizeLinear.
    """
    block = _image_block(graph)
    if block is None:
        return []
    conv, relu, pool = block
    pooled, activated = relu.output[0], pool.output[0]  # the names keep their places in the graph
    pool.input[0], pool.output[0] = conv.output[0], pooled
    relu.input[0], relu.output[0] = pooled, activated
    nodes = list(graph.node)
    i, j = nodes.index(relu), nodes.index(pool)
    nodes[i], nodes[j] = pool, relu  # keeps the node list in topological order
    _replace_nodes(graph, nodes)
    _forget_shapes(graph, {pooled})  # it was (N, C, H, W); now it is pooled
    return [conv.name, pool.name, relu.name]


def flatten_channels_last(graph: onnx.GraphProto) -> bool:
    """Flattens the last feature map in NHWC order, permuting the following Gemm's weights to match.

    onnxruntime's int8 convs and pools run NHWC, so before an NCHW flatten it transposes the feature map
    back, a tenth of the int8 cnn's time at batch 256 in a profile. An explicit NCHW -> NHWC Transpose
    ahead of the flatten cancels it. Returns whether the graph had such a flatten: (N, C, H, W) ->
    Reshape or Flatten -> Gemm with constant weights, C > 1 and H * W > 1.
    """
    found = _flatten_into_gemm(graph)
    if found is None:
        return False
    flatten, gemm, (channels, height, width) = found
    weights = next(t for t in graph.initializer if t.name == gemm.input[1])
    w = onnx.numpy_helper.to_array(weights)
    trans_b = any(a.name == "transB" and a.i for a in gemm.attribute)
    w_out_in = w if trans_b else w.T  # (out, C*H*W), columns in NCHW order
    w_nhwc = w_out_in.reshape(-1, channels, height, width).transpose(0, 2, 3, 1).reshape(w_out_in.shape)
    weights.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(w_nhwc if trans_b else w_nhwc.T), weights.name))
    nhwc = f"{flatten.input[0]}_nhwc"
    transpose = onnx.helper.make_node("Transpose", [flatten.input[0]], [nhwc], name=nhwc, perm=[0, 2, 3, 1])
    flatten.input[0] = nhwc
    nodes = list(graph.node)
    nodes.insert(nodes.index(flatten), transpose)
    _replace_nodes(graph, nodes)
    return True


def _image_block(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
    """(Conv, Relu, MaxPool) when the graph input feeds a Conv of < 4 input channels, each the next's only input."""
    consumers = _consumers(graph)
    weights = {t.name: t for t in graph.initializer}
    conv = next((n for n in consumers.get(graph.input[0].name, []) if n.op_type == "Conv"), None)
    if conv is None or conv.input[1] not in weights or weights[conv.input[1]].dims[1] >= 4:
        return None
    relu = _only_consumer(consumers, conv, "Relu")
    pool = _only_consumer(consumers, relu, "MaxPool") if relu is not None else None
    if pool is None or len(pool.output) > 1 or relu.output[0] in {o.name for o in graph.output}:
        return None  # MaxPool's optional indices, or a graph output, would not survive the swap
    return conv, relu, pool


def _flatten_into_gemm(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, onnx.NodeProto, tuple[int, ...]] | None:
    """(Reshape or Flatten, Gemm, (C, H, W)) for a flatten of a known-shape 4D map into a constant-weight Gemm."""
    consumers = _consumers(graph)
    weights = {t.name for t in graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    for flatten in (n for n in graph.node if n.op_type in ("Reshape", "Flatten")):
        if any(a.name == "axis" and a.i != 1 for a in flatten.attribute):
            continue  # a Flatten that keeps more than the batch apart
        gemm = _only_consumer(consumers, flatten, "Gemm")
        chw = shapes.get(flatten.input[0], [])[1:]
        # with one channel, or one pixel, NCHW and NHWC orders are the same: nothing to gain
        if gemm is not None and gemm.input[1] in weights and len(chw) == 3 and chw[0] > 1 and chw[1] * chw[2] > 1:
            return flatten, gemm, tuple(chw)
    return None


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _only_consumer(consumers: dict, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
    found = consumers.get(node.output[0], [])
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    graph.ClearField("node")
    graph.node.extend(nodes)


def _forget_shapes(graph: onnx.GraphProto, names: set[str]) -> None:
    kept = [v for v in graph.value_info if v.name not in names]
    graph.ClearField("value_info")
    graph.value_info.extend(kept)


class _CalibrationReader(CalibrationDataReader):
    """Feeds the calibration digits in batches: `get_next()` gives an input feed, then None."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = (
            images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def _copy_metadata(source: Path, target: Path) -> None:
    # the quantiser writes a new model: the normalisation, labels and provenance must travel on with it
    props = {p.key: p.value for p in onnx.load_model(str(source), load_external_data=False).metadata_props}
    quantized = onnx.load_model(str(target))
    onnx.helper.set_model_props(quantized, props)
    onnx.save_model(quantized, str(target), save_as_external_data=False)
