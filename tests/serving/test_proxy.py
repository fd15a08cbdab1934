"""The reverse proxy the README recommends (serving/nginx-digits.conf), started in front of a real TorchServe:
what TorchServe's frontend does not do itself, it does, for /predictions and OIP inference alike. Skipped where
nginx is not installed (Debian: apt-get install nginx)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from hostile_payloads import LARGEST_PROGRESSIVE_JPEG
from PIL import Image
from serving_helpers import free_ports, wait_for

RECIPE = Path(__file__).resolve().parents[2] / "serving" / "nginx-digits.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)")
TIMEOUT_S = 10  # the recipe's client_header_timeout and client_body_timeout


def recipe_for(listen: int, inference_url: str, log: Path, metrics_listen: int, metrics_url: str) -> str:
    """The recipe with its addresses replaced, as a user edits it."""
    text = RECIPE.read_text()
    for default, actual in [
        ("server 127.0.0.1:8080;", f"server {inference_url.removeprefix('http://')};"),
        ("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{listen};"),
        ("server 127.0.0.1:8082;", f"server {metrics_url.removeprefix('http://')};"),
        ("listen 127.0.0.1:9082", f"listen 127.0.0.1:{metrics_listen}"),
        ("/var/log/nginx/digits.log", str(log)),
    ]:
        assert default in text, default
        text = text.replace(default, actual)
    return text


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    """nginx with the recipe included in a minimal main config (what Debian's /etc/nginx/nginx.conf provides)."""
    root = tmp_path_factory.mktemp("nginx")
    port, metrics_port = free_ports(2)
    (root / "digits.conf").write_text(
        recipe_for(port, server.url, root / "digits.log", metrics_port, server.metrics_url)
    )
    temp = {name: root / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for folder in temp.values():
        folder.mkdir()
    (root / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {root / 'nginx.pid'};\nerror_log {root / 'error.log'} warn;\n"
        "events { worker_connections 64; }\nhttp {\n"
        f"  client_body_temp_path {temp['body']};\n  proxy_temp_path {temp['proxy']};\n"
        f"  fastcgi_temp_path {temp['fastcgi']};\n  uwsgi_temp_path {temp['uwsgi']};\n"
        f"  scgi_temp_path {temp['scgi']};\n  access_log off;\n  include {root / 'digits.conf'};\n}}\n"
    )
    user = ["-g", "user root;"] if os.geteuid() == 0 else []  # as root, workers would drop to nobody
    process = subprocess.Popen(
        [NGINX, "-p", str(root), "-e", "stderr", "-c", str(root / "nginx.conf"), *user],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    if process.poll() is not None:
        pytest.fail(f"nginx did not start: {process.stdout.read().decode(errors='replace')}")
    yield url, port, root, metrics_port
    process.terminate()
    process.wait(timeout=10)


def png_of(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_request(method: str, path: str, token: str, body: bytes, version: str = "HTTP/1.1", extra: str = "") -> bytes:
    head = f"{method} {path} {version}\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n{extra}"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, bool]:
    """Everything the server sends within `limit_s`, and whether it closed the connection."""
    sock.settimeout(limit_s)
    received, deadline = b"", time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return received, True
            received += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        return received, True
    return received, False


def statuses(raw: bytes) -> list[int]:
    """The status of each response in a raw byte stream (a response's JSON body runs straight into the next)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


def test_predictions_pass_through(proxy, server, mnist, expected_labels) -> None:
    url, _, _, _ = proxy
    response = requests.post(f"{url}/predictions/cnn", data=png_of(mnist.test_images[0]), headers=server.headers())
    assert response.status_code == 200 and response.json()["label"] == expected_labels["cnn"][0]


def test_pipelined_requests_are_answered_in_order(proxy, server, mnist) -> None:
    """A slow cnn request, then a fast mlp one that is refused: TorchServe alone answered the second first."""
    _, port, _, _ = proxy
    blank = png_of(mnist.test_images[0] * 0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            raw_request("POST", "/predictions/cnn", server.token, LARGEST_PROGRESSIVE_JPEG)
            + raw_request("POST", "/predictions/mlp", server.token, blank, extra="Connection: close\r\n")
        )
        received, closed = read_until_closed(sock, 30)
    assert statuses(received) == [200, 400] and closed


@pytest.mark.parametrize(("version", "extra"), [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", "")])
def test_connection_close_and_http_1_0_are_honoured(proxy, server, mnist, version: str, extra: str) -> None:
    _, port, _, _ = proxy
    with socket.create_connection(("127.0.0.1", port)) as sock:
        digit = png_of(mnist.test_images[0])
        sock.sendall(raw_request("POST", "/predictions/cnn", server.token, digit, version, extra))
        received, closed = read_until_closed(sock, 15)
    assert statuses(received) == [200] and closed


def test_idle_and_half_sent_connections_are_closed(proxy, server) -> None:
    _, port, _, _ = proxy
    half_head = f"POST /predictions/cnn HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {server.token}\r\n"
    half_body = half_head + "Content-Length: 1000\r\n\r\n" + "x" * 10
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        sockets[1].sendall(half_head.encode())
        sockets[2].sendall(half_body.encode())
        start = time.monotonic()
        outcomes = [read_until_closed(sock, 3 * TIMEOUT_S)[1] for sock in sockets]
        waited = time.monotonic() - start
    finally:
        for sock in sockets:
            sock.close()
    assert outcomes == [True, True, True]
    assert waited < 3 * TIMEOUT_S  # TorchServe alone kept them open for 45 s and more


def oip_json(digits: np.ndarray) -> dict:
    """An OIP request of (N, 28, 28) uint8 digits as JSON."""
    return {"inputs": [{"name": "x", "datatype": "UINT8", "shape": list(digits.shape), "data": digits.tolist()}]}


def oip_binary(digits: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An OIP request of (N, 28, 28) uint8 digits in the binary extension, labels asked for in binary."""
    tensor = {"name": "x", "datatype": "UINT8", "shape": list(digits.shape)}
    header = {
        "inputs": [{**tensor, "parameters": {"binary_data_size": digits.size}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + digits.tobytes(), headers


def test_oip_passes_through_as_json_and_binary(proxy, server, mnist, expected_labels) -> None:
    """OIP inference through the recipe, both encodings: the binary extension's headers pass both ways."""
    url, _, _, _ = proxy
    digits = np.asarray(mnist.test_images[:7], dtype=np.uint8).reshape(7, 28, 28)
    answer = requests.post(f"{url}/v2/models/cnn/infer", json=oip_json(digits), headers=server.headers(), timeout=30)
    assert answer.status_code == 200, answer.text
    label = next(o for o in answer.json()["outputs"] if o["name"] == "label")
    assert label["data"] == expected_labels["cnn"][:7].tolist()
    body, headers = oip_binary(digits)
    answer = requests.post(f"{url}/v2/models/cnn/infer", data=body, headers={**server.headers(), **headers}, timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/octet-stream", answer.content
    length = int(answer.headers["Inference-Header-Content-Length"])
    [label] = json.loads(answer.content[:length])["outputs"]
    assert label["name"] == "label" and label["parameters"]["binary_data_size"] == 7 * 8
    np.testing.assert_array_equal(np.frombuffer(answer.content[length:], dtype="<i8"), expected_labels["cnn"][:7])


PREDICTING_PATHS = ["/predictions/cnn", "/v2/models/cnn/infer"]


@pytest.mark.parametrize("path", PREDICTING_PATHS)
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "TRACE", "GET", "OPTIONS"])
def test_only_post_predicts(proxy, server, mnist, method: str, path: str) -> None:
    url, _, _, _ = proxy
    digit = np.asarray(mnist.test_images[:1], dtype=np.uint8).reshape(1, 28, 28)
    body = png_of(digit[0]) if path.startswith("/predictions") else json.dumps(oip_json(digit))
    response = requests.request(method, f"{url}{path}", data=body, headers=server.headers(), timeout=10)
    assert response.status_code in (403, 405), (method, response.status_code)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api-description"),
        ("OPTIONS", "/"),
        ("GET", "/models"),
        ("POST", "/v1/models/cnn:predict"),  # TorchServe would hand it to the handler, which refuses v1 anyway
        ("POST", "/v2/models/cnn/explain"),  # TorchServe would predict: its handler has no explanations
        ("GET", "/v2/models/cnn"),
        ("GET", "/v2/health/ready"),
        ("POST", "/v2/models/cnn/versions/1.0/infer"),
    ],
)
def test_nothing_but_predictions_oip_inference_and_ping_is_reachable(proxy, server, method: str, path: str) -> None:
    url, _, _, _ = proxy
    response = requests.request(method, f"{url}{path}", json={"inputs": []}, headers=server.headers(), timeout=10)
    assert response.status_code == 404


@pytest.mark.parametrize("path", PREDICTING_PATHS)
def test_query_strings_reach_no_log(proxy, server, mnist, path: str) -> None:
    url, _, root, _ = proxy
    secret = "not-a-real-key-9876543210"
    logs = {"nginx": root / "digits.log", "TorchServe": server.run_dir / "logs" / "access_log.log"}
    lines = {name: _request_lines(log, path) for name, log in logs.items()}
    digit = np.asarray(mnist.test_images[:1], dtype=np.uint8).reshape(1, 28, 28)
    body = png_of(digit[0]) if path.startswith("/predictions") else json.dumps(oip_json(digit))
    response = requests.post(f"{url}{path}?token={secret}", data=body, headers=server.headers(), timeout=30)
    assert response.status_code == 200
    for name, log in logs.items():  # both servers write their access logs after answering: wait for the line
        wait_for(lambda log=log, name=name: _request_lines(log, path) > lines[name], 30, f"{name}'s access-log line")
        assert secret not in log.read_text(errors="replace")


def _request_lines(log: Path, path: str) -> int:
    return log.read_text(errors="replace").count(path) if log.is_file() else 0


def metrics_request(port: int, method: str, host: str | None) -> tuple[int, bytes]:
    """A raw request to the recipe's metrics server (raw, so that the Host header is exactly `host`)."""
    head = f"{method} /metrics HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((head + "Content-Length: 0\r\nConnection: close\r\n\r\n").encode())
        received, _ = read_until_closed(sock, 10)
    head, _, body = received.partition(b"\r\n\r\n")
    return statuses(head)[0], body


def test_the_metrics_server_answers_get_for_its_own_names_only(proxy, server) -> None:
    """TorchServe's metrics port answers any method and any Host; through the recipe, only a GET naming this
    host gets the metrics: a page rebound to 127.0.0.1 sends its own name, and a POST is no scrape."""
    *_, metrics_port = proxy
    direct = requests.post(f"{server.metrics_url}/metrics", headers={"Host": "evil.example"}, timeout=10)
    assert direct.status_code == 200 and "# TYPE" in direct.text  # what TorchServe alone does
    for host in ("localhost", f"localhost:{metrics_port}", "127.0.0.1", f"127.0.0.1:{metrics_port}"):
        status, body = metrics_request(metrics_port, "GET", host)
        assert status == 200 and b"# TYPE ts_inference_requests_total counter" in body, (host, status)
    for host in ("evil.example", f"evil.example:{metrics_port}", "localhost.evil.example", None):
        status, body = metrics_request(metrics_port, "GET", host)
        assert status in (400, 421) and b"# TYPE" not in body, (host, status)
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
        status, body = metrics_request(metrics_port, method, "localhost")
        assert status in (403, 405) and b"# TYPE" not in body, (method, status)
