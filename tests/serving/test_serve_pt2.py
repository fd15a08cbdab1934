"""A `.pt2` archive (AOTInductor) served by a real TorchServe over HTTP, with the guarantees of the others.

Its own server on a store holding the pt2 archive alone, so the session server's models stay as `make demo`
serves them; the package is the suite's one mlp compile (`pt2_export`, tests/conftest.py).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import onnxruntime as ort
import pytest
import requests
from digits.serving.archive import ServingSettings, archive_model
from digits.serving.server import read_state, read_token
from digits.training.train import normalise
from PIL import Image
from serving_helpers import PORT_FLAGS, free_ports, port_flags

from digits.cli import main

NAME = "mlp-pt2"


def png(digit) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pt2_server(pt2_export, tmp_path_factory):
    """(inference URL, headers) of a TorchServe serving the pt2 archive of `pt2_export` alone."""
    tmp = tmp_path_factory.mktemp("pt2-serve")
    settings = ServingSettings(batch_size=8, max_batch_delay=20)
    archive_model("mlp", "pt2", pt2_export.model_dir.parent, tmp / "store", NAME, settings, log=lambda _: None)
    argv = ["--run-dir", str(tmp / "run")]
    assert main(["serve", "--model-store", str(tmp / "store"), *argv, *port_flags(free_ports(len(PORT_FLAGS)))]) == 0
    try:
        url = f"{read_state(tmp / 'run').inference_url}/predictions/{NAME}"
        yield url, {"Authorization": f"Bearer {read_token(tmp / 'run')}"}
    finally:
        assert main(["stop", *argv]) == 0


@pytest.fixture(scope="module")
def expected(pt2_export, mnist):
    """Labels of the first 64 test digits by the same export's ONNX file (parity proved the two equal)."""
    session = ort.InferenceSession(str(pt2_export.model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": normalise(mnist.test_images[:64]).numpy()})[0].argmax(1)


def test_the_pt2_archive_classifies_png_digits_like_the_exported_model(pt2_server, mnist, expected):
    url, headers = pt2_server
    for i in range(20):
        response = requests.post(url, data=png(mnist.test_images[i]), headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["label"] == expected[i]
        assert body["confidence"] == pytest.approx(max(body["probabilities"]))


def test_a_bad_request_in_a_pt2_batch_fails_alone(pt2_server, mnist, expected):
    url, headers = pt2_server

    def one(i):
        body = b"\x89PNG\r\n\x1a\n-truncated" if i % 4 == 0 else png(mnist.test_images[i])
        return i, requests.post(url, data=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(64)))
    for i, response in results:
        if i % 4 == 0:
            assert response.status_code == 400, response.text
        else:
            assert response.status_code == 200, response.text
            assert response.json()["label"] == expected[i]


def test_the_pt2_archive_answers_the_open_inference_protocol(pt2_server, mnist, expected):
    """Triton's client, binary tensor extension, a batch of 17 digits in one request, and one bad request."""
    tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
    url, headers = pt2_server
    client = tritonclient_http.InferenceServerClient(url=urlparse(url).netloc, connection_timeout=30)
    tensor = tritonclient_http.InferInput("digits", [17, 28, 28], "UINT8")
    tensor.set_data_from_numpy(mnist.test_images[:17], binary_data=True)
    outputs = [tritonclient_http.InferRequestedOutput(name, binary_data=True) for name in ("probabilities", "label")]
    result = client.infer(NAME, [tensor], outputs=outputs, headers=dict(headers))  # it adds its own headers
    assert result.as_numpy("label").tolist() == expected[:17].tolist()
    assert result.as_numpy("probabilities").shape == (17, 10)
    bad = requests.post(
        f"{urlparse(url).scheme}://{urlparse(url).netloc}/v2/models/{NAME}/infer",
        json={"inputs": [{"name": "x", "shape": [2, 28, 28], "datatype": "UINT8", "data": [0] * 5}]},
        headers=headers,
        timeout=30,
    )
    assert bad.status_code == 400 and "error" in bad.json(), bad.text
