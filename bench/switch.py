"""Load across a rollout and a rollback: every request answered, by a version live at that moment.

`MixedLoad` keeps `png` connections sending PNG digits to `/predictions/MODEL` and `oip` connections sending
Open Inference Protocol requests of N digits to `/v2/models/MODEL/infer`, each connection one request at a
time on a keep-alive connection, until stopped. Every answer is kept: when it was sent and answered (wall
clock, as the ledger's), its status, the version that answered (the handler's `Model-Version` header; OIP's
`model_version` too) and whether its labels are the expected ones.

The rule that judges the versions (`version_problems`), deterministic given the ledger's times:
- a switch from `old` to `new` happens at one moment between the ledger's `gated` line of `new` (written
  before set-default is called) and its `live` line (written after set-default answered);
- so `old` is live until the `live` line and `new` from the `gated` line on: an answer is valid when the
  version that gave it was live at some moment between its sending and its answer;
- and per connection, whose requests are strictly one after another, the versions follow the schedule
  (old, new, old again for a rollback) without going back: one switch per rollout, no flapping.

`digits bench switch` runs the load across a rollout and a rollback on a TorchServe of its own and writes
bench-switch.json: the counts, the rule's verdict, and p50/p99 latency per protocol in each phase (steady
before, during the rollout command, during the rollback command, steady after).
"""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests

from ..contract import VERSION_HEADER
from ..serving.ledger import GATED, LIVE, Event
from ..serving.samples import png_bytes
from .http import oip_json_bytes

OIP_DIGITS = 64
PNG_CONNECTIONS, OIP_CONNECTIONS = 16, 2
TIMEOUT_S = 60


@dataclass(frozen=True)
class Answer:
    connection: int
    protocol: str  # "png" or "oip"
    sent: float  # time.time()
    done: float
    status: int  # 0: no HTTP answer at all
    version: str | None  # the Model-Version header
    body_version: str | None  # OIP's model_version
    right: bool  # 2xx with the expected labels

    @property
    def ms(self) -> float:
        return (self.done - self.sent) * 1000


@dataclass(frozen=True)
class Switch:
    """One change of the default version, bounded by the ledger's lines (see the module docstring)."""

    old: str
    new: str
    began: float  # the `gated` line of `new`: nothing reached `new` through the default before
    ended: float  # the `live` line of `new`: everything that arrived after reached `new`


@dataclass
class MixedLoad:
    """PNG and OIP connections against one model until `stop()`; see the module docstring."""

    url: str  # inference base URL
    model: str
    token: str
    digits: np.ndarray  # (D, 28, 28) uint8, cycled through by the PNG connections
    expected: np.ndarray  # (D,) the label the served model gives each
    png: int = PNG_CONNECTIONS
    oip: int = OIP_CONNECTIONS
    oip_digits: int = OIP_DIGITS
    limit: int | None = None  # requests in all, after which the connections stop by themselves
    answers: list[Answer] = field(default_factory=list)  # appended as they come (list.append is atomic)

    def __post_init__(self) -> None:
        self._stop, self._threads, self._counter = threading.Event(), [], itertools.count()
        self._payloads = [png_bytes(d) for d in self.digits]
        self._oip = oip_json_bytes(self.digits[: self.oip_digits])

    def start(self) -> MixedLoad:
        for connection in range(self.png + self.oip):
            thread = threading.Thread(target=self._connection, args=(connection,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT_S + 5)
        return sorted(self.answers, key=lambda a: a.sent)

    def wait_for(self, count: int, timeout: float) -> None:
        """Returns once `count` more requests were answered right, or raises after `timeout` seconds."""
        goal, deadline = sum(a.right for a in self.answers) + count, time.monotonic() + timeout
        while sum(a.right for a in self.answers) < goal:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the load got fewer than {count} right answers in {timeout:.0f} s")
            time.sleep(0.05)

    def _connection(self, connection: int) -> None:
        protocol = "png" if connection < self.png else "oip"
        headers = {"Authorization": f"Bearer {self.token}"}
        with requests.Session() as session:
            while not self._stop.is_set():
                number = next(self._counter)
                if self.limit is not None and number >= self.limit:
                    return
                self.answers.append(self._send(session, connection, protocol, number % len(self._payloads), headers))

    def finished(self) -> bool:
        """Whether every connection has stopped (at `limit`, or after `stop()`)."""
        return not any(thread.is_alive() for thread in self._threads)

    def _send(self, session: requests.Session, connection: int, protocol: str, index: int, headers: dict) -> Answer:
        if protocol == "png":
            url, body, content = f"{self.url}/predictions/{self.model}", self._payloads[index], "image/png"
        else:
            url, body, content = f"{self.url}/v2/models/{self.model}/infer", self._oip, "application/json"
        sent = time.time()
        try:
            response = session.post(url, data=body, headers={**headers, "Content-Type": content}, timeout=TIMEOUT_S)
        except requests.RequestException:
            return Answer(connection, protocol, sent, time.time(), 0, None, None, False)
        done = time.time()
        version, body_version, right = response.headers.get(VERSION_HEADER), None, False
        if response.status_code == 200:
            payload = response.json()
            if protocol == "png":
                right = payload["label"] == int(self.expected[index])
            else:
                body_version = payload.get("model_version")
                labels = next(o["data"] for o in payload["outputs"] if o["name"] == "label")
                right = labels == self.expected[: self.oip_digits].tolist()
        return Answer(connection, protocol, sent, done, response.status_code, version, body_version, right)


def switches_from_ledger(events: Sequence[Event]) -> list[Switch]:
    """The switches of one model the ledger recorded, in order: each `live` line with the `gated` line
    before it of the same version."""
    switches, gated = [], {}
    for event in events:
        if event.step == GATED and event.get("passed"):
            gated[event.version] = event
        elif event.step == LIVE and event.version in gated and event.get("previous"):
            began = gated.pop(event.version)
            switches.append(Switch(event.get("previous"), event.version, stamp(began), stamp(event)))
    return switches


def stamp(event: Event) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event.time).timestamp()


