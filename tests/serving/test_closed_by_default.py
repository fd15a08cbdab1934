"""Closed by default: a token on every inference and management API (HTTP and gRPC), the management API on its
own port only, model registration (on, for `digits rollout`) refusing every URL and every file outside the
store, archives only from the local store, every listener on loopback.

What TorchServe 0.12.0 leaves open without a token, on loopback only: the metrics API and the OpenAPI
description (`OPTIONS /`). docs/security.md says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import psutil
import pytest
import requests
from digits.serving.config import Ports, render_config
from digits.serving.server import read_state

REFUSED = "InvalidKeyException"  # TorchServe's error type for a missing or wrong key (status 400, not 401)
INFERENCE_APIS = [
    ("POST", "/predictions/cnn"),
    ("POST", "/explanations/cnn"),
    ("POST", "/v1/models/cnn:predict"),
    ("POST", "/v2/models/cnn/infer"),
    ("POST", "/wfpredict/ghost"),
    ("GET", "/ping"),
]
# none of these changes anything even if a key were accepted: "ghost" is no model or workflow here
MANAGEMENT_APIS = [
    ("GET", "/models"),
    ("GET", "/models/cnn"),
    ("POST", "/models?url=ghost.mar"),
    ("PUT", "/models/ghost?min_worker=3"),
    ("DELETE", "/models/ghost"),
    ("GET", "/workflows"),
    ("POST", "/workflows?url=ghost.war"),
    ("DELETE", "/workflows/ghost"),
    ("POST", "/token?type=inference"),  # needs the third key, "API", which digits never hands out
]


def call(base: str, method: str, path: str, key: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return requests.request(method, base + path, headers=headers, data=b"{}", timeout=10)


def error_type(response: requests.Response) -> str | None:
    try:
        return response.json().get("type")
    except (ValueError, AttributeError):
        return None


@pytest.mark.parametrize(("method", "path"), INFERENCE_APIS, ids=[p for _, p in INFERENCE_APIS])
@pytest.mark.parametrize("key", [None, "wrong", "management"])
def test_every_inference_api_refuses_a_missing_or_wrong_key(server, method: str, path: str, key) -> None:
    sent = {"wrong": "not-the-key", "management": server.management_token}.get(key)
    response = call(server.url, method, path, sent)
    assert error_type(response) == REFUSED, response.text
    assert response.status_code == 400 and "Token Authorization failed" in response.json()["message"]


# the other APIs' keys too; the management key itself must not open the token API (it takes the "API" key)
MANAGEMENT_CASES = [(m, p, key) for m, p in MANAGEMENT_APIS for key in (None, "wrong", "inference")]
MANAGEMENT_CASES.append(("POST", "/token?type=inference", "management"))


@pytest.mark.parametrize(("method", "path", "key"), MANAGEMENT_CASES, ids=[f"{p}-{k}" for _, p, k in MANAGEMENT_CASES])
def test_every_management_api_refuses_a_missing_or_wrong_key(server, method: str, path: str, key) -> None:
    sent = {"wrong": "not-the-key", "inference": server.token, "management": server.management_token}.get(key)
    response = call(server.management_url, method, path, sent)
    assert error_type(response) == REFUSED, response.text
    assert re.search(r"Token Authori[sz]ation failed|Token Authentication failed", response.json()["message"])


def test_the_right_keys_get_past_the_check(server) -> None:
    """The refusals above are the token check's: with the right key the same calls get other answers."""
    for method, path in INFERENCE_APIS:
        assert error_type(call(server.url, method, path, server.token)) != REFUSED, path
    for method, path in MANAGEMENT_APIS[:-1]:
        assert error_type(call(server.management_url, method, path, server.management_token)) != REFUSED, path


def test_management_api_answers_on_its_own_port_only(server) -> None:
    for base in (server.url, server.metrics_url):
        for key in (server.token, server.management_token):
            for method, path in MANAGEMENT_APIS[:3]:
                response = call(base, method, path, key)
                assert response.status_code in (400, 404, 405), (base, path, response.text)
                assert "modelName" not in response.text and "models" not in response.text


def test_registration_takes_nothing_from_outside_the_store(server, tmp_path) -> None:
    """TorchServe itself refuses, with the management key: URLs allowed_urls does not admit (every scheme, the
    store's own folder through `..`), relative paths, and archive files outside the store."""
    headers = {"Authorization": f"Bearer {server.management_token}"}
    store = read_state(server.run_dir).store
    outside = tmp_path / "outside.mar"
    shutil.copy(Path(store) / "cnn.mar", outside)
    refusals = {
        f"file://{outside}": "does not match any allowed URL",
        "http://169.254.169.254/x.mar": "does not match any allowed URL",
        "https://example.com/cnn.mar": "does not match any allowed URL",
        f"file://{store}/../{outside.name}": "Relative path is not allowed",
        f"../{tmp_path.name}/{outside.name}": "Relative path is not allowed",
        str(outside): "Model not found at",
    }
    for url, message in refusals.items():
        params = {"url": url, "model_name": "outsider"}
        response = requests.post(f"{server.management_url}/models", params=params, headers=headers, timeout=30)
        assert response.status_code == 404 and message in response.text, (url, response.text)
    listed = requests.get(f"{server.management_url}/models", headers=headers, timeout=10).json()["models"]
    assert "outsider" not in {model["modelName"] for model in listed}
    assert not (Path(store) / outside.name).exists()


