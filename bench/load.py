"""Load generators: N POST requests of one body at a fixed concurrency, with keep-alive connections.

`ab` (ApacheBench, Debian's apache2-utils) is the default: C, one event loop, cheap enough per request
that a no-op TorchServe is the bottleneck and not the client. `python` (threads over http.client) needs
nothing installed; on a small machine it can itself be the bottleneck, so use it for smoke runs.
"""

from __future__ import annotations

import http.client
import itertools
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import BenchError
from .timing import Latency

AB_INSTALL = "install it (Debian/Ubuntu: apt-get install apache2-utils)"
AB_TIMEOUT_S = 30  # per request, as ab's own default


@dataclass(frozen=True)
class Target:
    """Where to send and what: a predictions URL, its bearer token, one request body (and extra headers)."""

    url: str
    token: str
    body: Path
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()  # e.g. OIP's Inference-Header-Content-Length


@dataclass(frozen=True)
class LoadResult:
    requests: int  # answered, whatever the status
    errors: int  # non-2xx answers and transport failures
    seconds: float
    latency: Latency  # per request, as the client saw it
    # latencies standing for equal shares of the requests (ab: its 101 percentiles; python: every one),
    # so that runs of equal size pool into one distribution
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


def pooled(runs: list[LoadResult]) -> LoadResult:
    """Equal-sized runs of one target as one: counts and time added, latency samples pooled."""
    if len({run.requests for run in runs}) > 1:
        raise ValueError(f"runs of different sizes do not pool: {[run.requests for run in runs]}")
    samples = tuple(ms for run in runs for ms in run.samples_ms)
    return LoadResult(
        requests=sum(run.requests for run in runs),
        errors=sum(run.errors for run in runs),
        seconds=sum(run.seconds for run in runs),
        latency=Latency.of(samples),
        samples_ms=samples,
    )


def run_load(generator: str, target: Target, concurrency: int, requests: int) -> LoadResult:
    """Runs one load; `generator` is "ab" or "python"."""
    if requests < concurrency:
        raise BenchError(f"--requests {requests} must be at least the concurrency {concurrency}")
    if generator not in GENERATORS:
        raise BenchError(f"unknown load generator {generator!r}; known: {', '.join(GENERATORS)}")
    return GENERATORS[generator](target, concurrency, requests)


def find_ab() -> str:
    path = shutil.which("ab")
    if path is None:
        raise BenchError(
            f"the load generator `ab` (ApacheBench) is not installed: {AB_INSTALL}, "
            "or pass --load-generator python (slower: it may be the bottleneck itself)"
        )
    return path


# --- ab ----------------------------------------------------------------------------------------------


def run_ab(target: Target, concurrency: int, requests: int) -> LoadResult:
    """Runs ab with keep-alive; latency percentiles come from its CSV (1% steps, microsecond resolution)."""
    with tempfile.TemporaryDirectory(prefix="digits-ab-") as tmp:
        csv = Path(tmp) / "percentiles.csv"
        command = [
            find_ab(),
            *("-k", "-q", "-s", str(AB_TIMEOUT_S), "-n", str(requests), "-c", str(concurrency)),
            *("-p", str(target.body), "-T", target.content_type, "-e", str(csv)),
            *("-H", f"Authorization: Bearer {target.token}"),
            *(arg for name, value in target.headers for arg in ("-H", f"{name}: {value}")),
            target.url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"ab failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
        return parse_ab(done.stdout, csv.read_text())


def parse_ab(summary: str, percentiles_csv: str) -> LoadResult:
    """ab's summary and `-e` CSV -> LoadResult.

    ab counts a body whose length differs from the first one's as a "Length" failure; predictions differ
    in length by nature, so those are not errors here. Errors are non-2xx answers, failed connects and
    receives, and exceptions.
    """
    complete = _ab_number(summary, r"Complete requests:\s+(\d+)")
    seconds = _ab_number(summary, r"Time taken for tests:\s+([\d.]+) seconds")
    failures = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", summary)
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", summary)
    errors = (sum(map(int, failures.groups())) if failures else 0) + (int(non_2xx.group(1)) if non_2xx else 0)
    by_percent = {}
    for line in percentiles_csv.splitlines()[1:]:
        percent, ms = line.split(",")
        by_percent[int(percent)] = float(ms)
    latency = Latency(by_percent[50], by_percent[90], by_percent[99])
    return LoadResult(int(complete), errors, seconds, latency, tuple(by_percent[p] for p in sorted(by_percent)))


def _ab_number(summary: str, pattern: str) -> float:
    match = re.search(pattern, summary)
    if match is None:
        raise BenchError(f"cannot read ab's output (no match for {pattern!r}):\n{summary[-800:]}")
    return float(match.group(1))


# --- python ------------------------------------------------------------------------------------------


def run_python(target: Target, concurrency: int, requests: int) -> LoadResult:
    """One thread and one keep-alive connection per concurrent client, sharing a request counter."""
    body, url = target.body.read_bytes(), urlsplit(target.url)
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": target.content_type, **dict(target.headers)}
    tickets, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    statuses: list[int] = []

    def client() -> None:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=AB_TIMEOUT_S)
        while next(tickets) < requests:
            status, ms = _post(connection, url.path, body, headers)
            with lock:
                statuses.append(status)
                latencies.append(ms)
        connection.close()

    seconds = _run_threads(client, concurrency)
    errors = sum(not 200 <= s < 300 for s in statuses)
    return LoadResult(len(statuses), errors, seconds, Latency.of(latencies), tuple(latencies))


def run_sequence(
    url: str, token: str, bodies: list[bytes], content_type: str, requests: int, headers: dict[str, str] | None = None
) -> LoadResult:
    """`requests` POSTs one after the other on one keep-alive connection, cycling through `bodies`: the latency
    of one client alone, over bodies whose cost differs (ab sends a single body)."""
    url_parts = urlsplit(url)
    sent = {"Authorization": f"Bearer {token}", "Content-Type": content_type, **(headers or {})}
    connection = http.client.HTTPConnection(url_parts.hostname, url_parts.port, timeout=AB_TIMEOUT_S)
    path = url_parts.path + (f"?{url_parts.query}" if url_parts.query else "")
    statuses, latencies = [], []
    start = time.perf_counter()
    for body in itertools.islice(itertools.cycle(bodies), requests):
        status, ms = _post(connection, path, body, sent)
        statuses.append(status)
        latencies.append(ms)
    seconds = time.perf_counter() - start
    connection.close()
    errors = sum(not 200 <= s < 300 for s in statuses)
    return LoadResult(len(statuses), errors, seconds, Latency.of(latencies), tuple(latencies))


def _post(connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> tuple[int, float]:
    """One request on a kept-alive connection: (status, ms); status 0 for a transport failure."""
    start = time.perf_counter()
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException):
        connection.close()  # http.client reconnects on the next request
        status = 0
    return status, (time.perf_counter() - start) * 1000


def _run_threads(client: Callable[[], None], count: int) -> float:
    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


GENERATORS: dict[str, Callable[[Target, int, int], LoadResult]] = {"ab": run_ab, "python": run_python}
