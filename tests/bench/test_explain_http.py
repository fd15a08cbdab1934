"""`digits bench explain-http`: the explanation cost over HTTP, on a real TorchServe, on a tiny configuration."""

from __future__ import annotations

import json

import pytest
from digits.bench.explain import handler_modules
from digits.bench.explain_http import CostReport
from digits.bench.report import explain_http_markdown

from digits.cli import main


def test_explain_http_bench_times_every_method_of_every_format_beside_the_prediction(int8_artifacts, tmp_path, capsys):
    out = tmp_path / "explain-http"
    args = ["bench", "explain-http", "--model", "mlp", "--artifacts", str(int8_artifacts), "--digits", "3"]
    sizes = ["--requests", "4", "--oip", "4", "--oip-requests", "2"]
    assert main([*args, *sizes, "--out", str(out)]) == 0
    report = json.loads((out / "bench-explain-http.json").read_text())
    assert report["kind"] == "explain-http" and report["plan"]["settings"]["batch_size"] == 1
    _, engine = handler_modules()
    rows = {(row["format"], row["method"]): row for row in report["rows"]}
    forward_only = [m for m, method in engine.METHODS.items() if not method.gradients]
    expected = {("torchscript", m) for m in ("prediction", *engine.METHODS)}
    expected |= {(fmt, m) for fmt in ("onnx", "onnx-int8") for m in ("prediction", *forward_only)}
    assert set(rows) == expected
    for (fmt, method), row in rows.items():
        assert row["single"]["requests"] == 4 and row["oip"]["requests"] == 2
        assert row["single"]["errors"] == 0 and row["oip"]["errors"] == 0
        assert 0 < row["single"]["latency"]["p50_ms"] <= row["single"]["latency"]["p99_ms"]
        assert row["digits_per_s"] == pytest.approx(row["oip"]["requests_per_s"] * 4)
        assert row["default"] == (method == engine.DEFAULT_METHODS[fmt.removesuffix("-int8")])
        # the handler's own metrics: an explanation's time, only where one was asked for
        explain_time = row["handler"]["single"]["ExplainTime"]
        assert (explain_time is None) == (method == "prediction")
        assert row["handler"]["single"]["batches"] == 4
    markdown = (out / "bench-explain-http.md").read_text()
    assert "| format | method | one digit: p50 / p90 / p99 ms |" in markdown and "default method" in markdown
    assert (out / "bench-explain-http.png").read_bytes().startswith(b"\x89PNG")
    assert markdown in capsys.readouterr().out
    # digits bench report renders the run from its JSON alone
    assert explain_http_markdown(CostReport.from_dict(report)) == markdown
    performance = tmp_path / "docs" / "performance.md"
    args = ["bench", "report", "--runs", str(tmp_path), "--artifacts", str(int8_artifacts), "--out", str(performance)]
    assert main(args) == 0
    assert "## Explanations, cost over HTTP: mlp (`explain-http`)" in performance.read_text()
    assert (tmp_path / "docs" / "performance" / "explain-http.png").read_bytes().startswith(b"\x89PNG")


def test_explain_http_bench_refuses_more_digits_than_a_request_may_explain(int8_artifacts, tmp_path, capsys):
    args = ["bench", "explain-http", "--model", "mlp", "--artifacts", str(int8_artifacts), "--oip", "65"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "--oip 1-64" in capsys.readouterr().err
