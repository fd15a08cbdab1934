"""`digits bench explain-http`: what an explanation costs over HTTP, per format and method, beside a prediction.

The run archives MODEL once per exported format (as `MODEL-FORMAT`, with the same serving settings) into a
temporary store and serves them all from one TorchServe on free loopback ports (its run folder, logs
included, is kept in OUT/torchserve). Then, format by format, one client alone sends one request at a time
on a keep-alive connection (bench.load.run_sequence):
  - one digit a request: `/predictions/NAME`, and per method `/explanations/NAME` with
    `{"data": BASE64_PNG, "method": METHOD}`, cycling through the first `digits` MNIST test digits as 28x28
    PNGs (feature ablation's work follows a digit's ink, so a single digit would flatter or wrong it): the
    latency percentiles;
  - N digits a request over the Open Inference Protocol: `/v2/models/NAME/infer` with a UINT8 [N, 28, 28]
    tensor in the binary extension, asking for `probabilities` and `label`, and per method `attributions` too
    with the request parameter `method`: digits per second.
The handler's own ExplainTime and InferenceTime per batch come from its metrics in ts_log.log, as
`digits bench http` reads them, so the server's frame can be told from the explanation's work.

The default settings are the archive's, except a batch size of 1: one client alone never fills a batch,
and with a larger one TorchServe holds every request for the batch delay first (Model.pollBatch), which
would add that delay to every figure here. `--batch-size 16` measures what `make demo` serves.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..serving.archive import ServingSettings
from ..serving.samples import png_bytes
from . import BenchError
from .explain import FORMATS, check_choices, handler_module, handler_modules, load_formats, mnist_digits
from .http import (
    BATCH_LINE,
    METRIC_LINE,
    LogCursor,
    handler_summary,
    oip_request_bytes,
    read_inference_token,
    torchserve,
)
from .load import LoadResult, run_sequence
from .offline import exported_files
from .timing import Latency, known_fields, machine

BINARY = "application/octet-stream"
PREDICT = "prediction"  # the row of a format that explains nothing, beside its methods
SETTINGS = replace(ServingSettings(), batch_size=1)  # see the module docstring
STAGES = ("InferenceTime", "ExplainTime", "PredictionTime")
DIGITS = 50
REQUESTS = 200
OIP_DIGITS = 64
OIP_REQUESTS = 10
# untimed requests per method after the checked one (whose answer imports Captum in the worker): one digit,
# and 64 digits a request (one is plenty: each runs a thousand model calls)
WARMUP = {"single": 5, "oip": 1}
LOG_WAIT_S = 30  # at most, for the frontend to log a run's metrics


@dataclass(frozen=True)
class CostPlan:
    model: str
    artifacts: Path
    formats: tuple[str, ...]
    methods: tuple[str, ...] | None  # None: every method a format runs
    settings: ServingSettings
    digits: int  # distinct digits the one-digit requests cycle through
    requests: int  # one-digit requests per format and method
    oip_digits: int
    oip_requests: int


@dataclass
class CostRow:
    """One format's prediction, or one of its methods, measured both ways."""

    format: str
    method: str  # PREDICT for the prediction
    default: bool
    single: LoadResult  # one digit a request
    oip: LoadResult  # oip_digits a request
    oip_digits: int
    handler: dict[str, Any] = field(default_factory=dict)  # "single" / "oip" -> the handler's stage times

    @property
    def digits_per_s(self) -> float:
        return self.oip.requests_per_s * self.oip_digits