# the ledger's times are written to the millisecond, truncated: a bound is widened by that much
LEDGER_RESOLUTION_S = 0.001


def live_intervals(initial: str, switches: Sequence[Switch]) -> list[tuple[str, float, float]]:
    """(version, from, until) for each stage of the schedule: when each may have been the default."""
    stages, start = [], float("-inf")
    versions = [initial, *(s.new for s in switches)]
    for index, version in enumerate(versions):
        until = switches[index].ended + LEDGER_RESOLUTION_S if index < len(switches) else float("inf")
        stages.append((version, start, until))
        start = switches[index].began if index < len(switches) else start
    return stages


def version_problems(answers: Sequence[Answer], initial: str, switches: Sequence[Switch]) -> list[str]:
    """What breaks the module docstring's rule; empty when every answer and every connection keeps it."""
    stages, problems = live_intervals(initial, switches), []
    by_connection: dict[int, list[Answer]] = {}
    for answer in answers:
        by_connection.setdefault(answer.connection, []).append(answer)
    for connection, own in sorted(by_connection.items()):
        stage = 0
        for answer in sorted(own, key=lambda a: a.sent):
            if not 200 <= answer.status < 300:
                continue
            if answer.protocol == "oip" and answer.body_version != answer.version:
                problems.append(
                    f"connection {connection}: OIP model_version {answer.body_version} vs header {answer.version}"
                )
            later = [k for k in range(stage, len(stages)) if fits(answer, stages[k])]
            if not later:
                problems.append(
                    f"connection {connection}: {answer.protocol} sent {answer.sent:.3f}, answered {answer.done:.3f} "
                    f"by {answer.version}, which was not live then (or came back after a later version)"
                )
                continue
            stage = later[0]
    return problems


def fits(answer: Answer, stage: tuple[str, float, float]) -> bool:
    version, start, until = stage
    return answer.version == version and answer.sent <= until and answer.done >= start


@dataclass(frozen=True)
class PhaseLatency:
    phase: str
    protocol: str
    requests: int
    p50_ms: float | None
    p99_ms: float | None


def phase_latency(answers: Sequence[Answer], phases: Sequence[tuple[str, float, float]]) -> list[PhaseLatency]:
    """p50/p99 per protocol of the requests sent within each (name, from, until) phase."""
    rows = []
    for name, start, until in phases:
        for protocol in ("png", "oip"):
            ms = [a.ms for a in answers if a.protocol == protocol and start <= a.sent < until]
            p50, p99 = np.percentile(ms, [50, 99]).tolist() if ms else (None, None)
            rows.append(PhaseLatency(name, protocol, len(ms), p50, p99))
    return rows


