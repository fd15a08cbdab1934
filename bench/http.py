"""`digits bench http`: a model's archive against the no-op ceiling, over HTTP, in one TorchServe.

The run archives MODEL in FORMAT and the no-op handler with the same batch settings into a temporary
store, starts TorchServe on free loopback ports (its run folder, logs included, is kept in OUT/torchserve),
and at each concurrency loads the no-op and the model with the same body, alternating in short rounds so
that whatever else the machine does in the meantime weighs on both alike. The handler's time split
per batch (DecodeTime, PreprocessTime, InferenceTime, PostprocessTime; see handlers/digit_metrics.py),
its BatchSize, and TorchServe's own PredictionTime (the whole batch) are read back for each model run from
ts_log.log, where the frontend logs every metric line a worker writes (`result=[METRICS]...`), in
Prometheus mode (what `digits serve` runs) as in log mode.

With `oip_digits` N, the body is instead an Open Inference Protocol request of N MNIST test digits (a UINT8
[N,28,28] tensor), sent to /v2/models/MODEL/infer, and rows report digits per second beside requests per
second; after the loads, with TorchServe stopped, the served file is timed offline at batch N on the
workers' threads (`offline`). `oip_encoding` says how the tensor travels: "binary", in the binary extension
with outputs binary too, as Triton's clients send by default, or "json", its values in the JSON `data` list
and the outputs in JSON, as hand-written clients send (`oip_body`).
"""

from __future__ import annotations

import gzip
import json
import mimetypes
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import requests

from ..contract import OIP_DEFAULT_OUTPUTS
from ..serving.archive import ServingSettings
from . import BenchError
from .load import LoadResult, Target, find_ab, pooled, run_load
from .timing import Latency, known_fields, machine

HOST = "127.0.0.1"
NOOP = "noop"
STAGES = ("DecodeTime", "PreprocessTime", "InferenceTime", "PostprocessTime", "PredictionTime")
# ts_log.log: "... WorkerLifeCycle - result=[METRICS]DecodeTime.Milliseconds:0.118|#ModelName:cnn,Level:Model|..."
METRIC_LINE = re.compile(r"result=\[METRICS\](\w+)\.(?:ms|Milliseconds):([0-9.]+)\|#ModelName:([^,|]+)")
BATCH_LINE = re.compile(r"result=\[METRICS\]BatchSize\.Count:(\d+)\|#ModelName:([^,|]+)")  # requests a batch
LOG_SETTLE_S = 0.5  # the frontend copies worker output into its logs asynchronously
# TorchServe's log timestamps, "2026-11-28T23:49:26,857": ISO order, so comparable as strings
LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S,%f"
LOG_TIME_CHARS = 23


@dataclass(frozen=True)
class HttpPlan:
    """What one `digits bench http` run measures."""

    model: str
    fmt: str
    artifacts: Path
    body: Path
    concurrency: tuple[int, ...]
    requests: int  # per target and concurrency, split evenly over the rounds
    rounds: int  # no-op, model, no-op, model, ... at each concurrency
    warmup: int  # requests per target before the first measurement
    settings: ServingSettings
    generator: str  # "ab" or "python"
    oip_digits: int = 0  # > 0: the body is an OIP request of this many digits (see oip_body)
    oip_encoding: str = "binary"  # of that request: "binary" (the extension) or "json" (see oip_body)


@dataclass
class HttpRow:
    concurrency: int
    model: LoadResult
    noop: LoadResult
    handler: dict[str, Any]  # the time split per batch, from the handler's metrics (see handler_summary)
    round_ratios: list[float] = field(default_factory=list)  # model / no-op of each round: the run's spread

    digits_per_request: int = 1

    @property
    def digits_per_s(self) -> float:
        """Digits the model classified per second: an OIP request carries many."""
        return self.model.requests_per_s * self.digits_per_request

    @property
    def ratio(self) -> float:
        """Model requests per second over the no-op's: the share of the frame's ceiling the model keeps."""
        return self.model.requests_per_s / self.noop.requests_per_s


