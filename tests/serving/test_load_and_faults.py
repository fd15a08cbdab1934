"""Load and faults against a TorchServe of their own: a worker killed mid-load, and (slow) a 20,000-request soak.

Each test starts its own server on a store holding the cnn archive alone: the session server is shared, and
these tests kill its worker or measure its memory. Everything is on loopback and bounded in time: the load
stops itself at its request count, its stop signal or its deadline, and the server is stopped afterwards.

The soak serves the session's briefly trained cnn, or the cnn exported in $DIGITS_SOAK_ARTIFACTS when set
(e.g. a fully trained one: `DIGITS_SOAK_ARTIFACTS=artifacts make test-slow`).
"""

from __future__ import annotations

import io
import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import requests
from digits.serving.archive import archive_model
from digits.serving.server import ServerState, read_state, read_token
from digits.training.train import normalise
from PIL import Image
from serving_helpers import PORT_FLAGS, free_ports, port_flags, wait_for

from digits.cli import main

RECOVERY_S = 15  # the bound: serving again within 15 s of the kill
DIGITS = 1000  # distinct MNIST test digits the load cycles through


@dataclass(frozen=True)
class Outcome:
    index: int  # which request, in sending order
    sent: float  # time.monotonic() when it left
    done: float
    status: int  # 0: no HTTP answer at all
    right: bool  # 200 with the label the exported model gives that digit


@dataclass
class Target:
    """A running TorchServe with the cnn archive, and the digits to send it with their expected labels."""

    state: ServerState
    token: str
    management_token: str
    payloads: list[bytes]  # PNG digits
    labels: np.ndarray  # what the archived model answers for each, from its exported ONNX

    def worker(self) -> dict:
        headers = {"Authorization": f"Bearer {self.management_token}"}
        response = requests.get(f"{self.state.management_url}/models/cnn", headers=headers, timeout=10)
        return response.json()[0]["workers"][0]

    def worker_rss(self) -> int:
        """Resident bytes of TorchServe's Python workers: the Java process's children."""
        return sum(child.memory_info().rss for child in psutil.Process(self.state.pid).children(recursive=True))


def png(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def serve_cnn(mar: Path, model_onnx: Path, tmp: Path, mnist) -> Iterator[Target]:
    """Serves `mar` alone from a store under `tmp` until the generator is closed."""
    store = tmp / "store"
    store.mkdir()
    shutil.copy(mar, store / "cnn.mar")
    argv = ["--run-dir", str(tmp / "run")]
    assert main(["serve", "--model-store", str(store), *argv, *port_flags(free_ports(len(PORT_FLAGS)))]) == 0
    digits = mnist.test_images[:DIGITS]
    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"input": normalise(digits).numpy()})[0].argmax(1)
    state = read_state(tmp / "run")
    assert state.host == "127.0.0.1"
    try:
        yield Target(
            state, read_token(tmp / "run"), read_token(tmp / "run", "management"), [png(d) for d in digits], labels
        )
    finally:
        assert main(["stop", *argv]) == 0


def hammer(
    target: Target,
    concurrency: int,
    total: int,
    deadline: float,
    stop: threading.Event,
    seen: list[Outcome] | None = None,
) -> list[Outcome]:
    """Sends digits from `concurrency` keep-alive connections until `total` are sent, `stop` is set or the deadline.

    Each outcome is also appended to `seen` as it comes, for a caller that waits on the load's progress.
    """
    counter, lock = itertools.count(), threading.Lock()
    url = f"{target.state.inference_url}/predictions/cnn"
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "image/png"}

    def connection() -> list[Outcome]:
        outcomes, session = [], requests.Session()
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                index = next(counter)
            if index >= total:
                break
            outcomes.append(send(session, url, headers, target, index))
            if seen is not None:
                seen.append(outcomes[-1])  # list.append is atomic
        session.close()
        return outcomes

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        runs = [pool.submit(connection) for _ in range(concurrency)]
        return sorted((o for run in runs for o in run.result()), key=lambda o: o.sent)


def send(session: requests.Session, url: str, headers: dict, target: Target, index: int) -> Outcome:
    digit = index % len(target.payloads)
    sent = time.monotonic()
    try:
        response = session.post(url, data=target.payloads[digit], headers=headers, timeout=30)
    except requests.RequestException:
        return Outcome(index, sent, time.monotonic(), 0, False)
    right = response.status_code == 200 and response.json()["label"] == target.labels[digit]
    return Outcome(index, sent, time.monotonic(), response.status_code, right)


def wrong_answers(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status == 200 and not o.right]


@pytest.fixture
def cnn_target(store, artifacts, tmp_path, mnist) -> Iterator[Target]:
    yield from serve_cnn(store / "cnn.mar", artifacts / "cnn" / "model.onnx", tmp_path, mnist)


