"""Starts, watches and stops a TorchServe for a model store, with everything it writes in a run folder.

A run folder holds config.properties, key_file.json (TorchServe writes it in its working directory),
logs/, tmp/ (TorchServe's pid file lives in the temp dir, so each run folder is its own instance) and
server.json, which `digits stop`, `digits token` and `digits predict` read. It holds the keys, and logs
that name every request, so it is its owner's alone: the folder is 0700, and TorchServe and its workers
run with umask 077, so that every file they write is 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import requests

from ..export.metadata import sha256_file
from .config import Ports, make_private, write_config, write_private
from .ledger import ABANDONED, interrupted, live_versions, read_events, record, recorded_digest
from .store import StoredArchive, choose_archives

READY_TIMEOUT_S = 60
TS_PROCESS = "org.pytorch.serve.ModelServer"  # in the command line of TorchServe's Java process
# readiness probe: a real prediction through the whole handler, of a "1" (a blank image is refused: no digit)
PROBE_DIGIT = {"data": [255 if 5 <= row < 23 and 12 <= col < 16 else 0 for row in range(28) for col in range(28)]}
LOG_TAIL_LINES = 30
PRIVATE_UMASK = 0o077  # TorchServe's files (keys, logs, pid) readable by their owner only


class ServeError(RuntimeError):
    """TorchServe could not be started, reached or stopped; the message says why."""


@dataclass
class ServerState:
    pid: int
    host: str
    ports: dict
    store: str
    config: str
    models: list[str]

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics']}"


def read_state(run_dir: Path) -> ServerState | None:
    path = Path(run_dir) / "server.json"
    if not path.is_file():
        return None
    return ServerState(**json.loads(path.read_text()))


def is_running(state: ServerState | None) -> bool:
    if state is None:
        return False
    try:
        return TS_PROCESS in psutil.Process(state.pid).cmdline()
    except psutil.Error:
        return False


def read_token(run_dir: Path, kind: str = "inference") -> str:
    """The current key TorchServe wrote for `kind` (inference, management)."""
    path = Path(run_dir) / "key_file.json"
    if not path.is_file():
        raise ServeError(f"no key file at {path}: is TorchServe running from {run_dir}? (`digits serve`)")
    return json.loads(path.read_text())[kind]["key"]


def refresh_token(run_dir: Path, kind: str = "inference") -> str:
    """Asks TorchServe for a new `kind` key (its keys expire after 60 minutes) and returns it.

    TorchServe's token API takes the key file's "API" key and rewrites key_file.json itself.
    """
    state = read_state(run_dir)
    if not is_running(state):
        raise ServeError(f"no TorchServe is running from {run_dir}; `digits serve` starts one with fresh keys")
    headers = {"Authorization": f"Bearer {read_token(run_dir, 'API')}"}
    response = requests.post(f"{state.management_url}/token", params={"type": kind}, headers=headers, timeout=10)
    if response.status_code != 200:
        raise ServeError(f"TorchServe refused a new {kind} key: {response.status_code} {response.text.strip()[:200]}")
    return read_token(run_dir, kind)


def find_java() -> str:
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not Path(java).is_file():
        raise ServeError("Java was not found (TorchServe needs Java 17): install it or set JAVA_HOME")
    return str(java)


def check_ports_free(host: str, ports: Ports) -> None:
    for role, port in asdict(ports).items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex((host, port)) == 0:
                flag = "--" + role.replace("_", "-") + "-port"
                raise ServeError(
                    f"{role.replace('_', ' ')} port {port} on {host} is already in use{listener(port)}; "
                    f"pass {flag} with a free port (or stop what uses it)"
                )


def listener(port: int) -> str:
    """' by NAME (pid N)' for the process listening on `port`, when the OS tells us; else ''."""
    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        pid = next(pid for pid in pids if pid)
        process = psutil.Process(pid)
        if TS_PROCESS in process.cmdline():
            return f" by a TorchServe (pid {pid}; `digits stop` or `torchserve --stop` stops it)"
        return f" by {process.name()} (pid {pid})"
    except (psutil.Error, StopIteration):  # other users' sockets hide their pid unless we are root
        return ""


def _environment(run_dir: Path, java: str) -> dict:
    env = dict(os.environ)
    tmp = run_dir / "tmp"
    tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    env.update(
        TMPDIR=str(tmp),
        TEMP=str(tmp),
        LOG_LOCATION=str(run_dir / "logs"),
        METRICS_LOCATION=str(run_dir / "logs"),
        JAVA_HOME=str(Path(java).resolve().parent.parent),
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # workers use this python
    return env


def torchserve_command(store: Path, config: Path, foreground: bool) -> list[str]:
    """The models to load are the config's `load_models` (one version each: serving/store.py)."""
    torchserve = Path(sys.executable).parent / "torchserve"
    cmd = [str(torchserve), "--start", "--ncs", "--model-store", str(store), "--ts-config", str(config)]
    return [*cmd, "--foreground"] if foreground else cmd