@dataclass
class HttpReport:
    plan: HttpPlan
    body: dict  # what was sent: bytes, content type, image size and mode
    machine: dict
    rows: list[HttpRow] = field(default_factory=list)
    # OIP runs: the served file offline at batch N on the workers' threads, measured after the loads
    # (bench.offline.served_rate), so that each row's digits/s has its offline ceiling beside it
    offline: dict | None = None

    def offline_share(self, row: HttpRow) -> float | None:
        """The row's digits per second over the offline rate of the same file, batch and threads."""
        return row.digits_per_s / self.offline["samples_per_s"] if self.offline else None

    def to_dict(self) -> dict[str, Any]:
        plan = {**asdict(self.plan), "artifacts": str(self.plan.artifacts), "body": str(self.plan.body)}
        rows = [
            {**asdict(row), "ratio": round(row.ratio, 3), "digits_per_s": row.digits_per_s, "offline_share": share}
            for row, share in ((row, self.offline_share(row)) for row in self.rows)
        ]
        for row, source in zip(rows, self.rows, strict=True):
            for target in ("model", "noop"):
                del row[target]["samples_ms"]  # summarised in latency
                row[target]["requests_per_s"] = getattr(source, target).requests_per_s
        return {"plan": plan, "body": self.body, "machine": self.machine, "rows": rows, "offline": self.offline}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HttpReport:
        """The report back from its JSON (`to_dict`), as `digits bench report` reads it."""
        plan = data["plan"]
        plan = HttpPlan(
            **{
                **known_fields(HttpPlan, plan),
                "artifacts": Path(plan["artifacts"]),
                "body": Path(plan["body"]),
                "concurrency": tuple(plan["concurrency"]),
                "settings": ServingSettings(**plan["settings"]),
            }
        )
        rows = [
            HttpRow(
                **{**known_fields(HttpRow, row), "model": _load_result(row["model"]), "noop": _load_result(row["noop"])}
            )
            for row in data["rows"]
        ]
        return cls(**{**known_fields(cls, data), "plan": plan, "rows": rows})


def _load_result(data: dict[str, Any]) -> LoadResult:
    return LoadResult(**{**known_fields(LoadResult, data), "latency": Latency(**data["latency"])})


def run_http(plan: HttpPlan, run_dir: Path, log: Callable[[str], Any] = print) -> HttpReport:
    """Archives, serves, loads and measures as the module docstring says; stops TorchServe in every case."""
    if plan.generator == "ab":
        find_ab()  # fail before minutes of archiving and start-up, not after
    report = HttpReport(plan, describe_body(plan.body), machine())
    with tempfile.TemporaryDirectory(prefix="digits-bench-store-") as store, serving(plan, Path(store), run_dir) as url:
        token = read_inference_token(run_dir)
        targets = {
            name: target_for(url, name, token, plan.body, plan.oip_digits, plan.oip_encoding)
            for name in (NOOP, plan.model)
        }
        check_answers(targets[plan.model])
        for target in targets.values():
            run_load(plan.generator, target, max(plan.concurrency), max(plan.warmup, max(plan.concurrency)))
        logs = LogCursor(run_dir / "logs")
        for concurrency in plan.concurrency:
            logs.mark()
            runs = measure_level(plan, targets, concurrency)
            model, noop = pooled(runs[plan.model]), pooled(runs[NOOP])
            ratios = [m.requests_per_s / n.requests_per_s for m, n in zip(runs[plan.model], runs[NOOP], strict=True)]
            summary = handler_summary(logs.read(), plan.model)
            row = HttpRow(concurrency, model, noop, summary, ratios, max(plan.oip_digits, 1))
            report.rows.append(row)
            log(progress_line(report.rows[-1]))
    if plan.oip_digits:  # TorchServe is stopped: the offline run has the machine to itself
        report.offline = measure_offline(plan, log)
    return report


def measure_offline(plan: HttpPlan, log: Callable[[str], Any]) -> dict:
    """The served file offline at batch N (the digits of one OIP request) on as many threads as all the
    model's workers have together (workers x threads): the ceiling for that much CPU."""
    from .offline import served_rate

    threads = plan.settings.workers * plan.settings.threads
    offline = served_rate(plan.artifacts, plan.model, plan.fmt, plan.oip_digits, threads)
    log(
        f"  offline, no server: {offline['backend']} at batch {offline['batch_size']} on {offline['threads']} "
        f"thread(s): {offline['samples_per_s']:7.0f} samples/s"
    )
    return offline


