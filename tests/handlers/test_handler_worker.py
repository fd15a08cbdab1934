"""The handler inside TorchServe's own worker code: loaded as an archive's model dir, answering a batch.

These run TorchServe 0.12.0's Python side (ts.model_loader, ts.service, ts.protocol) without the Java
frontend: what the worker writes back to the frontend is decoded here, request by request, and that is
what the frontend turns into each HTTP response (status line, Content-Type, body).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ts
from handler_helpers import png_bytes, write_model_dir

METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"
FORBIDDEN = ("digits", "training", "export", "serving", "handlers", "tests")


def decode_predict_response(message: bytes) -> tuple[int, list[dict[str, Any]]]:
    """Parses the frame `create_predict_response` writes (ts/protocol/otf_message_handler.py)."""
    position = 0

    def integer() -> int:
        nonlocal position
        (value,) = struct.unpack_from("!i", message, position)
        position += 4
        return value

    def chunk() -> bytes:
        nonlocal position
        length = integer()
        position += length
        return bytes(message[position - length : position])

    batch_code, _ = integer(), chunk()
    answers = []
    while struct.unpack_from("!i", message, position)[0] != -1:  # -1 ends the list
        request_id, content_type, status, phrase = chunk().decode(), chunk().decode(), integer(), chunk().decode()
        headers = dict((chunk().decode(), chunk().decode()) for _ in range(integer()))
        answers.append(
            {
                "id": request_id,
                "status": status,
                "phrase": phrase,
                "content_type": content_type,
                "headers": headers,
                "body": json.loads(chunk()),
            }
        )
    return batch_code, answers


# The same script runs in this process and in a bare subprocess: load through TorchServe's loader, predict.
WORKER_SCRIPT = textwrap.dedent(
    """
    import base64, importlib.abc, json, sys

    FORBIDDEN = {forbidden!r}

    class RefuseProjectImports(importlib.abc.MetaPathFinder):
        # inside an archive these packages do not exist; make any attempt to import them fail loudly
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"the handler imported {{name!r}}, which an archive does not ship")
            return None

    sys.meta_path.insert(0, RefuseProjectImports())

    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    model_dir, batch = sys.argv[1], json.loads(sys.stdin.read())
    metrics = MetricsCacheYamlImpl(config_file_path={metrics!r})
    metrics.model_name = "tiny"
    # as ts/model_service_worker.py load_model: handler string from the manifest, no GPU, batch size 8
    service = TsModelLoader().load("tiny", model_dir, "digit_handler.py", None, 8, None, True, metrics)
    service.set_cl_socket(None)
    for request in batch:
        request["requestId"] = request["requestId"].encode()
        for parameter in request["parameters"]:
            if parameter["contentType"] != "application/json":
                parameter["value"] = base64.b64decode(parameter["value"])
    response = service.predict(batch)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    handler_file = sys.modules["digit_handler"].__file__
    result = {{"response": base64.b64encode(response).decode(), "leaked": leaked, "handler_file": handler_file}}
    print("RESULT " + json.dumps(result))
    """
).format(forbidden=FORBIDDEN, metrics=str(METRICS_YAML))


def jsonable_batch(digit_png: bytes, digit_pixels: list) -> list[dict[str, Any]]:
    """A batch mixing good and bad requests, binary values base64'd for the trip through stdin."""

    def b64(value: bytes) -> str:
        return base64.b64encode(value).decode()

    return [
        {"requestId": "png", "parameters": [{"name": "body", "contentType": "image/png", "value": b64(digit_png)}]},
        {"requestId": "junk", "parameters": [{"name": "body", "contentType": "image/png", "value": b64(b"\x00junk")}]},
        {
            "requestId": "json",
            "parameters": [{"name": "body", "contentType": "application/json", "value": {"data": digit_pixels}}],
        },
        {
            "requestId": "nan",
            "parameters": [{"name": "body", "contentType": "application/json", "value": [float("nan")] * 784}],
        },
        {"requestId": "form", "parameters": [{"name": "file", "contentType": "image/png", "value": b64(digit_png)}]},
    ]


def run_worker(model_dir: Path, batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs WORKER_SCRIPT as TorchServe starts a worker: cwd and PYTHONPATH are the model dir, nothing else."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PYTEST"))}
    env["PYTHONPATH"] = str(model_dir)
    result = subprocess.run(
        [sys.executable, "-c", WORKER_SCRIPT, str(model_dir)],
        input=json.dumps(batch),
        capture_output=True,
        text=True,
        cwd=model_dir,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def check_mixed_batch(batch_code: int, answers: list[dict[str, Any]]) -> None:
    assert batch_code == 200
    assert [(a["id"], a["status"]) for a in answers] == [
        ("png", 200),
        ("junk", 415),
        ("json", 200),
        ("nan", 400),
        ("form", 200),
    ]
    assert all(a["content_type"] == "application/json" for a in answers)
    assert answers[0]["body"] == answers[4]["body"]
    assert answers[0]["body"]["label"] == answers[2]["body"]["label"]
    assert answers[1]["body"]["type"] == "NotAnImage" and answers[1]["phrase"] == answers[1]["body"]["message"]
    assert answers[3]["body"] == {"code": 400, "type": "BadPixels", "message": "pixel 0 is nan; pixels must be finite"}


def test_archive_layout_serves_with_only_torchserve_and_runtimes(tiny_model, mnist_test, tmp_path) -> None:
    """The isolation proof: handler files flat in a model dir, project packages unimportable, cwd elsewhere."""
    digit = mnist_test[0][0]
    for fmt in ("onnx", "torchscript"):
        model_dir = write_model_dir(tmp_path / fmt, tiny_model, fmt, with_handler_files=True)
        outcome = run_worker(model_dir, jsonable_batch(png_bytes(digit), digit.tolist()))
        assert outcome["leaked"] == []
        assert Path(outcome["handler_file"]).parent == model_dir
        check_mixed_batch(*decode_predict_response(base64.b64decode(outcome["response"])))


def test_per_request_status_survives_torchservice_response_framing(tiny_model, mnist_test, tmp_path) -> None:
    """In this process: TorchServe's Service.predict frames each request's status, phrase, type and body."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    model_dir = write_model_dir(tmp_path / "onnx", tiny_model, "onnx")
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.model_name = "tiny"
    service = TsModelLoader().load("tiny", str(model_dir), "digit_handler.py", None, 8, None, True, metrics)
    service.set_cl_socket(None)
    digit = mnist_test[0][0]
    batch = jsonable_batch(png_bytes(digit), digit.tolist())
    for request in batch:
        request["requestId"] = request["requestId"].encode()
        for parameter in request["parameters"]:
            if parameter["contentType"] != "application/json":
                parameter["value"] = base64.b64decode(parameter["value"])
    check_mixed_batch(*decode_predict_response(service.predict(batch)))
