"""`digits serve` refuses clearly, exit code 2, instead of hanging or starting half a server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from digits.contract import META_FILE
from digits.serving import server
from digits.serving.server import TS_PROCESS, check_not_running
from serving_helpers import PORT_FLAGS, port_flags

from digits.cli import main


def _rewrite_archive(source: Path, target: Path, change) -> None:
    """Copies an archive, passing its metadata and model file through `change(meta, model) -> (meta, model)`."""
    with zipfile.ZipFile(source) as original:
        meta = json.loads(original.read(META_FILE))
        model_name = meta["model_file"]
        meta, model = change(meta, original.read(model_name))
        with zipfile.ZipFile(target, "w") as copy:
            for item in original.infolist():
                payload = {META_FILE: json.dumps(meta).encode(), model_name: model}.get(item.filename)
                copy.writestr(item, original.read(item) if payload is None else payload)


def _wrong_digest(meta: dict, model: bytes) -> tuple[dict, bytes]:
    return {**meta, "sha256": "0" * 64}, model


def _damaged_file(meta: dict, model: bytes) -> tuple[dict, bytes]:
    """A model file cut short, with metadata vouching for the damaged bytes: only the load itself can fail."""
    damaged = model[: len(model) * 3 // 4]
    return {**meta, "sha256": hashlib.sha256(damaged).hexdigest()}, damaged


def test_broken_models_fail_serve_fast_each_with_its_reason(store, tmp_path, ports, capsys):
    bad_store = tmp_path / "store"
    bad_store.mkdir()
    _rewrite_archive(store / "cnn.mar", bad_store / "cnn.mar", _wrong_digest)  # ONNX
    _rewrite_archive(store / "mlp.mar", bad_store / "mlp.mar", _damaged_file)  # TorchScript
    argv = ["--run-dir", str(tmp_path / "run")]
    assert main(["serve", "--model-store", str(bad_store), *argv, *port_flags(ports), "--timeout", "60"]) == 2
    err = capsys.readouterr().err
    assert "model cnn failed to load: model file model.onnx has SHA-256" in err and "0" * 64 in err
    assert "model mlp failed to load: model file model.pt cannot be loaded as torchscript" in err
    assert main(["stop", *argv]) == 0
    assert "not running" in capsys.readouterr().out  # serve cleaned up after itself


@pytest.mark.parametrize("role", range(len(PORT_FLAGS)), ids=[flag.strip("-") for flag in PORT_FLAGS])
def test_serve_refuses_each_taken_port_naming_its_flag_and_holder(store, tmp_path, ports, capsys, role: int):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[role]))
        taken.listen()
        assert main(["serve", "--model-store", str(store), "--run-dir", str(tmp_path), *port_flags(ports)]) == 2
    err = capsys.readouterr().err
    assert f"port {ports[role]} on 127.0.0.1 is already in use by " in err and f"(pid {os.getpid()})" in err
    assert f"pass {PORT_FLAGS[role]} with a free port" in err
    assert not (tmp_path / "server.json").exists()


def test_serve_names_the_torchserve_that_holds_its_port(server, store, tmp_path, capsys):
    port = server.url.rsplit(":", 1)[1]
    assert main(["serve", "--model-store", str(store), "--run-dir", str(tmp_path), "--inference-port", port]) == 2
    assert f"port {port} on 127.0.0.1 is already in use by a TorchServe (pid" in capsys.readouterr().err


@pytest.fixture
def foreign_torchserve():
    """A process that TorchServe's and digits's checks take for TorchServe (its command line names the class)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", TS_PROCESS])
    yield process.pid
    process.kill()
    process.wait()


