"""`digits bench report`: one performance report from one `make bench` run, and the README's headline table.

It reads every `bench-<KIND>.json` in RUNS (one folder per bench step, `make bench`'s BENCH_OUT) and renders
each with its kind's renderer, after the training and export figures, which it reads from the files those
steps wrote in ARTIFACTS/<model>/ (metrics.json, parity.json, parity-int8.json). A header names the machine
(from the runs' JSON: CPU, vector ISA, cores, memory), the date, the versions and the command. The report and
its folder of plots (OUT without `.md`: docs/performance/) are replaced whole, so no two figures in them come
from different runs. Nothing in them is typed by hand.

Adding a bench kind: a function that turns its JSON into a `Section`, registered with `@renderer("KIND")`
(here or in the kind's own module, imported below), and the Makefile line that runs its step into BENCH_OUT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contract import FORMATS, HISTORY_PLOT, METRICS_FILE, PARITY_JSON
from . import BenchError

HEADLINE_BEGIN = "<!-- headline: written by `digits bench report` (make bench); do not edit -->"
HEADLINE_END = "<!-- end of headline -->"
ISA = {  # what the header names, and the /proc/cpuinfo flags that show it (export/cpu.py reads them)
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AMX": ("amx_int8",),
}


@dataclass
class Section:
    """One part of the report: a heading, markdown lines, and cells for the headline table.

    headline: model -> column -> cell; the report keeps a run's cells only when asked (`--headline RUN`).
    """

    title: str
    lines: list[str]
    headline: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One bench step's JSON: RUNS/<name>/bench-<kind>.json."""

    name: str
    kind: str
    path: Path

    def data(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except ValueError as err:
            raise BenchError(f"{self.path} is not JSON ({err}); rerun its bench step") from None


Renderer = Callable[[Run, dict[str, Any], Path], Section]  # (run, its JSON, the plots folder) -> Section
RENDERERS: dict[str, Renderer] = {}


def renderer(kind: str) -> Callable[[Renderer], Renderer]:
    """Registers a renderer for `bench-<kind>.json`."""

    def register(render: Renderer) -> Renderer:
        RENDERERS[kind] = render
        return render

    return register


def find_runs(runs_dir: Path) -> list[Run]:
    """Every bench JSON in `runs_dir` and its folders, in name order; refuses a kind nobody renders."""
    paths = sorted({*runs_dir.glob("bench-*.json"), *runs_dir.glob("*/bench-*.json")})
    runs = [Run(p.parent.name if p.parent != runs_dir else p.stem, p.stem.removeprefix("bench-"), p) for p in paths]
    unknown = [run.path for run in runs if run.kind not in RENDERERS]
    if unknown:
        raise BenchError(
            f"no renderer for {', '.join(map(str, unknown))}; known kinds: {', '.join(RENDERERS)} "
            "(add one with @renderer in bench/performance.py)"
        )
    if not runs:
        raise BenchError(f"no bench-*.json in {runs_dir}: run the bench steps first (make bench)")
    return runs


def write_report(
    runs_dir: Path,
    artifacts: Path,
    out: Path,
    command: str,
    headline_runs: Sequence[str] = (),
    readme: Path | None = None,
) -> Path:
    """Writes `out` and its plots folder whole from the runs and the artifacts; with `readme`, replaces the
    headline table between its markers too. Returns `out`."""
    runs = find_runs(runs_dir)
    unknown = sorted(set(headline_runs) - {run.name for run in runs})
    if unknown:
        raise BenchError(f"--headline {', '.join(unknown)}: no such run in {runs_dir}")
    if readme is not None:
        headline_block(readme.read_text(), readme)  # refuse a README without markers before writing anything
    plots = out.with_suffix("")
    shutil.rmtree(plots, ignore_errors=True)
    plots.mkdir(parents=True)
    models = sorted(p.parent.name for p in artifacts.glob(f"*/{METRICS_FILE}"))
    sections = [training_section(artifacts, models, plots), export_section(artifacts, models)]
    machines, headlined = [], list(sections)
    for run in runs:
        data = run.data()
        if "machine" in data:  # bench.timing.machine(), which every kind's JSON should carry
            machines.append(data["machine"])
        sections.append(RENDERERS[run.kind](run, data, plots))
        if run.name in headline_runs:
            headlined.append(sections[-1])
    table = headline_table(headlined)
    text = [*header(machines, command), "", "## Headline", "", *table, ""]
    for section in sections:
        text += [f"## {section.title}", "", *section.lines, ""]
    out.write_text("\n".join(text))
    if readme is not None:
        update_readme(readme, table, machines, out)
    return out


# --- header and headline ---------------------------------------------------------------------------


def header(machines: list[dict], command: str) -> list[str]:
    """Title, machine, date, versions and command, from the runs' machine records."""
    machine = one_machine(machines)
    dates = sorted(m["date"] for m in machines if m.get("date"))
    when = f"{dates[0]} to {dates[-1]}" if dates and dates[0] != dates[-1] else (dates[0] if dates else "not recorded")
    versions = ", ".join(f"{name} {v}" for name, v in machine.get("versions", {}).items() if v)
    return [
        "# Performance",
        "",
        "Written whole by `digits bench report` from one `make bench` run: do not edit; rerun `make bench`.",
        "",
        f"- Machine: {describe_machine(machine)}",
        f"- Date: {when}",
        f"- Versions: {versions or 'not recorded'}",
        f"- Command: `{command}`",
    ]


def one_machine(machines: list[dict]) -> dict:
    """The machine every run ran on; refuses runs from different CPUs (their figures do not compare)."""
    cpus = {(m.get("cpu"), m.get("logical_cpus")) for m in machines}
    if len(cpus) > 1:
        raise BenchError(f"the runs come from different machines ({sorted(map(str, cpus))}); rerun make bench")
    return machines[0] if machines else {}


def describe_machine(machine: dict) -> str:
    flags = machine.get("cpu_flags", [])
    isa = ", ".join(f"{name} {'yes' if any(f in flags for f in names) else 'no'}" for name, names in ISA.items())
    cores = f"{machine.get('physical_cores', '?')} cores, {machine.get('logical_cpus', '?')} logical CPUs"
    memory = f"{machine['memory_gib']} GiB memory" if machine.get("memory_gib") else "memory not recorded"
    return f"{machine.get('cpu', 'unknown CPU')} ({machine.get('architecture', '?')}; {isa}); {cores}; {memory}"


def headline_table(sections: list[Section]) -> list[str]:
    """One row per model, one column per figure the sections offered, "-" where a model has none."""
    headline: dict[str, dict[str, str]] = {}
    for section in sections:
        for model, cells in section.headline.items():
            headline.setdefault(model, {}).update(cells)
    columns = list(dict.fromkeys(column for cells in headline.values() for column in cells))
    rows = [[f"`{model}`", *(cells.get(column, "-") for column in columns)] for model, cells in headline.items()]
    return markdown_table(["model", *columns], rows)


def update_readme(readme: Path, table: list[str], machines: list[dict], report: Path) -> None:
    """Replaces what stands between the README's headline markers with the table, its machine and date."""
    text = readme.read_text()
    pattern = headline_block(text, readme)
    machine = one_machine(machines)
    dates = sorted(m["date"] for m in machines if m.get("date"))
    where = f"{describe_machine(machine)}; {dates[-1] if dates else 'date not recorded'}"
    link = f"[{report.name}]({Path(os.path.relpath(report, readme.parent)).as_posix()})"
    block = "\n".join(
        [HEADLINE_BEGIN, *table, "", f"Measured on {where}: every figure of that run in {link}.", HEADLINE_END]
    )
    readme.write_text(pattern.sub(lambda _: block, text, count=1))


def headline_block(text: str, readme: Path) -> re.Pattern:
    """The pattern of the README's headline block (markers included); refuses a README without one."""
    pattern = re.compile(re.escape(HEADLINE_BEGIN) + ".*?" + re.escape(HEADLINE_END), re.S)
    if not pattern.search(text):
        raise BenchError(f"{readme} has no headline markers ({HEADLINE_BEGIN} ... {HEADLINE_END})")
    return pattern


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# --- training and export: from the files those steps wrote -------------------------------------------


def training_section(artifacts: Path, models: list[str], plots: Path) -> Section:
    """metrics.json of each model (and its history.png, copied beside the plots)."""
    rows, headline, lines = [], {}, []
    for model in models:
        metrics = json.loads((artifacts / model / METRICS_FILE).read_text())
        rows.append(
            [
                f"`{model}`",
                str(metrics["epochs"]),
                str(metrics["batch_size"]),
                f"{metrics['test_accuracy']:.2%}",
                f"{metrics['train_seconds']:.0f}",
                f"{metrics['seconds_per_epoch']:.1f}",
                str(metrics["device"]),
            ]
        )
        headline[model] = {"test accuracy": f"{metrics['test_accuracy']:.2%}"}
        history = artifacts / model / HISTORY_PLOT
        if history.is_file():
            shutil.copy2(history, plots / f"{model}-history.png")
            lines.append(f"![{model} training history]({plots.name}/{model}-history.png)")
    header = ["model", "epochs", "batch", "test accuracy", "train s", "s per epoch", "device"]
    intro = f"From `{artifacts}/MODEL/{METRICS_FILE}`, written by `digits train MODEL`, on the MNIST test set."
    return Section("Training", [intro, "", *markdown_table(header, rows), "", *lines], headline)


def export_section(artifacts: Path, models: list[str]) -> Section:
    """parity.json (every exported file against eager) and each derived file's report, per model."""
    lines = [
        f"From `{artifacts}/MODEL/{PARITY_JSON}` and the derived files' reports (`parity-int8.json`), written by "
        "`digits export`/`digits verify`. Worst: the largest difference over every check of the file; share: "
        "the largest share of the tolerance any element used.",
        "",
    ]
    rows, headline = [], {}
    for model in models:
        path = artifacts / model / PARITY_JSON
        if not path.is_file():
            continue
        parity = json.loads(path.read_text())
        for backend, checks in _by_backend(parity["checks"]).items():
            rows.append(_parity_row(model, backend, checks, parity))
        share = max(_share(c) for c in parity["checks"])
        verdict = "pass" if parity["passed"] else "FAIL"
        headline[model] = {"parity, every file (worst share of tolerance)": f"{verdict} ({share:.0%})"}
        for fmt in FORMATS.values():
            derived = artifacts / model / fmt.parity_json
            if fmt.proof == "predictions" and derived.is_file():
                report = json.loads(derived.read_text())
                rows.append(_prediction_row(model, report))
                headline[model][f"{fmt.name}: argmax agreement"] = f"{report['argmax_agreement']:.2%}"
    header = [
        "model",
        "file (runtime)",
        "checks",
        "worst max abs diff",
        "worst share of tolerance",
        "accuracy",
        "result",
    ]
    cpus = {json.dumps(json.loads((artifacts / m / PARITY_JSON).read_text()).get("cpu")) for m in headline}
    lines += markdown_table(header, rows)
    lines += ["", *(f"Checked on: {_cpu_line(json.loads(cpu))}" for cpu in sorted(cpus))]
    return Section("Export and parity", lines, headline)


def _by_backend(checks: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for check in checks:
        name = check["backend"] + (f" ({check['ort_optimization']})" if check.get("ort_optimization") else "")
        grouped.setdefault(name, []).append(check)
    return grouped


def _share(check: dict) -> float:
    return float(check["tolerance_used"] or 0.0)


def _parity_row(model: str, backend: str, checks: list[dict], parity: dict) -> list[str]:
    whole = max(checks, key=lambda c: c["samples"])  # the whole-set pass
    tolerance = f"atol {parity['atol']:g}, rtol {parity['rtol']:g}"
    return [
        f"`{model}`",
        backend,
        f"{len(checks)} batch sizes, {whole['samples']:,} digits",
        f"{max(c['max_abs_diff'] for c in checks):.3g}",
        f"{max(map(_share, checks)):.0%} of {tolerance}",
        f"{whole['accuracy']:.2%}",
        "pass" if all(c["passed"] for c in checks) else "FAIL",
    ]


def _prediction_row(model: str, report: dict) -> list[str]:
    return [
        f"`{model}`",
        report["backend"],
        f"predictions, {report['samples']:,} digits",
        "-",
        f"argmax agreement {report['argmax_agreement']:.2%} (at least {report['min_agreement']:.1%})",
        f"{report['accuracy']:.2%} (eager {report['reference_accuracy']:.2%})",
        "pass" if report["passed"] else "FAIL",
    ]


def _cpu_line(cpu: dict | None) -> str:
    if not cpu:
        return "CPU not recorded"
    return f"{cpu.get('model')} ({', '.join(cpu.get('flags') or [])}), torch kernels {cpu.get('torch_capability')}"


# --- the bench kinds ---------------------------------------------------------------------------------


def run_lines(run: Run, data: dict[str, Any], markdown: str) -> list[str]:
    """A run's own markdown under the report's heading: its title dropped, its command and date added."""
    body = markdown.split("\n", 1)[1].strip("\n").splitlines() if markdown.startswith("# ") else markdown.splitlines()
    machine = data.get("machine", {})
    command = machine.get("command") or "not recorded"
    return [f"Command: `{command}`; started {machine.get('date', 'at a time not recorded')}.", "", *body]


@renderer("offline")
def render_offline(run: Run, data: dict[str, Any], plots: Path) -> Section:
    from .offline import OfflineReport
    from .report import offline_markdown, plot_offline

    report = OfflineReport.from_dict(data)
    plot_offline(report, plots / f"{run.name}.png")
    lines = [*run_lines(run, data, offline_markdown(report)), "", f"![{run.name}]({plots.name}/{run.name}.png)"]
    return Section(f"Offline: {report.model} (`{run.name}`)", lines)


@renderer("http")
def render_http(run: Run, data: dict[str, Any], plots: Path) -> Section:
    from .http import HttpReport
    from .report import http_markdown, plot_http

    report = HttpReport.from_dict(data)
    plot_http(report, plots / f"{run.name}.png")
    lines = [*run_lines(run, data, http_markdown(report)), "", f"![{run.name}]({plots.name}/{run.name}.png)"]
    plan = report.plan
    top = max(report.rows, key=lambda row: row.concurrency)
    if plan.oip_digits:  # one column per body kind, so that runs of one model do not overwrite each other
        column = f"OIP, {plan.oip_digits} digits a request, {plan.oip_encoding}: digits/s"
        cells = {column: f"{plan.fmt}: {top.digits_per_s:,.0f} (c{top.concurrency})"}
    else:
        column = "/predictions, one PNG a request: req/s (model / no-op)"
        cells = {column: f"{plan.fmt}: {top.model.requests_per_s:,.0f} at c{top.concurrency} ({top.ratio:.2f})"}
    return Section(f"Over HTTP: {plan.model} ({plan.fmt}, `{run.name}`)", lines, {plan.model: cells})


@renderer("explain")
def render_explain(run: Run, data: dict[str, Any], plots: Path) -> Section:
    from .explain import STOCK, TARGET_K, ExplainReport
    from .report import explain_markdown, plot_explain

    report = ExplainReport.from_dict(data)
    plot_explain(report, plots / f"{run.name}.png")
    lines = [*run_lines(run, data, explain_markdown(report)), "", f"![{run.name}]({plots.name}/{run.name}.png)"]
    defaults = [row for row in report.deletions if row.default and row.source != STOCK]
    lowest = min(defaults, key=lambda row: row.win_share[TARGET_K], default=None)
    cells = {}
    if lowest is not None:
        column = f"explanations: deletion test wins at k={TARGET_K} (lowest default)"
        cells[column] = f"{lowest.win_share[TARGET_K]:.1%} ({lowest.source}, {lowest.method})"
    return Section(f"Explanations, faithfulness: {report.model} (`{run.name}`)", lines, {report.model: cells})


@renderer("explain-http")
def render_explain_http(run: Run, data: dict[str, Any], plots: Path) -> Section:
    from .explain_http import CostReport
    from .report import explain_http_markdown, plot_explain_http

    report = CostReport.from_dict(data)
    plot_explain_http(report, plots / f"{run.name}.png")
    lines = [*run_lines(run, data, explain_http_markdown(report)), "", f"![{run.name}]({plots.name}/{run.name}.png)"]
    cells = {
        f"explain one digit, p50 ({row.format}, {row.method})": f"{row.single.latency.p50_ms:.1f} ms"
        for row in report.rows
        if row.default and row.format == "onnx"
    }
    title = f"Explanations, cost over HTTP: {report.plan.model} (`{run.name}`)"
    return Section(title, lines, {report.plan.model: cells})


@renderer("switch")
def render_switch(run: Run, data: dict[str, Any], plots: Path) -> Section:
    from .switch import plot_switch, switch_markdown

    plot_switch(data, plots / f"{run.name}.png")
    lines = [*run_lines(run, data, switch_markdown(data)), "", f"![{run.name}]({plots.name}/{run.name}.png)"]
    return Section(f"Replacing a served model under load: {data['plan']['model']} (`{run.name}`)", lines)
