"""`digits bench switch`'s report: its section of docs/performance.md, from the JSON of a short real run.

fixtures/switch/cnn-onnx-switch/bench-switch.json is `digits bench switch --steady 2` on the default-trained
cnn, its timeline (the plot's points) thinned to about 150 to keep the file small; the figures are
the run's own. It is rendered beside the report fixtures of tests/bench/test_performance.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from digits.bench.performance import write_report
from digits.bench.switch import switch_markdown

FIXTURES = Path(__file__).parent / "fixtures"
RUN = FIXTURES / "switch" / "cnn-onnx-switch"


def test_the_switch_run_is_a_section_of_the_report_with_its_table_verdict_and_plot(tmp_path) -> None:
    shutil.copytree(FIXTURES / "report", tmp_path / "in")
    shutil.copytree(RUN, tmp_path / "in" / "runs" / RUN.name)
    out = tmp_path / "docs" / "performance.md"
    write_report(tmp_path / "in" / "runs", tmp_path / "in" / "artifacts", out, "make bench")
    text = out.read_text()
    assert "Replacing a served model under load: cnn (`cnn-onnx-switch`)" in text
    assert "Command: `digits bench switch --steady 2" in text
    assert "| phase | protocol | requests | p50 ms | p99 ms |" in text
    assert "0 failed, 0 wrong labels; versions: every answer from a version live at that moment" in text
    assert (out.parent / "performance" / f"{RUN.name}.png").read_bytes()[:4] == b"\x89PNG"


def test_each_phase_and_protocol_has_its_row() -> None:
    data = json.loads((RUN / "bench-switch.json").read_text())
    rows = [line for line in switch_markdown(data).splitlines() if line.startswith("| ") and "---" not in line][1:]
    phases = ("steady before", "rollout command", "steady between", "rollback command", "steady after")
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [p for p in phases for _ in ("png", "oip")]
    assert sum(row["requests"] for row in data["latency"]) <= data["summary"]["requests"]
