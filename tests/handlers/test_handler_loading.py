"""Loading an archive's model: metadata, digest, format, device, threads; each failure says what is wrong."""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import digit_model
import numpy as np
import pytest
import torch
from digit_handler import DigitHandler
from digit_model import ModelLoadError, choose_device
from handler_helpers import (
    MODEL_FILES,
    TinyNet,
    make_context,
    model_inputs,
    png_bytes,
    run_batch,
    sha256_of,
    write_model_dir,
)
from torch import nn


def initialize(directory: Path, **context_args) -> DigitHandler:
    handler = DigitHandler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, and still the way
        handler.initialize(make_context(directory, **context_args))
    return handler


@pytest.fixture(params=sorted(MODEL_FILES))
def model_dir(request: pytest.FixtureRequest, model_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of an archive-shaped model dir of each format, free to break."""
    return Path(shutil.copytree(model_dirs[request.param], tmp_path / request.param))


def edit_metadata(directory: Path, **changes) -> None:
    path = directory / "digits_meta.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps({key: value for key, value in meta.items() if value is not ...}))


def test_both_formats_agree_with_the_eager_model(model_dirs, tiny_model, mnist_test) -> None:
    digits = mnist_test[0][:16]
    expected = torch.softmax(
        tiny_model(torch.from_numpy((digits / 255.0 - 0.1307) / 0.3081).float()[:, None]), 1
    ).detach()
    for fmt, directory in model_dirs.items():
        handler = initialize(directory)
        answers = run_batch(handler, make_context(directory), [{"body": png_bytes(d)} for d in digits])
        got = torch.tensor([a.body["probabilities"] for a in answers], dtype=torch.float64)
        assert torch.allclose(got, expected.double(), atol=1e-5), fmt


def test_normalisation_comes_from_the_metadata(model_dir, mnist_test) -> None:
    edit_metadata(model_dir, mean=0.5, std=2.0, labels=[f"class-{i}" for i in range(10)])
    handler = initialize(model_dir)
    [answer], seen = model_inputs(handler, make_context(model_dir), [{"body": png_bytes(mnist_test[0][0])}])
    expected = (torch.from_numpy(mnist_test[0][0].astype(np.float32)) / 255.0 - 0.5) / 2.0
    assert torch.equal(seen[0, 0], expected)
    assert answer.body["label"].startswith("class-")  # labels that are not digits stay strings


def test_missing_metadata_fails_the_load(model_dir) -> None:
    (model_dir / "digits_meta.json").unlink()
    with pytest.raises(ModelLoadError, match=r"digits_meta\.json is missing"):
        initialize(model_dir)


def test_unparsable_metadata_fails_the_load(model_dir) -> None:
    (model_dir / "digits_meta.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        initialize(model_dir)


def test_metadata_missing_keys_are_all_named(model_dir) -> None:
    edit_metadata(model_dir, mean=..., labels=...)
    with pytest.raises(ModelLoadError, match="missing keys: mean, labels"):
        initialize(model_dir)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"mean": "0.1307"}, "mean"),
        ({"std": 0}, "std"),
        ({"std": float("nan")}, "std"),
        ({"labels": []}, "labels"),
        ({"labels": [0, 1]}, "labels"),
        ({"input_shape": [3, 28, 28]}, "input_shape"),
        ({"input_shape": [1, 28]}, "input_shape"),
        ({"layout": "NHWC"}, "layout"),
        ({"format": "pickle"}, "format"),
        ({"sha256": "ABC"}, "sha256"),
    ],
)
def test_invalid_metadata_values_fail_the_load(model_dir, changes: dict, named: str) -> None:
    edit_metadata(model_dir, **changes)
    with pytest.raises(ModelLoadError, match=rf"invalid: .*{named} is"):
        initialize(model_dir)


def test_sha256_mismatch_names_both_digests(model_dir) -> None:
    meta = json.loads((model_dir / "digits_meta.json").read_text())
    model_path = model_dir / meta["model_file"]
    model_path.write_bytes(model_path.read_bytes() + b"\0")
    actual = digit_model.hashlib.sha256(model_path.read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match=rf"SHA-256 {actual}, but digits_meta\.json expects {meta['sha256']}"):
        initialize(model_dir)


def test_a_damaged_model_file_vouched_for_by_its_digest_fails_the_load(model_dir) -> None:
    """The digest matches (the archive was built around broken bytes): the runtime's failure is named."""
    meta = json.loads((model_dir / "digits_meta.json").read_text())
    model_path = model_dir / meta["model_file"]
    damaged = model_path.read_bytes()
    damaged = damaged[: len(damaged) // 2]
    model_path.write_bytes(damaged)
    edit_metadata(model_dir, sha256=digit_model.hashlib.sha256(damaged).hexdigest())
    with pytest.raises(ModelLoadError, match=rf"model file {model_path.name} cannot be loaded as {meta['format']} \("):
        initialize(model_dir)


def test_model_file_falls_back_to_the_metadata(model_dir) -> None:
    handler = initialize(model_dir, manifest={"model": {"modelName": "tiny"}})
    assert Path(handler.model_pt_path).name == json.loads((model_dir / "digits_meta.json").read_text())["model_file"]


def test_missing_model_file_fails_the_load(model_dir) -> None:
    for path in model_dir.glob("model.*"):
        path.unlink()
    with pytest.raises(ModelLoadError, match="missing from the archive"):
        initialize(model_dir)


def test_format_must_match_the_extension(model_dir) -> None:
    fmt = json.loads((model_dir / "digits_meta.json").read_text())["format"]
    edit_metadata(model_dir, format="onnx" if fmt == "torchscript" else "torchscript")
    with pytest.raises(ModelLoadError, match=f"is {fmt} by its extension"):
        initialize(model_dir)


def test_a_model_with_the_wrong_outputs_fails_the_load(tmp_path) -> None:
    directory = write_model_dir(tmp_path / "wrong", nn.Sequential(nn.Flatten(), nn.Linear(784, 3)), "torchscript")
    with pytest.raises(ModelLoadError, match=r"scores of shape \[2, 3\]; expected \[2, 10\]"):
        initialize(directory)


def test_a_model_with_the_wrong_input_fails_the_load(tmp_path) -> None:
    directory = write_model_dir(tmp_path / "wrong", TinyNet(), "onnx")
    edit_metadata(directory, input_shape=[1, 32, 32])
    with pytest.raises(ModelLoadError, match="warm-up forward pass"):
        initialize(directory)


def test_onnx_threads_follow_torch(monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    options = digit_model.session_options(ort)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)


# --- device choice, with a stand-in context -------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu_id", "cuda", "device"),
    [
        (None, True, "cpu"),
        (None, False, "cpu"),
        (0, True, "cuda:0"),
        (1, True, "cuda:1"),
        ("2", True, "cuda:2"),
        (0, False, "cpu"),
    ],
)
def test_device_choice(monkeypatch, caplog, gpu_id, cuda: bool, device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with caplog.at_level(logging.INFO, logger="digit_model"):
        assert choose_device(gpu_id) == torch.device(device)
    assert f"running on {device}" in caplog.text
    if gpu_id is not None and not cuda:
        assert "CUDA is unavailable" in caplog.text


def test_handler_takes_the_gpu_torchserve_assigns(monkeypatch, model_dirs, caplog, mnist_test) -> None:
    """With CUDA claimed but absent, an ONNX worker on gpu_id 1 picks cuda:1, warns, and serves on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO):
        handler = initialize(model_dirs["onnx"], gpu_id=1)
    assert handler.device == torch.device("cuda:1")
    assert "running on cuda:1 (TorchServe assigned gpu_id 1)" in caplog.text
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "install onnxruntime-gpu" in caplog.text
    [answer] = run_batch(handler, make_context(model_dirs["onnx"]), [{"body": png_bytes(mnist_test[0][0])}])
    assert answer.status == 200


def test_handler_stays_on_cpu_without_a_gpu_id(model_dirs) -> None:
    assert initialize(model_dirs["torchscript"]).device == torch.device("cpu")


def test_handler_undoes_the_tf32_switch_of_torchserve(model_dirs) -> None:
    # importing BaseHandler on an Ampere+ GPU sets "high" (TF32); the served model must stay the exported one
    previous = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        initialize(model_dirs["torchscript"])
        assert torch.get_float32_matmul_precision() == "highest"
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous[1:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", sorted(MODEL_FILES))
def test_serves_on_cuda(model_dirs, tiny_model, mnist_test, caplog, tmp_path, fmt: str) -> None:
    import onnxruntime as ort

    # a .pt2 package is compiled for one device: the GPU worker gets one compiled for CUDA
    directory = write_model_dir(tmp_path / fmt, tiny_model, fmt, device="cuda") if fmt == "pt2" else model_dirs[fmt]
    with caplog.at_level(logging.INFO):
        handler = initialize(directory, gpu_id=0)
    assert handler.device == torch.device("cuda:0")
    if fmt == "onnx" and "CUDAExecutionProvider" in ort.get_available_providers():
        assert "providers ['CUDAExecutionProvider'" in caplog.text
    digits = mnist_test[0][:8]
    answers = run_batch(handler, make_context(directory), [{"body": png_bytes(d)} for d in digits])
    expected = torch.softmax(
        tiny_model(torch.from_numpy((digits / 255.0 - 0.1307) / 0.3081).float()[:, None]), 1
    ).detach()
    got = torch.tensor([a.body["probabilities"] for a in answers], dtype=torch.float64)
    # full float32 on the GPU (keep_fp32_exact): within the export's parity tolerance of the CPU model
    assert torch.allclose(got, expected.double(), atol=1e-5)


def test_answers_are_json_with_seven_significant_digits(model_dir, mnist_test) -> None:
    labels = [f'say "{i}" \\ ü, 100% %s' for i in range(10)]  # labels JSON must escape, and %-signs
    edit_metadata(model_dir, labels=labels)
    handler = initialize(model_dir)
    context = make_context(model_dir)
    rows = [{"body": png_bytes(d)} for d in mnist_test[0][:16]]
    answers, seen = model_inputs(handler, context, rows)  # run_batch parses each body with json.loads
    scores = handler.model(seen)
    expected = torch.softmax(scores.double(), dim=1)
    for answer, row in zip(answers, expected, strict=True):
        got = torch.tensor(answer.body["probabilities"], dtype=torch.float64)
        assert torch.allclose(got, row, rtol=5e-7, atol=0)  # seven significant digits
        assert answer.body["confidence"] == max(answer.body["probabilities"])
        index = int(row.argmax())
        assert answer.body["label"] == labels[index]


def test_the_pt2_facts_the_handler_reads_are_the_ones_export_writes() -> None:
    from digits.export import pt2  # the handler keeps its own copy: it ships alone inside the archive

    assert digit_model.pt2_targets(torch.device("cpu")) == pt2.supported_targets(torch.device("cpu"))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"torch_version": "2.0.0"}, "compiled by torch 2.0.0; this worker runs torch " + torch.__version__),
        ({"device": "cuda", "target": "sm_90"}, "compiled for cuda; this worker runs on cpu"),
        ({"target": "neon"}, "compiled for cpu neon; this worker's cpu runs"),
    ],
)
def test_a_pt2_compiled_elsewhere_is_refused_by_name(model_dirs, tmp_path, forge_pt2, changes, named) -> None:
    directory = shutil.copytree(model_dirs["pt2"], tmp_path / "pt2")
    forge_pt2(model_dirs["pt2"] / "model.pt2", directory / "model.pt2", **changes)
    meta = json.loads((directory / "digits_meta.json").read_text())
    meta["sha256"] = sha256_of(directory / "model.pt2")  # vouched for: the refusal must come from the facts
    (directory / "digits_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=re.escape(named)):
        initialize(directory)


def test_a_pt2_without_its_facts_is_refused(model_dirs, tmp_path) -> None:
    package = tmp_path / "model.pt2"
    with zipfile.ZipFile(model_dirs["pt2"] / "model.pt2") as source, zipfile.ZipFile(package, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("extra/digits_meta.json"):
                target.writestr(item, source.read(item))
    with pytest.raises(ModelLoadError, match="carries no extra/digits_meta.json"):
        digit_model.read_pt2_facts(package)


def test_a_pt2_takes_a_batch_past_its_range_in_chunks_and_refuses_an_empty_one(model_dirs) -> None:
    # load_pt2 itself, not load_predictor: what a GPU worker gets, without the CPU's smaller chunks
    predict = digit_model.load_pt2(model_dirs["pt2"] / "model.pt2", torch.device("cpu"))
    with pytest.raises(ValueError, match="model.pt2 takes batches of 1 to 4096 digits, got 0"):
        predict(torch.zeros(0, 1, 28, 28))
    digits = torch.rand(4097, 1, 28, 28)
    scores = predict(digits)
    assert scores.shape == (4097, 10)
    assert torch.allclose(scores[-1:], predict(digits[-1:]), rtol=1e-5, atol=1e-6)  # the second chunk's one row


@pytest.mark.parametrize("fmt", sorted(MODEL_FILES))
def test_a_large_batch_runs_in_chunks_with_the_same_scores(model_dirs, mnist_test, fmt: str) -> None:
    path = model_dirs[fmt] / MODEL_FILES[fmt]
    loaders = {"onnx": digit_model.load_onnx, "torchscript": digit_model.load_torchscript, "pt2": digit_model.load_pt2}
    whole = loaders[fmt](path, torch.device("cpu"))
    sizes = []

    def recording(images: torch.Tensor) -> torch.Tensor:
        sizes.append(len(images))
        return whole(images)

    digits = torch.from_numpy((mnist_test[0][:150] / 255.0 - 0.1307) / 0.3081).float()[:, None]
    chunked = digit_model.in_chunks(recording, 64)(digits)
    assert sizes == [64, 64, 22]
    expected = whole(digits)
    assert chunked.shape == expected.shape == (150, 10)
    # kernels may block a batch by its size: the same scores to far below any tolerance, not the same bits
    assert torch.allclose(chunked, expected, rtol=1e-5, atol=1e-6)
    sizes.clear()
    digit_model.in_chunks(recording, 64)(digits[:64])
    assert sizes == [64]  # up to the chunk size, one call


@pytest.mark.parametrize("fmt", sorted(MODEL_FILES))
def test_the_cpu_predictor_runs_in_chunks(model_dirs, monkeypatch, fmt: str) -> None:
    sizes = []
    whole = digit_model.in_chunks

    def recording_chunks(predict, rows):
        if rows != digit_model.CPU_CHUNK_ROWS:  # a .pt2's own chunks, at its compiled range
            return whole(predict, rows)

        def recording(images):
            sizes.append(len(images))
            return predict(images)

        return whole(recording, rows)

    monkeypatch.setattr(digit_model, "in_chunks", recording_chunks)
    predict = digit_model.load_predictor(model_dirs[fmt] / MODEL_FILES[fmt], torch.device("cpu"))
    assert predict(torch.zeros(130, 1, 28, 28)).shape == (130, 10)
    assert sizes == [digit_model.CPU_CHUNK_ROWS, digit_model.CPU_CHUNK_ROWS, 130 - 2 * digit_model.CPU_CHUNK_ROWS]
