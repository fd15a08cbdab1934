"""The page server of `digits ui` over real HTTP, without a browser: its guards, its files, its forwarding."""

from __future__ import annotations

import base64
import io
import socket
import threading

import numpy as np
import pytest
import requests
from digits.serving.server import read_token
from digits.serving.ui import CSP, MAX_IMAGE_BYTES, TorchServeLink, make_server
from PIL import Image


def start(link: TorchServeLink):
    server = make_server(0, link)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def idle_page(tmp_path):
    """A page server whose run folder has no TorchServe."""
    server, url = start(TorchServeLink(tmp_path / "no-run"))
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def page(server):
    """A page server next to the session's TorchServe."""
    page_server, url = start(TorchServeLink(server.run_dir))
    yield url
    page_server.shutdown()
    page_server.server_close()


def digit_png(mnist, index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mnist.test_images[index], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")],
)
def test_the_page_files_come_with_a_strict_content_security_policy(idle_page, path, content_type):
    response = requests.get(idle_page + path, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(content_type)
    assert response.headers["Content-Security-Policy"] == CSP
    assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_the_page_has_no_inline_script_or_style_and_nothing_from_elsewhere(idle_page):
    html = requests.get(idle_page, timeout=10).text
    assert "<script>" not in html and " style=" not in html and "<style" not in html and " on" + "click=" not in html
    assert "http://" not in html and "https://" not in html  # no CDN: the page works offline


@pytest.mark.parametrize("path", ["/nope", "/../serving/ui.py", "/static/app.js", "//attacker.example/"])
def test_nothing_but_the_page_files_is_served(idle_page, path):
    response = requests.get(idle_page + path, timeout=10)
    assert response.status_code == 404
    assert response.json()["error"].startswith("no such page")
    assert response.headers["Content-Security-Policy"] == CSP


@pytest.mark.parametrize(
    ("method", "path", "allowed"), [("GET", "/api/classify", "POST"), ("DELETE", "/", "GET, HEAD")]
)
def test_a_route_answers_only_its_method(idle_page, method, path, allowed):
    response = requests.request(method, idle_page + path, timeout=10)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    assert response.json()["error"] == f"{path} answers {allowed}, not {method}"


def test_head_is_get_without_the_body(idle_page):
    got, head = requests.get(idle_page + "/app.js", timeout=10), requests.head(idle_page + "/app.js", timeout=10)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["Content-Length"] == got.headers["Content-Length"] == str(len(got.content))
    assert head.headers["Content-Security-Policy"] == CSP


def test_a_request_to_another_host_name_is_refused(idle_page):
    # a DNS-rebinding page reaches 127.0.0.1 under its own name; it must not read the answers
    response = requests.get(idle_page, headers={"Host": "attacker.example:8000"}, timeout=10)
    assert response.status_code == 403
    assert "only on loopback names" in response.json()["error"]


def test_a_cross_site_post_is_refused(idle_page):
    response = requests.post(
        idle_page + "/api/classify?model=cnn",
        data=b"x",
        headers={"Origin": "https://attacker.example"},
        timeout=10,
    )
    assert response.status_code == 403
    assert response.json() == {"error": "cross-site request from https://attacker.example refused"}


def test_an_image_over_the_limit_gets_413_and_words(idle_page):
    response = requests.post(idle_page + "/api/classify?model=cnn", data=b"\0" * (MAX_IMAGE_BYTES + 1), timeout=30)
    assert response.status_code == 413
    assert response.json()["error"] == "the image is 2.0 MiB; this page forwards at most 2 MiB"


@pytest.mark.parametrize("model", ["", "../models", "cnn/../../x", "a b", "x" * 65])
def test_a_model_name_that_could_leave_the_prediction_path_is_refused(idle_page, model):
    response = requests.post(idle_page + "/api/classify", params={"model": model}, data=b"x", timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == f"not a model name: {model!r}"


def test_an_empty_body_is_refused(idle_page):
    response = requests.post(idle_page + "/api/classify?model=cnn", data=b"", timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "the image is empty"


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/models"), ("POST", "/api/classify?model=cnn")])
def test_no_torchserve_is_said_in_words(idle_page, tmp_path, method, path):
    response = requests.request(method, idle_page + path, data=b"x" if method == "POST" else None, timeout=10)
    assert response.status_code == 503
    assert response.json()["error"].startswith("TorchServe is not running from ")


def test_the_served_models_are_listed_with_their_readiness(page):
    assert requests.get(page + "/api/models", timeout=30).json() == {
        "models": [{"name": "cnn", "ready": True}, {"name": "mlp", "ready": True}]
    }


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_an_image_is_forwarded_and_answered_as_torchserve_answers(server, page, mnist, expected_labels, model):
    for index in range(5):
        response = requests.post(page + f"/api/classify?model={model}", data=digit_png(mnist, index), timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model and body["label"] == expected_labels[model][index]
        assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-4
        assert body["torchserve_ms"] > 0
        framed = body["framed"]  # the 28x28 image the model saw: an MNIST digit passes through as it is
        assert framed == mnist.test_images[index].tolist()


def oip_attributions(server, model: str, image: bytes) -> tuple[np.ndarray, dict]:
    """TorchServe's own `attributions` output for `image`, asked directly over OIP: the (28, 28) map and its
    parameters."""
    request = {
        "inputs": [{"name": "digit", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}],
        "outputs": [{"name": "attributions"}],
    }
    response = requests.post(
        f"{server.url}/v2/models/{model}/infer", json=request, headers=server.headers(), timeout=60
    )
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(28, 28), output["parameters"]


@pytest.mark.parametrize(("model", "method"), [("cnn", "feature-ablation"), ("mlp", "integrated-gradients")])
def test_why_adds_the_models_own_attributions_of_the_label_it_answered(server, page, mnist, model, method):
    image = digit_png(mnist, 3)
    response = requests.post(page + f"/api/classify?model={model}&why=1", data=image, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    why = body["why"]
    assert why["label"] == body["label"] and why["method"] == method  # the format's default method
    attributions = np.asarray(why["attributions"], dtype=np.float32)
    truth, parameters = oip_attributions(server, model, image)
    assert parameters["method"] == method and parameters["target"] == "predicted"
    assert attributions.shape == (28, 28) and np.abs(attributions).max() > 0
    np.testing.assert_allclose(attributions, truth, rtol=1e-3, atol=1e-6 * np.abs(truth).max())
    without = requests.post(page + f"/api/classify?model={model}&why=0", data=image, timeout=60).json()
    assert "why" not in without and without["label"] == body["label"]


def test_the_page_asks_only_for_outputs_the_contract_names():
    from digits.contract import OIP_OUTPUTS
    from digits.serving import ui

    assert {*ui.OIP_OUTPUTS, ui.ATTRIBUTIONS} <= set(OIP_OUTPUTS)


@pytest.mark.parametrize("query", ["why=yes", "why=2", "why=1&why=true"])
def test_a_why_other_than_1_or_0_is_refused_in_words(page, mnist, query):
    response = requests.post(page + f"/api/classify?model=cnn&{query}", data=digit_png(mnist, 0), timeout=30)
    assert response.status_code == 400
    assert response.json()["error"].startswith("why must be 1 or 0")


def test_a_refused_image_and_an_unknown_model_are_said_in_words(page):
    refused = requests.post(page + "/api/classify?model=cnn", data=b"not an image", timeout=30)
    assert 400 <= refused.status_code < 500  # the handler's own status, passed on (400, or 415 over OIP)
    assert refused.json()["error"].startswith("TorchServe refused the image: ")
    unknown = requests.post(page + "/api/classify?model=nosuchmodel", data=b"x", timeout=30)
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "model nosuchmodel is not served by this TorchServe"


def test_digits_ui_refuses_a_bad_or_taken_port_in_words(tmp_path, capsys):
    from digits.cli import main

    assert main(["ui", "--port", "70000", "--run-dir", str(tmp_path)]) == 2
    assert "--port must be between 0 and 65535, got 70000" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--run-dir", str(tmp_path)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_key_renewed_by_another_request_is_used_not_renewed_again(server):
    # each new key voids the last: of two requests refused at once, only the first may ask for a new one
    before = read_token(server.run_dir)
    assert TorchServeLink(server.run_dir)._renew("inference", refused="a key another request saw refused") == before
    assert read_token(server.run_dir) == before
