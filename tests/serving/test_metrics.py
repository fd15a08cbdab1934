"""Prometheus metrics of a real TorchServe started by `digits serve`, scraped while it serves and parsed with
prometheus_client's parser: each metric present, and counts equal to the traffic sent."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests

parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client (the dev extra) is needed")

MODEL = "mlp"  # the other tests of this session send to cnn only here and there; counts are deltas anyway
HANDLER_METRICS = ("DecodeTime", "PreprocessTime", "InferenceTime", "PostprocessTime", "BatchSize", "BatchDigits")
FRONTEND_METRICS = ("ts_inference_requests_total", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds")


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of every sample on the metrics port."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name.removesuffix("_total"), frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, tags), value in samples.items() if sample == name and wanted <= tags)


def oip(datatype: str, digits: np.ndarray, **extra) -> dict:
    """An OIP request of `digits` ((N, 28, 28) uint8 MNIST digits: a blank one would be refused NoDigit)."""
    data = digits.reshape(len(digits), 784).tolist()
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": [len(digits), 784], "data": data}], **extra}


def test_metrics_parse_and_count_the_traffic(server, mnist) -> None:
    digit = {"data": np.asarray(mnist.test_images[0]).tolist()}
    digits = np.asarray(mnist.test_images[:3], dtype=np.uint8).reshape(3, 28, 28)
    sent = [  # (path, body, protocol, status, error type, digits)
        *[("predictions", digit, "predictions", 200, "OK", 1)] * 5,
        *[("predictions", {"pixels": []}, "predictions", 400, "BadJson", 0)] * 2,
        *[("v2", oip("UINT8", digits), "oip", 200, "OK", 3)] * 4,
        *[("v2", oip("INT16", digits[:1]), "oip", 400, "BadDatatype", 0)] * 2,
        ("v2", oip("UINT8", digits[:1], outputs=[{"name": "logits"}]), "oip", 400, "UnknownOutput", 0),
        ("v2", oip("UINT8", digits[:1] * 0), "oip", 400, "NoDigit", 0),
    ]
    before = scrape(server)
    for path, body, *_ in sent:
        url = f"{server.url}/predictions/{MODEL}" if path == "predictions" else f"{server.url}/v2/models/{MODEL}/infer"
        requests.post(url, json=body, headers=server.headers(), timeout=30)
    answers = Counter((protocol, str(status), kind) for _, _, protocol, status, kind, _ in sent)
    deadline = time.monotonic() + 15  # the frontend reads the worker's metric lines asynchronously
    while True:
        after = scrape(server)
        counted = total(after, "Answers", ModelName=MODEL) - total(before, "Answers", ModelName=MODEL)
        if counted >= len(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    present = {name for name, _ in after}
    for name in (*HANDLER_METRICS, "Answers", "PredictionTime"):
        assert name in present or f"{name}_count" in present, f"{name} missing from the metrics port"
    for name in FRONTEND_METRICS:
        assert name.removesuffix("_total") in present, f"{name} missing from the metrics port"
    for (protocol, status, kind), count in answers.items():
        got = delta("Answers", ModelName=MODEL, Protocol=protocol, Status=status, ErrorType=kind)
        assert got == count, (protocol, status, kind)
    assert delta("ts_inference_requests", model_name=MODEL) == len(sent)
    assert delta("BatchSize_sum", ModelName=MODEL) == len(sent)  # every request in exactly one batch
    assert delta("BatchDigits_sum", ModelName=MODEL) == sum(row[-1] for row in sent)
    batches = delta("BatchSize_count", ModelName=MODEL)
    assert 1 <= batches <= len(sent)
    for stage in HANDLER_METRICS[:4]:
        assert delta(f"{stage}_count", ModelName=MODEL) == batches and delta(f"{stage}_sum", ModelName=MODEL) > 0


DOCS = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
PROMQL_NAME = re.compile(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]")  # a series selector: name{...} or name[5m]


def documented_metric_names() -> tuple[dict[str, str], set[str]]:
    """docs/serving.md's Prometheus table (metric name -> the type its row gives) and the metric names its
    PromQL queries select."""
    text = DOCS.read_text()
    table = {
        name: line.split("|")[2].split()[0]
        for line in text.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", line.split("|")[1])
    }
    queries = {name for block in re.findall(r"```promql\n(.*?)```", text, re.S) for name in PROMQL_NAME.findall(block)}
    return table, queries


def exported_names(server) -> tuple[dict[str, str], set[str]]:
    """(family -> type from `# TYPE` lines, sample names) of a raw scrape: what a Prometheus query can select."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    families = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
    samples = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}
    return families, samples


def test_every_metric_name_in_the_docs_is_exported(server, mnist) -> None:
    """The docs' table and queries against a real scrape (round 3: they said `Answers_total`, the port exports
    `Answers`, and the queries returned nothing). Fails when the docs or the port drift."""
    requests.post(  # the handler's metrics appear with the first batch
        f"{server.url}/predictions/{MODEL}",
        json={"data": np.asarray(mnist.test_images[0]).tolist()},
        headers=server.headers(),
        timeout=30,
    )
    table, queries = documented_metric_names()
    assert {"Answers", "DecodeTime", "ts_inference_requests_total"} <= set(table) and len(queries) >= 3
    deadline = time.monotonic() + 15  # the frontend reads the worker's metric lines asynchronously
    while True:
        families, samples = exported_names(server)
        missing_table = sorted(set(table) - set(families) - samples)
        missing_queries = sorted(queries - samples)
        if not (missing_table or missing_queries) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing_table, f"docs/serving.md's table names {missing_table}; the port exports {sorted(samples)}"
    assert not missing_queries, f"docs/serving.md's PromQL selects {missing_queries}, which the port does not export"
    wrong_types = {name: (kind, families[name]) for name, kind in table.items() if families.get(name, kind) != kind}
    assert not wrong_types, f"docs/serving.md's table gives these types, the port others: {wrong_types}"
