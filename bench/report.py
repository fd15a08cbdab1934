"""Each benchmark run as three files: JSON (every figure), a markdown table (for people and the README),
and a PNG plot. Written to the run's output folder under fixed names: `bench-offline.*`, `bench-http.*`,
`bench-explain.*` and `bench-explain-http.*`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, also on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from .explain import STOCK, TARGET_K, TARGET_WIN_SHARE, ExplainReport  # noqa: E402
from .explain_http import CostReport, CostRow  # noqa: E402
from .http import STAGES, HttpReport  # noqa: E402
from .offline import OfflineReport  # noqa: E402


def write_offline(report: OfflineReport, out: Path) -> list[Path]:
    """bench-offline.json, .md and .png in `out`; returns their paths."""
    return _write(
        out, "bench-offline", report.to_dict(), offline_markdown(report), lambda path: plot_offline(report, path)
    )


def write_http(report: HttpReport, out: Path) -> list[Path]:
    """bench-http.json, .md and .png in `out`; returns their paths."""
    return _write(out, "bench-http", report.to_dict(), http_markdown(report), lambda path: plot_http(report, path))


def _write(out: Path, stem: str, data: dict, markdown: str, plot) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown)
    plot(paths[2])
    return paths


def save(figure, path: Path, title: str) -> None:
    """Titles a finished figure, writes it as PNG and frees it."""
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def machine_line(machine: dict, threads: str = "") -> str:
    """The machine, its versions and load; `threads`, when given, says who ran on how many threads."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    threads = f", {threads}" if threads else ""
    return (
        f"Machine: {machine['cpu']} ({machine['architecture']}, {machine['logical_cpus']} logical CPUs{threads}), "
        f"load average {machine['load_average_1min']} at the start; {versions}."
    )


# --- offline -----------------------------------------------------------------------------------------


def offline_markdown(report: OfflineReport) -> str:
    rows = [
        [
            r.backend,
            str(r.batch_size),
            f"{r.samples_per_s:,.0f}",
            f"{r.latency.p50_ms:.3f}",
            f"{r.latency.p99_ms:.3f}",
            f"{r.gflops:.1f}",
            f"{r.peak_share:.0%}",
            f"{r.paired_peak_share:.0%}",
        ]
        for n in report.batch_sizes
        for r in report.results
        if r.batch_size == n
    ]
    header = [
        "backend",
        "batch",
        "samples/s",
        "p50 ms/batch",
        "p99 ms/batch",
        "GFLOP/s",
        "of the best fp32 peak",
        "of the peak beside it (median of rounds)",
    ]
    low, high = min(report.peak_measurements), max(report.peak_measurements)
    lines = [
        f"# Offline benchmark: {report.model}",
        "",
        f"{report.flops_per_sample / 1e6:.2f} MFLOP per sample (PyTorch's FLOP counter). Measured fp32 peak: "
        f"{report.peak_gflops:.0f} GFLOP/s (float32 matmul, best of {len(report.peak_measurements)} measurements "
        f"spread over the run, which ranged {low:.0f}-{high:.0f}). At least "
        f"{report.min_seconds:g} s per backend and batch size, after warm-up, in {report.rounds} turns taken in "
        "rotation by the backends.",
        "",
        machine_line(report.machine, f"every backend on {report.machine['torch_threads']} intra-op thread(s)"),
        "",
        *table(header, rows),
        "",
        *table(["ratio (samples/s)", "value"], [[name, f"{value:.2f}"] for name, value in report.ratios().items()]),
    ]
    if "onnxruntime-int8" in report.backends:
        # the share is of the fp32 peak: int8 multiply-adds (VNNI) are several times cheaper, so it can pass 100%
        lines += ["", "int8 rows count the model's FLOPs as if fp32: their share of the fp32 peak can exceed 100%."]
    lines += [
        "",
        "The last column sets each round's throughput against the fp32 peak measured right after that round "
        "(median over the rounds): this machine's speed drifts within a run, and the best peak alone sets one "
        "fast moment against an average over slow and fast ones.",
    ]
    return "\n".join(lines) + "\n"


