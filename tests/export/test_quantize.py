"""int8: `digits export --quantize int8` writes a file that is judged, and listed, on its predictions."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from digits.contract import ONNX_INT8, normalise
from digits.export import ExportError
from digits.export.parity import INT8_MAX_ACCURACY_DIFF, INT8_MIN_AGREEMENT, check_prediction_parity
from digits.export.quantize import (
    INT16_MAX,
    WEIGHT_LIMIT,
    check_no_saturation,
    keep_outputs_float,
    largest_pair_sum,
    quantize_int8,
    rewrite_for_int8,
)
from digits.export.runners import Backend
from onnxruntime.quantization.shape_inference import quant_pre_process

from digits.cli import main

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
    parity = json.loads((model_dir / ONNX_INT8.parity_json).read_text())
    assert manifest["files"][ONNX_INT8.name]["path"] == ONNX_INT8.file
    assert parity["passed"] and parity["samples"] == 10_000 and parity["argmax_agreement"] >= 0.995
    quantized, fp32 = (onnx.load(model_dir / name) for name in (ONNX_INT8.file, "model.onnx"))
    ops = {node.op_type for node in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    # per-channel: one weight scale per output feature of the first layer, not one for the whole tensor
    scales = [t for t in quantized.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1]
    assert any(t.dims[0] == 128 for t in scales)
    assert {p.key: p.value for p in quantized.metadata_props} == {p.key: p.value for p in fp32.metadata_props}


def _product_weights(path) -> list[np.ndarray]:
    """The integer weights DequantizeLinear reads for the weight input of the file's Gemm and Conv nodes."""
    model = onnx.load(path)
    weight_inputs = {n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "Conv")}
    initializers = {t.name: t for t in model.graph.initializer}
    return [
        onnx.numpy_helper.to_array(initializers[n.input[0]])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.output[0] in weight_inputs
    ]


def test_int8_weights_leave_no_int16_pair_sum_to_clip(int8_artifacts):
    # x86 kernels without VNNI add two uint8 x int8 products in a saturating int16: 7-bit weights keep every
    # such sum exact, so the file predicts the same on CPUs with and without VNNI
    path = int8_artifacts / "mlp" / ONNX_INT8.file
    weights = _product_weights(path)
    assert len(weights) == 2 and all(w.dtype == np.int8 for w in weights)  # fc1 and fc2
    assert max(int(np.abs(w.astype(int)).max()) for w in weights) == WEIGHT_LIMIT == 64  # per channel: reached
    assert largest_pair_sum(path) == 2 * 255 * 64 <= INT16_MAX


def test_int8_logits_stay_float32(int8_artifacts, tmp_path):
    # rounded to 256 levels the logits tie where the float model's do not, and argmax takes the first class
    path = int8_artifacts / "mlp" / ONNX_INT8.file
    graph = onnx.load(path).graph
    producers = {out: node for node in graph.node for out in node.output}
    assert (
        producers["logits"].op_type == "Gemm" and graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    )
    assert keep_outputs_float(path) == []  # nothing left to free
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops[-1] == "QGemm" and ops.count("QGemm") == 2  # still integer products, float32 out


def test_an_int8_file_whose_pairs_could_clip_is_refused(int8_artifacts, tmp_path):
    # one weight at 127, as quantize_static writes 8-bit weights: 255 * 127 * 2 = 64,770 does not fit int16
    quantized = onnx.load(int8_artifacts / "mlp" / ONNX_INT8.file)
    weights = next(t for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2)
    values = onnx.numpy_helper.to_array(weights).copy()
    values.flat[0] = 127
    weights.CopyFrom(onnx.numpy_helper.from_array(values, weights.name))
    onnx.save(quantized, tmp_path / ONNX_INT8.file)
    assert largest_pair_sum(tmp_path / ONNX_INT8.file) == 64_770
    with pytest.raises(ExportError, match="can sum to 64770, beyond int16 \\(32767\\): x86 CPUs without VNNI"):
        check_no_saturation(tmp_path / ONNX_INT8.file)


OUTLIER = 32.0  # 64 int8 steps of 0.5: every weight under 0.25 becomes 0