@dataclass
class CostReport:
    plan: CostPlan
    machine: dict
    rows: list[CostRow] = field(default_factory=list)

    def prediction(self, fmt: str) -> CostRow | None:
        return next((r for r in self.rows if r.format == fmt and r.method == PREDICT), None)

    def to_dict(self) -> dict[str, Any]:
        plan = {**asdict(self.plan), "artifacts": str(self.plan.artifacts)}
        rows = []
        for row in self.rows:
            data = asdict(row)
            for kind in ("single", "oip"):
                del data[kind]["samples_ms"]  # summarised in latency
                data[kind]["requests_per_s"] = getattr(row, kind).requests_per_s
            data["digits_per_s"] = row.digits_per_s
            rows.append(data)
        return {"kind": "explain-http", "plan": plan, "machine": self.machine, "rows": rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostReport:
        """The report back from its JSON (`to_dict`), as `digits bench report` reads it."""
        plan = data["plan"]
        plan = CostPlan(
            **{
                **known_fields(CostPlan, plan),
                "artifacts": Path(plan["artifacts"]),
                "formats": tuple(plan["formats"]),
                "methods": tuple(plan["methods"]) if plan["methods"] else None,
                "settings": ServingSettings(**plan["settings"]),
            }
        )
        rows = [
            CostRow(
                **{**known_fields(CostRow, row), "single": load_result(row["single"]), "oip": load_result(row["oip"])}
            )
            for row in data["rows"]
        ]
        return cls(plan, data["machine"], rows)


def load_result(data: dict[str, Any]) -> LoadResult:
    return LoadResult(**{**known_fields(LoadResult, data), "latency": Latency(**data["latency"])})


def run_explain_http(plan: CostPlan, run_dir: Path, log: Callable[[str], Any] = print) -> CostReport:
    """Archives, serves and measures as the module docstring says; stops TorchServe in every case."""
    check_plan(plan)
    report = CostReport(plan, machine())
    images = mnist_digits(max(plan.digits, plan.oip_digits), None)[0]
    pngs = [png_bytes(image) for image in images[: plan.digits]]
    oip_tensor = images[: plan.oip_digits]
    _, engine = handler_modules()
    methods = methods_by_format(plan)
    with tempfile.TemporaryDirectory(prefix="digits-bench-store-") as store:
        names = archive_formats(plan, Path(store))
        with torchserve(Path(store), run_dir) as url:
            token = read_inference_token(run_dir)
            logs = LogCursor(run_dir / "logs")
            for fmt, name in names.items():
                default = engine.DEFAULT_METHODS[runtime_of(fmt)]
                for method in (PREDICT, *methods[fmt]):
                    client = Client(url, name, token, method, logs)
                    single, oip = client.measure(plan, pngs, oip_tensor)
                    row = CostRow(fmt, method, method == default, single, oip, plan.oip_digits, client.stages)
                    report.rows.append(row)
                    log(progress_line(row))
    return report


def check_plan(plan: CostPlan) -> None:
    check_choices(plan.formats, plan.methods)
    limit = handler_module("digit_explanations").MAX_EXPLAINED
    if min(plan.digits, plan.requests, plan.oip_requests) < 1 or not 1 <= plan.oip_digits <= limit:
        raise BenchError(
            f"--digits, --requests and --oip-requests must be at least 1 and --oip 1-{limit} (the handler's "
            f"limit of explained digits a request); got {plan.digits}, {plan.requests}, {plan.oip_requests}, "
            f"{plan.oip_digits}"
        )


def runtime_of(fmt: str) -> str:
    """The handler's format of an exported one: the int8 file is an ONNX file to it."""
    return "onnx" if fmt == "onnx-int8" else fmt


def methods_by_format(plan: CostPlan) -> dict[str, list[str]]:
    """The methods measured for each format: those its predictor runs (the handler's `methods_for` on the file
    loaded as a worker loads it), narrowed by the plan."""
    _, engine = handler_modules()
    predictors = load_formats(Path(plan.artifacts) / plan.model, plan.model, plan.formats, lambda _: None)
    return {
        fmt: [name for name in engine.methods_for(predict) if plan.methods is None or name in plan.methods]
        for fmt, predict in predictors.items()
    }


def archive_formats(plan: CostPlan, store: Path) -> dict[str, str]:
    """One archive per format in `store`, named MODEL-FORMAT; format -> model name."""
    from ..serving.archive import archive_model

    names = {}
    for fmt in plan.formats:
        names[fmt] = f"{plan.model}-{fmt}"
        archive_model(plan.model, fmt, plan.artifacts, store, names[fmt], plan.settings, log=lambda _: None)
    return names


class Client:
    """One model's requests for one method (or the prediction), both ways, and the handler's times for each."""

    def __init__(self, url: str, name: str, token: str, method: str, logs: LogCursor) -> None:
        self.url, self.name, self.token, self.method, self.logs = url, name, token, method, logs
        self.stages: dict[str, Any] = {}

    def measure(self, plan: CostPlan, pngs: list[bytes], digits: np.ndarray) -> tuple[LoadResult, LoadResult]:
        single = self.timed("single", *self.single_request(pngs), plan.requests)
        oip = self.timed("oip", *self.oip_request(digits), plan.oip_requests)
        return single, oip

    def timed(self, kind: str, url: str, bodies: list[bytes], content_type: str, headers: dict, count: int):
        """One request checked, warm-up requests, then `count` timed ones; the handler's stage times of those."""
        self.logs.mark()
        self.check_answer(kind, url, bodies[0], content_type, headers)
        warm = run_sequence(url, self.token, bodies, content_type, WARMUP[kind], headers)
        if warm.errors:
            raise BenchError(f"{self.name} refused {warm.errors} {kind} warm-up requests for {self.method}")
        self.logged(1 + WARMUP[kind])  # the warm-up's metrics in the log before the mark, not after it
        self.logs.mark()
        result = run_sequence(url, self.token, bodies, content_type, count, headers)
        self.stages[kind] = handler_summary(self.logged(count), self.name, STAGES)
        return result

    def logged(self, batches: int) -> str:
        """What TorchServe logged since the mark, once it holds the metrics of `batches` of this model's batches
        (one client alone: a request a batch), or whatever it holds after LOG_WAIT_S. The frontend copies a
        worker's lines into its log on its own time, later still on a busy machine."""
        deadline = time.monotonic() + LOG_WAIT_S
        while True:
            text = self.logs.read()
            if batches_logged(text, self.name) >= batches or time.monotonic() > deadline:
                return text

    def single_request(self, pngs: list[bytes]) -> tuple[str, list[bytes], str, dict]:
        if self.method == PREDICT:
            return f"{self.url}/predictions/{self.name}", pngs, "image/png", {}
        bodies = [
            json.dumps({"data": base64.b64encode(body).decode(), "method": self.method}).encode() for body in pngs
        ]
        return f"{self.url}/explanations/{self.name}", bodies, "application/json", {}

    def oip_request(self, digits: np.ndarray) -> tuple[str, list[bytes], str, dict]:
        outputs = ["probabilities", "label"] + ([] if self.method == PREDICT else ["attributions"])
        parameters = {} if self.method == PREDICT else {"method": self.method}
        body, header_length = oip_request_bytes(digits, outputs, parameters)
        headers = {"Inference-Header-Content-Length": str(header_length)}
        return f"{self.url}/v2/models/{self.name}/infer", [body], BINARY, headers

    def check_answer(self, kind: str, url: str, body: bytes, content_type: str, headers: dict) -> None:
        """One request first, its answer read: a refusal, or an answer without the explanation asked for,
        would otherwise be timed as the real thing."""
        import requests

        sent = {"Authorization": f"Bearer {self.token}", "Content-Type": content_type, **headers}
        response = requests.post(url, data=body, headers=sent, timeout=120)
        if response.status_code != 200:
            raise BenchError(
                f"{self.name} refuses {kind} requests for {self.method}: {response.status_code} "
                f"{response.text.strip()[:300]}"
            )
        if self.method != PREDICT and explained_method(response) != self.method:
            raise BenchError(
                f"{self.name} answered a {kind} request for {self.method} without its explanation: "
                f"{response.content[:300]!r}"
            )


def batches_logged(text: str, model: str) -> int:
    """Batches of `model` whose metrics are all in the log text: the handler's (BatchSize comes last of its
    lines) and TorchServe's PredictionTime, written after the handler returns."""
    sizes = sum(name == model for _, name in BATCH_LINE.findall(text))
    whole = sum(name == model for metric, _, name in METRIC_LINE.findall(text) if metric == "PredictionTime")
    return min(sizes, whole)


def explained_method(response) -> str | None:
    """The method an answer names: an /explanations object's `method`, or the OIP `attributions` output's."""
    length = response.headers.get("Inference-Header-Content-Length")
    envelope = json.loads(response.content[: int(length)] if length else response.content)
    if "outputs" not in envelope:
        return envelope.get("method")
    outputs = {output["name"]: output for output in envelope["outputs"]}
    return outputs.get("attributions", {}).get("parameters", {}).get("method")


def progress_line(row: CostRow) -> str:
    latency = row.single.latency
    return (
        f"  {row.format:11} {row.method:20}: one digit p50 {latency.p50_ms:7.1f} ms, p99 {latency.p99_ms:7.1f} ms; "
        f"{row.oip_digits} a request over OIP: {row.digits_per_s:8.0f} digits/s"
    )


def parse_formats(formats: Sequence[str] | None, artifacts: Path, model: str) -> tuple[str, ...]:
    """The formats asked for, else every exported one, in FORMATS order."""
    exported = exported_files(Path(artifacts) / model, model)
    return tuple(formats or [fmt for fmt in FORMATS if fmt in exported])