def summary(answers: Sequence[Answer]) -> dict:
    failed = [a for a in answers if not 200 <= a.status < 300]
    wrong = [a for a in answers if 200 <= a.status < 300 and not a.right]
    return {
        "requests": len(answers),
        "png": sum(a.protocol == "png" for a in answers),
        "oip": sum(a.protocol == "oip" for a in answers),
        "failed": len(failed),
        "no_answer": sum(a.status == 0 for a in answers),
        "wrong": len(wrong),
        "statuses": sorted({a.status for a in failed}),
    }


def to_json(latency: Sequence[PhaseLatency]) -> list[dict]:
    return [asdict(row) for row in latency]


# -- `digits bench switch` ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwitchPlan:
    model: str  # an exported model in `artifacts`
    fmt: str
    artifacts: Path
    steady_s: float  # load alone before the rollout, between rollout and rollback, and after
    png: int = PNG_CONNECTIONS
    oip: int = OIP_CONNECTIONS
    oip_digits: int = OIP_DIGITS


def run_switch(plan: SwitchPlan, run_dir: Path, log=print) -> dict:
    """Serves MODEL as version 1.0, loads it, rolls 2.0 (the same export) out and back, and reports."""
    from ..serving import server
    from ..serving.archive import archive_model
    from ..serving.config import Ports
    from ..serving.ledger import read_events
    from ..serving.rollout import Candidate, rollback, rollout
    from .http import HOST, free_ports
    from .timing import machine

    report = {"kind": "switch", "plan": {**asdict(plan), "artifacts": str(plan.artifacts)}, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="digits-bench-switch-") as tmp:
        store, candidates = Path(tmp) / "store", Path(tmp) / "candidates"
        archive_model(plan.model, plan.fmt, plan.artifacts, store, log=lambda _: None)
        candidate = archive_model(plan.model, plan.fmt, plan.artifacts, candidates, log=lambda _: None, version="2.0")
        run_dir.mkdir(parents=True, exist_ok=True)
        state, _ = server.launch(store, run_dir, Ports(*free_ports(5)), HOST, foreground=False)
        try:
            server.wait_until_ready(state, run_dir)
            load = start_load(plan, state.inference_url, server.read_token(run_dir))
            marks = out_and_back(
                plan,
                lambda: rollout(run_dir, plan.model, Candidate(archive=candidate), log=log),
                lambda: rollback(run_dir, plan.model, log=log),
            )
            answers = load.stop()
            switches = switches_from_ledger(read_events(run_dir, store.resolve(), plan.model))
        finally:
            server.stop(run_dir)
    phases = [
        ("steady before", marks["load"], marks["rollout"]),
        ("rollout command", marks["rollout"], marks["between"]),
        ("steady between", marks["between"], marks["rollback"]),
        ("rollback command", marks["rollback"], marks["after"]),
        ("steady after", marks["after"], marks["end"]),
    ]
    report.update(
        summary=summary(answers),
        version_problems=version_problems(answers, "1.0", switches),
        switches=[asdict(s) for s in switches],
        phases=[{"phase": name, "from": start, "until": until} for name, start, until in phases],
        latency=to_json(phase_latency(answers, phases)),
        timeline=timeline(answers, marks["load"]),
    )
    return report


def out_and_back(plan: SwitchPlan, roll_out: Callable[[], object], roll_back: Callable[[], object]) -> dict:
    """Under the load already running: steady, the rollout, steady, the rollback, steady; the time each began."""
    marks = {"load": time.time()}
    time.sleep(plan.steady_s)
    marks["rollout"] = time.time()
    roll_out()
    marks["between"] = time.time()
    time.sleep(plan.steady_s)
    marks["rollback"] = time.time()
    roll_back()
    marks["after"] = time.time()
    time.sleep(plan.steady_s)
    marks["end"] = time.time()
    return marks


TIMELINE_POINTS = 5_000  # the plot's points: every k-th answer of a longer run, and every outlier
OUTLIER_MS = 1000


