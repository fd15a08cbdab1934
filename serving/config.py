"""The TorchServe `config.properties` that digits writes for a model store: closed by default.

Registration is on (`enable_model_api=true`) because `digits rollout` registers a new version beside the live
one; it stays closed to everything but the store's own archives (see `allowed_urls` and docs/security.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .archive import ArchiveError, read_archive_settings, response_limit
from .metrics import write_metrics_config
from .store import describe_archive, list_archives

MAX_REQUEST_BYTES = 10 * 1024 * 1024  # a 4096x4096 PNG fits; anything bigger is refused by the frontend


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    # TorchServe always opens its gRPC APIs too; two servers on one machine need their own
    grpc_inference: int = 7070
    grpc_management: int = 7071

    def validate(self) -> None:
        values = list(asdict(self).values())
        if any(not 1 <= p <= 65535 for p in values):
            raise ValueError(f"ports must be between 1 and 65535, got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"the inference, management, metrics and gRPC ports must all differ, got {values}")


def default_run_dir() -> Path:
    """`DIGITS_RUN_DIR`, else a per-user state folder: logs, key file and config never land in the cwd."""
    if os.environ.get("DIGITS_RUN_DIR"):
        return Path(os.environ["DIGITS_RUN_DIR"]).expanduser()
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "digits" / "torchserve"


def models_entry(archives: list[Path]) -> dict:
    """config.properties' `models=` JSON: per-model batching and workers, from each archive's settings, under
    the model name and version of its manifest. One version per model (serving/store.py says why)."""
    entry = {}
    for mar in archives:
        stored = describe_archive(mar)
        if stored.model in entry:
            raise ArchiveError(
                f"{mar.name} is a second version of {stored.model}; serve one version per model (move the "
                f"others out of the store) and put new ones live with `digits rollout {stored.model}`"
            )
        settings = read_archive_settings(mar)
        version = {"defaultVersion": True, "marName": mar.name}
        for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"):
            if key in settings:
                version[key] = settings[key]
        entry[stored.model] = {stored.version: version}
    return entry


def max_response_size(archives: list[Path]) -> int:
    """config.properties' max_response_size: the largest of the archives' own limits (`response_limit`).

    TorchServe's frontend drops a worker's reply holding any answer body over it (ModelResponseDecoder), and
    the worker with it; each archive's handler refuses, as that request's 413, an answer over its own limit,
    which is never over this one.
    """
    try:
        return max(response_limit(read_archive_settings(mar)) for mar in archives)
    except ArchiveError as err:
        raise ValueError(str(err)) from None


def load_models(entry: dict) -> str:
    """config.properties' `load_models`: NAME=FILE.mar for each model of a `models_entry`, one version each."""
    return ",".join(f"{model}={spec['marName']}" for model, versions in entry.items() for spec in versions.values())


def allowed_urls(store: Path) -> str:
    """A Java regex admitting only `file://<store>/<name>.mar`: no other folder, no `..`, no other scheme.

    Model registration (on, for `digits rollout`) and the workflow API check every URL against it; a bare
    file name is not a URL and is looked up in the store (TorchServe's ModelArchive.downloadModel).
    `file://<store>/.*` would admit `file://<store>/../../etc/passwd`, and TorchServe 0.12.0's workflow API
    (which enable_model_api does not switch off) copies such a file into the store before it refuses the
    relative path. Characters of the store path other than letters, digits and `/_-` are matched literally
    through a one-character class; the few that cannot be are refused (TorchServe splits the list at commas,
    config.properties eats backslashes, and brackets and `^` change what a class means).
    """
    path = str(Path(store).resolve())
    unsafe = sorted({c for c in path if c in ",\\[]^\n"})
    if unsafe:
        raise ValueError(f"model store path {path!r} holds {unsafe}, which allowed_urls cannot match literally")
    literal = "".join(c if c.isalnum() or c in "/_-" else f"[{c}]" for c in path)
    return f"file://{literal}/[A-Za-z0-9_][A-Za-z0-9_.-]*[.]mar"


LOG_CONFIG = Path(__file__).resolve().with_name("log4j2.xml")
# What a run folder holds (serving/server.py): TorchServe's config, keys, logs and temp dir, and digits' state
RUN_FILES = (
    "config.properties",
    "metrics.yaml",
    "key_file.json",
    "server.json",
    "logs",
    "logs.prev",
    "tmp",
    "ledger.jsonl",  # serving/ledger.py: every step of every rollout
    "locks",  # serving/rollout.py: one lock file per model, held while a rollout or rollback runs
)