def test_serve_refuses_a_torchserve_it_did_not_start_in_its_temp_dir(
    store, tmp_path, ports, foreign_torchserve, capsys
):
    """Started by hand with TMPDIR=RUN_DIR/tmp: digits must neither delete its pid file nor start beside it."""
    pid_file = tmp_path / "run" / "tmp" / ".model_server.pid"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(str(foreign_torchserve))
    argv = ["serve", "--model-store", str(store), "--run-dir", str(tmp_path / "run"), *port_flags(ports)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"a TorchServe that digits did not start (pid {foreign_torchserve}) is running" in err
    assert "torchserve --stop" in err and len(err.strip().splitlines()) == 1
    assert pid_file.read_text() == str(foreign_torchserve)


def test_a_stale_pid_file_is_removed(tmp_path):
    pid_file = tmp_path / "tmp" / ".model_server.pid"
    pid_file.parent.mkdir()
    pid_file.write_text(str(os.getpid()))  # alive, but not TorchServe: a reused pid
    check_not_running(tmp_path)
    assert not pid_file.exists()


def test_serve_without_java_says_so(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert main(["serve", "--model-store", str(store), "--run-dir", str(tmp_path)]) == 2
    assert "Java was not found" in capsys.readouterr().err


def test_serve_without_java_on_the_path_says_so(store, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["serve", "--model-store", str(store), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Java was not found (TorchServe needs Java 17): install it or set JAVA_HOME" in err
    assert len(err.strip().splitlines()) == 1


def test_serve_without_archives_names_the_command_to_run(tmp_path, ports, capsys):
    if shutil.which("java") is None:
        pytest.skip("needs java to get past the first check")
    argv = ["serve", "--model-store", str(tmp_path), "--run-dir", str(tmp_path / "run"), *port_flags(ports)]
    assert main(argv) == 2
    assert "holds no .mar archives; run `digits archive MODEL` first" in capsys.readouterr().err


@pytest.mark.parametrize(("host", "warns"), [("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False)])
def test_binding_beyond_loopback_warns(tmp_path, ports, capsys, host: str, warns: bool):
    # an empty store stops serve right after the warning: nothing is ever exposed by this test
    argv = ["serve", "--model-store", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--bind", host]
    assert main([*argv, *port_flags(ports)]) == 2
    err = capsys.readouterr().err
    assert (f"warning: binding TorchServe to {host}: it is reachable from other machines" in err) == warns
    assert "holds no .mar archives" in err


def test_every_broken_model_is_named_even_when_one_fails_later(tmp_path, monkeypatch):
    # cnn's worker has died twice; mlp's dies twice a second later: serve must wait for it and name both
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "model_log.log"

    def failure(model: str, reason: str) -> str:
        prefix = f"2026-11-26T15:00:00,000 [INFO ] W-9000-{model}_1.0-stdout MODEL_LOG - "
        return f"{prefix}Failed to load model {model}, exception {reason}\n{prefix}Backend worker process died.\n"

    log.write_text(failure("cnn", "digest mismatch") * 2)
    state = server.ServerState(0, "127.0.0.1", {"inference": 9}, str(tmp_path), "", ["cnn", "mlp"])
    monkeypatch.setattr(server, "is_running", lambda _: True)
    monkeypatch.setattr(server, "_answers", lambda *_: False)
    later = threading.Timer(1.0, lambda: log.open("a").write(failure("mlp", "cannot be loaded") * 2))
    later.start()
    try:
        with pytest.raises(server.ServeError) as raised:
            server.wait_until_ready(state, tmp_path, timeout=30)
    finally:
        later.cancel()
    message = str(raised.value)
    assert "model cnn failed to load: digest mismatch" in message
    assert "model mlp failed to load: cannot be loaded" in message


def test_a_failure_counts_even_when_torchserve_kills_the_worker_before_it_says_it_died(tmp_path):
    # what TorchServe 0.12 wrote for a damaged model: the worker logs its reason, answers the frontend, and
    # is killed (its output no longer read) before its "Backend worker process died" line, here on the 2nd try
    prefix = "2026-11-28T22:11:37,726 [INFO ] W-44169-mlp_1.0-stdout MODEL_LOG - "
    reason = f"{prefix}Failed to load model mlp, exception model file model.pt cannot be loaded as torchscript\n"
    died = f"{prefix}Backend worker process died.\n{prefix}RuntimeError: 500 - Unknown exception\n"
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "model_log.log"
    log.write_text(reason + died + reason)
    assert server.failed_models(tmp_path, ["cnn", "mlp"]) == ["mlp"]
    assert server.load_failure(log, "mlp") == "model file model.pt cannot be loaded as torchscript"
    log.write_text(reason + died)
    assert server.failed_models(tmp_path, ["mlp"]) == []  # once is not yet a verdict: TorchServe retries


def test_a_worker_that_dies_without_a_reason_still_counts(tmp_path):
    # an exception TorchServe's loader does not catch (not a RuntimeError): no reason line, only the death
    prefix = "2026-11-28T22:11:37,726 [INFO ] W-9000-cnn_1.0-stdout MODEL_LOG - "
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "model_log.log"
    log.write_text(f"{prefix}Backend worker process died.\n{prefix}ImportError: no module named x\n" * 2)
    assert server.failed_models(tmp_path, ["cnn", "mlp"]) == ["cnn"]
    assert server.load_failure(log, "cnn") == "the worker died during start-up (see the log below)"