def timeline(answers: Sequence[Answer], start: float) -> list[list]:
    """[seconds since the load began, latency ms, protocol, version] of every k-th answer and of every answer
    that failed or took over a second (a stall must show however thin the sample), for the plot."""
    step = max(1, -(-len(answers) // TIMELINE_POINTS))
    kept = [a for i, a in enumerate(answers) if i % step == 0 or a.ms > OUTLIER_MS or not 200 <= a.status < 300]
    return [[round(a.sent - start, 3), round(a.ms, 1), a.protocol, a.version] for a in kept]


def plot_switch(report: dict, path: Path) -> None:
    """Latency of each request over time, PNG and OIP, with the rollout and rollback commands shaded and
    each switch of the default version marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = report["phases"][0]["from"]
    figure, axes = plt.subplots(figsize=(10, 4))
    for protocol, colour in (("png", "tab:blue"), ("oip", "tab:orange")):
        points = [(t, ms) for t, ms, proto, _ in report["timeline"] if proto == protocol]
        if points:
            axes.scatter(*zip(*points, strict=True), s=2, color=colour, label=f"{protocol} request", alpha=0.5)
    for phase in report["phases"]:
        if "command" in phase["phase"]:
            axes.axvspan(phase["from"] - start, phase["until"] - start, color="grey", alpha=0.15)
    for switch in report["switches"]:
        axes.axvline(switch["ended"] - start, color="black", linewidth=0.8)
        axes.annotate(f"{switch['old']} -> {switch['new']}", (switch["ended"] - start, 0), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("seconds since the load began (shaded: the rollout and rollback commands)")
    axes.set_ylabel("latency, ms")
    axes.legend(loc="upper right", markerscale=4)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def start_load(plan: SwitchPlan, url: str, token: str) -> MixedLoad:
    """The load over the golden set's first 256 digits, its expected labels what the live version answers."""
    from ..serving.golden import GOLDEN_FILE

    with np.load(GOLDEN_FILE) as stored:
        digits = stored["images"][:256]
    expected = np.array([served_label(url, plan.model, token, png_bytes(d)) for d in digits])
    load = MixedLoad(url, plan.model, token, digits, expected, plan.png, plan.oip, plan.oip_digits).start()
    load.wait_for(plan.png + plan.oip, TIMEOUT_S)
    return load


def served_label(url: str, model: str, token: str, png: bytes) -> int:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    response = requests.post(f"{url}/predictions/{model}", data=png, headers=headers, timeout=TIMEOUT_S)
    response.raise_for_status()
    return int(response.json()["label"])


def switch_markdown(report: dict) -> str:
    """The latency table of a bench-switch.json, for people and docs/performance.md."""
    from .report import machine_line, table

    counts, problems = report["summary"], report["version_problems"]
    rows = [
        [row["phase"], row["protocol"], str(row["requests"]), _ms(row["p50_ms"]), _ms(row["p99_ms"])]
        for row in report["latency"]
    ]
    plan = report["plan"]
    lines = [
        f"Load: {plan['png']} connections sending PNG digits to /predictions/{plan['model']} and {plan['oip']} "
        f"sending OIP requests of {plan['oip_digits']} digits, one request at a time each, across `digits rollout` "
        f"(1.0 -> 2.0, the same {plan['fmt']} export) and `digits rollback` ({plan['steady_s']:.0f} s of load "
        "alone before, between and after).",
        "",
        *table(["phase", "protocol", "requests", "p50 ms", "p99 ms"], rows),
        "",
        f"{counts['requests']} requests ({counts['png']} PNG, {counts['oip']} OIP): {counts['failed']} failed, "
        f"{counts['wrong']} wrong labels; versions: "
        + (
            "every answer from a version live at that moment, one switch per connection and command."
            if not problems
            else f"{len(problems)} answers broke the rule (see version_problems)."
        ),
        "",
        machine_line(report["machine"]),
        "",
    ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_switch(report: dict, out: Path) -> list[Path]:
    """bench-switch.json, .md and .png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench-switch.json", out / "bench-switch.md", out / "bench-switch.png"]
    paths[0].write_text(json.dumps(report) + "\n")
    paths[1].write_text(switch_markdown(report))
    plot_switch(report, paths[2])
    return paths
