"""The handler's own metrics per batch, reported as TorchServe custom metrics.

Five stages, one value each, in milliseconds per batch (ModelName and Level dimensions, as TorchServe's
own PredictionTime, which times the whole batch):
  - DecodeTime: every request's body read into a framed digit (parsing, image decoding, MNIST framing);
  - PreprocessTime: the digits stacked into one tensor and normalised;
  - InferenceTime: the forward pass and the softmax;
  - ExplainTime: the explanations asked for, only in a batch where a request asked for one;
  - PostprocessTime: the JSON bodies and per-request statuses.
and, per batch, BatchSize (requests) and BatchDigits (digits: an OIP request carries many), and the
counter Answers (one per request, by Protocol "predictions"/"oip"/"kserve-v1", HTTP Status and ErrorType,
"OK" when answered). TorchServe 0.12.0 records a custom metric only when the frontend knows it: `MODEL_METRICS`
declares them for the frontend's metrics config (serving/metrics.py writes it; in Prometheus mode the stage
times and batch sizes are histograms there, whatever type a line names), and `digits serve` also sets
`model_metrics_auto_detect=true`. The frontend logs every line it reads in logs/ts_log.log, which
`digits bench http` summarises.

The four lines go out in one write, in the format TorchServe's own `CachingMetric.emit_metrics` writes
(`ts/metrics/caching_metric.py`) and the frontend parses (`Metric.parse`). Through the metrics cache's
`add_time`, each metric built dimension objects, validated them, asked for the host name and went through
its own logging call, about ten times the cost of one write, spent while the batch's requests wait.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

STAGES = ("DecodeTime", "PreprocessTime", "InferenceTime", "ExplainTime", "PostprocessTime")
UNIT = "Milliseconds"  # what TorchServe writes for add_time's "ms"
SIZES = ("BatchSize", "BatchDigits")
ANSWERS = "Answers"
DIMENSIONS = ["ModelName", "Level"]
ANSWER_DIMENSIONS = [*DIMENSIONS, "Protocol", "Status", "ErrorType"]
# the handler's metrics as TorchServe's metrics config (`model_metrics:`) declares them; the frontend appends
# Hostname to each declaration's dimensions, in place (so no two may share one list)
MODEL_METRICS = {
    "histogram": [
        *({"name": name, "unit": UNIT, "dimensions": list(DIMENSIONS)} for name in STAGES),
        *({"name": name, "unit": "Count", "dimensions": list(DIMENSIONS)} for name in SIZES),
    ],
    "counter": [{"name": ANSWERS, "unit": "Count", "dimensions": list(ANSWER_DIMENSIONS)}],
}

logger = logging.getLogger(__name__)


class StageTimes:
    """Wall time of each stage of one batch, in ms (`stage(name)` times a block), its size and its answers."""

    def __init__(self) -> None:
        self.milliseconds: dict[str, float] = {}
        self.sizes: dict[str, int] = {}
        self.answers: Counter[tuple[str, int, str]] = Counter()  # (protocol, status, error type) -> requests

    def count(self, requests: int, digits: int, answers: Counter[tuple[str, int, str]]) -> None:
        """The batch's size in requests and digits, and its answers by (protocol, status, error type)."""
        self.sizes = {"BatchSize": requests, "BatchDigits": digits}
        self.answers = answers

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.milliseconds[name] = round((time.perf_counter() - start) * 1000, 3)

    def report(self, context: Any) -> None:
        """Writes one line per metric to the worker's stdout, which TorchServe's frontend reads, in one write.

        Each carries the model's name and, as PredictionTime does, the ids of all the batch's requests.
        """
        lines = []
        if self.milliseconds:
            lines.append(metric_lines(self.milliseconds, context.model_name, context.request_ids))
        if self.sizes:
            lines.append(count_lines(self.sizes, self.answers, context.model_name, context.request_ids))
        if lines:
            logger.info("\n".join(lines))


def count_lines(
    sizes: Mapping[str, int],
    answers: Mapping[tuple[str, int, str], int],
    model_name: str,
    request_ids: Mapping[int, str] | None,
) -> str:
    """The batch's sizes (histograms) and answer counts (counters), in metric_lines' format."""
    tail = _tail(request_ids)
    dimensions = f"ModelName:{model_name},Level:Model"
    lines = [f"[METRICS]{name}.Count:{value}|#{dimensions}|#type:HISTOGRAM{tail}" for name, value in sizes.items()]
    for (protocol, status, kind), requests in sorted(answers.items()):
        labels = f"{dimensions},Protocol:{protocol},Status:{status},ErrorType:{kind}"
        lines.append(f"[METRICS]{ANSWERS}.Count:{requests}|#{labels}|#type:COUNTER{tail}")
    return "\n".join(lines)


def _tail(request_ids: Mapping[int, str] | None) -> str:
    tail = f"|#hostname:{socket.gethostname()},{int(time.time())}"
    if request_ids:
        tail += "," + ",".join(request_ids.values())
    return tail


def metric_lines(milliseconds: Mapping[str, float], model_name: str, request_ids: Mapping[int, str] | None) -> str:
    """TorchServe's metric lines for a batch's gauges, one per line:
    `[METRICS]DecodeTime.Milliseconds:0.52|#ModelName:cnn,Level:Model|#type:GAUGE|#hostname:h,1795704013,id1,id2`
    """
    dimensions = f"ModelName:{model_name},Level:Model"
    tail = "|#type:GAUGE" + _tail(request_ids)
    return "\n".join(f"[METRICS]{name}.{UNIT}:{value}|#{dimensions}{tail}" for name, value in milliseconds.items())
