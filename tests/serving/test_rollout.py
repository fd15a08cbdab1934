"""`digits rollout`, `rollback` and `versions` end to end, on real TorchServes started by `digits serve`.

Under load: a rollout then a rollback while 16 connections send PNG digits and 2 send OIP requests of 64
digits; every request answered 2xx with the right labels, and every answer from a version live at that moment
(bench/switch.py states the rule). The restart: the ledger, not TorchServe's start-up order, decides the
default. Bad input, each refused before TorchServe is touched; faults, each ending with the old version
serving: a candidate that does not load, one that fails the gate, its worker killed while it loads, a
read-only store, a concurrent rollout, TorchServe killed between register and set-default, the command
killed after register. The candidates are the session's briefly trained cnn archived again as a new
version (same answers: the gate passes with its whole tolerance to spare), or a cnn trained on 300 digits
(tens of points below the live one: the gate fails with the same margin).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from digits.bench.switch import MixedLoad, png_bytes, summary, switches_from_ledger, version_problems
from digits.export.convert import export_model
from digits.serving.archive import ServingSettings, archive_model
from digits.serving.ledger import read_events, record
from digits.serving.server import read_token
from digits.training.train import TrainConfig, train
from rollout_helpers import Served, copy_store, forge, onnx_labels, serve, serving
from serving_helpers import wait_for

from digits.cli import main

SETTINGS = ServingSettings(batch_size=8, max_batch_delay=20)  # the session store's
REFUSED, NOT_LIVE = 2, 1  # digits rollout's exit statuses


@pytest.fixture(scope="module")
def candidates(artifacts, tmp_path_factory) -> Path:
    """A folder for candidate archives: the session's cnn export as versions 2.0 and 3.0."""
    out = tmp_path_factory.mktemp("candidates")
    for version in ("2.0", "3.0"):
        archive_model("cnn", "onnx", artifacts, out, settings=SETTINGS, log=lambda _: None, version=version)
    return out


@pytest.fixture(scope="module")
def weak_candidate(tmp_path_factory) -> Path:
    """A cnn trained on 300 digits for one epoch, exported with parity proven, archived as version 7.0."""
    out = tmp_path_factory.mktemp("weak")
    train(TrainConfig(model="cnn", epochs=1, limit=300, out=out, quiet=True), log=lambda _: None)
    assert export_model(out, "cnn", samples=256, log=lambda _: None).report.passed
    return archive_model("cnn", "onnx", out, out / "store", settings=SETTINGS, log=lambda _: None, version="7.0")


@pytest.fixture(scope="module")
def digit_png(mnist) -> bytes:
    return png_bytes(mnist.test_images[0])


def connection_versions(answers, connection: int) -> list[str]:
    """The versions one connection saw, in order, repeats collapsed: ["1.0", "2.0", "1.0"]."""
    seen: list[str] = []
    for answer in sorted((a for a in answers if a.connection == connection), key=lambda a: a.sent):
        if not seen or seen[-1] != answer.version:
            seen.append(answer.version)
    return seen


def every_connection_saw(load: MixedLoad, version: str, since: float) -> bool:
    connections = load.png + load.oip
    seen = {a.connection for a in list(load.answers) if a.version == version and a.sent > since and a.right}
    return len(seen) == connections


def test_a_rollout_and_a_rollback_under_load_lose_no_request(store, artifacts, candidates, mnist, tmp_path) -> None:
    digits = mnist.test_images[:256]
    with serving(copy_store(store, tmp_path / "store"), tmp_path / "run") as served:
        token = read_token(served.run_dir)
        load = MixedLoad(
            served.state.inference_url, "cnn", token, digits, onnx_labels(artifacts / "cnn" / "model.onnx", digits)
        )
        load.start()
        try:
            wait_for(lambda: every_connection_saw(load, "1.0", 0), 120, "every connection answered by 1.0")
            assert main(["rollout", "cnn", "--archive", str(candidates / "cnn-v2.0.mar"), *served.argv]) == 0
            switched = time.time()
            wait_for(lambda: every_connection_saw(load, "2.0", switched), 120, "every connection answered by 2.0")
            assert main(["rollback", "cnn", *served.argv]) == 0
            back = time.time()
            wait_for(lambda: every_connection_saw(load, "1.0", back), 120, "every connection answered by 1.0 again")
        finally:
            answers = load.stop()
        switches = switches_from_ledger(read_events(served.run_dir, served.store, "cnn"))
    counts = summary(answers)
    print(f"\nrollout and rollback under load: {counts}")
    assert counts["failed"] == 0 and counts["wrong"] == 0, counts
    assert [(s.old, s.new) for s in switches] == [("1.0", "2.0"), ("2.0", "1.0")]
    assert version_problems(answers, "1.0", switches) == []
    for connection in range(load.png + load.oip):  # each switched once per command, OIP's model_version too
        assert connection_versions(answers, connection) == ["1.0", "2.0", "1.0"], connection


