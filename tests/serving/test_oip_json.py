"""OIP JSON bodies over real HTTP, as the handler now parses them itself (handlers/digit_json.py): 1,024 MNIST
test digits as JSON, flat and nested, get what the binary extension gets, to the 7 significant digits a JSON
answer carries, and the answers the exported ONNX file gives; JSON's corners keep their answers."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import requests
from digits.training.train import normalise

COUNT = 1024  # the handler's limit a request


@pytest.fixture(scope="module")
def digits(mnist) -> np.ndarray:
    return np.asarray(mnist.test_images[:COUNT], dtype=np.uint8).reshape(COUNT, 28, 28)


def post(server, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(
        f"{server.url}/v2/models/cnn/infer", data=body, headers={**server.headers(), **headers}, timeout=120
    )


def binary_answer(server, digits: np.ndarray) -> dict[str, np.ndarray]:
    tensor = {
        "name": "d",
        "datatype": "UINT8",
        "shape": list(digits.shape),
        "parameters": {"binary_data_size": digits.size},
    }
    outputs = [{"name": name, "parameters": {"binary_data": True}} for name in ("probabilities", "label")]
    header = json.dumps({"inputs": [tensor], "outputs": outputs}).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    response = post(server, header + digits.tobytes(), headers)
    assert response.status_code == 200, response.text[:300]
    length = int(response.headers["Inference-Header-Content-Length"])
    head, offset, values = json.loads(response.content[:length]), length, {}
    for output in head["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = "<f4" if output["datatype"] == "FP32" else "<i8"
        values[output["name"]] = np.frombuffer(response.content[offset : offset + size], dtype=dtype)
        offset += size
    return values


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "text/plain"])
def test_json_answers_carry_the_binary_answers(server, artifacts, digits, nested, content_type) -> None:
    data = digits.tolist() if nested else digits.reshape(-1).tolist()
    body = json.dumps(
        {"id": "j", "inputs": [{"name": "d", "datatype": "UINT8", "shape": [COUNT, 28, 28], "data": data}]}
    )
    response = post(server, body.encode(), {"Content-Type": content_type})
    assert response.status_code == 200, response.text[:300]
    answer = response.json()
    assert answer["id"] == "j" and response.headers["Content-Type"].startswith("application/json")
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert outputs["probabilities"]["shape"] == [COUNT, 10] and outputs["label"]["shape"] == [COUNT]
    binary = binary_answer(server, digits)
    assert outputs["label"]["data"] == binary["label"].tolist()
    assert outputs["probabilities"]["data"] == [float(f"{p:.7g}") for p in binary["probabilities"].tolist()]
    session = ort.InferenceSession(str(artifacts / "cnn" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": normalise(digits).numpy()})[0]
    scores = np.sort(logits, axis=1)
    clear = scores[:, -1] - scores[:, -2] > 1e-3  # no near ties between kernels
    assert clear.mean() > 0.99
    assert np.array_equal(np.asarray(outputs["label"]["data"])[clear], logits.argmax(axis=1)[clear])


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (
            b'{"inputs": [{"name": "d", "datatype": "FP32", "shape": [1, 784], "data": [NaN' + b", 0" * 783 + b"]}]}",
            400,
            "finite",
        ),
        (
            b'{"inputs": [{"name": "d", "datatype": "UINT8", "shape": [1, 784], "data": [1e400]}]}',
            400,
            "float64 values",
        ),
        (
            b'{"inputs": [{"name": "d", "datatype": "UINT8", "shape": [1, 784], "data": [' + b"9" * 30 + b"]}]}",
            400,
            "object values",
        ),
        (b'{"inputs": [{"name": "d", "datatype": "UINT8", "shape": [1, 784], "data": [true, false]}]}', 400, "bool"),
        (b'{"inputs": [{"name": "d", "datatype": "UINT8", "shape": [1, 784], "data": [1, 2', 400, "parse"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ],
    ids=["NaN", "past a double", "past 64 bits", "booleans", "cut short", "deep"],
)
def test_json_that_msgspec_refuses_is_answered_as_before(server, body, status, words) -> None:
    """Texts msgspec does not take go to json, which takes some (NaN) and names what is wrong with the rest."""
    response = post(server, body, {"Content-Type": "application/json"})
    assert response.status_code == status and words in response.json()["error"], response.text[:300]