def plot_offline(report: OfflineReport, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for backend in report.backends:
        points = [(r.batch_size, r.samples_per_s) for r in report.results if r.backend == backend]
        axes.plot(*zip(*points, strict=True), marker="o", label=backend)
    ceiling = report.peak_gflops * 1e9 / report.flops_per_sample
    axes.axhline(ceiling, color="grey", linestyle="--", label=f"fp32 peak ({report.peak_gflops:.0f} GFLOP/s)")
    axes.set(xscale="log", yscale="log", xlabel="batch size", ylabel="samples per second")
    axes.set_xticks(report.batch_sizes, [str(n) for n in report.batch_sizes])
    axes.set_title(f"{report.model}: throughput by batch size ({report.machine['cpu']})", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- http --------------------------------------------------------------------------------------------


def http_markdown(report: HttpReport) -> str:
    plan, body = report.plan, report.body
    look = f"{body['width']}x{body['height']} {body['mode']} {body['format']}" if "width" in body else body["file"]
    settings = plan.settings
    lines = [
        f"# HTTP benchmark: {plan.model} ({plan.fmt}) against the no-op handler",
        "",
        f"Body: {look}, {body['bytes']} bytes. {plan.requests} requests per target and concurrency, in "
        f"{plan.rounds} alternating rounds, after {plan.warmup} warm-up requests; load generator "
        f"`{plan.generator}`, keep-alive. Both archives: batch size "
        f"{settings.batch_size}, max batch delay {settings.max_batch_delay} ms, {settings.workers} worker(s) of "
        f"{settings.threads} intra-op thread(s).",
        "",
        machine_line(report.machine),
        "",
        *table(
            [
                "concurrency",
                "model req/s",
                "no-op req/s",
                "model / no-op",
                "rounds: lowest-highest",
                "model p50 / p90 / p99 ms",
                "no-op p50 / p90 / p99 ms",
                "errors (model, no-op)",
            ],
            [_http_row(row) for row in report.rows],
        ),
        *oip_lines(report),
        "",
        "Handler time per batch, from its TorchServe metrics (mean ms; p99 in brackets); the whole batch is "
        "TorchServe's own PredictionTime:",
        "",
        *table(
            ["concurrency", "batches", "mean batch", *(s.removesuffix("Time").lower() for s in STAGES[:-1]), "whole"],
            [_split_row(row.concurrency, row.handler) for row in report.rows],
        ),
    ]
    return "\n".join(lines) + "\n"


OIP_ENCODING_NAMES = {
    "binary": "a UINT8 tensor in the binary extension, outputs binary",
    "json": "a UINT8 tensor as a JSON data list, outputs in JSON",
}


def oip_lines(report: HttpReport) -> list[str]:
    """OIP runs: digits per second at each concurrency, against the served file's offline rate."""
    if not report.plan.oip_digits:
        return []
    rates = "; ".join(f"concurrency {row.concurrency}: {row.digits_per_s:,.0f}" for row in report.rows)
    encoding = OIP_ENCODING_NAMES[report.plan.oip_encoding]
    lines = ["", f"Digits per second ({report.plan.oip_digits} a request, {encoding}): {rates}."]
    if report.offline:
        offline = report.offline
        shares = "; ".join(f"concurrency {row.concurrency}: {report.offline_share(row):.0%}" for row in report.rows)
        lines[-1] += (
            f" Offline, with TorchServe stopped, the same file ({offline['backend']}) at batch "
            f"{offline['batch_size']} on {offline['threads']} thread(s), as many as the model's "
            f"{report.plan.settings.workers} worker(s) have: "
            f"{offline['samples_per_s']:,.0f} samples/s. Served over OIP: {shares} of it."
        )
    return lines


def _http_row(row) -> list[str]:
    def percentiles(result) -> str:
        return f"{result.latency.p50_ms:.1f} / {result.latency.p90_ms:.1f} / {result.latency.p99_ms:.1f}"

    return [
        str(row.concurrency),
        f"{row.model.requests_per_s:,.0f}",
        f"{row.noop.requests_per_s:,.0f}",
        f"{row.ratio:.2f}",
        f"{min(row.round_ratios):.2f}-{max(row.round_ratios):.2f}",
        percentiles(row.model),
        percentiles(row.noop),
        f"{row.model.errors}, {row.noop.errors}",
    ]


def _split_row(concurrency: int, split: dict) -> list[str]:
    stages = [f"{split[s]['mean_ms']:.2f} ({split[s]['p99_ms']:.2f})" if split.get(s) else "-" for s in STAGES]
    size = split.get("mean_batch_size")
    return [str(concurrency), str(split.get("batches", 0)), f"{size:.1f}" if size else "-", *stages]


def plot_http(report: HttpReport, path: Path) -> None:
    figure, (rate, tail) = plt.subplots(1, 2, figsize=(10, 4.2))
    levels = [row.concurrency for row in report.rows]
    for name, label in (("noop", "no-op handler"), ("model", f"{report.plan.model} ({report.plan.fmt})")):
        rate.plot(levels, [getattr(r, name).requests_per_s for r in report.rows], marker="o", label=label)
        tail.plot(levels, [getattr(r, name).latency.p99_ms for r in report.rows], marker="o", label=label)
    rate.set(xscale="log", xlabel="concurrency", ylabel="requests per second", title="throughput")
    tail.set(xscale="log", xlabel="concurrency", ylabel="p99 latency (ms)", title="p99 latency")
    for axes in (rate, tail):
        axes.set_xticks(levels, [str(n) for n in levels])
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    save(figure, path, f"{report.plan.model} over HTTP against the no-op ceiling ({report.machine['cpu']})")


# --- explain -----------------------------------------------------------------------------------------


def write_explain(report: ExplainReport, out: Path) -> list[Path]:
    """bench-explain.json, .md and .png in `out`; returns their paths."""
    return _write(
        out, "bench-explain", report.to_dict(), explain_markdown(report), lambda path: plot_explain(report, path)
    )


def explain_markdown(report: ExplainReport) -> str:
    settings = "; ".join(
        f"{name}: {', '.join(f'{key} {value}' for key, value in chosen.items())}"
        for name, chosen in report.settings.items()
    )
    lines = [
        f"# Explanations of {report.model}: faithfulness and agreement across formats",
        "",
        f"Deletion test on the first {report.digits:,} MNIST test digits: for each digit, format and method, the "
        f"k% most attributed pixels are set to the background, and separately as many of the digit's ink pixels "
        f"chosen at random (seed {report.seed}, the same pixels for every format and method); each row gives the "
        "share of digits whose attributed deletion dropped the explained class's probability more than the random "
        f"one ('wins'), and the mean drops. k counts the digit's ink pixels. The target: wins >= "
        f"{TARGET_WIN_SHARE:.0%} at k={TARGET_K} for each format's default method. AOPC: the mean drop over "
        f"k = {', '.join(map(str, report.curve_ks))}. Attributions come from the handler's engine on each "
        "format's predictor, loaded as a worker loads it; the explained class is the predicted one, except "
        "where the stock example explains class 0.",
        "",
        f"Methods' settings: {settings}. The stock example's method: Captum IntegratedGradients on the eager model's "
        "log-probabilities, target 0 for every digit, 15 steps, baseline 0 in normalised space (TorchServe 0.12.0 "
        "`vision_handler.get_insights`).",
        "",
        machine_line(report.machine, f"{report.machine['torch_threads']} intra-op thread(s)"),
        "",
        *_deletion_table(report),
        "",
        target_line(report),
        "",
        "Accuracy on these digits: " + ", ".join(f"{fmt} {share:.1%}" for fmt, share in report.accuracy.items()) + ".",
        *_agreement_lines(report),
    ]
    return "\n".join(lines) + "\n"


def _deletion_table(report: ExplainReport) -> list[str]:
    ks = list(report.ks)
    header = [
        "format",
        "method",
        "explained class",
        *(f"wins at k={k}" for k in ks),
        f"mean drop at k={TARGET_K}: attributed / random",
        "AOPC: attributed / random",
        "seconds",
    ]
    rows = [
        [
            row.source,
            f"**{row.method}** (default)" if row.default and row.source != STOCK else row.method,
            row.explained,
            *(f"{row.win_share[k]:.1%}" for k in ks),
            f"{row.mean_drop[TARGET_K]:.3f} / {row.mean_random_drop[TARGET_K]:.3f}",
            f"{row.aopc:.3f} / {row.random_aopc:.3f}",
            f"{row.seconds:.1f}",
        ]
        for row in report.deletions
    ]
    return table(header, rows)


def _agreement_lines(report: ExplainReport) -> list[str]:
    if not report.agreements:
        return []
    return [
        "",
        "Agreement across formats: Spearman's rank correlation of two formats' maps of the same digit, over the "
        "pixels either map scores, per digit:",
        "",
        *table(
            ["method", "formats", "median", "10th percentile", "mean", "digits"],
            [_agreement_row(agreement) for agreement in report.agreements],
        ),
    ]


def _agreement_row(a) -> list[str]:
    return [a.method, f"{a.first} vs {a.second}", f"{a.median:.4f}", f"{a.p10:.4f}", f"{a.mean:.4f}", str(a.digits)]


def target_line(report: ExplainReport) -> str:
    """Whether each format's default method wins often enough at k = TARGET_K."""
    defaults = [row for row in report.deletions if row.default and row.source != STOCK]
    missed = [f"{row.source} ({row.method}: {row.win_share[TARGET_K]:.1%})" for row in defaults if not row.meets_target]
    if not defaults:
        return "No format's default method ran in this run."
    if missed:
        return f"Target missed at k={TARGET_K} by: {', '.join(missed)}."
    return (
        f"Target met: every default method's deletion wins on at least {TARGET_WIN_SHARE:.0%} of digits at "
        f"k={TARGET_K}."
    )


def plot_explain(report: ExplainReport, path: Path) -> None:
    """The mean drop over k (an AOPC-style curve) per method, one panel per format and one for the stock example."""
    sources = list(dict.fromkeys(row.source for row in report.deletions))
    colors = {method: f"C{index}" for index, method in enumerate(report.settings)}
    figure, panels = plt.subplots(1, len(sources), figsize=(3.2 * len(sources), 3.4), sharey=True, squeeze=False)
    for axes, source in zip(panels[0], sources, strict=True):
        rows = [row for row in report.deletions if row.source == source]
        for index, row in enumerate(rows):
            label = row.method.split(",")[0] + (f" ({row.explained})" if source == STOCK else "")
            drops = [row.mean_drop[k] for k in report.curve_ks]
            color = colors.get(row.method, f"C{len(colors) + index}")  # a method has one colour in every panel
            axes.plot(report.curve_ks, drops, marker="o", markersize=3, label=label, color=color)
        # the random deletion is the same for every method of a source: one line per explained class
        randoms = {row.explained: row for row in rows}
        for (explained, row), style in zip(randoms.items(), ("k--", "k:"), strict=False):
            label = "random ink" + (f" ({explained})" if len(randoms) > 1 else "")
            axes.plot(report.curve_ks, [row.mean_random_drop[k] for k in report.curve_ks], style, label=label)
        axes.set(title=source, xlabel="% of the ink deleted")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    panels[0][0].set_ylabel("mean drop of the explained class's probability")
    save(figure, path, f"{report.model}: deletion curves ({report.digits:,} MNIST test digits)")


# --- explain-http ------------------------------------------------------------------------------------


def write_explain_http(report: CostReport, out: Path) -> list[Path]:
    """bench-explain-http.json, .md and .png in `out`; returns their paths."""
    return _write(
        out,
        "bench-explain-http",
        report.to_dict(),
        explain_http_markdown(report),
        lambda path: plot_explain_http(report, path),
    )


def explain_http_markdown(report: CostReport) -> str:
    plan, settings = report.plan, report.plan.settings
    header = [
        "format",
        "method",
        "one digit: p50 / p90 / p99 ms",
        "p50 x prediction",
        "handler ms a digit: inference / explanation (mean)",
        f"{plan.oip_digits} a request over OIP: digits/s",
        "digits/s x prediction",
    ]
    lines = [
        f"# Explanation cost over HTTP: {plan.model}",
        "",
        f"One client alone, one request at a time on a keep-alive connection. One digit a request: "
        f"{plan.requests} requests cycling through the first {plan.digits} MNIST test digits as 28x28 PNGs, to "
        '`/predictions/NAME` (the prediction rows) or `/explanations/NAME` with `{"data": BASE64_PNG, '
        f'"method": METHOD}}`. Over OIP: {plan.oip_requests} requests of {plan.oip_digits} digits (a binary UINT8 '
        "tensor) to `/v2/models/NAME/infer`, asking for `attributions` (with the request parameter `method`) "
        f"beside the probabilities and labels. Every archive: batch size {settings.batch_size}, max batch delay "
        f"{settings.max_batch_delay} ms, {settings.workers} worker(s) of {settings.threads} intra-op thread(s). "
        "The handler's times come from its metrics (InferenceTime, ExplainTime; mean ms per batch, one digit a "
        "batch here).",
        "",
        machine_line(report.machine),
        "",
        *table(header, [_cost_row(report, row) for row in report.rows]),
        "",
        cost_target_line(report),
    ]
    return "\n".join(lines) + "\n"


COST_TARGET_MS = 30  # issue 22: the default method explains one cnn digit under this p50, on one thread


def cost_target_line(report: CostReport) -> str:
    defaults = [row for row in report.rows if row.default]
    timed = ", ".join(f"{row.format} ({row.method}) {row.single.latency.p50_ms:.1f} ms" for row in defaults)
    missed = [row.format for row in defaults if row.single.latency.p50_ms >= COST_TARGET_MS]
    verdict = f"over {COST_TARGET_MS} ms: {', '.join(missed)}" if missed else f"all under {COST_TARGET_MS} ms"
    return f"Each format's default method, one digit, p50: {timed}; {verdict}."


def _cost_row(report: CostReport, row: CostRow) -> list[str]:
    latency, prediction = row.single.latency, report.prediction(row.format)
    single = row.handler.get("single", {})

    def mean(stage: str) -> str:
        return f"{single[stage]['mean_ms']:.1f}" if single.get(stage) else "-"

    method = row.method if not row.default else f"**{row.method}** (default)"
    return [
        row.format,
        method,
        f"{latency.p50_ms:.1f} / {latency.p90_ms:.1f} / {latency.p99_ms:.1f}",
        f"{latency.p50_ms / prediction.single.latency.p50_ms:.1f}" if prediction else "-",
        f"{mean('InferenceTime')} / {mean('ExplainTime')}",
        f"{row.digits_per_s:,.0f}",
        f"{row.digits_per_s / prediction.digits_per_s:.3f}" if prediction else "-",
    ]


def plot_explain_http(report: CostReport, path: Path) -> None:
    """Per format, each method's one-digit p50 and its digits per second over OIP, the prediction's beside."""
    formats = list(dict.fromkeys(row.format for row in report.rows))
    methods = list(dict.fromkeys(row.method for row in report.rows))
    figure, (latency, rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        rows = {row.format: row for row in report.rows if row.method == method}
        positions = [i + (index - (len(methods) - 1) / 2) * width for i, fmt in enumerate(formats) if fmt in rows]
        present = [fmt for fmt in formats if fmt in rows]
        latency.bar(positions, [rows[f].single.latency.p50_ms for f in present], width, label=method)
        rate.bar(positions, [rows[f].digits_per_s for f in present], width, label=method)
    latency.axhline(COST_TARGET_MS, color="grey", linestyle="--", label=f"target for the default ({COST_TARGET_MS} ms)")
    latency.set(ylabel="ms, p50", title="one digit a request, one client")
    rate.set(yscale="log", ylabel="digits per second", title=f"{report.plan.oip_digits} digits a request over OIP")
    for axes in (latency, rate):
        axes.set_xticks(range(len(formats)), formats)
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(fontsize=7)
    save(figure, path, f"{report.plan.model}: explanations against predictions ({report.machine['cpu']})")