def test_a_killed_worker_is_replaced_and_no_answer_is_ever_wrong(cnn_target: Target) -> None:
    stop, seen = threading.Event(), []
    with ThreadPoolExecutor(max_workers=1) as background:
        load = background.submit(hammer, cnn_target, 8, 10**9, time.monotonic() + 120, stop, seen)
        # under load, with batches in flight: the load has had answers and keeps sending
        wait_for(lambda: sum(o.right for o in seen) >= 20, 60, "the load got 20 right answers")
        victim = cnn_target.worker()["pid"]
        assert "python" in psutil.Process(victim).name().lower()
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        back_in = wait_until_served(cnn_target, killed, RECOVERY_S + 15) - killed
        # and it goes on serving the load itself
        wait_for(lambda: sum(o.right for o in seen if o.sent > killed + back_in) > 10, 60, "11 right after")
        stop.set()
        outcomes = load.result()
    failed = [o for o in outcomes if o.status != 200]
    print(f"\nkill: {len(outcomes)} requests, {len(failed)} failed, serving again {back_in:.1f} s after the kill")
    assert not wrong_answers(outcomes), wrong_answers(outcomes)[:5]
    assert all(500 <= o.status < 600 for o in failed), {o.status for o in failed}
    assert back_in <= RECOVERY_S, f"serving again {back_in:.1f} s after the kill"
    worker = cnn_target.worker()
    assert worker["pid"] != victim and worker["status"] == "READY"


def wait_until_served(target: Target, since: float, timeout: float) -> float:
    """When the first request sent after `since` got a right answer (polled by a request of its own)."""
    url = f"{target.state.inference_url}/predictions/cnn"
    headers = {"Authorization": f"Bearer {target.token}"}
    with requests.Session() as session:
        while time.monotonic() < since + timeout:
            outcome = send(session, url, headers, target, 0)
            if outcome.right:
                return outcome.done
            time.sleep(0.1)
    raise AssertionError(f"not serving {timeout:.0f} s after the worker was killed")


SOAK_REQUESTS, SOAK_WARMUP, SOAK_CONCURRENCY = 20_000, 1_000, 32
SOAK_DEADLINE_S = 20 * 60
RSS_GROWTH = 0.10


@pytest.fixture
def soak_target(request, tmp_path, mnist) -> Iterator[Target]:
    artifacts = os.environ.get("DIGITS_SOAK_ARTIFACTS")
    if artifacts:
        mar = archive_model("cnn", "onnx", Path(artifacts), tmp_path / "archive", log=lambda _: None)
        onnx = Path(artifacts) / "cnn" / "model.onnx"
    else:
        mar = request.getfixturevalue("store") / "cnn.mar"
        onnx = request.getfixturevalue("artifacts") / "cnn" / "model.onnx"
    yield from serve_cnn(mar, onnx, tmp_path, mnist)


@pytest.mark.slow
def test_soak_20000_requests_all_right_and_the_worker_does_not_grow(soak_target: Target) -> None:
    stop, deadline = threading.Event(), time.monotonic() + SOAK_DEADLINE_S
    pid = soak_target.worker()["pid"]
    start = time.monotonic()
    warmup = hammer(soak_target, SOAK_CONCURRENCY, SOAK_WARMUP, deadline, stop)
    before = soak_target.worker_rss()
    rest = hammer(soak_target, SOAK_CONCURRENCY, SOAK_REQUESTS - SOAK_WARMUP, deadline, stop)
    seconds, after = time.monotonic() - start, soak_target.worker_rss()
    outcomes = warmup + rest
    failed = [o for o in outcomes if o.status != 200]
    print(
        f"\nsoak: {len(outcomes)} requests in {seconds:.0f} s ({len(outcomes) / seconds:.0f}/s) at concurrency "
        f"{SOAK_CONCURRENCY}, {len(failed)} failed, {len(wrong_answers(outcomes))} wrong; worker RSS "
        f"{before / 2**20:.1f} MiB after {SOAK_WARMUP}, {after / 2**20:.1f} MiB after {len(outcomes)} "
        f"({(after - before) / before:+.1%})"
    )
    assert len(outcomes) == SOAK_REQUESTS, f"only {len(outcomes)} requests within {SOAK_DEADLINE_S} s"
    assert not failed, failed[:5]
    assert not wrong_answers(outcomes), wrong_answers(outcomes)[:5]
    assert soak_target.worker()["pid"] == pid, "the worker was restarted during the soak"
    assert after <= before * (1 + RSS_GROWTH), f"worker RSS grew from {before} to {after} bytes"