def _with_an_outlier_weight(checkpoint: Path) -> None:
    """The same function on MNIST digits, with a weight in each row of fc1 that int8 cannot share a scale with.

    The top-left pixel is background on every digit: its weights grow by OUTLIER and the bias takes back what
    that adds there. Per channel, int8's scale then follows the outlier and the row's other weights (a few
    tenths at most) round to zero, so int8 fails its parity by a wide margin on any CPU.
    """
    payload = torch.load(checkpoint, weights_only=True)
    state, meta = payload["state_dict"], payload["metadata"]
    background = (0 - meta["mean"]) / meta["std"]  # what the normalisation makes of a 0 pixel
    state["fc1.weight"][:, 0] += OUTLIER
    state["fc1.bias"] -= OUTLIER * background
    torch.save(payload, checkpoint)


def test_a_failed_int8_parity_exits_1_and_leaves_the_file_unlisted(checkpoint_copy, capsys):
    artifacts = checkpoint_copy("mlp")
    _with_an_outlier_weight(artifacts / "mlp" / "checkpoint.pt")
    assert main(["export", "mlp", "--artifacts", str(artifacts), "--quantize", "int8"]) == 1
    assert "int8 parity failed" in capsys.readouterr().err
    manifest = json.loads((artifacts / "mlp" / "export.json").read_text())
    assert ONNX_INT8.name not in manifest["files"] and "onnx" in manifest["files"]  # fp32 parity held
    int8 = json.loads((artifacts / "mlp" / ONNX_INT8.parity_json).read_text())
    assert not int8["passed"] and int8["argmax_agreement"] < 0.9  # far from the floor, on any CPU


