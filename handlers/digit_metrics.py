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
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STAGES = ("DecodeTime", "PreprocessTime", "InferenceTime", "PostprocessTime")


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

    def report(self, metrics: Any) -> None:
        """Adds one time metric per stage timed, to TorchServe's metrics cache of the batch."""
        for name, value in self.milliseconds.items():
            # idx None: the batch's metric, tagged with all its request ids, as PredictionTime is
            metrics.add_time(name, value, None, "ms")
