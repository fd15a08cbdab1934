"""`digits bench http --oip N`: Open Inference Protocol requests of N digits, on a tiny configuration."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from digits.bench.http import oip_body, target_for
from digits.bench.load import run_load

from digits.cli import main


@pytest.mark.parametrize(
    ("encoding", "content_type"), [("binary", "application/octet-stream"), ("json", "application/json")]
)
def test_http_bench_over_oip_counts_digits(int8_artifacts, tmp_path, encoding, content_type):
    out = tmp_path / "http"
    args = ["bench", "http", "--model", "mlp", "--format", "onnx-int8", "--artifacts", str(int8_artifacts)]
    load = ["--concurrency", "1,2", "--requests", "8", "--rounds", "2", "--warmup", "2", "--load-generator", "python"]
    oip = ["--oip", "8", "--encoding", encoding]
    assert main([*args, *load, *oip, "--workers", "2", "--out", str(out)]) == 0
    report = json.loads((out / "bench-http.json").read_text())
    assert report["plan"]["oip_digits"] == 8 and report["body"]["bytes"] > 8 * 784
    assert report["plan"]["oip_encoding"] == encoding and report["body"]["content_type"] == content_type
    for row in report["rows"]:
        assert row["model"]["errors"] == 0 and row["noop"]["errors"] == 0
        assert row["digits_per_request"] == 8
        assert row["digits_per_s"] == pytest.approx(row["model"]["requests_per_s"] * 8)
        assert row["handler"]["batches"] >= 1 and row["handler"]["mean_batch_size"] >= 1
        assert row["offline_share"] == pytest.approx(row["digits_per_s"] / report["offline"]["samples_per_s"])
    # the served file offline at the request's batch on all the workers' threads (2 x 1), torch's restored
    offline = report["offline"]
    assert (offline["backend"], offline["batch_size"], offline["threads"]) == ("onnxruntime-int8", 8, 2)
    assert offline["samples_per_s"] > 0
    markdown = (out / "bench-http.md").read_text()
    assert "the same file (onnxruntime-int8) at batch 8 on 2 thread(s), as many as the model's 2 worker(s)" in markdown
    sent = "in the binary extension" if encoding == "binary" else "as a JSON data list"
    assert f"(8 a request, a UINT8 tensor {sent}" in markdown


def test_the_json_oip_body_holds_the_digits_as_a_flat_data_list(tmp_path):
    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    body = json.loads(oip_body(digits, tmp_path / "oip.json", "json").read_text())
    [tensor] = body["inputs"]
    assert (tensor["datatype"], tensor["shape"]) == ("UINT8", [3, 28, 28]) and "outputs" not in body
    assert tensor["data"] == digits.ravel().tolist()


def test_bench_refuses_an_encoding_without_oip(tmp_path, capsys):
    assert main(["bench", "http", "--encoding", "json", "--out", str(tmp_path)]) != 0
    assert "--oip" in capsys.readouterr().err


def test_bench_refuses_oip_over_the_handlers_limit(tmp_path, capsys):
    assert main(["bench", "http", "--oip", "2000", "--out", str(tmp_path)]) != 0
    assert "1-1024" in capsys.readouterr().err


class _Headers(BaseHTTPRequestHandler):
    """Answers 200 when the OIP header says where the JSON part ends, or when a JSON body says it is JSON and
    holds its tensor's values; 400 otherwise."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        length = int(self.headers.get("Inference-Header-Content-Length", "-1"))
        if self.headers["Content-Type"] == "application/json":
            tensor = json.loads(body)["inputs"][0]
            ok = length == -1 and len(tensor["data"]) == np.prod(tensor["shape"])
        else:
            ok = (
                length > 0
                and json.loads(body[:length])["inputs"][0]["parameters"]["binary_data_size"] == len(body) - length
            )
        self.send_response(200 if ok else 400)
        self.send_header("Connection", "keep-alive")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("encoding", ["binary", "json"])
@pytest.mark.parametrize(
    "generator",
    ["python", pytest.param("ab", marks=pytest.mark.skipif(shutil.which("ab") is None, reason="ab not installed"))],
)
def test_load_generators_send_the_oip_header(generator, encoding, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Headers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = oip_body(np.zeros((3, 28, 28), dtype=np.uint8), tmp_path / "oip", encoding)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        target = target_for(url, "m", "token", body, oip_digits=3, encoding=encoding)
        result = run_load(generator, target, 2, 6)
        assert (result.requests, result.errors) == (6, 0)
    finally:
        server.shutdown()