def launch(
    store: Path, run_dir: Path, ports: Ports, host: str, foreground: bool, registration: bool = True
) -> tuple[ServerState, object]:
    """Writes the config and starts TorchServe; returns its state and the launcher process.

    `registration`: TorchServe's model API (`enable_model_api`), which `digits rollout` needs.
    """
    java = find_java()
    check_not_running(run_dir)
    check_ports_free(host, ports)
    store = Path(store).resolve()
    make_private(run_dir)  # before anything is written: keys and logs are its owner's alone
    chosen = archives_to_serve(store, run_dir)
    models = [stored.model for stored in chosen]
    config = write_config(store, run_dir, ports, host, [stored.path for stored in chosen], registration)
    (run_dir / "key_file.json").unlink(missing_ok=True)
    _rotate_logs(run_dir)
    console = os.open(run_dir / "logs" / "torchserve.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with open(console, "ab") as out:  # the child keeps its own copy of the fd
        launcher = subprocess.Popen(
            torchserve_command(store, config, foreground),
            cwd=run_dir,
            env=_environment(run_dir, java),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=not foreground,
            umask=PRIVATE_UMASK,
        )
    pid = _wait_for_pid(run_dir, launcher)
    state = ServerState(pid=pid, host=host, ports=asdict(ports), store=str(store), config=str(config), models=models)
    write_private(run_dir / "server.json", json.dumps(asdict(state), indent=2) + "\n")
    return state, launcher


def archives_to_serve(store: Path, run_dir: Path) -> list[StoredArchive]:
    """One archive per model: the version the run folder's ledger says is live (checked against the SHA-256
    the ledger recorded for it), else the model's only one. Rollouts the ledger shows unfinished are marked
    abandoned: the TorchServe about to start has none of their candidates registered."""
    events = read_events(run_dir, store)
    chosen = choose_archives(store, live_versions(run_dir, store))
    for stored in chosen:
        recorded = recorded_digest(events, stored.model, stored.version)
        if recorded and sha256_file(stored.path) != recorded:
            raise ServeError(
                f"{stored.path} is not the archive the ledger recorded for {stored.model} {stored.version} "
                f"(SHA-256 {recorded[:12]}...): put the original back, or roll a new version out"
            )
    for model in {event.model for event in events}:
        for version in interrupted([e for e in events if e.model == model]):
            record(run_dir, store, model, version, ABANDONED, reason="`digits serve` started without it")
    return chosen


def check_not_running(run_dir: Path) -> None:
    """Refuses to start a second TorchServe from `run_dir`, whether digits started the first one or not.

    TorchServe keeps one pid file per temp dir and refuses to start while it names a live TorchServe;
    `digits serve` gives each run folder its own temp dir, so a live pid file there is a TorchServe started
    by hand (or by a digits whose server.json is gone) with that TMPDIR. A stale pid file is removed.
    """
    state = read_state(run_dir)
    if is_running(state):
        raise ServeError(
            f"TorchServe is already running from {run_dir} (pid {state.pid}, {state.inference_url}); "
            "`digits stop` first"
        )
    pid_file = Path(run_dir) / "tmp" / ".model_server.pid"
    owner = _pid_file_owner(pid_file)
    if owner is not None:
        raise ServeError(
            f"a TorchServe that digits did not start (pid {owner}) is running with {pid_file.parent} as its temp "
            f"dir; stop it (`TMPDIR={pid_file.parent} torchserve --stop`, or kill {owner}) or pass another --run-dir"
        )
    pid_file.unlink(missing_ok=True)


def _pid_file_owner(pid_file: Path) -> int | None:
    """The pid in TorchServe's pid file when that process is a live TorchServe, else None."""
    try:
        pid = int(pid_file.read_text().strip())
        return pid if TS_PROCESS in psutil.Process(pid).cmdline() else None
    except (OSError, ValueError, psutil.Error):
        return None


def _rotate_logs(run_dir: Path) -> None:
    """Keeps the previous run's logs in logs.prev/: start-up checks must read this run's lines only."""
    logs, previous = run_dir / "logs", run_dir / "logs.prev"
    if logs.is_dir():
        shutil.rmtree(previous, ignore_errors=True)
        logs.rename(previous)
    logs.mkdir(mode=0o700, parents=True)


def _wait_for_pid(run_dir: Path, launcher: subprocess.Popen, timeout: float = 20) -> int:
    pid_file = run_dir / "tmp" / ".model_server.pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_file.is_file() and pid_file.read_text().strip():
            return int(pid_file.read_text().strip())
        if launcher.poll() not in (None, 0):
            break
        time.sleep(0.1)
    raise ServeError(f"TorchServe did not start:\n{server_log_tail(run_dir)}")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def server_log_tail(run_dir: Path) -> str:
    """The console's tail (the JVM's own output) and ts_log.log's, where TorchServe's warnings and errors go
    (serving/log4j2.xml keeps them off the console, which cannot be rotated)."""
    logs = run_dir / "logs"
    return f"{log_tail(logs / 'torchserve.out')}\nlast lines of {logs / 'ts_log.log'}:\n{log_tail(logs / 'ts_log.log')}"


def wait_until_ready(state: ServerState, run_dir: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Returns once every model answers a prediction; raises ServeError with the model log's tail."""
    deadline, pending = time.monotonic() + timeout, list(state.models)
    while pending:
        failed = failed_models(run_dir, pending)
        if failed:  # checked first: a worker's own reason beats "TorchServe exited"
            failed = every_failure(state, run_dir, pending, deadline)
            log = run_dir / "logs" / "model_log.log"
            reasons = "\n".join(f"model {model} failed to load: {load_failure(log, model)}" for model in failed)
            raise ServeError(f"{reasons}\nlast lines of {log}:\n{log_tail(log)}")
        if not is_running(state):
            raise ServeError(f"TorchServe exited during start-up:\n{server_log_tail(run_dir)}")
        if time.monotonic() > deadline:
            raise ServeError(
                f"model(s) {', '.join(pending)} did not answer within {timeout:.0f} s; model log:\n"
                f"{log_tail(run_dir / 'logs' / 'model_log.log')}"
            )
        pending = [m for m in pending if not _answers(state, run_dir, m)]
        if pending:
            time.sleep(0.5)


# TorchServe retries a worker that fails to load forever, with back-off; two failures are enough to know.
# A failure is counted from the worker's "Failed to load model NAME, exception ..." line: the worker writes
# it before it answers the frontend, so it always reaches the log. Its "Backend worker process died" line
# comes after that answer, and TorchServe, on hearing the failure, kills the worker and stops reading its
# output, so that line is lost at random; it still counts for a worker that dies without answering (an
# exception TorchServe does not catch), which writes it before it exits.
LOAD_FAILED = "Failed to load model {model}, exception "
WORKER_DIED = "Backend worker process died"
LOAD_FAILED_AFTER = 2


def every_failure(state: ServerState, run_dir: Path, pending: list[str], deadline: float) -> list[str]:
    """The pending models that failed to load, once each has failed or answered (or the deadline is over).

    Waits on each model's own outcome, not on a fixed grace: how soon a second broken model fails depends on
    how fast its worker starts, which a loaded machine slows down; a healthy model answers as soon as it is up.
    """
    while True:
        failed = failed_models(run_dir, pending)
        undecided = [m for m in pending if m not in failed and not _answers(state, run_dir, m)]
        if not undecided or time.monotonic() > deadline or not is_running(state):
            return failed
        time.sleep(0.5)


def failed_models(run_dir: Path, models: list[str]) -> list[str]:
    log = run_dir / "logs" / "model_log.log"
    if not log.is_file():
        return []
    text = log.read_text(errors="replace")
    return [m for m in models if load_failures(text, m) >= LOAD_FAILED_AFTER]


def load_failures(text: str, model: str) -> int:
    """How many of `model`'s workers failed to load, from the model log's text (see LOAD_FAILED)."""
    lines = text.splitlines()
    reported = sum(1 for line in lines if LOAD_FAILED.format(model=model) in line)
    # log lines carry the worker thread's name, e.g. "W-9000-cnn_1.0"
    died = sum(1 for line in lines if WORKER_DIED in line and f"-{model}_" in line)
    return max(reported, died)


def load_failure(log: Path, model: str) -> str:
    """The handler's own reason, from TorchServe's 'Failed to load model NAME, exception ...' line."""
    reasons = [
        line.split(LOAD_FAILED.format(model=model), 1)[-1]
        for line in log.read_text(errors="replace").splitlines()
        if LOAD_FAILED.format(model=model) in line
    ]
    return reasons[-1] if reasons else "the worker died during start-up (see the log below)"


def _answers(state: ServerState, run_dir: Path, model: str) -> bool:
    try:
        token = read_token(run_dir)
        response = requests.post(
            f"{state.inference_url}/predictions/{model}",
            json=PROBE_DIGIT,
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
    except (requests.RequestException, ServeError, KeyError, json.JSONDecodeError):
        return False
    return response.status_code == 200


def stop(run_dir: Path, timeout: float = 30) -> ServerState | None:
    """Stops the TorchServe started from `run_dir` and its workers; returns its state, or None."""
    state = read_state(run_dir)
    if not is_running(state):
        (Path(run_dir) / "server.json").unlink(missing_ok=True)
        return None
    parent = psutil.Process(state.pid)
    children = parent.children(recursive=True)
    parent.terminate()
    _, alive = psutil.wait_procs([parent, *children], timeout=timeout)
    for process in alive:
        process.kill()
    for name in ("server.json", "key_file.json", "tmp/.model_server.pid"):
        (Path(run_dir) / name).unlink(missing_ok=True)
    return state
