"""The handler's time split reaches TorchServe as custom metrics: one line a stage, as TorchServe writes them."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import ts
from digit_metrics import STAGES, StageTimes, metric_lines
from handler_helpers import make_context, png_bytes, run_batch
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

# TorchServe's frontend, org.pytorch.serve.metrics.Metric.parse: a line it cannot match is dropped
FRONTEND_PATTERN = re.compile(
    r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?\|#hostname:([^,]+),([^,]+)(,(.*))?"
)
METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"


def parsed(message: str) -> list[re.Match]:
    lines = message.splitlines()
    assert all(line.startswith("[METRICS]") for line in lines), lines
    matches = [FRONTEND_PATTERN.fullmatch(line.removeprefix("[METRICS]")) for line in lines]
    assert all(matches), lines
    return matches


def test_handler_reports_each_stage_of_a_batch(handlers_by_format, model_dirs, mnist_test, caplog) -> None:
    context = make_context(model_dirs["onnx"])
    with caplog.at_level(logging.INFO, logger="digit_metrics"):
        run_batch(handlers_by_format["onnx"], context, [{"body": png_bytes(mnist_test[0][0])}] * 3)
    [record] = [r for r in caplog.records if r.name == "digit_metrics"]  # all in one write
    matches = parsed(record.getMessage())
    stages = [stage for stage in STAGES if stage != "ExplainTime"]  # timed only when a request asks for one
    assert [m[1] for m in matches] == [*stages, "BatchSize", "BatchDigits", "Answers"]
    assert [(m[3], m[6]) for m in matches[4:]] == [("3", "HISTOGRAM"), ("3", "HISTOGRAM"), ("3", "COUNTER")]
    assert matches[6][4] == "ModelName:tiny,Level:Model,Protocol:predictions,Status:200,ErrorType:OK"
    for match in matches[:4]:
        assert match[2] == "Milliseconds" and float(match[3]) >= 0 and match[6] == "GAUGE"
        assert match[4] == "ModelName:tiny,Level:Model"
        assert match[10] == "request-0,request-1,request-2"  # every request of the batch, as PredictionTime


@pytest.mark.parametrize("request_ids", [{0: "a-1", 1: "b-2"}, None], ids=["batch", "no-ids"])
def test_lines_are_those_torchserves_metrics_cache_writes(request_ids, caplog) -> None:
    cache = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    cache.model_name, cache.request_ids = "cnn", request_ids
    with caplog.at_level(logging.INFO):
        cache.add_time("DecodeTime", 0.518, None, "ms")
    theirs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]")]
    ours = metric_lines({"DecodeTime": 0.518}, "cnn", request_ids)

    def without_timestamp(line: str) -> str:
        return re.sub(r"(#hostname:[^,]+),\d+", r"\1,T", line)

    assert [without_timestamp(line) for line in theirs] == [without_timestamp(ours)]


def test_an_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stage 'Decode'; known: DecodeTime"):
        with StageTimes().stage("Decode"):
            pass
