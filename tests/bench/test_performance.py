"""`digits bench report`: docs/performance.md and its plots from one run's JSON, and the README's headline.

The fixtures in fixtures/report/ are the JSON of a short real run (`digits bench offline mlp --batch-sizes 1,8
--min-seconds 0.05 --rounds 1`, `digits bench http` on torchscript and over OIP with --requests 200/100) and
the artifacts' metrics.json and parity reports of a default-trained, exported mlp.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from digits.bench import BenchError
from digits.bench.performance import HEADLINE_BEGIN, HEADLINE_END, RENDERERS, Section, write_report

from digits.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "report"
REPO = Path(__file__).resolve().parents[2]
RUNS = ("mlp-offline", "mlp-onnx-oip-http", "mlp-torchscript-http")


@pytest.fixture
def run(tmp_path) -> dict[str, Path]:
    """A copy of the fixture run and artifacts, and a README holding the headline markers."""
    shutil.copytree(FIXTURES, tmp_path / "in")
    readme = tmp_path / "README.md"
    readme.write_text(f"# digits\n\n## Performance\n\n{HEADLINE_BEGIN}\nnot measured yet\n{HEADLINE_END}\n\nmore\n")
    return {
        "runs": tmp_path / "in" / "runs",
        "artifacts": tmp_path / "in" / "artifacts",
        "out": tmp_path / "docs" / "performance.md",
        "readme": readme,
    }


def report(paths: dict[str, Path], *extra: str) -> int:
    args = ["bench", "report", "--runs", str(paths["runs"]), "--artifacts", str(paths["artifacts"])]
    return main([*args, "--out", str(paths["out"]), "--readme", str(paths["readme"]), *extra])


def table_after(text: str, marker: str) -> list[str]:
    """The markdown table that starts on the first table line after `marker`."""
    lines = text.split(marker, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    return [line for line in lines[start:] if line.startswith("|")][: _table_length(lines[start:])]


def _table_length(lines: list[str]) -> int:
    return next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))


def test_the_report_renders_every_run_under_a_header_naming_machine_date_versions_command(run, capsys):
    assert report(run, "--command", "make bench BENCH_OUT=runs/bench", "--headline", "mlp-torchscript-http") == 0
    text = run["out"].read_text()
    machine = json.loads((run["runs"] / "mlp-offline" / "bench-offline.json").read_text())["machine"]
    assert f"- Machine: {machine['cpu']} ({machine['architecture']}; AVX2 " in text
    assert re.search(r"AVX-512 (yes|no), VNNI (yes|no), AMX (yes|no)\); \d+ cores, \d+ logical CPUs; [\d.]+ GiB", text)
    assert f"- Date: {machine['date']}" in text
    assert "- Versions: torch " in text and ", java " in text and "torchserve 0.12.0" in text
    assert "- Command: `make bench BENCH_OUT=runs/bench`" in text
    for name in RUNS:
        assert (
            f"`{name}`)" in text and (run["out"].parent / "performance" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        )
        assert f"](performance/{name}.png)" in text
    assert "Command: `digits bench offline mlp --batch-sizes 1,8" in text  # each run's own command


def test_training_and_export_figures_come_from_the_files_those_steps_wrote(run):
    assert report(run) == 0
    text = run["out"].read_text()
    metrics = json.loads((run["artifacts"] / "mlp" / "metrics.json").read_text())
    parity = json.loads((run["artifacts"] / "mlp" / "parity.json").read_text())
    int8 = json.loads((run["artifacts"] / "mlp" / "parity-int8.json").read_text())
    accuracy = f"{metrics['test_accuracy']:.2%}"
    share = f"{max(c['tolerance_used'] for c in parity['checks']):.0%}"
    headline = table_after(text, "## Headline")
    assert headline[2] == f"| `mlp` | {accuracy} | pass ({share}) | {int8['argmax_agreement']:.2%} |"
    assert text.count(accuracy) >= 3  # the headline, the training table, and the eager accuracy of each file
    assert "| `mlp` | onnxruntime (ORT_ENABLE_ALL) | 5 batch sizes, 10,000 digits |" in text


def test_the_readme_headline_is_the_report_s_with_machine_and_date(run):
    assert report(run, "--headline", "mlp-torchscript-http", "--headline", "mlp-onnx-oip-http") == 0
    text, readme = run["out"].read_text(), run["readme"].read_text()
    assert table_after(readme, HEADLINE_BEGIN) == table_after(text, "## Headline")
    header, _, row = table_after(readme, HEADLINE_BEGIN)
    cells = dict(zip((c.strip() for c in header.split("|")), (c.strip() for c in row.split("|")), strict=True))
    png, oip = (top_row(run, name) for name in ("mlp-torchscript-http", "mlp-onnx-oip-http"))
    # one column per body kind: the PNG run and the OIP run of one model both stand in the table
    served = f"torchscript: {png['model']['requests_per_s']:,.0f} at c{png['concurrency']} ({png['ratio']:.2f})"
    assert cells["/predictions, one PNG a request: req/s (model / no-op)"] == served
    plan = json.loads((run["runs"] / "mlp-onnx-oip-http" / "bench-http.json").read_text())["plan"]
    column = f"OIP, {plan['oip_digits']} digits a request, {plan.get('oip_encoding', 'binary')}: digits/s"
    assert cells[column] == f"onnx: {oip['digits_per_s']:,.0f} (c{oip['concurrency']})"
    assert "Measured on " in readme and "[performance.md](docs/performance.md)" in readme
    assert readme.startswith("# digits\n") and readme.endswith(f"{HEADLINE_END}\n\nmore\n")  # the rest untouched


def top_row(paths: dict[str, Path], name: str) -> dict:
    rows = json.loads((paths["runs"] / name / "bench-http.json").read_text())["rows"]
    return max(rows, key=lambda row: row["concurrency"])


def test_a_second_run_replaces_the_report_and_its_plots_whole(run):
    assert report(run) == 0
    stale = run["out"].parent / "performance" / "old-run.png"
    stale.write_bytes(b"a plot of a run that is gone")
    shutil.rmtree(run["runs"] / "mlp-onnx-oip-http")
    assert report(run) == 0
    assert not stale.exists() and "mlp-onnx-oip-http" not in run["out"].read_text()
    assert not (run["out"].parent / "performance" / "mlp-onnx-oip-http.png").exists()


def test_a_kind_without_a_renderer_is_refused_and_one_renderer_adds_it(run, monkeypatch):
    (run["runs"] / "rollout").mkdir()
    (run["runs"] / "rollout" / "bench-rollout.json").write_text(json.dumps({"switch_ms": [3.5, 4.0]}))
    with pytest.raises(BenchError, match="no renderer for .*bench-rollout.json; known kinds: offline, http"):
        write_report(run["runs"], run["artifacts"], run["out"], "make bench")

    def render_rollout(run_, data, plots) -> Section:
        return Section("Rollout", [f"switches: {', '.join(map(str, data['switch_ms']))} ms"])

    monkeypatch.setitem(RENDERERS, "rollout", render_rollout)
    write_report(run["runs"], run["artifacts"], run["out"], "make bench")
    assert "## Rollout\n\nswitches: 3.5, 4.0 ms" in run["out"].read_text()


def test_runs_from_two_machines_are_refused(run):
    path = run["runs"] / "mlp-offline" / "bench-offline.json"
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "Another CPU"
    path.write_text(json.dumps(data))
    with pytest.raises(BenchError, match="different machines"):
        write_report(run["runs"], run["artifacts"], run["out"], "make bench")


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("no markers", "has no headline markers"),
        ("no runs", "no bench-\\*.json in"),
        ("unknown headline", "--headline nowhere: no such run"),
    ],
)
def test_what_cannot_be_reported_is_one_clear_error(run, capsys, damage, named):
    extra = []
    if damage == "no markers":
        run["readme"].write_text("# digits\n")
    elif damage == "no runs":
        shutil.rmtree(run["runs"])
        run["runs"].mkdir()
    else:
        extra = ["--headline", "nowhere"]
    assert report(run, *extra) == 2
    assert re.search(named, capsys.readouterr().err)


def test_the_repository_readme_headline_matches_its_report():
    readme = (REPO / "README.md").read_text()
    assert HEADLINE_BEGIN in readme and HEADLINE_END in readme
    performance = REPO / "docs" / "performance.md"
    if not performance.is_file():  # a fresh clone before its first `make bench`
        assert "Not measured yet" in readme.split(HEADLINE_BEGIN, 1)[1].split(HEADLINE_END, 1)[0]
        return
    assert table_after(readme, HEADLINE_BEGIN) == table_after(performance.read_text(), "## Headline")