def test_a_restarted_server_serves_the_version_the_ledger_says_is_live(
    store, candidates, digit_png, tmp_path, capsys
) -> None:
    run_dir, model_store = tmp_path / "run", copy_store(store, tmp_path / "store")
    with serving(model_store, run_dir) as served:
        # an archive already in the store (`digits archive --version 2.0` wrote it there) is taken in place
        shutil.copy(candidates / "cnn-v2.0.mar", model_store / "cnn-v2.0.mar")
        assert main(["rollout", "cnn", "--archive", str(model_store / "cnn-v2.0.mar"), *served.argv]) == 0
        assert served.registered() == ["2.0"]
    # the store now holds cnn.mar (1.0) and cnn-v2.0.mar: TorchServe's own order would pick either
    assert sorted(p.name for p in model_store.glob("*.mar")) == ["cnn-v2.0.mar", "cnn.mar"]
    with serving(model_store, run_dir) as served:
        assert served.registered() == ["2.0"] and served.default() == "2.0"
        assert served.predict_version(digit_png) == (200, "2.0")
        assert "load_models=cnn=cnn-v2.0.mar" in (run_dir / "config.properties").read_text().splitlines()
        capsys.readouterr()
        assert main(["versions", "cnn", *served.argv]) == 0
        table = capsys.readouterr().out
        # 1.0 was the baseline: never gated itself, its accuracy measured as the reference of 2.0's gate
        assert re.search(r"^1\.0 +cnn\.mar +[0-9a-f]{12} +\d+\.\d\d% +- .* retired$", table, re.MULTILINE), table
        assert re.search(r"^2\.0 +cnn-v2\.0\.mar .* passed .* default$", table, re.MULTILINE), table
        assert main(["rollback", "cnn", *served.argv]) == 0  # 1.0 registered again from the store
        assert served.registered() == ["1.0"] and served.predict_version(digit_png) == (200, "1.0")


# -- bad input and faults, on one server whose live version each must leave untouched ------------------


