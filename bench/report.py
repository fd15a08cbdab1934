"""Each benchmark run as three files: JSON (every figure), a markdown table (for people and the README),
and a PNG plot. Written to the run's output folder under fixed names, `bench-offline.*` and `bench-http.*`."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, also on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

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
    figure.suptitle(f"{report.plan.model} over HTTP against the no-op ceiling ({report.machine['cpu']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
