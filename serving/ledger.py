"""The run folder's ledger: every step of every rollout and rollback, one JSON object a line, append only.

It is what a restarted `digits serve` reads to serve the version that was live (not the one TorchServe's
start-up order would pick, pytorch/serve#2744), what `digits versions` shows, and what a rollout reads to
recover from one that was interrupted. A line is written and flushed to disk before the step it records
is taken further, so a killed command or server leaves the ledger at a step the next command understands.

Each line: `{"time", "model", "version", "step", "store", ...}` and what the step adds (checksums, the
gate's figures, a reason). The steps, in the order a rollout takes them:

    baseline    the version TorchServe served when digits first rolled this model out (live from then on)
    checked     the candidate's archive passed the checks before registration (file, SHA-256s, parity)
    registered  TorchServe registered it beside the live version and its workers loaded
    gated       the gate's verdict (`passed`) and figures, on the candidate's own versioned URL
    live        it is TorchServe's default version (`previous`: the one it replaced)
    retired     a version that was live was drained and unregistered (its archive stays in the store)
    withdrawn   a candidate that did not go live was unregistered (`reason`)
    failed      a rollout or rollback stopped (`reason`); the live version is what the last `live` says
    abandoned   a rollout found interrupted (its command or TorchServe killed) and cleaned up
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

LEDGER_FILE = "ledger.jsonl"
BASELINE, CHECKED, REGISTERED, GATED, LIVE = "baseline", "checked", "registered", "gated", "live"
RETIRED, WITHDRAWN, FAILED, ABANDONED = "retired", "withdrawn", "failed", "abandoned"
# an attempt whose last step is one of these has ended; any other last step means it was interrupted
ENDED = (LIVE, RETIRED, WITHDRAWN, FAILED, ABANDONED, BASELINE)


@dataclass(frozen=True)
class Event:
    time: str
    model: str
    version: str
    step: str
    store: str
    detail: dict

    def get(self, key: str, default=None):
        return self.detail.get(key, default)


def ledger_path(run_dir: Path) -> Path:
    return Path(run_dir) / LEDGER_FILE


def record(run_dir: Path, store: Path, model: str, version: str, step: str, **detail) -> Event:
    """Appends one step to the ledger and flushes it to disk before returning."""
    event = Event(
        datetime.now(timezone.utc).isoformat(timespec="milliseconds"), model, version, step, str(store), detail
    )
    line = json.dumps(
        {"time": event.time, "model": model, "version": version, "step": step, "store": str(store), **detail}
    )
    descriptor = os.open(ledger_path(run_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(descriptor, (line + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return event


def read_events(run_dir: Path, store: Path | None = None, model: str | None = None) -> list[Event]:
    """The ledger's events, oldest first, of one store (a run folder may have served others) and model.

    A line cut short (the machine lost power while it was written) is skipped: it recorded nothing done.
    """
    path = ledger_path(run_dir)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
            keys = ("time", "model", "version", "step", "store")
            event = Event(*(str(raw.pop(key)) for key in keys), detail=raw)
        except (ValueError, KeyError, AttributeError):
            continue
        if (store is None or event.store == str(store)) and (model is None or event.model == model):
            events.append(event)
    return events


def live_versions(run_dir: Path, store: Path) -> dict[str, str]:
    """model -> the version the ledger last put live (or recorded as the baseline) for `store`."""
    live = {}
    for event in read_events(run_dir, store):
        if event.step in (LIVE, BASELINE):
            live[event.model] = event.version
    return live


def live_order(events: list[Event]) -> list[str]:
    """The versions of one model in the order they went live, each once, the current one last."""
    order: list[str] = []
    for event in events:
        if event.step in (LIVE, BASELINE):
            if event.version in order:
                order.remove(event.version)
            order.append(event.version)
    return order


def last_step(events: list[Event], version: str) -> Event | None:
    steps = [event for event in events if event.version == version]
    return steps[-1] if steps else None


def interrupted(events: list[Event]) -> list[str]:
    """Versions of one model whose last step shows an attempt that never ended (see ENDED)."""
    versions = dict.fromkeys(event.version for event in events)
    return [version for version in versions if last_step(events, version).step not in ENDED]


def recorded_digest(events: list[Event], model: str, version: str) -> str | None:
    """The SHA-256 the ledger last recorded for `model` `version`'s archive, or None if it recorded none."""
    digests = [e.get("archive_sha256") for e in events if e.model == model and e.version == version]
    digests = [digest for digest in digests if digest]
    return digests[-1] if digests else None


def passed_gate(events: list[Event], version: str) -> Event | None:
    """The latest `gated` event of `version` if it passed, else None."""
    gates = [event for event in events if event.version == version and event.step == GATED]
    return gates[-1] if gates and gates[-1].get("passed") else None
