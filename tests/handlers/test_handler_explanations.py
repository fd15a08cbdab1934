"""Explanations through `DigitHandler.handle`, as TorchServe's worker calls it, for every format and route:
/explanations, OIP's `attributions` output (and /v2/models/NAME/explain), KServe v1 `:predict` and `:explain`;
the answers' contents, the choices a client makes, per-request errors, and the bounds on the work."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import digit_handler
import numpy as np
import pytest
import torch
from digit_contract import normalise
from digit_explain import DEFAULT_METHODS, attribute
from digit_explanations import MAX_EXPLAINED, Deadline
from handler_helpers import HANDLERS_DIR, MEAN, STD, make_context, png_bytes, run_batch
from ts.context import RequestProcessor

FORMATS = ("torchscript", "onnx", "pt2")
PREDICTIONS = {"url_path": "", "explain": "False"}  # what the frontend writes on /predictions/NAME
EXPLANATIONS = {"url_path": "", "explain": "True"}  # ... on /explanations/NAME
KSERVE = {"explain": "False"}  # ... on /v2/models/NAME/infer and /v1/models/NAME:predict
KSERVE_EXPLAIN = {"explain": "True"}  # ... on /v2/models/NAME/explain and /v1/models/NAME:explain
ANSWER_KEYS = {"label", "confidence", "probabilities", "target", "method", "settings", "model_name", "model_version"}
V1_MNIST = Path(__file__).resolve().parents[1] / "serving" / "data" / "kserve_v1_mnist.json"


@pytest.fixture(params=FORMATS)
def fmt(request) -> str:
    return request.param


@pytest.fixture
def handle(fmt, handlers_by_format, model_dirs):
    """Runs rows with the frontend's headers through the handler of `fmt`."""
    handler, directory = handlers_by_format[fmt], model_dirs[fmt]
    return lambda rows, headers: run_batch(handler, make_context(directory), rows, headers)


@pytest.fixture(scope="module")
def images(mnist_test) -> np.ndarray:
    return np.asarray(mnist_test[0][:70], dtype=np.uint8)


def expected_maps(handler, framed: np.ndarray, targets, method: str) -> np.ndarray:
    """What the engine gives for these framed digits, called directly."""
    x = torch.from_numpy(normalise(framed.astype(np.float32), MEAN, STD, (1, 28, 28)))
    return attribute(handler.model, x, targets, method, mean=MEAN, std=STD)


def oip_body(pixels: np.ndarray, outputs=None, **parameters) -> dict:
    body = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.tolist()}]}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    if parameters:
        body["parameters"] = parameters
    return body


def output(answer, name: str) -> dict:
    return next(o for o in answer.body["outputs"] if o["name"] == name)


