"""End to end: a real TorchServe, started by `digits serve`, over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from digits.serving.samples import drawn_large
from PIL import Image
from serving_helpers import wait_for

pytestmark = pytest.mark.usefixtures("server")


def png(digit) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(digit) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit, mode="L").convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def post(server, model, **kwargs):
    return requests.post(f"{server.url}/predictions/{model}", headers=server.headers(), timeout=30, **kwargs)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_png_digits_are_classified_like_the_exported_model(server, mnist, expected_labels, model):
    for i in range(20):
        response = post(
            server,
            model,
            data=png(mnist.test_images[i]),
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["label"] == expected_labels[model][i]
        assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-4
        assert body["confidence"] == pytest.approx(max(body["probabilities"]))


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda d: {"data": jpeg(d)}, id="jpeg"),
        pytest.param(lambda d: {"json": {"data": d.tolist()}}, id="json-rows"),
        pytest.param(lambda d: {"json": d.reshape(-1).tolist()}, id="json-bare-784"),
        pytest.param(lambda d: {"data": base64.b64encode(png(d))}, id="base64"),
        pytest.param(lambda d: {"files": {"data": ("digit.png", png(d), "image/png")}}, id="multipart"),
    ],
)
def test_every_request_format_gives_the_same_answer(server, mnist, expected_labels, encode):
    for i in range(5):
        response = post(server, "cnn", **encode(mnist.test_images[i]))
        assert response.status_code == 200, response.text
        assert response.json()["label"] == expected_labels["cnn"][i]


def test_drawn_large_digit_on_white_is_classified(server, mnist, expected_labels):
    import numpy as np

    rng = np.random.default_rng(0)
    right = 0
    for i in range(20):
        buffer = io.BytesIO()
        drawn_large(mnist.test_images[i], rng).save(buffer, format="PNG")
        right += post(server, "cnn", data=buffer.getvalue()).json()["label"] == mnist.test_labels[i]
    assert right >= 17  # a briefly trained cnn; the full figure is in the README


def _burst(server, mnist, bad_every: int = 0, total: int = 96):
    def one(i):
        if bad_every and i % bad_every == 0:
            return i, post(server, "cnn", data=b"\x89PNG\r\n\x1a\n-truncated")
        return i, post(server, "cnn", data=png(mnist.test_images[i]))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, range(total)))


def test_concurrent_burst_forms_batches_and_every_answer_is_right(server, mnist, expected_labels):
    logged = sum(batch_sizes(server))
    results = _burst(server, mnist)
    assert all(r.status_code == 200 for _, r in results)
    assert all(r.json()["label"] == expected_labels["cnn"][i] for i, r in results)
    # the worker's metric lines reach the log through a reader thread, possibly after the answers: wait for them
    wait_for(lambda: sum(batch_sizes(server)) >= logged + len(results), 30, "the burst's PredictionTime lines")
    sizes = batch_sizes(server)
    assert max(sizes) > 1, f"TorchServe never formed a batch larger than 1: {sizes[-20:]}"


def batch_sizes(server) -> list[int]:
    """Batch sizes of cnn's batches, from the handler's BatchSize lines the frontend logs (ts_log.log)."""
    log = (server.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    return [int(size) for size in re.findall(r"result=\[METRICS\]BatchSize\.Count:(\d+)\|#ModelName:cnn,", log)]


def test_bad_requests_in_a_burst_fail_alone(server, mnist, expected_labels):
    results = _burst(server, mnist, bad_every=5)
    for i, response in results:
        if i % 5 == 0:
            assert response.status_code == 400, response.text
            body = response.json()
            assert body["code"] == 400 and "truncated" in body["message"].lower() or "image" in body["message"]
        else:
            assert response.status_code == 200, response.text
            assert response.json()["label"] == expected_labels["cnn"][i]
    assert worker_status(server, "cnn") == "READY"
    assert post(server, "cnn", data=png(mnist.test_images[0])).status_code == 200


def worker_status(server, model) -> str:
    headers = {"Authorization": f"Bearer {server.management_token}"}
    description = requests.get(f"{server.management_url}/models/{model}", headers=headers, timeout=10).json()
    return description[0]["workers"][0]["status"]


@pytest.mark.parametrize("header", [None, "Bearer wrong-token"])
def test_requests_without_the_right_token_are_refused(server, mnist, header):
    headers = {"Authorization": header} if header else {}
    inference = requests.post(f"{server.url}/predictions/cnn", data=png(mnist.test_images[0]), headers=headers)
    management = requests.get(f"{server.management_url}/models", headers=headers)
    for response in (inference, management):
        assert response.status_code in (400, 401, 403)
        assert "Token Authorization failed" in response.json()["message"]


def test_management_api_is_not_on_the_inference_port_and_a_served_version_cannot_be_registered_again(server):
    for token in (server.token, server.management_token):  # neither key opens management on this port
        response = requests.get(f"{server.url}/models", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code in (400, 404) and "modelName" not in response.text
    headers = {"Authorization": f"Bearer {server.management_token}"}
    register = requests.post(f"{server.management_url}/models?url=cnn.mar", headers=headers)
    assert register.status_code == 409 and "already registered" in register.text  # what rollouts rely on
    versions = requests.get(f"{server.management_url}/models/cnn/all", headers=headers).json()
    assert [v["modelVersion"] for v in versions] == ["1.0"]


def test_predict_command_prints_label_and_confidence(server, mnist, tmp_path, capsys):
    from digits.cli import main

    path = tmp_path / "seven_label-7.png"
    path.write_bytes(png(mnist.test_images[0]))
    assert main(["predict", str(path), "--model", "cnn", "--run-dir", str(server.run_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"seven_label-7\.png\s+7\s+7\s+0\.\d{4}", out), out


def test_serve_refuses_taken_ports(server, store, tmp_path, capsys):
    from digits.cli import main

    port = server.url.rsplit(":", 1)[1]
    assert main(["serve", "--model-store", str(store), "--run-dir", str(tmp_path), "--inference-port", port]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "already in use" in err


def test_serve_refuses_a_second_start_from_the_same_run_dir(server, store, capsys):
    from digits.cli import main

    assert main(["serve", "--model-store", str(store), "--run-dir", str(server.run_dir)]) == 2
    assert "already running" in capsys.readouterr().err


def test_metadata_reaches_the_client_unchanged(server):
    headers = {"Authorization": f"Bearer {server.management_token}"}
    described = requests.get(f"{server.management_url}/models/cnn", headers=headers, timeout=10).json()[0]
    assert described["batchSize"] == 8 and described["maxBatchDelay"] == 20
    assert json.loads(json.dumps(described))["modelName"] == "cnn"


def test_token_refresh_replaces_the_inference_key(server, mnist, capsys):
    from digits.cli import main

    old = server.token
    assert main(["token", "--refresh", "--run-dir", str(server.run_dir)]) == 0
    new = capsys.readouterr().out.strip()
    assert new and new != old
    server.token = new  # the rest of the session's tests use the live key
    assert post(server, "cnn", data=png(mnist.test_images[0])).status_code == 200
    stale = requests.post(
        f"{server.url}/predictions/cnn",
        data=png(mnist.test_images[0]),
        headers={"Authorization": f"Bearer {old}"},
        timeout=30,
    )
    assert stale.status_code == 400 and "Token Authorization failed" in stale.json()["message"]


def test_evaluate_reports_accuracy_and_a_dead_url_is_one_line(server, capsys, ports):
    from digits.cli import main

    assert main(["evaluate", "--count", "20", "--run-dir", str(server.run_dir)]) == 0
    assert re.search(r"cnn: \d+/20 right \(\d+\.\d\d%\), 0 failed, 28x28 PNG", capsys.readouterr().out)
    dead = f"http://127.0.0.1:{ports[0]}"  # a free port: nothing listens there
    assert main(["evaluate", "--count", "2", "--url", dead, "--run-dir", str(server.run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {dead}" in err and "Traceback" not in err