def measure_level(plan: HttpPlan, targets: dict[str, Target], concurrency: int) -> dict[str, list[LoadResult]]:
    """The no-op's and the model's loads at one concurrency, round by round, alternating."""
    runs: dict[str, list[LoadResult]] = {NOOP: [], plan.model: []}
    for _ in range(plan.rounds):
        for name in (NOOP, plan.model):
            runs[name].append(run_load(plan.generator, targets[name], concurrency, plan.requests // plan.rounds))
    return runs


@contextmanager
def serving(plan: HttpPlan, store: Path, run_dir: Path) -> Iterator[str]:
    """The model's and the no-op's archives in `store`, served by a TorchServe of our own; yields its URL."""
    from ..serving.archive import archive_model, archive_noop

    archive_model(plan.model, plan.fmt, plan.artifacts, store, settings=plan.settings, log=lambda _: None)
    archive_noop(store, NOOP, plan.settings)
    with torchserve(store, run_dir) as url:
        yield url


@contextmanager
def torchserve(store: Path, run_dir: Path) -> Iterator[str]:
    """A TorchServe of our own serving every archive in `store`, on free loopback ports, its logs in
    `run_dir`; yields its inference URL once every model is ready, and stops it in every case."""
    from ..serving import server
    from ..serving.config import Ports

    ports = Ports(*free_ports(5))
    run_dir.mkdir(parents=True, exist_ok=True)
    state, _ = server.launch(store, run_dir, ports, HOST, foreground=False)
    try:
        server.wait_until_ready(state, run_dir)
        yield state.inference_url
    finally:
        server.stop(run_dir)


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free on loopback now (each bound once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def read_inference_token(run_dir: Path) -> str:
    from ..serving.server import read_token

    return read_token(run_dir)


def target_for(url: str, model: str, token: str, body: Path, oip_digits: int = 0, encoding: str = "binary") -> Target:
    if oip_digits and encoding == "json":
        return Target(f"{url}/v2/models/{model}/infer", token, body, JSON)
    if oip_digits:
        length = ("Inference-Header-Content-Length", oip_header_length(body))
        return Target(f"{url}/v2/models/{model}/infer", token, body, BINARY, (length,))
    content_type = mimetypes.guess_type(body.name)[0] or BINARY
    return Target(f"{url}/predictions/{model}", token, body, content_type)


BINARY = "application/octet-stream"
JSON = "application/json"
OIP_ENCODINGS = ("binary", "json")
OIP_HEADER_SUFFIX = ".header-length"  # beside an OIP body in the binary extension: the length of its JSON part


def oip_body(digits: np.ndarray, path: Path, encoding: str = "binary") -> Path:
    """Writes an OIP inference request of `digits` ((N, 28, 28) uint8) to `path`.

    "binary": in the binary tensor extension, as Triton's client sends it (see oip_request_bytes), outputs
    asked binary; the JSON part's length goes beside it. "json": one compact JSON object, the tensor's values as
    a flat `data` list (as Triton's and KServe's clients flatten them), outputs in JSON.
    """
    if encoding not in OIP_ENCODINGS:
        raise BenchError(f"unknown OIP encoding {encoding!r}; known: {', '.join(OIP_ENCODINGS)}")
    digits = np.ascontiguousarray(digits, dtype=np.uint8)
    if encoding == "json":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(oip_json_bytes(digits))
        return path
    body, header_length = oip_request_bytes(digits, OIP_DEFAULT_OUTPUTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    path.with_name(path.name + OIP_HEADER_SUFFIX).write_text(str(header_length))
    return path


def oip_json_bytes(digits: np.ndarray) -> bytes:
    """An OIP inference request of `digits` ((N, 28, 28) uint8) as one compact JSON object, the tensor's values
    as a flat `data` list (as Triton's and KServe's clients flatten them); outputs: the default ones, in JSON."""
    digits = np.ascontiguousarray(digits, dtype=np.uint8)
    tensor = {"name": "digits", "datatype": "UINT8", "shape": list(digits.shape), "data": digits.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def oip_request_bytes(
    digits: np.ndarray, outputs: Sequence[str], parameters: dict[str, Any] | None = None
) -> tuple[bytes, int]:
    """An OIP inference request of `digits` ((N, 28, 28) uint8) in the binary tensor extension, as Triton's
    client sends it: the JSON part, then the tensor's bytes, the outputs asked for in binary too, and the
    request `parameters` if any. Returns the body and the length of its JSON part."""
    digits = np.ascontiguousarray(digits, dtype=np.uint8)
    envelope = {
        "inputs": [
            {
                "name": "digits",
                "datatype": "UINT8",
                "shape": list(digits.shape),
                "parameters": {"binary_data_size": digits.nbytes},
            }
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }
    if parameters:
        envelope["parameters"] = parameters
    header = json.dumps(envelope).encode()
    return header + digits.tobytes(), len(header)


def oip_header_length(body: Path) -> str:
    beside = body.with_name(body.name + OIP_HEADER_SUFFIX)
    if not beside.is_file():
        raise BenchError(f"{body} has no {beside.name} beside it: OIP bodies come from oip_body")
    return beside.read_text().strip()


def check_answers(target: Target) -> None:
    """One request first: a body the model refuses would otherwise be measured as fast errors."""
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": target.content_type, **dict(target.headers)}
    response = requests.post(target.url, data=target.body.read_bytes(), headers=headers, timeout=30)
    if response.status_code != 200:
        raise BenchError(f"the model refuses {target.body}: {response.status_code} {response.text.strip()[:300]}")


def describe_body(path: Path) -> dict:
    """Bytes and content type of the request body and, for an image, its size and mode."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise BenchError(f"no input file {path}")
    described = {"file": path.name, "bytes": path.stat().st_size, "content_type": mimetypes.guess_type(path.name)[0]}
    try:
        with Image.open(path) as image:
            described |= {"format": image.format, "width": image.width, "height": image.height, "mode": image.mode}
    except UnidentifiedImageError:
        pass  # JSON or another body the handler reads: sent as it is
    return described


class LogCursor:
    """Reads what TorchServe logged in ts_log.log since `mark()`, across its rollovers.

    The run folder's log4j2.xml rolls ts_log.log over at 10 MB into ts_log.N.log.gz (log4j's default
    `fileIndex="max"`: oldest N = 1, at most 4 kept), and a benchmark writes several times that, so a byte
    offset into the current file would miss what rolled away.
    Lines carry TorchServe's timestamp (local time, milliseconds); those at or after the mark are kept.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.since = ""

    def mark(self) -> None:
        self.since = datetime.now().strftime(LOG_TIME_FORMAT)[:LOG_TIME_CHARS]

    def read(self) -> str:
        time.sleep(LOG_SETTLE_S)
        rolled = sorted(self.log_dir.glob("ts_log.*.log.gz"), key=_rollover_index)  # oldest first
        texts = [gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace") for path in rolled]
        current = self.log_dir / "ts_log.log"
        if current.is_file():
            texts.append(current.read_text(errors="replace"))
        lines = (line for text in texts for line in text.splitlines())
        return "\n".join(line for line in lines if line[:LOG_TIME_CHARS] >= self.since and line[:2].isdigit())


def _rollover_index(path: Path) -> int:
    return int(path.name.split(".")[1])


def handler_summary(metrics_log: str, model: str, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Per stage: mean, p50 and p99 ms per batch; the number of batches and their mean size."""
    values: dict[str, list[float]] = {stage: [] for stage in stages}
    for name, value, model_name in METRIC_LINE.findall(metrics_log):
        if model_name == model and name in values:
            values[name].append(float(value))
    sizes = [int(size) for size, name in BATCH_LINE.findall(metrics_log) if name == model]
    summary: dict[str, Any] = {"batches": len(sizes), "mean_batch_size": float(np.mean(sizes)) if sizes else None}
    for stage, ms in values.items():
        summary[stage] = (
            {
                "mean_ms": float(np.mean(ms)),
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
            }
            if ms
            else None
        )
    return summary


def progress_line(row: HttpRow) -> str:
    digits = f" = {row.digits_per_s:7.0f} digits/s" if row.digits_per_request > 1 else ""
    return (
        f"  concurrency {row.concurrency:3}: model {row.model.requests_per_s:7.0f} req/s{digits} "
        f"(p99 {row.model.latency.p99_ms:6.1f} ms, {row.model.errors} errors), "
        f"no-op {row.noop.requests_per_s:7.0f} req/s, ratio {row.ratio:.2f} "
        f"(rounds {min(row.round_ratios):.2f}-{max(row.round_ratios):.2f})"
    )