@pytest.fixture(scope="module")
def live(store, tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("live")
    with serving(copy_store(store, tmp / "store"), tmp / "run") as served:
        yield served


def assert_untouched(served: Served, digit_png: bytes) -> None:
    """cnn 1.0 is the default and the only version registered, it answers, and no candidate stays in the store."""
    assert served.registered() == ["1.0"] and served.default() == "1.0"
    assert served.predict_version(digit_png) == (200, "1.0")
    assert sorted(p.name for p in served.store.glob("*.mar")) == ["cnn.mar"]


def bad_inputs(store: Path, candidates: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (rollout arguments, what the refusal must say)."""
    mar = candidates / "cnn-v2.0.mar"
    garbage = tmp / "garbage.mar"
    garbage.write_bytes(b"not a zip file")
    return {
        "a model that is not served": (["ghost", "--archive", str(mar)], r"serves no model 'ghost'"),
        "a version that exists": (
            ["cnn", "--archive", str(forge(mar, tmp / "v1.mar", "1.0"))],
            r"version 1\.0 exists already",
        ),
        "another architecture's labels": (
            [
                "cnn",
                "--archive",
                str(forge(mar, tmp / "labels.mar", "4.0", lambda m: {**m, "labels": list("ABCDEFGHIJ")})),
            ],
            r"its labels is \['A'",
        ),
        "another input shape": (
            [
                "cnn",
                "--archive",
                str(forge(mar, tmp / "shape.mar", "4.1", lambda m: {**m, "input_shape": [1, 32, 32]})),
            ],
            r"its input_shape is \[1, 32, 32\]",
        ),
        "another normalisation": (
            ["cnn", "--archive", str(forge(mar, tmp / "mean.mar", "4.2", lambda m: {**m, "mean": 0.5}))],
            r"its mean is 0\.5 where the live version's is 0\.1307",
        ),
        "no recorded parity": (
            [
                "cnn",
                "--archive",
                str(forge(mar, tmp / "parity.mar", "4.3", lambda m: {k: v for k, v in m.items() if k != "parity"})),
            ],
            r"records no passed parity check",
        ),
        "a model file that is not its checksum's": (
            ["cnn", "--archive", str(forge(mar, tmp / "sha.mar", "4.4", files={"model.onnx": b"tampered"}))],
            r"its model file model\.onnx has SHA-256",
        ),
        "an archive that is not one": (
            ["cnn", "--archive", str(garbage), "--version", "4.5"],
            r"is not a model archive",
        ),
        "another model's archive": (
            ["cnn", "--archive", str(store / "mlp.mar"), "--version", "1.0"],
            r"exists already|holds model 'mlp'",
        ),
        "a version that is no path segment": (
            ["cnn", "--archive", str(mar), "--version", "../2"],
            r"--version '\.\./2'",
        ),
    }


CASES = [
    "a model that is not served",
    "a version that exists",
    "another architecture's labels",
    "another input shape",
    "another normalisation",
    "no recorded parity",
    "a model file that is not its checksum's",
    "an archive that is not one",
    "another model's archive",
    "a version that is no path segment",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_before_torchserve_is_touched(
    live, store, candidates, digit_png, tmp_path, capsys, case
) -> None:
    arguments, message = bad_inputs(store, candidates, tmp_path)[case]
    before = live.steps()
    capsys.readouterr()
    assert main(["rollout", *arguments, *live.argv]) == REFUSED
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert not any(step == "registered" for _, step in live.steps()[len(before) :])
    assert_untouched(live, digit_png)


def test_a_candidate_that_does_not_load_is_withdrawn(live, candidates, digit_png, tmp_path, capsys) -> None:
    broken = b"this is not an ONNX model"
    digest = hashlib.sha256(broken).hexdigest()
    mar = forge(
        candidates / "cnn-v2.0.mar",
        tmp_path / "broken.mar",
        "6.0",
        lambda m: {**m, "sha256": digest},
        {"model.onnx": broken},
    )
    capsys.readouterr()
    assert main(["rollout", "cnn", "--archive", str(mar), *live.argv]) == NOT_LIVE
    assert "cnn 6.0 did not go live" in capsys.readouterr().err
    assert ("6.0", "withdrawn") in live.steps()
    assert_untouched(live, digit_png)


def test_a_candidate_failing_the_gate_is_withdrawn(live, weak_candidate, digit_png, capsys) -> None:
    capsys.readouterr()
    assert main(["rollout", "cnn", "--archive", str(weak_candidate), *live.argv]) == NOT_LIVE
    out, err = capsys.readouterr()
    assert "gate FAILED: 7.0" in out and "cnn 7.0 did not go live: gate FAILED" in err, (out, err)
    assert ("7.0", "withdrawn") in live.steps()
    assert_untouched(live, digit_png)


def in_background(argv: list[str]) -> tuple[threading.Thread, list[int]]:
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(main(argv)), daemon=True)
    thread.start()
    return thread, status


def test_the_candidates_worker_killed_while_it_loads(live, candidates, digit_png, tmp_path, capsys) -> None:
    mar = forge(candidates / "cnn-v2.0.mar", tmp_path / "victim.mar", "8.0")
    java = psutil.Process(live.state.pid)
    before = {child.pid for child in java.children(recursive=True)}
    thread, status = in_background(["rollout", "cnn", "--archive", str(mar), *live.argv])

    def new_worker() -> psutil.Process | None:
        for child in java.children(recursive=True):
            try:
                if child.pid not in before and "model_service_worker" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        return None

    wait_for(lambda: new_worker() is not None, 60, "the candidate's worker process")
    victim = new_worker()
    victim.suspend()  # frozen while it starts: it cannot finish loading while we look
    try:
        workers = live.management("GET", "/models/cnn/8.0").json()[0]["workers"]
        assert thread.is_alive() and all(w["status"] != "READY" for w in workers), "it loaded before it could be killed"
    finally:
        victim.kill()
    thread.join(180)
    assert status == [NOT_LIVE]
    assert "cnn 8.0 did not go live" in capsys.readouterr().err
    assert_untouched(live, digit_png)


@pytest.fixture
def read_only_store(live) -> Iterator[Path]:
    """The live server's store, read-only: a read-only bind mount over itself (root), else mode 0555."""
    store = live.store
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "--bind", str(store), str(store)], capture_output=True).returncode == 0
    )
    if mounted:
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(store), str(store)]).returncode == 0
    elif os.geteuid() == 0:
        pytest.skip("root without mount rights: no way to make the store read-only for root")
    else:
        store.chmod(0o555)
    try:
        yield store
    finally:
        subprocess.run(["umount", str(store)]) if mounted else store.chmod(0o755)