def _digits(model_dir, images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> (N, 1, 28, 28) float32, normalised as the export's metadata says."""
    meta = json.loads((model_dir / "export.json").read_text())
    return normalise(images, meta["mean"], meta["std"], meta["input_shape"])


def _run(path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def test_the_int8_rewrite_of_the_cnn_is_the_same_maths(exported, mnist, tmp_path):
    prepared, rewritten = tmp_path / "prepared.onnx", tmp_path / "rewritten.onnx"
    quant_pre_process(str(exported("cnn").model_dir / "model.onnx"), str(prepared))
    rewritten.write_bytes(prepared.read_bytes())
    fp32_nodes = rewrite_for_int8(rewritten)
    ops = [node.op_type for node in onnx.load(rewritten).graph.node]
    assert ops[:3] == ["Conv", "MaxPool", "Relu"] and len(fp32_nodes) == 3  # the image block, pool first
    assert ops[ops.index("Reshape") - 1] == "Transpose"  # flattened channels-last
    images = _digits(exported("cnn").model_dir, mnist.test_images[:64])
    np.testing.assert_allclose(_run(rewritten, images), _run(prepared, images), rtol=1e-5, atol=1e-5)


def test_the_int8_rewrite_leaves_the_mlp_alone(exported, tmp_path):
    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(exported("mlp").model_dir / "model.onnx"), str(prepared))
    before = [node.op_type for node in onnx.load(prepared).graph.node]
    assert rewrite_for_int8(prepared) == []
    assert [node.op_type for node in onnx.load(prepared).graph.node] == before


def test_int8_cnn_keeps_its_image_block_in_fp32(exported, mnist, tmp_path):
    # what makes the int8 cnn faster than fp32: no int8 conv on 1 channel, no MaxPool fed int8 in NCHW
    # (onnxruntime's generic kernel, 40 ms), no Transpose back to NCHW before the flatten
    quantized, optimized = tmp_path / "model.int8.onnx", tmp_path / "optimized.onnx"
    calibration = _digits(exported("cnn").model_dir, mnist.train_images[:64])
    quantize_int8(exported("cnn").model_dir / "model.onnx", quantized, calibration)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(optimized).graph.node
    producers = {out: n.op_type for n in nodes for out in n.output}
    assert [n.op_type for n in nodes[:2]] == ["Conv", "MaxPool"] and nodes[0].input[0] == "input"
    assert sum(n.op_type == "QLinearConv" for n in nodes) == 1
    assert not any(n.op_type == "MaxPool" and producers.get(n.input[0]) == "QuantizeLinear" for n in nodes)
    reshape = next(n for n in nodes if n.op_type == "Reshape")
    assert producers[reshape.input[0]] != "Transpose"


QEMU = shutil.which("qemu-x86_64")
# run under QEMU: onnxruntime there sees a Haswell (AVX2, no AVX-512, no VNNI) and picks its kernels for it
_RUN_ONNX = (
    "import sys, numpy as np, onnxruntime as ort; "
    "session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
    "np.save(sys.argv[3], session.run(None, {'input': np.load(sys.argv[2])})[0])"
)


def _run_on_haswell(path: Path, images: np.ndarray, tmp_path: Path) -> np.ndarray:
    np.save(tmp_path / "images.npy", images)
    command = [QEMU, "-cpu", "Haswell", sys.executable, "-c", _RUN_ONNX, str(path), str(tmp_path / "images.npy")]
    subprocess.run([*command, str(tmp_path / "logits.npy")], check=True, capture_output=True, timeout=600)
    return np.load(tmp_path / "logits.npy")


def _with_8_bit_weights(path: Path, target: Path) -> None:
    """The same model with its first layer's weights doubled into 8 bits and their scales halved."""
    model = onnx.load(path)
    initializers = {t.name: t for t in model.graph.initializer}
    weights = initializers["fc1.weight_quantized"]
    doubled = np.clip(onnx.numpy_helper.to_array(weights).astype(np.int16) * 2, -127, 127).astype(np.int8)
    weights.CopyFrom(onnx.numpy_helper.from_array(doubled, weights.name))
    scale = initializers["fc1.weight_scale"]
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) / 2, scale.name))
    onnx.save(model, target)


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64", reason="needs x86-64 and qemu-x86_64 (qemu-user)")
def test_the_int8_file_computes_the_same_on_a_cpu_without_vnni(int8_artifacts, mnist, tmp_path):
    model_dir = int8_artifacts / "mlp"
    images = _digits(model_dir, mnist.test_images[:500])
    path = model_dir / ONNX_INT8.file
    np.testing.assert_array_equal(_run_on_haswell(path, images, tmp_path), _run(path, images))  # bit for bit
    # the control: with 8-bit weights the Haswell's int16 pair sums clip, so QEMU really ran those kernels
    eight_bits = tmp_path / "eight-bits.onnx"
    _with_8_bit_weights(path, eight_bits)
    assert largest_pair_sum(eight_bits) == 2 * 255 * 127
    assert not np.array_equal(_run_on_haswell(eight_bits, images, tmp_path), _run(eight_bits, images))


def _copy_of(int8_artifacts, tmp_path):
    return Path(shutil.copytree(int8_artifacts, tmp_path / "artifacts"))


def test_verify_rechecks_the_int8_file(int8_artifacts, tmp_path, capsys):
    artifacts = _copy_of(int8_artifacts, tmp_path)
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 0
    assert "onnxruntime-int8" in capsys.readouterr().out
    # zero the int8 weights of the first layer: the file still loads, its predictions are garbage
    path = artifacts / "mlp" / ONNX_INT8.file
    quantized = onnx.load(path)
    weights = next(t for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2)
    weights.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(weights.dims), np.int8), weights.name))
    onnx.save(quantized, path)
    assert main(["verify", "mlp", "--artifacts", str(artifacts)]) == 1
    assert "int8 parity failed" in capsys.readouterr().err
    assert not json.loads((artifacts / "mlp" / ONNX_INT8.parity_json).read_text())["passed"]


def test_exporting_again_without_quantize_removes_the_old_int8_file(int8_artifacts, tmp_path, capsys):
    artifacts = _copy_of(int8_artifacts, tmp_path)
    assert main(["export", "mlp", "--artifacts", str(artifacts)]) == 0
    assert f"removed {artifacts / 'mlp' / ONNX_INT8.file}" in capsys.readouterr().out
    assert (
        not (artifacts / "mlp" / ONNX_INT8.file).exists() and not (artifacts / "mlp" / ONNX_INT8.parity_json).exists()
    )
    assert ONNX_INT8.name not in json.loads((artifacts / "mlp" / "export.json").read_text())["files"]
