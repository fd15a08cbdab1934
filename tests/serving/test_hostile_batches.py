"""Round 3 over real HTTP, as the issue found it: each hostile request sent at once with four good neighbours
to a TorchServe that batches them together (batch 8, 1 s delay), so that they share the hostile request's
batch. Every neighbour must get its own 200 and its digit's label, the hostile request its own 4xx, the worker
must be the same process afterwards (a reply over max_response_size used to kill it with its batch), and
model_log.log must gain no traceback. The time each request took is printed (`pytest -s`)."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from digits.serving.archive import ServingSettings, archive_model
from hostile_payloads import round3_corpus
from PIL import Image
from serving_helpers import Server, serving, wait_for

BY_NAME = {hostile.name: hostile for hostile in round3_corpus()}
CASES = [
    "id-of-1750000-e-acute",  # its answer would have been 10.5 MB
    "1024-lossless-4096-webps-binary",  # held the worker past its 120 s timeout
    "128-lossless-4096-webps-json",
    "512-4096-pngs-binary",
    "20-pngs-of-1000-exif-tags",
    "header-length-superscript-two",  # a 500 and a traceback per request
    "header-length-5000-digits",
]
DELAY_MS = 1000  # long enough that five requests sent at once always share a batch
NEIGHBOURS = 4
NEIGHBOUR_S = 5.0  # generous on a busy machine; unbounded, the WebP request held its neighbours 122 s


@pytest.fixture(scope="module")
def batching(artifacts, tmp_path_factory):
    """`digits serve` of the cnn archived with batch 8 and a 1 s delay."""
    store = tmp_path_factory.mktemp("batching_store")
    settings = ServingSettings(batch_size=8, max_batch_delay=DELAY_MS)
    archive_model("cnn", "onnx", artifacts, store, settings=settings, log=lambda _: None)
    with serving(store, tmp_path_factory.mktemp("batching_run")) as started:
        yield started


def worker_pid(server: Server) -> int:
    headers = {"Authorization": f"Bearer {server.management_token}"}
    [worker] = requests.get(f"{server.management_url}/models/cnn", headers=headers, timeout=10).json()[0]["workers"]
    assert worker["status"] == "READY", worker
    return worker["pid"]


def batch_sizes(server: Server) -> tuple[float, float]:
    """(batches, requests in them) so far, from the handler's BatchSize histogram."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("BatchSize_")
    }
    return values.get("BatchSize_count", 0.0), values.get("BatchSize_sum", 0.0)


def neighbour(mnist, index: int) -> tuple[str, dict]:
    """A good request for test digit `index`: /predictions PNG for even indices, OIP JSON for odd ones."""
    digit = np.asarray(mnist.test_images[index], dtype=np.uint8)
    if index % 2 == 0:
        buffer = io.BytesIO()
        Image.fromarray(digit).save(buffer, format="PNG")
        return "/predictions/cnn", {"data": buffer.getvalue()}
    tensor = {"name": "x", "datatype": "UINT8", "shape": [1, 784], "data": digit.ravel().tolist()}
    return "/v2/models/cnn/infer", {"json": {"inputs": [tensor]}}


def label_of(response: requests.Response) -> int:
    body = response.json()
    if "outputs" in body:
        return next(o for o in body["outputs"] if o["name"] == "label")["data"][0]
    return body["label"]


def timed_post(server: Server, path: str, request: dict) -> tuple[requests.Response, float]:
    request = dict(request)
    headers = {**request.pop("headers", {}), **server.headers()}
    start = time.perf_counter()
    response = requests.post(f"{server.url}{path}", headers=headers, timeout=180, **request)
    return response, time.perf_counter() - start


def model_log(server: Server) -> str:
    path = server.run_dir / "logs" / "model_log.log"
    return path.read_text(errors="replace") if path.is_file() else ""


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_request_fails_alone_in_its_batch(batching, mnist, expected_labels, name: str) -> None:
    hostile = BY_NAME[name]
    pid, (batches, batched), tracebacks = (
        worker_pid(batching),
        batch_sizes(batching),
        model_log(batching).count("Traceback"),
    )
    goods = [neighbour(mnist, index) for index in range(NEIGHBOURS)]
    with ThreadPoolExecutor(NEIGHBOURS + 1) as pool:
        bad = pool.submit(timed_post, batching, hostile.path, hostile.request)
        futures = [pool.submit(timed_post, batching, path, request) for path, request in goods]
        answers = [future.result() for future in futures]
        refused, refused_s = bad.result()
    times = ", ".join(f"{seconds:.2f}" for _, seconds in answers)
    print(f"\n{name}: {refused.status_code} in {refused_s:.2f} s; its {NEIGHBOURS} neighbours 200 in {times} s")
    for index, (response, seconds) in enumerate(answers):
        assert response.status_code == 200, (index, response.status_code, response.text[:300])
        assert label_of(response) == expected_labels["cnn"][index]
        assert seconds < NEIGHBOUR_S + DELAY_MS / 1000, (index, seconds)
    assert refused.status_code == hostile.status, refused.text[:300]
    assert all(word.lower() in json.loads(refused.content)["error"].lower() for word in hostile.words), refused.text
    assert worker_pid(batching) == pid, "the worker died and was restarted"
    # the frontend reads the worker's metric lines after the answers: wait for the batch to be counted
    wait_for(lambda: batch_sizes(batching)[1] - batched >= NEIGHBOURS + 1, 15, "the batch's metrics")
    after_batches, after_batched = batch_sizes(batching)
    assert after_batched - batched == NEIGHBOURS + 1 and after_batches - batches <= 2, "the requests did not batch"
    assert model_log(batching).count("Traceback") == tracebacks, "a client's request left a traceback in model_log.log"