def test_explanations_answer_every_body_predictions_take(fmt, handle, handlers_by_format, images) -> None:
    """Image bytes, base64, {"data": pixels}: the prediction, what was explained and how, the framed digit and
    its map, which is the engine's for that digit and label."""
    digit = images[0]
    rows = [
        {"body": png_bytes(digit)},
        {"body": base64.b64encode(png_bytes(digit))},
        {"body": {"data": digit.tolist()}},
        {"body": {"data": digit.tolist()}},
    ]
    answers = handle(rows, [EXPLANATIONS, EXPLANATIONS, EXPLANATIONS, PREDICTIONS])
    assert [a.status for a in answers] == [200] * 4
    prediction = answers[3].body
    for answer in answers[:3]:
        body = answer.body
        assert set(body) == ANSWER_KEYS | {"framed", "attributions"}
        assert body["label"] == prediction["label"] == body["target"]
        assert np.allclose(body["probabilities"], prediction["probabilities"], rtol=1e-5, atol=1e-8)
        assert body["method"] == DEFAULT_METHODS[fmt] and body["model_name"] == "tiny"
        assert body["model_version"] == "1.0" and body["settings"]["baseline"] == 0
        assert np.array_equal(body["framed"], digit)
        expected = expected_maps(handlers_by_format[fmt], digit[None], [body["label"]], body["method"])[0]
        assert np.allclose(body["attributions"], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_the_client_chooses_method_and_target(handle, images) -> None:
    """As JSON keys beside "data", or as form fields beside the field "data" (bytes, as TorchServe hands them)."""
    digit = images[1]
    rows = [
        {"body": {"data": digit.tolist(), "method": "occlusion", "target": 3}},
        {"data": png_bytes(digit), "method": b"occlusion", "target": b"3"},
        {"body": {"data": digit.tolist(), "target": "3"}},
    ]
    answers = handle(rows, [EXPLANATIONS] * 3)
    assert [a.status for a in answers] == [200] * 3
    assert [a.body["method"] for a in answers[:2]] == ["occlusion"] * 2
    assert [a.body["target"] for a in answers] == [3, 3, 3]
    assert answers[0].body["settings"] == {"baseline": 0, "window": 4, "stride": 2}
    assert np.allclose(answers[0].body["attributions"], answers[1].body["attributions"], rtol=1e-5, atol=1e-8)


def test_bad_choices_are_refused_naming_the_allowed_values(fmt, handle, images) -> None:
    digit = images[2].tolist()
    choices = [{"method": "lime"}, {"target": 10}, {"target": "seven"}, {"target": True}, {"method": 3}]
    answers = handle([{"body": {"data": digit, **choice}} for choice in choices], [EXPLANATIONS] * len(choices))
    assert [a.status for a in answers] == [400] * len(choices)
    assert answers[0].body["type"] == "UnknownMethod" and "offers" in answers[0].body["message"]
    assert "feature-ablation, occlusion" in answers[0].body["message"]
    for answer in answers[1:4]:
        assert (
            answer.body["type"] == "BadTarget"
            and "the labels are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in answer.body["message"]
        )
    assert answers[4].body["type"] == "UnknownMethod"
    gradients = handle([{"body": {"data": digit, "method": "integrated-gradients"}}], [EXPLANATIONS])[0]
    if fmt == "torchscript":
        assert gradients.status == 200 and gradients.body["method"] == "integrated-gradients"
    else:
        assert gradients.status == 400 and gradients.body["type"] == "MethodNotOffered"
        assert "gradients" in gradients.body["message"] and "feature-ablation, occlusion" in gradients.body["message"]


def test_errors_stay_their_requests_own(handle, images) -> None:
    """A bad image, a blank, a bad method: each its 4xx as predictions get them; the rest answered."""
    rows = [
        {"body": png_bytes(images[3])},
        {"body": b"junk\x00"},
        {"body": {"data": [0] * 784}},
        {"body": {"data": images[4].tolist(), "method": "nope"}},
        {"body": png_bytes(images[5])},
    ]
    answers = handle(rows, [EXPLANATIONS, EXPLANATIONS, EXPLANATIONS, EXPLANATIONS, PREDICTIONS])
    assert [a.status for a in answers] == [200, 415, 400, 400, 200]
    assert "attributions" in answers[0].body and "attributions" not in answers[4].body
    assert [a.body["type"] for a in answers[1:4]] == ["NotAnImage", "NoDigit", "UnknownMethod"]


def raw_answer(handler, directory: Path, body: dict, headers: dict) -> tuple[dict, bytes | None]:
    """One OIP request's answer as a client reads it: the JSON part, and the binary part."""
    context = make_context(directory)
    context.request_processor = [RequestProcessor(dict(headers))]
    context.request_ids = {0: "request-0"}
    raw = handler.handle([{"body": body}], context)[0]
    length = context.get_response_headers(0).get("Inference-Header-Content-Length")
    if length is None:
        return json.loads(raw), None
    return json.loads(raw[: int(length)]), raw[int(length) :]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_oip_attributions_output(binary, fmt, handlers_by_format, model_dirs, images) -> None:
    """FP32 [N, 28, 28], JSON or binary like `framed`, with the method, its settings and the target as the
    output's parameters; the request parameters `method` and `target` choose."""
    pixels = images[:3]
    body = oip_body(pixels, ["attributions"], method="occlusion", target=5, binary_data_output=binary)
    header, data = raw_answer(handlers_by_format[fmt], model_dirs[fmt], body, KSERVE)
    [maps] = header["outputs"]
    assert maps["name"] == "attributions" and maps["datatype"] == "FP32" and maps["shape"] == [3, 28, 28]
    parameters = maps["parameters"]
    assert {k: parameters[k] for k in ("method", "target", "window", "stride", "baseline")} == {
        "method": "occlusion",
        "target": 5,
        "window": 4,
        "stride": 2,
        "baseline": 0,
    }
    values = np.frombuffer(data, dtype="<f4") if binary else np.asarray(maps["data"], dtype=np.float32)
    assert (parameters.get("binary_data_size") == 3 * 28 * 28 * 4) == binary
    expected = expected_maps(handlers_by_format[fmt], pixels, [5, 5, 5], "occlusion")
    assert np.allclose(values.reshape(3, 28, 28), expected, rtol=1e-4, atol=1e-6)


def test_oip_default_target_is_each_digits_label(handlers_by_format, model_dirs, images) -> None:
    handler = handlers_by_format["onnx"]
    body = oip_body(images[:2], ["label", "attributions"], binary_data_output=True)
    header, data = raw_answer(handler, model_dirs["onnx"], body, KSERVE)
    assert header["outputs"][1]["parameters"]["target"] == "predicted"
    assert header["outputs"][1]["parameters"]["method"] == "feature-ablation"
    targets = np.frombuffer(data[:16], dtype="<i8")  # the label output comes first: 2 INT64
    maps = np.frombuffer(data[16:], dtype="<f4").reshape(2, 28, 28)
    assert np.allclose(maps, expected_maps(handler, images[:2], targets, "feature-ablation"), rtol=1e-4, atol=1e-6)


def test_oip_explain_route_adds_attributions_and_refusals_name_the_allowed_values(handle, images) -> None:
    answers = handle(
        [
            {"body": oip_body(images[:2])},
            {"body": oip_body(images[:2], ["attributions"], method="lime")},
            {"body": oip_body(images[:2], ["attributions"], target=11)},
            {"body": oip_body(images[: MAX_EXPLAINED + 1], ["attributions"])},
            {"body": oip_body(images[: MAX_EXPLAINED + 1], ["label"])},
        ],
        [KSERVE_EXPLAIN, KSERVE, KSERVE, KSERVE, KSERVE],
    )
    assert [a.status for a in answers] == [200, 400, 400, 413, 200]
    assert [o["name"] for o in answers[0].body["outputs"]] == ["probabilities", "label", "attributions"]
    assert "lime" in answers[1].body["error"] and "occlusion" in answers[1].body["error"]
    assert "the labels are 0, 1" in answers[2].body["error"]
    assert f"the limit is {MAX_EXPLAINED}" in answers[3].body["error"]
    assert len(output(answers[4], "label")["data"]) == MAX_EXPLAINED + 1  # predictions keep their own limit


def test_kserve_v1_predict_and_explain(fmt, handle, handlers_by_format, images) -> None:
    """{"instances": [...]} answers {"predictions": [...]}, and on :explain {"explanations": [...]}, one object
    per instance with the fields /explanations answers; an instance may name its target."""
    instances = [{"data": base64.b64encode(png_bytes(images[6])).decode()}, {"data": images[7].tolist(), "target": 1}]
    predicted, explained = handle([{"body": {"instances": instances}}] * 2, [KSERVE, KSERVE_EXPLAIN])
    labels = [handle([{"body": {"data": d.tolist()}}], [PREDICTIONS])[0].body["label"] for d in images[6:8]]
    assert predicted.status == 200 and predicted.body == {"predictions": labels}
    assert explained.status == 200 and set(explained.body) == {"explanations"}
    first, second = explained.body["explanations"]
    assert set(first) == ANSWER_KEYS | {"framed", "attributions"}
    assert [first["label"], second["label"]] == labels
    assert [first["target"], second["target"]] == [labels[0], 1]
    expected = expected_maps(handlers_by_format[fmt], images[6:8], [labels[0], 1], DEFAULT_METHODS[fmt])
    assert np.allclose([first["attributions"], second["attributions"]], expected, rtol=1e-4, atol=1e-6)


def test_torchserves_own_kserve_v1_request_is_read(handle) -> None:
    """pytorch/serve v0.12.0 kubernetes/kserve/kf_request_json/v1/mnist.json, unchanged: one base64 PNG with
    "target": 0, which :explain honours (the label it names); the label itself is checked end to end."""
    body = json.loads(V1_MNIST.read_text())
    predicted, explained = handle([{"body": body}, {"body": json.dumps(body).encode()}], [KSERVE, KSERVE_EXPLAIN])
    assert predicted.status == 200 and len(predicted.body["predictions"]) == 1
    assert explained.status == 200 and explained.body["explanations"][0]["target"] == 0


def test_kserve_v1_refusals(handle, images) -> None:
    answers = handle(
        [
            {"body": {"instances": []}},
            {"body": {"instances": [{"data": images[0].tolist()}, {"data": "bm90IGFuIGltYWdl"}]}},
            {"body": {"instances": [{"data": images[0].tolist()}] * (MAX_EXPLAINED + 1)}},
            {
                "body": {
                    "instances": [{"data": images[0].tolist(), "method": "occlusion"}, {"data": "", "method": "lime"}]
                }
            },
            {"body": {"instances": [{"data": images[0].tolist(), "target": 12}]}},
        ],
        [KSERVE, KSERVE, KSERVE_EXPLAIN, KSERVE_EXPLAIN, KSERVE_EXPLAIN],
    )
    assert [a.status for a in answers] == [400, 415, 413, 400, 400]
    assert all(set(a.body) == {"error"} for a in answers)
    assert answers[1].body["error"].startswith("instance 1: ")
    assert f"the limit is {MAX_EXPLAINED} to explain" in answers[2].body["error"]
    assert "one method" in answers[3].body["error"]
    assert "the labels are" in answers[4].body["error"]


def test_kserve_v1_images_share_one_decoding_budget(handlers_by_format, model_dirs) -> None:
    """128 lossless 4096x4096 WebPs, each within the bounds of one image: the request's work is summed before
    any is decoded (digit_budget.RequestBudget, as for OIP's BYTES) and refused naming the instance."""
    from costly_images import large_image

    image = base64.b64encode(large_image("WEBP", lossless=True)).decode()
    rows = [{"body": {"instances": [{"data": image}] * 128}}]
    answer = run_batch(handlers_by_format["onnx"], make_context(model_dirs["onnx"]), rows, [KSERVE])[0]
    assert answer.status == 413 and answer.body["error"].startswith("instance "), answer.body
    assert "in one request" in answer.body["error"]


def test_a_prediction_batch_makes_no_explanation_call(handlers_by_format, model_dirs, images, monkeypatch) -> None:
    """/predictions, OIP without attributions, KServe v1 :predict: the engine is never called."""
    calls = []
    monkeypatch.setattr(digit_handler, "explain_jobs", lambda *args: calls.append(args) or {})
    rows = [
        {"body": png_bytes(images[0])},
        {"body": oip_body(images[:3])},
        {"body": {"instances": [images[1].tolist()]}},
    ]
    answers = run_batch(
        handlers_by_format["onnx"], make_context(model_dirs["onnx"]), rows, [PREDICTIONS, KSERVE, KSERVE]
    )
    assert [a.status for a in answers] == [200, 200, 200] and calls == []
    run_batch(handlers_by_format["onnx"], make_context(model_dirs["onnx"]), rows[:1], [EXPLANATIONS])
    assert len(calls) == 1


def test_a_predicting_worker_never_imports_captum(model_dirs, images, tmp_path) -> None:
    """Captum loads on the first explanation, not before: a worker that only predicts never pays for it."""
    script = f"""
import sys
sys.path[:0] = [{str(HANDLERS_DIR)!r}, {str(Path(__file__).parent)!r}]
from pathlib import Path
from digit_handler import DigitHandler
from handler_helpers import make_context, run_batch
handler = DigitHandler()
handler.initialize(make_context(Path({str(model_dirs["onnx"])!r})))
rows = [{{"body": {{"data": {images[0].tolist()!r}}}}}]
assert run_batch(handler, make_context(Path({str(model_dirs["onnx"])!r})), rows)[0].status == 200
print("captum" in sys.modules)
run_batch(handler, make_context(Path({str(model_dirs["onnx"])!r})), rows, [{{"url_path": "", "explain": "True"}}])
print("captum" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


class SteppedClock:
    """A clock that moves on only when the engine asks before a model call: one second a call."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_costly_explanation_never_fails_its_cheaper_neighbours(
    handlers_by_format, model_dirs, images, monkeypatch
) -> None:
    """The batch's explanations run cheapest first; when the time runs out, what is left is refused 503, each
    alone, and the batch answers: the one-digit requests and the prediction answered, the 64-digit one not."""
    handler = handlers_by_format["onnx"]
    clock = SteppedClock()
    rows = [
        {"body": oip_body(images[:MAX_EXPLAINED], ["label", "attributions"], method="occlusion")},
        {"body": {"data": images[0].tolist()}},
        {"body": {"data": images[1].tolist()}},
        {"body": {"data": images[2].tolist()}},
    ]
    # 1 call (+1 clock read at start) for the two small ones together; the 64 digits need 12 calls
    monkeypatch.setattr(digit_handler, "Deadline", lambda seconds: Deadline(6, clock))
    headers = [KSERVE, EXPLANATIONS, EXPLANATIONS, PREDICTIONS]
    answers = run_batch(handler, make_context(model_dirs["onnx"]), rows, headers)
    assert [a.status for a in answers] == [503, 200, 200, 200]
    assert "ran out of their 6 s" in answers[0].body["error"]
    assert "attributions" in answers[1].body and "attributions" in answers[2].body
    assert "attributions" not in answers[3].body


def test_the_explanation_time_is_a_share_of_the_response_timeout(model_dirs) -> None:
    from digit_handler import DigitHandler

    handler = DigitHandler()
    context = make_context(model_dirs["onnx"])
    context.model_yaml_config = {"responseTimeout": 30}
    handler.initialize(context)
    assert handler.explain_seconds == 15
    context.model_yaml_config = {}
    handler.initialize(context)
    assert handler.explain_seconds == 60  # TorchServe's default response timeout, 120 s