def test_a_read_only_store_refuses_the_candidate(live, read_only_store, artifacts, digit_png, capsys) -> None:
    capsys.readouterr()
    argv = ["rollout", "cnn", "--artifacts", str(artifacts), "--version", "9.0", *live.argv]
    assert main(argv) == REFUSED
    assert f"cannot write the candidate's archive into the model store {read_only_store}" in capsys.readouterr().err
    assert_untouched(live, digit_png)


def test_a_second_rollout_of_the_same_model_is_refused(
    live, weak_candidate, candidates, digit_png, tmp_path, capsys
) -> None:
    weak = forge(weak_candidate, tmp_path / "weak.mar", "7.1")
    first, status = in_background(["rollout", "cnn", "--archive", str(weak), *live.argv])
    wait_for(lambda: ("7.1", "checked") in live.steps(), 60, "the first rollout to hold the lock")
    assert first.is_alive()
    second = ["rollout", "cnn", "--archive", str(candidates / "cnn-v3.0.mar"), *live.argv]
    assert main(second) == REFUSED
    assert re.search(r"a rollout or rollback of cnn is already running \(pid \d+\)", capsys.readouterr().err)
    first.join(180)
    assert status == [NOT_LIVE]  # the weak candidate fails its gate
    assert_untouched(live, digit_png)


# -- interrupted rollouts -------------------------------------------------------------------------------


def kill_torchserve(served: Served) -> None:
    java = psutil.Process(served.state.pid)
    for process in [*java.children(recursive=True), java]:
        process.kill()


def test_torchserve_killed_between_register_and_set_default(store, candidates, digit_png, tmp_path, capsys) -> None:
    run_dir, model_store = tmp_path / "run", copy_store(store, tmp_path / "store")
    served = serve(model_store, run_dir)
    try:
        thread, status = in_background(["rollout", "cnn", "--archive", str(candidates / "cnn-v2.0.mar"), *served.argv])
        wait_for(lambda: ("2.0", "registered") in served.steps(), 120, "the candidate registered")
        kill_torchserve(served)  # during the gate, which sends 1,500 requests
        thread.join(180)
        assert status == [NOT_LIVE]
        assert "TorchServe stopped during the rollout" in capsys.readouterr().err
        assert ("2.0", "live") not in served.steps(), "the gate ended before TorchServe could be killed"
    finally:
        main(["stop", *served.argv])
    with serving(model_store, run_dir) as restarted:  # the old version, as the ledger says
        assert restarted.registered() == ["1.0"] and restarted.predict_version(digit_png) == (200, "1.0")


