"""Open Inference Protocol (KServe v2) against a real TorchServe started by `digits serve`, with Triton's client.

tritonclient is an independent implementation of the protocol: JSON and the binary tensor data extension,
UINT8/FP32 tensors and BYTES images, N = 1, 7 and 256, on both archive formats (cnn ONNX, mlp TorchScript).
The requests of TorchServe's own KServe MNIST v2 example are rebuilt here from a test digit; every bad request
is answered 4xx with `{"error": ...}` one by one, and never fails its neighbours.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import onnxruntime as ort
import pytest
import requests
from digits.training.train import normalise
from PIL import Image

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is needed")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = ("cnn", "mlp")
COUNT = 256  # the largest N tested


@pytest.fixture(scope="module")
def digits(mnist) -> np.ndarray:
    """The first COUNT test digits, (COUNT, 28, 28) uint8, white on black."""
    return np.asarray(mnist.test_images[:COUNT], dtype=np.uint8).reshape(COUNT, 28, 28)


@pytest.fixture(scope="module")
def expected(artifacts, mnist) -> dict[str, np.ndarray]:
    """Each model's labels for the COUNT digits, from its exported ONNX model (the parity-proven reference)."""
    x = normalise(mnist.test_images[:COUNT]).numpy()
    labels = {}
    for model in MODELS:
        session = ort.InferenceSession(str(artifacts / model / "model.onnx"), providers=["CPUExecutionProvider"])
        labels[model] = session.run(None, {"input": x})[0].argmax(1)
    return labels


@pytest.fixture(scope="module")
def client(server):
    return tritonclient_http.InferenceServerClient(url=urlparse(server.url).netloc, connection_timeout=30)


def png_base64(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue())


def infer(client, server, model: str, tensor, outputs=("probabilities", "label"), binary: bool = True):
    requested = [tritonclient_http.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(model, [tensor], outputs=requested, headers=server.headers(), request_id="req-1")


def check_answer(result, model: str, expected_labels: np.ndarray) -> None:
    response = result.get_response()
    assert response["model_name"] == model and response["id"] == "req-1"
    probabilities, labels = result.as_numpy("probabilities"), result.as_numpy("label")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(expected_labels), 10)
    assert labels.dtype == np.int64 and labels.shape == (len(expected_labels),)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=1))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("count", [1, 7, 256])
def test_uint8_tensors_get_the_models_labels(client, server, digits, expected, model, binary, count) -> None:
    tensor = tritonclient_http.InferInput("digits", [count, 28, 28], "UINT8")
    tensor.set_data_from_numpy(digits[:count], binary_data=binary)
    check_answer(infer(client, server, model, tensor, binary=binary), model, expected[model][:count])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("count", [1, 7, 256])
def test_base64_images_as_bytes_get_the_models_labels(client, server, digits, expected, model, binary, count) -> None:
    tensor = tritonclient_http.InferInput("images", [count], "BYTES")
    tensor.set_data_from_numpy(np.array([png_base64(d) for d in digits[:count]], dtype=np.object_), binary_data=binary)
    check_answer(infer(client, server, model, tensor, binary=binary), model, expected[model][:count])


@pytest.mark.parametrize("model", MODELS)
def test_raw_png_bytes_in_the_binary_extension(client, server, digits, expected, model) -> None:
    raw = [base64.b64decode(png_base64(d)) for d in digits[:7]]
    tensor = tritonclient_http.InferInput("images", [7], "BYTES")
    tensor.set_data_from_numpy(np.array(raw, dtype=np.object_), binary_data=True)
    check_answer(infer(client, server, model, tensor), model, expected[model][:7])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("shape", "scale"), [((7, 1, 28, 28), 1.0), ((7, 784), 1 / 255)], ids=["0-255 NCHW", "0-1 flat"]
)
def test_fp32_tensors_intensities_or_scaled(client, server, digits, expected, model, shape, scale) -> None:
    tensor = tritonclient_http.InferInput("x", list(shape), "FP32")
    tensor.set_data_from_numpy((digits[:7].astype(np.float32) * np.float32(scale)).reshape(shape), binary_data=True)
    check_answer(infer(client, server, model, tensor), model, expected[model][:7])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_framed_output_only_when_asked(client, server, digits, binary) -> None:
    """`framed` is the 28x28 image the model saw: an MNIST digit passes through as it is."""
    tensor = tritonclient_http.InferInput("digits", [3, 28, 28], "UINT8")
    tensor.set_data_from_numpy(digits[:3], binary_data=binary)
    result = infer(client, server, "cnn", tensor, outputs=("label", "framed"), binary=binary)
    framed = result.as_numpy("framed")
    assert framed.dtype == np.uint8 and framed.shape == (3, 28, 28)
    np.testing.assert_array_equal(framed, digits[:3])
    assert result.as_numpy("probabilities") is None
    default = client.infer("cnn", [tensor], headers=server.headers())
    assert {o["name"] for o in default.get_response()["outputs"]} == {"probabilities", "label"}


