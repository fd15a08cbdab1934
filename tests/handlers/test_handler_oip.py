"""OIP requests through `DigitHandler.handle`, as TorchServe's worker calls it: which requests are OIP, batches
mixing them with /predictions ones, the binary extension, and per-request errors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from digit_oip import MAX_DIGITS
from handler_helpers import assert_same_answer, make_context, png_bytes, run_batch
from ts.context import RequestProcessor

PREDICTIONS = {"url_path": "", "explain": "False"}  # what the frontend adds on /predictions/NAME
OIP = {"explain": "False"}  # ... and on /v2/models/NAME/infer


@pytest.fixture
def handle(handlers_by_format, model_dirs):
    handler, directory = handlers_by_format["onnx"], model_dirs["onnx"]
    return lambda rows, headers: run_batch(handler, make_context(directory), rows, headers)


def digits(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def oip_body(pixels: np.ndarray, datatype: str = "UINT8", **extra) -> dict:
    return {
        "inputs": [{"name": "x", "datatype": datatype, "shape": list(pixels.shape), "data": pixels.tolist()}],
        **extra,
    }


def output(answer, name: str) -> list:
    return next(o for o in answer.body["outputs"] if o["name"] == name)["data"]


def test_a_mixed_batch_answers_each_request_in_its_own_protocol(handle) -> None:
    pixels = digits(5)
    alone = handle([{"body": {"data": pixels[0].tolist()}}], [PREDICTIONS])[0]
    rows = [
        {"body": {"data": pixels[0].tolist()}},
        {"body": oip_body(pixels[1:4], id="a")},
        {"body": oip_body(pixels[1:2], datatype="INT16")},
        {"body": {"data": pixels[4].tolist()}},
    ]
    answers = handle(rows, [PREDICTIONS, OIP, OIP, PREDICTIONS])
    assert answers[0].status == 200
    assert_same_answer(answers[0].body, alone.body)
    assert answers[1].status == 200 and answers[1].body["id"] == "a"
    assert len(output(answers[1], "label")) == 3 and len(output(answers[1], "probabilities")) == 30
    assert answers[2].status == 400 and set(answers[2].body) == {"error"}
    assert answers[3].status == 200 and set(answers[3].body) == {"label", "confidence", "probabilities"}
    same = handle([{"body": oip_body(pixels[1:4])}], [OIP])[0]
    assert output(same, "probabilities") == output(answers[1], "probabilities")


def test_what_counts_as_oip(handle) -> None:
    """The body decides; the frontend's own markers only name an odd body's dialect on a KServe route."""
    body = oip_body(digits(1))
    assert "outputs" in handle([{"body": body}], [PREDICTIONS])[0].body  # an OIP body on /predictions is OIP
    assert "outputs" in handle([{"body": body}], [{}])[0].body  # no headers: TorchServe's OIP gRPC service
    as_text = {"body": json.dumps(body)}  # sent as text/plain: the same request
    assert "outputs" in handle([as_text], [PREDICTIONS])[0].body
    plain = {"data": digits(1, seed=1)[0].tolist()}
    assert handle([{"body": plain}], [{}])[0].body["label"] in range(10)  # no headers, not OIP
    assert handle([{"body": plain}], [PREDICTIONS])[0].body["label"] in range(10)
    odd = handle([{"body": b"\x89PNG garbage"}], [OIP])[0]  # neither protocol's body, on a KServe route
    assert odd.status == 400 and set(odd.body) == {"error"}


def test_client_headers_change_nothing(handle) -> None:
    """TorchServe copies a client's headers before writing its own, case-sensitively: a client's `url_path`
    on an OIP route, its `Explain: True` (the frontend writes `explain`), change neither protocol nor mode."""
    body = oip_body(digits(2))
    clean = handle([{"body": body}], [OIP])[0]
    for extra in ({"url_path": ""}, {"Explain": "True"}, {"EXPLAIN": "True", "Url_Path": "x"}):
        answer = handle([{"body": body}], [{**extra, **OIP}])[0]
        assert answer.status == 200 and output(answer, "label") == output(clean, "label"), extra
    plain = {"data": digits(1, seed=1)[0].tolist()}
    assert handle([{"body": plain}], [{**PREDICTIONS, "Explain": "True"}])[0].body["label"] in range(10)


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "+12", "-1", "1 2", "0x10", "\u0661\u0662", "", "12.0"])
def test_a_malformed_binary_header_length_is_a_400_naming_it(handle, value) -> None:
    """`str.isdigit` admits "²" and Arabic-Indic digits, which `int` refuses: a 400 naming the header, never a 500."""
    request = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}
    for body in (json.dumps(request).encode(), request):  # as bytes, or as JSON the frontend parsed
        answer = handle([{"body": body}], [{**OIP, "Inference-Header-Content-Length": value}])[0]
        assert answer.status == 400 and "Inference-Header-Content-Length" in answer.body["error"], answer.body


def binary_request(pixels: np.ndarray, outputs: list[dict]) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "UINT8",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.size},
                }
            ],
            "outputs": outputs,
        }
    ).encode()
    return header + pixels.tobytes(), {**OIP, "Inference-Header-Content-Length": str(len(header))}


def test_binary_in_and_out(handlers_by_format, model_dirs) -> None:
    pixels = digits(4)
    body, headers = binary_request(pixels, [{"name": "label", "parameters": {"binary_data": True}}, {"name": "framed"}])
    context = make_context(model_dirs["onnx"])  # by hand: run_batch reads answers as JSON
    context.request_processor = [RequestProcessor(headers)]
    context.request_ids = {0: "r"}
    raw = handlers_by_format["onnx"].handle([{"body": body}], context)[0]
    length = int(context.get_response_headers(0)["Inference-Header-Content-Length"])
    head = json.loads(raw[:length])
    label, framed = head["outputs"]
    assert label["parameters"]["binary_data_size"] == 4 * 8 and "data" not in label
    labels = np.frombuffer(raw[length:], dtype="<i8")
    assert labels.shape == (4,)
    np.testing.assert_array_equal(np.asarray(framed["data"], dtype=np.uint8).reshape(4, 28, 28), pixels)
    as_json = run_batch(
        handlers_by_format["onnx"], make_context(model_dirs["onnx"]), [{"body": oip_body(pixels)}], [OIP]
    )
    assert output(as_json[0], "label") == labels.tolist()


def test_fp32_within_0_1_reads_as_scaled(handle) -> None:
    pixels = digits(3)
    intensities = handle([{"body": oip_body(pixels)}], [OIP])[0]
    scaled = handle([{"body": oip_body(pixels.astype(np.float32) / 255, datatype="FP32")}], [OIP])[0]
    assert output(scaled, "label") == output(intensities, "label")


def test_bytes_images_in_the_binary_extension(handle) -> None:
    images = [png_bytes(d) for d in digits(2)]
    data = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header = json.dumps(
        {"inputs": [{"name": "i", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(data)}}]}
    ).encode()
    answer = handle([{"body": header + data}], [{**OIP, "inference-header-content-length": str(len(header))}])[0]
    assert answer.status == 200 and len(output(answer, "label")) == 2
    cut = handle([{"body": header + data[:-1]}], [{**OIP, "inference-header-content-length": str(len(header))}])[0]
    assert cut.status == 400 and "binary_data_size" in cut.body["error"]


@pytest.mark.parametrize(
    ("tensor", "status", "words"),
    [
        ({"datatype": "UINT8", "shape": [MAX_DIGITS + 1, 784], "data": [0]}, 413, "limit"),
        ({"datatype": "BYTES", "shape": [2], "data": ["aGVsbG8="]}, 400, "[2] for 1 elements"),
        ({"datatype": "FP32", "shape": [1, 784], "data": [float("nan")] * 784}, 400, "finite"),
        ({"datatype": "UINT8", "shape": [1, 28, 28], "data": [[0] * 28] * 27 + [[0] * 27]}, 400, "ragged"),
        ({"datatype": "UINT8", "shape": [1, 28, 28]}, 400, "binary_data_size"),
        ({"datatype": "UINT8", "shape": [0, 784], "data": []}, 400, "n >= 1"),
    ],
    ids=["N over limit", "BYTES count", "NaN", "ragged", "no data", "N = 0"],
)
def test_bad_tensors(handle, tensor, status, words) -> None:
    answer = handle([{"body": {"inputs": [{"name": "x", **tensor}]}}], [OIP])[0]
    assert answer.status == status and words.lower() in answer.body["error"].lower(), answer.body


def binary_tensor(pixels: np.ndarray, datatype: str = "UINT8") -> tuple[bytes, dict]:
    """An OIP request of `pixels` ((N, 28, 28)) in the binary extension, and its headers."""
    data = pixels.astype(np.uint8 if datatype == "UINT8" else "<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
        }
    ).encode()
    return header + data, {**OIP, "Inference-Header-Content-Length": str(len(header))}


def test_a_blank_digit_fails_its_own_request_naming_it(handle, mnist_test) -> None:
    """/predictions' rule (no ink, no digit) for every digit of a pixel tensor, UINT8 and FP32, JSON and binary:
    its request gets 400 NoDigit naming the digit, its neighbours in the batch are answered."""
    digits = mnist_test[0][:4].astype(np.uint8)
    blank_dark, blank_light = digits.copy(), 255 - digits
    blank_dark[2] = 0  # black: no ink on a dark background
    blank_light[0] = 240  # light grey paper: no ink on a light background
    faint = digits.copy()
    faint[3] = np.where(digits[3] > 0, 15, 0)  # strokes 15 levels above the background: under the 16 needed
    binary, binary_headers = binary_tensor(blank_light)
    rows = [
        {"body": oip_body(blank_dark)},
        {"body": binary},
        {"body": oip_body(blank_dark.astype(np.float32) / 255, datatype="FP32")},  # scaled 0..1
        {"body": oip_body(faint.astype(np.float32), datatype="FP32")},
        {"body": oip_body(digits)},
        {"body": {"data": digits[0].tolist()}},
    ]
    answers = handle(rows, [OIP, binary_headers, OIP, OIP, OIP, PREDICTIONS])
    for answer, blank in zip(answers[:4], [2, 0, 2, 3], strict=True):
        assert answer.status == 400 and set(answer.body) == {"error"}, answer.body
        assert answer.body["error"].startswith(f"digit {blank}: no digit found"), answer.body
    assert answers[3].body["error"].startswith("digit 3: no digit found: the image is nearly uniform (ink contrast 15")
    assert answers[4].status == 200 and len(output(answers[4], "label")) == 4
    assert answers[5].status == 200 and answers[5].body["label"] in range(10)


def test_every_blank_digit_is_counted_and_the_first_ten_named(handle) -> None:
    pixels = digits(30)
    pixels[3:25] = 7  # uniform grey, 22 of them
    error = handle([{"body": oip_body(pixels)}], [OIP])[0].body["error"]
    assert error.startswith("digit 3: ") and error.endswith(
        "; 22 digits are blank: 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, ..."
    )


def test_all_mnist_test_digits_pass_as_uint8_tensors(handlers_by_format, model_dirs, mnist) -> None:
    """The 10,000 test digits, as binary UINT8 tensors of MAX_DIGITS digits in one batch: none is refused."""
    images = np.asarray(mnist.test_images, dtype=np.uint8).reshape(-1, 28, 28)
    requests = [binary_tensor(images[start : start + MAX_DIGITS]) for start in range(0, len(images), MAX_DIGITS)]
    context = make_context(model_dirs["onnx"])
    answers = run_batch(
        handlers_by_format["onnx"], context, [{"body": b} for b, _ in requests], [h for _, h in requests]
    )
    assert [a.status for a in answers] == [200] * len(requests), [a.body for a in answers if a.status != 200][:1]
    assert sum(len(output(a, "label")) for a in answers) == len(images) == 10_000


def test_a_kserve_v1_body_gets_a_v1_answer_and_inputs_make_oip(handle) -> None:
    """TorchServe routes /v1/models/NAME:predict to the handler as it routes OIP: a v1 body gets v1's answer
    (digit_kserve.py; tests/handlers/test_handler_explanations.py has the rest); with "inputs" it is OIP."""
    pixels = digits(1)[0]
    answer = handle([{"body": {"instances": [pixels.tolist()]}}], [OIP])[0]
    label = handle([{"body": {"data": pixels.tolist()}}], [PREDICTIONS])[0].body["label"]
    assert answer.status == 200 and answer.body == {"predictions": [label]}
    both = handle([{"body": {"instances": [], "inputs": []}}], [OIP])[0]  # "inputs" present: an OIP request
    assert both.status == 400 and "exactly one input tensor" in both.body["error"]


def test_an_explain_route_is_answered_beside_an_inference(handle, mnist_test) -> None:
    """KServe's explain routes reach the handler with `explain: True` (frontend-set, last): that request gets
    its attributions beside its outputs; its neighbour's answer is unchanged."""
    body = oip_body(mnist_test[0][:2])
    explained, inferred = handle([{"body": body}, {"body": body}], [{"explain": "True"}, OIP])
    assert explained.status == 200 and np.asarray(output(explained, "attributions")).size == 2 * 28 * 28
    assert output(explained, "label") == output(inferred, "label")
    assert inferred.status == 200 and [o["name"] for o in inferred.body["outputs"]] == ["probabilities", "label"]


