"""The handler's time split per batch, reported as TorchServe custom metrics.

Four stages, one gauge each, in milliseconds per batch (ModelName and Level dimensions, as TorchServe's
own PredictionTime, which times the whole batch):
  - DecodeTime: every request's body read into a framed digit (parsing, image decoding, MNIST framing);
  - PreprocessTime: the digits stacked into one tensor and normalised;
  - InferenceTime: the forward pass and the softmax;
  - PostprocessTime: the JSON bodies and per-request statuses.
TorchServe 0.12.0 records a custom metric only when the frontend knows it: `digits serve` sets
`model_metrics_auto_detect=true` (serving/config.py). In log mode they land in logs/model_metrics.log,
which `digits bench http` summarises.

The four lines go out in one write, in the format TorchServe's own `CachingMetric.emit_metrics` writes
(`ts/metrics/caching_metric.py`) and the frontend parses (`Metric.parse`). Through the metrics cache's
`add_time`, each metric built dimension objects, validated them, asked for the host name and went through
its own logging call: 91 us a batch for the four, a tenth of the mlp handler's whole time, spent while the
batch's requests wait (in one write: 9 us).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

STAGES = ("DecodeTime", "PreprocessTime", "InferenceTime", "PostprocessTime")
UNIT = "Milliseconds"  # what TorchServe writes for add_time's "ms"

logger = logging.getLogger(__name__)


class StageTimes:
    """Wall time of each stage of one batch, in ms; `stage(name)` times a block."""

    def __init__(self) -> None:
        self.milliseconds: dict[str, float] = {}

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
        """Writes one gauge per stage timed to the worker's stdout, which TorchServe's frontend reads.

        Each carries the model's name and, as PredictionTime does, the ids of all the batch's requests.
        """
        if self.milliseconds:
            logger.info(metric_lines(self.milliseconds, context.model_name, context.request_ids))


def metric_lines(milliseconds: Mapping[str, float], model_name: str, request_ids: Mapping[int, str] | None) -> str:
    """TorchServe's metric lines for a batch's gauges, one per line:
    `[METRICS]DecodeTime.Milliseconds:0.52|#ModelName:cnn,Level:Model|#type:GAUGE|#hostname:h,1795704013,id1,id2`
    """
    dimensions = f"ModelName:{model_name},Level:Model"
    tail = f"|#type:GAUGE|#hostname:{socket.gethostname()},{int(time.time())}"
    if request_ids:
        tail += "," + ",".join(request_ids.values())
    return "\n".join(f"[METRICS]{name}.{UNIT}:{value}|#{dimensions}{tail}" for name, value in milliseconds.items())