def test_urls_stop_at_the_store_for_workflows_too(server, tmp_path) -> None:
    headers = {"Authorization": f"Bearer {server.management_token}"}
    store = read_state(server.run_dir).store
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the model store")
    for url in (
        f"file://{store}/{'../' * 12}{str(secret).lstrip('/')}",
        f"file://{secret}",
        "http://169.254.169.254/x",
    ):
        response = requests.post(f"{server.management_url}/workflows", params={"url": url}, headers=headers)
        assert response.status_code == 404 and "does not match any allowed URL" in response.text, response.text
    assert not (Path(store) / secret.name).exists()  # TorchServe 0.12.0 copies before it checks the path


def test_metrics_and_api_description_need_no_token_and_every_listener_is_on_loopback(server) -> None:
    assert requests.get(f"{server.metrics_url}/metrics", timeout=10).status_code == 200
    for base in (server.url, server.management_url):
        assert requests.options(base, timeout=10).json()["info"]["title"] == "TorchServe APIs"
    state = read_state(server.run_dir)
    listening = [c for c in psutil.Process(state.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert {c.laddr.port for c in listening} == set(state.ports.values())
    assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_config_is_closed_by_default(store) -> None:
    config = dict(line.split("=", 1) for line in render_config(store, Ports()).splitlines() if "=" in line)
    addresses = [config[k] for k in config if k.endswith("_address")]
    assert len(addresses) == 5 and all(re.fullmatch(r"(http://)?127\.0\.0\.1(:\d+)?", a) for a in addresses)
    assert config["disable_token_authorization"] == "false" and config["enable_model_api"] == "true"
    assert config["load_models"] == "cnn=cnn.mar,mlp=mlp.mar"  # one version each, named: never `all`
    assert config["install_py_dep_per_model"] == "false"
    allowed = config["allowed_urls"]  # a Java regex; Python's re reads this one the same way
    root = store.resolve()
    assert re.fullmatch(allowed, f"file://{root}/cnn.mar")
    for url in (
        f"file://{root}/../cnn.mar",
        f"file://{root}/sub/cnn.mar",
        f"file://{root}x/cnn.mar",
        "http://h/cnn.mar",
    ):
        assert not re.fullmatch(allowed, url), url


# gRPC: TorchServe wraps both gRPC services in GRPCInterceptor, which checks the same keys as HTTP
# (org.pytorch.serve.grpcimpl.GRPCInterceptor). grpcio is not a dependency; curl speaks gRPC's framing well
# enough for unary calls: HTTP/2 POST, application/grpc, a 5-byte prefix, status in the trailers.
GRPC_INFERENCE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
GRPC_MANAGEMENT = "org.pytorch.serve.grpc.management.ManagementAPIsService"
PERMISSION_DENIED = 7


def grpc_call(port: int, method: str, key: str | None, message: bytes = b"") -> tuple[int, str]:
    """Calls a unary gRPC method on 127.0.0.1:`port`; returns (grpc-status, grpc-message)."""
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    command = ["curl", "-s", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "-X", "POST"]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-"]
    if key is not None:
        command += ["-H", f"authorization: Bearer {key}"]
    out = subprocess.run([*command, f"http://127.0.0.1:{port}/{method}"], input=framed, capture_output=True, timeout=20)
    headers = dict(re.findall(r"^(grpc-[a-z]+): ?(.*?)\r?$", out.stdout.decode(errors="replace"), re.MULTILINE))
    assert "grpc-status" in headers, out.stdout
    return int(headers["grpc-status"]), unquote(headers.get("grpc-message", ""))


def _curl_speaks_http2() -> bool:
    if shutil.which("curl") is None:
        return False
    return "HTTP2" in subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout


needs_curl = pytest.mark.skipif(not _curl_speaks_http2(), reason="needs curl with HTTP/2 to speak gRPC")


@needs_curl
def test_grpc_apis_refuse_a_missing_or_wrong_key(server) -> None:
    ports = read_state(server.run_dir).ports
    calls = [
        (ports["grpc_inference"], f"{GRPC_INFERENCE}/Ping", server.token, server.management_token),
        (ports["grpc_management"], f"{GRPC_MANAGEMENT}/ListModels", server.management_token, server.token),
    ]
    for port, method, right, other in calls:
        for key in (None, "not-the-key", other):
            status, message = grpc_call(port, method, key)
            assert status == PERMISSION_DENIED and "Token Authorization failed" in message, (method, key)
        assert grpc_call(port, method, right) == (0, ""), method


def test_no_registration_closes_the_model_api(store) -> None:
    config = dict(
        line.split("=", 1) for line in render_config(store, Ports(), registration=False).splitlines() if "=" in line
    )
    assert config["enable_model_api"] == "false"


@needs_curl
def test_grpc_model_registration_stops_at_the_store_too(server) -> None:
    url = b"http://169.254.169.254/x.mar"
    register = b"\x4a" + bytes([len(url)]) + url  # RegisterModelRequest, field 9 (url), length-delimited
    port = read_state(server.run_dir).ports["grpc_management"]
    status, message = grpc_call(port, f"{GRPC_MANAGEMENT}/RegisterModel", server.management_token, register)
    assert status != 0 and "does not match any allowed URL" in message, message