def render_config(
    store: Path,
    ports: Ports,
    host: str = "127.0.0.1",
    metrics_config: Path | None = None,
    archives: list[Path] | None = None,
    registration: bool = True,
) -> str:
    """The config for serving `archives` (default: every archive of the store, one version per model);
    `registration` False closes TorchServe's model API (no `digits rollout` then)."""
    store = Path(store).resolve()
    archives = list_archives(store) if archives is None else archives
    try:
        models = models_entry(archives)
    except ArchiveError as err:
        raise ValueError(str(err)) from None
    lines = {
        **shared_properties(
            str(store),
            ports,
            host,
            archives,
            log_config=LOG_CONFIG.as_uri(),
            metrics_config=str(Path(metrics_config).resolve()) if metrics_config else None,
        ),
        # one version per model, named: never `all`, whose order would decide the default (serving/store.py)
        "load_models": load_models(models),
        "models": json.dumps(models),
        "disable_token_authorization": "false",  # tokens on every API
        # `digits rollout` registers versions: bare file names of the store, and no URL but those allowed_urls
        # admits (the management API keeps its own key)
        "enable_model_api": str(registration).lower(),
        # the handler's per-batch time split (handlers/digit_metrics.py) are custom metrics, which TorchServe
        # drops unless metrics.yaml names them or this is on; registering costs once, at the first batch
        "model_metrics_auto_detect": "true",
        # workers talk over unix sockets named after this number (/tmp/.ts.sock.N): derive it from the
        # inference port so that two servers on different ports never share a socket
        "initial_worker_port": str(9000 + ports.inference % 50000),
    }
    return render_properties("# written by `digits serve`/`digits config`; regenerate rather than edit", lines)


def shared_properties(
    store: str, ports: Ports, host: str, archives: list[Path], *, log_config: str, metrics_config: str | None
) -> dict[str, str]:
    """The config.properties keys that `digits serve` and the KServe bundle (serving/kserve.py) share.

    Args:
        store: the model store as TorchServe will see it.
        host: where the APIs listen, the metrics API included.
        archives: the store's archives (their response limit is TorchServe's, `max_response_size`).
        log_config: URI of the log4j2.xml TorchServe's JVM reads.
        metrics_config: path of the metrics.yaml declaring the handler's metrics (serving/metrics.py), if any.
    """
    return {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{host}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_address": host,
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_address": host,
        "grpc_management_port": str(ports.grpc_management),
        "model_store": store,
        # closed by default: no model registration over HTTP, local archives only
        "enable_model_api": "false",
        "allowed_urls": allowed_urls(Path(store)),
        "install_py_dep_per_model": "false",
        "max_request_size": str(MAX_REQUEST_BYTES),
        "max_response_size": str(max_response_size(archives)),
        "default_workers_per_model": "1",
        # Prometheus text on the metrics port (what KServe scrapes), with the handler's metrics declared in
        # `metrics_config`; without it, they register as their first line says
        "metrics_mode": "prometheus",
        **({"metrics_config": metrics_config} if metrics_config else {}),
        # TorchServe's logging, made affordable (see the file's header): DEBUG lines per request, every line
        # twice in ts_log.log and once more in the never-rotated stdout cost frontend time and disk
        "vmargs": f"-Dlog4j.configurationFile={log_config}",
    }


def render_properties(header: str, lines: dict[str, str]) -> str:
    """A config.properties file: a comment line, then one `key=value` line per entry."""
    return header + "\n" + "".join(f"{k}={v}\n" for k, v in lines.items())


def write_config(
    store: Path,
    run_dir: Path,
    ports: Ports,
    host: str = "127.0.0.1",
    archives: list[Path] | None = None,
    registration: bool = True,
) -> Path:
    ports.validate()
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = run_dir / "config.properties"
    metrics = write_metrics_config(run_dir / "metrics.yaml")
    metrics.chmod(0o600)  # the run folder is its owner's alone (make_private)
    write_private(path, render_config(store, ports, host, metrics, archives, registration))
    return path


def write_private(path: Path, text: str) -> None:
    """Writes `path` readable and writable by its owner only (0600), whatever it was before."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with open(descriptor, "w") as file:
        file.write(text)


def make_private(run_dir: Path) -> None:
    """Makes a run folder its owner's alone: the folder 0700, and what digits and TorchServe keep in it (an
    earlier run's keys and logs, written before digits restricted them) 0700 or 0600. Nothing else in it is
    touched: a run folder may be a folder of the user's own."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir.chmod(0o700)
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_symlink() or not path.exists():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)
        for root, folders, files in os.walk(path):
            for entry in [*folders, *files]:
                inner = Path(root) / entry
                if not inner.is_symlink():
                    inner.chmod(0o700 if inner.is_dir() else 0o600)
