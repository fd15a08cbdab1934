"""TorchServe's metrics config for Prometheus mode: its own metrics plus the handler's.

In Prometheus mode (`metrics_mode=prometheus`) TorchServe 0.12.0's frontend exposes on its metrics port
only the metrics its metrics config declares (or that `model_metrics_auto_detect` registers at their first
line, as gauges, counters or histograms as the line says). This writes TorchServe's own config
(ts/configs/metrics.yaml: request counts and latencies, queue time, PredictionTime, ...) with the handler's
metrics added under `model_metrics`, as the handler declares them (`MODEL_METRICS` in
handlers/digit_metrics.py, read from that file: the handler ships alone and is not a package to import).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import ts
import yaml

from .archive import HANDLER_DIR

TS_METRICS_CONFIG = Path(ts.__file__).parent / "configs" / "metrics.yaml"


class NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def handler_metrics() -> dict[str, list[dict[str, Any]]]:
    """`MODEL_METRICS` of handlers/digit_metrics.py (standard library only, so loaded on its own)."""
    spec = importlib.util.spec_from_file_location("digit_metrics_declared", HANDLER_DIR / "digit_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODEL_METRICS


def metrics_config() -> dict[str, Any]:
    """TorchServe's metrics config with the handler's metrics declared too (a name declared twice: ours)."""
    config = yaml.safe_load(TS_METRICS_CONFIG.read_text())
    model = config.setdefault("model_metrics", {}) or {}
    config["model_metrics"] = model
    ours = handler_metrics()
    names = {spec["name"] for specs in ours.values() for spec in specs}
    for kind in sorted(set(model) | set(ours)):
        model[kind] = [spec for spec in model.get(kind) or [] if spec["name"] not in names] + ours.get(kind, [])
    return config


def write_metrics_config(path: Path) -> Path:
    path = Path(path)
    # no YAML aliases: the frontend's loader would share one dimensions list between metrics, and it appends
    # Hostname to each metric's list in place (MetricConfiguration.setModel_metrics): "Incorrect number of labels"
    path.write_text(yaml.dump(metrics_config(), Dumper=NoAliases, sort_keys=False))
    return path
