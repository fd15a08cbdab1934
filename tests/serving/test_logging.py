"""TorchServe's logs under digits serve: each line once, in its own file, rotated and capped, its owner's alone,
and nothing a client sends can grow the console (which cannot be rotated) or leave a key or a stack trace."""

from __future__ import annotations

import io
import stat
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import requests
from digits.serving.config import LOG_CONFIG, make_private
from PIL import Image
from serving_helpers import wait_for


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_log_line_is_written_once_and_the_console_keeps_only_warnings(server, mnist):
    headers = {"Authorization": f"Bearer {server.token}"}
    for pixels in mnist.test_images[:50]:
        response = requests.post(f"{server.url}/predictions/cnn", data=_png(pixels), headers=headers, timeout=30)
        assert response.status_code == 200
    logs = server.run_dir / "logs"
    ts_log = (logs / "ts_log.log").read_text(errors="replace").splitlines()
    assert not any("[DEBUG]" in line for line in ts_log)  # TorchServe's default: several DEBUG lines a request
    # without additivity="false", access-log and metrics lines were copied here, and org.pytorch.serve's twice
    assert not any(" ACCESS_LOG - " in line or " TS_METRICS - " in line for line in ts_log)
    # lines TorchServe writes once by construction appear once: a logger that also wrote to its parent's
    # appender would copy every one of them (two identical event lines in one millisecond are legitimate,
    # e.g. two batches' "Looping backend response at" lines, so counting all lines would be a race)
    once = [f"Model {model} loaded." for model in ("cnn", "mlp")] + ["Inference API bind to"]
    assert {text: sum(text in line for line in ts_log) for text in once} == dict.fromkeys(once, 1)
    access = logs / "access_log.log"
    wait_for(lambda: "POST /predictions/cnn" in access.read_text(errors="replace"), 30, "an access-log line")
    console = (logs / "torchserve.out").read_text(errors="replace")
    assert "[INFO ]" not in console and "[WARN ]" not in console and len(console) < 100_000


def test_clients_cannot_write_stack_traces_or_errors_to_the_console(server):
    """A malformed form body (TorchServe's frontend answers it with a 500) and POST /token without a key, 20
    each: not a byte more on the console, no stack trace anywhere, one short line per form body in ts_log."""
    logs = server.run_dir / "logs"
    console_before = (logs / "torchserve.out").stat().st_size
    ts_log_before = (logs / "ts_log.log").stat().st_size
    form = {"Content-Type": "application/x-www-form-urlencoded", **server.headers()}
    for _ in range(20):
        response = requests.post(f"{server.url}/predictions/cnn", data=b"data=%ZZ%", headers=form, timeout=30)
        assert response.status_code == 500  # TorchServe's frontend, before any handler: see the README
        response = requests.post(f"{server.management_url}/token", params={"type": "inference"}, timeout=30)
        assert response.status_code == 400
    assert (logs / "torchserve.out").stat().st_size == console_before
    with (logs / "ts_log.log").open("rb") as log:
        log.seek(ts_log_before)
        added = log.read().decode(errors="replace").splitlines()
    assert not [line for line in added if line.lstrip().startswith("at ")], added[:10]  # no stack frames
    assert not [line for line in added if "Failed to update key file" in line]
    assert len([line for line in added if "ZZ" in line]) == 20
    assert all(len(line) < 1000 for line in added)


def test_a_json_body_torchserve_cannot_parse_leaves_one_line(server):
    """TorchServe's worker logged a traceback for each; the handler parses JSON bodies itself (digit_json.py)
    and logs one line for each refusal, naming the problem."""
    model_log = server.run_dir / "logs" / "model_log.log"
    before = model_log.stat().st_size
    json_headers = {"Content-Type": "application/json", **server.headers()}

    def added() -> str:
        with model_log.open("rb") as log:
            log.seek(before)
            return log.read().decode(errors="replace")

    line = "refused: 400 BadJson"
    for sent in (1, 2):
        body = b'{"data": [1, 2,'
        response = requests.post(f"{server.url}/predictions/cnn", data=body, headers=json_headers, timeout=30)
        assert response.status_code == 400 and response.json()["type"] == "BadJson"
        # the frontend copies the worker's output into the log asynchronously: wait for the line itself
        wait_for(lambda sent=sent: added().count(line) >= sent, 30, f"the handler's line for body {sent}")
    # the worker writes in order: once the second body's line is there, all that the first one made is too
    text = added()
    assert "Traceback" not in text[: text.index(line, text.index(line) + 1)]


def test_the_access_log_drops_query_strings(server):
    secret = "not-a-real-key-0123456789"
    requests.post(f"{server.url}/predictions/cnn?token={secret}", data=b"", headers=server.headers(), timeout=30)
    access_log = (server.run_dir / "logs" / "access_log.log").read_text(errors="replace")
    assert secret not in access_log and "/predictions/cnn?(query dropped)" in access_log


def test_the_run_folder_is_its_owners_alone(server):
    run_dir: Path = server.run_dir
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    written = [path for path in run_dir.rglob("*") if not path.is_symlink()]
    names = {path.relative_to(run_dir).as_posix() for path in written}
    assert {"config.properties", "key_file.json", "server.json", "logs/ts_log.log", "logs/access_log.log"} <= names
    shared = {path.relative_to(run_dir).as_posix(): oct(path.stat().st_mode) for path in written}
    shared = {name: mode for name, mode in shared.items() if int(mode, 8) & 0o077}
    assert not shared, shared


def test_every_log_file_rolls_over_by_size_and_keeps_a_fixed_number():
    """TorchServe's own config rolled daily as well and kept one more file a day, forever."""
    appenders = ElementTree.parse(LOG_CONFIG).getroot().find("Appenders")
    rolling = appenders.findall("RollingFile")
    assert {appender.get("name") for appender in rolling} >= {"access_log", "model_log", "model_metrics", "ts_log"}
    for appender in rolling:
        assert "%i" in appender.get("filePattern"), appender.get("name")
        assert appender.find("SizeBasedTriggeringPolicy") is not None, appender.get("name")
        assert int(appender.find("DefaultRolloverStrategy").get("max")) <= 5
        assert appender.find(".//TimeBasedTriggeringPolicy") is None


def test_an_earlier_runs_files_are_made_private_and_nothing_else_is_touched(tmp_path):
    """A run folder from before this change (0755, logs 0644) is closed on the next start; a file of the
    user's own in it keeps its mode."""
    run_dir = tmp_path / "run"
    (run_dir / "logs.prev").mkdir(parents=True)
    run_dir.chmod(0o755)
    (run_dir / "key_file.json").write_text("{}")
    (run_dir / "logs.prev" / "ts_log.log").write_text("old")
    (run_dir / "notes.txt").write_text("mine")
    for path in (run_dir / "key_file.json", run_dir / "logs.prev" / "ts_log.log", run_dir / "notes.txt"):
        path.chmod(0o644)
    make_private(run_dir)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "logs.prev").stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "key_file.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((run_dir / "logs.prev" / "ts_log.log").stat().st_mode) == 0o600
    assert stat.S_IMODE((run_dir / "notes.txt").stat().st_mode) == 0o644