def test_a_killed_rollout_is_recovered_by_the_next(store, candidates, digit_png, tmp_path, capsys) -> None:
    with serving(copy_store(store, tmp_path / "store"), tmp_path / "run") as served:
        command = [sys.executable, "-m", "digits", "rollout", "cnn", "--archive", str(candidates / "cnn-v2.0.mar")]
        process = subprocess.Popen([*command, *served.argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: ("2.0", "registered") in served.steps(), 120, "the candidate registered")
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert served.registered() == ["1.0", "2.0"] and served.default() == "1.0"  # left behind
        capsys.readouterr()
        assert main(["rollout", "cnn", "--archive", str(candidates / "cnn-v3.0.mar"), *served.argv]) == 0
        assert "recovering: draining and unregistering cnn 2.0" in capsys.readouterr().out
        assert served.registered() == ["3.0"] and served.predict_version(digit_png) == (200, "3.0")
        assert sorted(p.name for p in served.store.glob("*.mar")) == ["cnn-v3.0.mar", "cnn.mar"]  # 2.0's removed
        steps = served.steps()
        assert ("2.0", "withdrawn") in steps and ("1.0", "retired") in steps and steps[-1] == ("1.0", "retired")


def test_a_rollout_killed_after_set_default_is_recorded_live_by_the_next(
    store, candidates, digit_png, tmp_path, capsys
) -> None:
    """The state a command killed between set-default and its `live` line leaves: 2.0 registered, gated, the
    default; the ledger's last line for it `gated`; 1.0 still registered. The next rollout records 2.0 live
    (it passed its gate), retires 1.0, and goes on from 2.0."""
    model_store = copy_store(store, tmp_path / "store")
    with serving(model_store, tmp_path / "run") as served:
        shutil.copy(candidates / "cnn-v2.0.mar", model_store / "cnn-v2.0.mar")
        sha = hashlib.sha256((model_store / "cnn.mar").read_bytes()).hexdigest()
        record(served.run_dir, served.store, "cnn", "1.0", "baseline", archive="cnn.mar", archive_sha256=sha)
        record(served.run_dir, served.store, "cnn", "2.0", "checked", archive="cnn-v2.0.mar", written=True)
        assert served.management("POST", "/models", url="cnn-v2.0.mar", model_name="cnn", synchronous="true").ok
        record(served.run_dir, served.store, "cnn", "2.0", "registered")
        record(served.run_dir, served.store, "cnn", "2.0", "gated", passed=True, accuracy=0.9, reference="1.0")
        assert served.management("PUT", "/models/cnn/2.0/set-default").ok  # and here the command was killed
        capsys.readouterr()
        assert main(["rollout", "cnn", "--archive", str(candidates / "cnn-v3.0.mar"), *served.argv]) == 0
        assert "recovered: cnn 2.0 had passed its gate and was made the default" in capsys.readouterr().out
        assert served.registered() == ["3.0"] and served.predict_version(digit_png) == (200, "3.0")
        steps = served.steps()
        assert steps.index(("2.0", "live")) < steps.index(("1.0", "retired")) < steps.index(("3.0", "checked"))
        assert steps[-1] == ("2.0", "retired")


SOAK_REQUESTS, SOAK_PNG, SOAK_OIP = 100_000, 30, 2  # 32 connections
SOAK_DEADLINE_S = 60 * 60


@pytest.mark.slow
def test_soak_100000_requests_across_two_rollouts_and_a_rollback(store, artifacts, candidates, mnist, tmp_path) -> None:
    """1.0 -> 2.0 -> 3.0 -> 2.0 while 30 connections send PNG digits and 2 send OIP requests of 64 digits, each
    command started when the load has sent its share: 0 failed, 0 wrong, the version rule kept."""
    digits = mnist.test_images[:256]
    expected = onnx_labels(artifacts / "cnn" / "model.onnx", digits)
    with serving(copy_store(store, tmp_path / "store"), tmp_path / "run") as served:
        url, token = served.state.inference_url, read_token(served.run_dir)
        load = MixedLoad(url, "cnn", token, digits, expected, SOAK_PNG, SOAK_OIP, limit=SOAK_REQUESTS).start()
        commands = [
            (0.10, ["rollout", "cnn", "--archive", str(candidates / "cnn-v2.0.mar")]),
            (0.40, ["rollout", "cnn", "--archive", str(candidates / "cnn-v3.0.mar")]),
            (0.70, ["rollback", "cnn"]),
        ]
        try:
            for share, command in commands:
                wait_for(lambda s=share: len(load.answers) >= s * SOAK_REQUESTS, SOAK_DEADLINE_S, f"{share:.0%} sent")
                assert main([*command, *served.argv]) == 0, command
            wait_for(load.finished, SOAK_DEADLINE_S, "the soak's last request")
        finally:
            answers = load.stop()
        switches = switches_from_ledger(read_events(served.run_dir, served.store, "cnn"))
    counts = summary(answers)
    print(f"\nsoak: {counts}")
    assert counts["requests"] == SOAK_REQUESTS and counts["failed"] == 0 and counts["wrong"] == 0, counts
    assert [(s.old, s.new) for s in switches] == [("1.0", "2.0"), ("2.0", "3.0"), ("3.0", "2.0")]
    assert version_problems(answers, "1.0", switches) == []