def test_an_answer_over_the_response_limit_is_refused_alone(handle, mnist_test) -> None:
    """Round 3's case: an id of 1,750,000 "é" (3.5 MB of JSON) would be echoed as 10.5 MB, over TorchServe's
    max_response_size, which drops the worker and its batch; it gets its own 413, its neighbours their answers."""
    good = oip_body(mnist_test[0][:2], id="good")
    hostile = oip_body(mnist_test[0][:1], id="é" * 1_750_000)
    answers = handle([{"body": good}, {"body": hostile}, {"body": good}], [OIP, OIP, OIP])
    assert [a.status for a in answers] == [200, 413, 200]
    assert "6,553,500" in answers[1].body["error"] and "shorter id" in answers[1].body["error"]
    assert answers[0].body["id"] == "good" and len(output(answers[2], "label")) == 2


def test_the_response_limit_comes_from_model_config_and_holds_for_every_body(model_dirs, mnist_test) -> None:
    """`handler: {max_response_size: B}` (what `digits serve` writes into config.properties): no body over it,
    whatever the request asked (framed as JSON, many digits), and what fits is answered as before."""
    from digit_handler import DigitHandler

    context = make_context(model_dirs["onnx"])
    context.model_yaml_config = {"handler": {"max_response_size": 20_000}}
    handler = DigitHandler()
    handler.initialize(context)
    pixels = mnist_test[0][:8].astype(np.uint8)
    rows = [
        {"body": oip_body(pixels[:1], outputs=[{"name": "framed"}])},  # 28 x 28 levels as JSON: fits
        {"body": oip_body(pixels, outputs=[{"name": "framed"}])},  # 8 of them: does not
        {"body": oip_body(pixels, id="x" * 19_000)},
        {"body": {"data": pixels[0].tolist()}},
    ]
    answers = run_batch(handler, context, rows, [OIP, OIP, OIP, PREDICTIONS])
    assert [a.status for a in answers] == [200, 413, 413, 200], [a.body for a in answers]
    assert "20,000" in answers[1].body["error"] and "'framed' in binary" in answers[1].body["error"]
    assert "shorter id" in answers[2].body["error"]
    assert output(answers[0], "framed") == pixels[0].ravel().tolist()
    as_binary = oip_body(pixels, outputs=[{"name": "framed", "parameters": {"binary_data": True}}])
    context.request_processor = [RequestProcessor(dict(OIP))]
    (body,) = handler.handle([{"body": as_binary}], context)  # 8 x 784 bytes: fits, as the advice says
    assert context.get_response_status(0)[0] in (None, 200) and len(body) <= 20_000
    length = int(context.get_response_headers(0)["Inference-Header-Content-Length"])
    assert np.array_equal(np.frombuffer(body[length:], np.uint8).reshape(8, 28, 28), pixels)


def test_any_body_over_the_limit_is_replaced_by_its_413(model_dirs, mnist_test) -> None:
    """The last guard, behind the bounds checked before building: whatever the protocol, a body over the limit
    never reaches TorchServe's frontend (which would drop the worker with its batch)."""
    from digit_handler import DigitHandler

    context = make_context(model_dirs["onnx"])
    context.model_yaml_config = {"handler": {"max_response_size": 150}}  # under any /predictions answer
    handler = DigitHandler()
    handler.initialize(context)
    rows = [{"body": {"data": mnist_test[0][0].tolist()}}, {"body": oip_body(mnist_test[0][:1])}]
    context.request_processor = [RequestProcessor(dict(PREDICTIONS)), RequestProcessor(dict(OIP))]
    bodies = handler.handle(rows, context)
    assert all(len(body) <= 150 for body in bodies), [len(body) for body in bodies]
    assert [context.get_response_status(index)[0] for index in range(2)] == [413, 413]
    assert json.loads(bodies[0])["type"] == "AnswerTooLarge" and "150" in json.loads(bodies[1])["error"]