def raw_infer(server, model: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(
        f"{server.url}/v2/models/{model}/infer",
        data=data,
        headers={**server.headers(), "Content-Type": "application/json"},
        timeout=30,
    )


@pytest.mark.parametrize("model", MODELS)
def test_torchserve_kserve_mnist_v2_example_requests(server, digits, expected, model) -> None:
    """Built as pytorch/serve kubernetes/kserve/kf_request_json/v2/mnist/ builds them (tobytes.py, totensor.py):
    BYTES shape [-1] under a random name, one base64 PNG; FP32 [1,28,28] from ToTensor (0-1), rounded to 4 places."""
    as_bytes = {
        "id": str(uuid.uuid4()),
        "inputs": [
            {"name": str(uuid.uuid4()), "shape": [-1], "datatype": "BYTES", "data": [png_base64(digits[0]).decode()]}
        ],
    }
    scaled = np.round(digits[0].astype(np.float64) / 255, 4).reshape(1, 28, 28)
    as_tensor = {
        "id": str(uuid.uuid4()),
        "inputs": [{"name": "input-0", "shape": [1, 28, 28], "datatype": "FP32", "data": scaled.tolist()}],
    }
    for body in (as_bytes, as_tensor):
        response = raw_infer(server, model, body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"] == body["id"] and answer["model_name"] == model
        label = next(o for o in answer["outputs"] if o["name"] == "label")
        assert label["data"] == [int(expected[model][0])]


def tensor(datatype="UINT8", shape=(1, 28, 28), data=None) -> dict:
    data = [0] * int(np.prod(shape)) if data is None else data
    return {"name": "x", "datatype": datatype, "shape": list(shape), "data": data}


BAD_REQUESTS = {
    "wrong datatype": ({"inputs": [tensor("INT16")]}, 400, "datatype"),
    "wrong shape": ({"inputs": [tensor(shape=(1, 27, 28))]}, 400, "shape"),
    "element count": ({"inputs": [tensor(data=[0] * 783)]}, 400, "784 elements"),
    "bad base64": ({"inputs": [tensor("BYTES", (1,), data=["not base64!"])]}, 415, "base64"),
    "not an image": ({"inputs": [tensor("BYTES", (1,), data=[base64.b64encode(b"hello").decode()])]}, 415, "image"),
    "N over the limit": ({"inputs": [tensor(shape=(1025, 784), data=[0])]}, 413, "1024"),
    "unknown output": ({"inputs": [tensor()], "outputs": [{"name": "logits"}]}, 400, "logits"),
    "two inputs": ({"inputs": [tensor(), tensor()]}, 400, "one input"),
    "no inputs": ({"inputs": []}, 400, "one input"),
    "a KServe v1 body of a blank digit": ({"instances": [[0] * 784]}, 400, "instance 0: no digit found"),
    "a blank digit": ({"inputs": [tensor(shape=(2, 784), data=[255] * 8 + [0] * 776 + [0] * 784)]}, 400, "digit 1:"),
    "UINT8 out of range": ({"inputs": [tensor(data=[256] * 784)]}, 400, "0..255"),
    "FP32 negative": ({"inputs": [tensor("FP32", data=[-1.0] * 784)]}, 400, "0..255"),
    "strings as pixels": ({"inputs": [tensor(data=["0"] * 784)]}, 400, "integers"),
    "not JSON": (b"{inputs", 400, "JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_each_bad_request_gets_a_4xx_naming_the_problem(server, case) -> None:
    body, status, words = BAD_REQUESTS[case]
    response = raw_infer(server, "cnn", body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error"} and words.lower() in error["error"].lower(), error


def test_bad_requests_never_fail_their_neighbours(server, digits, expected) -> None:
    """Good and bad requests interleaved from 8 threads (batches of up to 8): every one gets its own answer."""
    good = [{"id": str(i), "inputs": [tensor(shape=(1, 784), data=digits[i].ravel().tolist())]} for i in range(24)]
    bad = [BAD_REQUESTS[case][0] for case in sorted(BAD_REQUESTS)]
    bodies = [body for pair in zip(good, bad * 2, strict=False) for body in pair]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: raw_infer(server, "cnn", b), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body in good:
            assert response.status_code == 200, response.text
            label = next(o for o in response.json()["outputs"] if o["name"] == "label")
            assert label["data"] == [int(expected["cnn"][int(body["id"])])]
        else:
            assert 400 <= response.status_code < 500 and "error" in response.json()


def test_a_blank_digit_fails_its_request_in_binary_too(client, server, digits) -> None:
    """/predictions' rule (no ink, no digit) for a UINT8 tensor in the binary extension, Triton's default."""
    with_blank = digits[:3].copy()
    with_blank[1] = 0
    tensor = tritonclient_http.InferInput("digits", [3, 28, 28], "UINT8")
    tensor.set_data_from_numpy(with_blank, binary_data=True)
    with pytest.raises(InferenceServerException, match="digit 1: no digit found") as refused:
        infer(client, server, "cnn", tensor)
    assert refused.value.status() == "400"


def test_the_kserve_v1_route_answers_v1(server, digits, expected) -> None:
    """TorchServe hands POST /v1/models/NAME:predict to the handler as it hands OIP; a v1 body gets v1's
    answer (tests/serving/test_explanations.py has the rest of v1)."""
    response = requests.post(
        f"{server.url}/v1/models/cnn:predict",
        json={"instances": [digits[0].tolist()]},
        headers=server.headers(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [int(expected["cnn"][0])]}


@pytest.mark.parametrize("path", ["/v2/models/cnn/explain", "/v1/models/cnn:explain"])
def test_kserves_explain_routes_answer_attributions_and_a_client_header_changes_nothing(
    server, digits, expected, path
) -> None:
    """TorchServe hands KServe's explain routes to the handler too, marked `explain: True` by the frontend:
    an OIP body there gets its outputs with `attributions`; a client's own `explain` header on /infer changes
    nothing."""
    body = {"inputs": [tensor(shape=(1, 784), data=digits[0].ravel().tolist())]}
    response = requests.post(f"{server.url}{path}", json=body, headers=server.headers(), timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == [int(expected["cnn"][0])] and outputs["attributions"]["shape"] == [1, 28, 28]
    headers = {**server.headers(), "explain": "True"}
    inferred = requests.post(f"{server.url}/v2/models/cnn/infer", json=body, headers=headers, timeout=30)
    assert inferred.status_code == 200, inferred.text
    assert [o["name"] for o in inferred.json()["outputs"]] == ["probabilities", "label"]
    label = next(o for o in inferred.json()["outputs"] if o["name"] == "label")
    assert label["data"] == [int(expected["cnn"][0])]


def test_predictions_answers_are_unchanged(server, digits, expected) -> None:
    response = requests.post(
        f"{server.url}/predictions/cnn", json={"data": digits[0].tolist()}, headers=server.headers(), timeout=30
    )
    assert response.status_code == 200
    assert set(response.json()) == {"label", "confidence", "probabilities"}
    assert response.json()["label"] == int(expected["cnn"][0])
    refused = requests.post(f"{server.url}/predictions/cnn", json={"pixels": []}, headers=server.headers(), timeout=30)
    assert refused.status_code == 400 and refused.json()["type"] == "BadJson"


def test_an_oip_body_is_oip_on_every_route(server, digits, expected) -> None:
    """The body decides the protocol: an OIP request sent to /predictions, or as text, gets the OIP answer."""
    body = {"id": "p", "inputs": [tensor(shape=(1, 784), data=digits[0].ravel().tolist())]}
    for path, headers in [
        ("/predictions/cnn", {"Content-Type": "application/json"}),
        ("/predictions/cnn", {"Content-Type": "text/plain"}),
        ("/v2/models/cnn/infer", {"Content-Type": "text/plain"}),
    ]:
        response = requests.post(
            f"{server.url}{path}", data=json.dumps(body), headers={**server.headers(), **headers}, timeout=30
        )
        assert response.status_code == 200, (path, response.text)
        label = next(o for o in response.json()["outputs"] if o["name"] == "label")
        assert response.json()["id"] == "p" and label["data"] == [int(expected["cnn"][0])], path


@pytest.mark.parametrize(
    "extra",
    [{"url_path": ""}, {"url_path": "cnn"}, {"Explain": "True"}, {"EXPLAIN": "true", "URL_PATH": "x"}],
    ids=["url_path", "url_path with a model", "Explain", "both, upper case"],
)
def test_client_headers_cannot_change_how_an_oip_request_is_read(server, digits, expected, extra) -> None:
    """TorchServe copies a client's headers before writing its own (case-sensitive map): a client's `url_path`
    (which /predictions adds) or `Explain: True` (KServe's explain routes add `explain`) changes nothing."""
    body = {"inputs": [tensor(shape=(2, 784), data=digits[:2].reshape(2, -1).tolist())]}
    response = requests.post(
        f"{server.url}/v2/models/cnn/infer", json=body, headers={**server.headers(), **extra}, timeout=30
    )
    assert response.status_code == 200, response.text
    label = next(o for o in response.json()["outputs"] if o["name"] == "label")
    assert label["data"] == [int(x) for x in expected["cnn"][:2]]


def test_standard_oip_grpc_clients_cannot_reach_torchserve(server) -> None:
    """digits keeps TorchServe's OIP gRPC service off (README, "Open Inference Protocol": when on, it is named
    `org.pytorch.serve.grpc.openinference.GRPCInferenceService`, not the protocol's `inference.GRPCInferenceService`,
    ignores raw_input_contents, and a 4xx answer kills the worker), so Triton's gRPC client gets UNIMPLEMENTED."""
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (the dev extra) is needed")
    from digits.serving.server import read_state

    port = read_state(server.run_dir).ports["grpc_inference"]
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    tensor = grpcclient.InferInput("digits", [1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 28, 28), dtype=np.uint8))
    with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
        client.infer("cnn", [tensor], headers={"authorization": f"Bearer {server.token}"})
