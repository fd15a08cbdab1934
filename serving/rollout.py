"""`digits rollout`, `digits rollback`, `digits versions`: replace a served model without dropping a request.

A rollout, step by step, each step written to the run folder's ledger (serving/ledger.py) before the next:
1. refuse a candidate that does not fit, before TorchServe is touched: another model name, labels, input
   shape, layout or normalisation than the live version's; no recorded parity pass; a model file whose
   SHA-256 is not its metadata's; a version that exists already (checked);
2. register it beside the live version from the model store, by file name (registered);
3. wait until it answers on its own URL, `/predictions/NAME/VERSION`, and run the gate there (gated);
4. make it the default version: from this moment new requests go to it (live);
5. drain the old version (every request it took is answered) and unregister it; its archive stays in the
   store for a rollback (retired).
A candidate that fails at 2 or 3 is unregistered (withdrawn) and the live version was never touched. Rollback
is the same procedure for the version that was live before, registered again if it was retired.

One rollout or rollback per model at a time: each holds an exclusive lock on `RUN/locks/MODEL.lock`
(`flock`, released by the kernel if the command dies). Each begins by reconciling the ledger with what
TorchServe serves (`recover`), so an interrupted one leaves nothing behind for long.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from ..contract import FORMATS, PARITY_KEY, PREPROCESSING_KEYS
from ..export.metadata import sha256_file
from .archive import (
    ArchiveError,
    ServingSettings,
    archive_file_name,
    archive_model,
    check_name,
    check_version,
    read_archive_meta,
    read_archive_settings,
    read_manifest,
)
from .gate import DEFAULT_TOLERANCE, GateResult, run_gate
from .ledger import (
    ABANDONED,
    BASELINE,
    CHECKED,
    FAILED,
    GATED,
    LIVE,
    REGISTERED,
    RETIRED,
    WITHDRAWN,
    Event,
    interrupted,
    live_order,
    passed_gate,
    read_events,
    record,
    recorded_digest,
)
from .management import Management, ManagementError
from .server import ServeError, ServerState, is_running, read_state, read_token
from .store import StoredArchive, catalogue, describe_archive

LOAD_TIMEOUT_S = 120  # registering and loading a candidate's workers, and its first answer
DRAIN_TIMEOUT_S = 180  # longer than a batch can take: the archives' response timeout is 120 s


class RolloutRefused(ValueError):
    """The candidate or the request was refused before TorchServe was touched; the message says why."""


class RolloutFailed(RuntimeError):
    """The candidate did not go live (it was withdrawn); the live version is the one the message names."""


@dataclass(frozen=True)
class Target:
    """A running TorchServe started from `run_dir` by `digits serve`, and its model store."""

    run_dir: Path
    store: Path
    state: ServerState
    api: Management

    def note(self, model: str, version: str, step: str, **detail) -> Event:
        return record(self.run_dir, self.store, model, version, step, **detail)

    def events(self, model: str) -> list[Event]:
        return read_events(self.run_dir, self.store, model)


def connect(run_dir: Path) -> Target:
    state = read_state(run_dir)
    if not is_running(state):
        raise RolloutRefused(f"no TorchServe is running from {run_dir}; start one with `digits serve`")
    if "enable_model_api=false" in Path(state.config).read_text().splitlines():
        raise RolloutRefused(
            f"the TorchServe of {run_dir} was started with --no-registration; `digits stop` and `digits serve` "
            "without it to roll out (its ledger keeps the live version)"
        )
    api = Management(state.management_url, read_token(run_dir, "management"), state.inference_url, read_token(run_dir))
    return Target(Path(run_dir), Path(state.store), state, api)


@contextmanager
def model_lock(run_dir: Path, model: str) -> Iterator[None]:
    """Holds `RUN/locks/MODEL.lock` exclusively, or refuses: one rollout or rollback per model at a time."""
    locks = Path(run_dir) / "locks"
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(locks / f"{model}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RolloutRefused(
                f"a rollout or rollback of {model} is already running (pid {holder}); wait until it ends"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def served_archive(target: Target, model: str) -> StoredArchive:
    """The live version of `model` (TorchServe's default) and its archive in the store."""
    live = target.api.default_version(model)
    if live is None:
        served = sorted(catalogue(target.store)) if target.store.is_dir() else []
        raise RolloutRefused(
            f"TorchServe serves no model {model!r}; the store's models: {', '.join(served) or 'none'} "
            "(a new model is served by `digits serve`, not rolled out)"
        )
    stored = catalogue(target.store).get(model, {}).get(live)
    if stored is None:
        raise RolloutRefused(f"{model} {live} is live but its archive is not in {target.store}; put it back first")
    return stored


def record_baseline(target: Target, live: StoredArchive) -> None:
    """The first time digits touches a model, the version TorchServe serves becomes the ledger's baseline."""
    if not any(e.step in (LIVE, BASELINE) for e in target.events(live.model)):
        target.note(live.model, live.version, BASELINE, archive=live.path.name, archive_sha256=sha256_file(live.path))


# -- recovery -------------------------------------------------------------------------------------------


def recover(target: Target, model: str, log: Callable[[str], None]) -> None:
    """Reconciles the ledger with TorchServe after an interrupted rollout: the default a killed command set
    is recorded (it had passed its gate), and versions registered beside the default are drained and
    unregistered (candidates withdrawn, former live versions retired)."""
    events = target.events(model)
    default, registered = target.api.default_version(model), target.api.versions(model)
    if default is None:
        return
    order = live_order(events)
    if order and order[-1] != default:
        if passed_gate(events, default):
            target.note(model, default, LIVE, previous=order[-1], recovered=True)
            log(f"recovered: {model} {default} had passed its gate and was made the default; ledger updated")
        else:
            target.note(model, default, BASELINE, note="made the default outside digits")
            log(f"note: {model} {default} was made the default outside digits; the ledger now records it as live")
        events, order = target.events(model), [*order, default]
    known = {event.version for event in events}
    for version in registered:
        if version == default:
            continue
        if version not in known:
            log(f"note: {model} {version} is registered beside the default but not by digits; left alone")
            continue
        step, reason = (RETIRED, None) if version in order else (WITHDRAWN, "an interrupted rollout left it registered")
        log(f"recovering: draining and unregistering {model} {version}, left registered by an interrupted run")
        target.api.drain(model, version, DRAIN_TIMEOUT_S)
        target.api.unregister(model, version)
        target.note(model, version, step, **({"reason": reason} if reason else {}))
        if step == WITHDRAWN:
            remove_written(target, events, version)
    for version in interrupted(target.events(model)):
        target.note(model, version, ABANDONED, reason="its rollout was interrupted")


def remove_written(target: Target, events: list[Event], version: str) -> None:
    """Removes a withdrawn candidate's archive from the store when a rollout wrote it there (its `checked`
    line says so), as a rollout that ends does."""
    written = [e.get("archive") for e in events if e.version == version and e.step == CHECKED and e.get("written")]
    if written:
        (target.store / written[-1]).unlink(missing_ok=True)


# -- checking a candidate ------------------------------------------------------------------------------


def known_versions(target: Target, model: str, besides: Path | None = None) -> set[str]:
    """Every version of `model` the ledger, the store (but the archive `besides`) or TorchServe has seen: none
    may be reused."""
    ledger = {event.version for event in target.events(model)}
    stored = {v for v, a in catalogue(target.store).get(model, {}).items() if a.path.resolve() != besides}
    return ledger | stored | set(target.api.versions(model))


def next_version(versions: set[str]) -> str:
    """One major version past the highest numeric one ("1.0", "2" -> "3.0"); refuses when none is numeric."""
    majors = [int(match.group(1)) for v in versions if (match := re.fullmatch(r"v?(\d+)(?:\.\d+)*", v))]
    if not majors:
        raise RolloutRefused(f"cannot number the next version after {', '.join(sorted(versions))}; pass --version")
    return f"{max(majors) + 1}.0"


def format_of(meta: dict) -> str:
    """The `digits archive --format` an archive was made with, from its model file's name."""
    for fmt in FORMATS.values():
        if meta.get("model_file") == fmt.file:
            return fmt.name
    raise RolloutRefused(f"cannot tell the live archive's format from {meta.get('model_file')!r}; pass --format")


def candidate_problems(live: StoredArchive, mar: Path) -> list[str]:
    """What makes `mar` unfit to replace `live`, each named; empty when it fits."""
    try:
        manifest, meta, live_meta = read_manifest(mar), read_archive_meta(mar), read_archive_meta(live.path)
    except ArchiveError as err:
        return [str(err)]
    problems = []
    name = (manifest.get("model") or {}).get("modelName")
    if name != live.model:
        problems.append(f"its model name is {name!r}, not {live.model!r}")
    for key in PREPROCESSING_KEYS:
        if meta.get(key) != live_meta.get(key):
            problems.append(f"its {key} is {meta.get(key)!r} where the live version's is {live_meta.get(key)!r}")
    if (meta.get(PARITY_KEY) or {}).get("passed") is not True:
        problems.append("it records no passed parity check (`digits archive` records the export's verdict)")
    problems += checksum_problems(mar, manifest, meta)
    return problems


def checksum_problems(mar: Path, manifest: dict, meta: dict) -> list[str]:
    """The model file inside the archive must have the SHA-256 its metadata gives (the handler checks it too,
    but only once registered)."""
    name = (manifest.get("model") or {}).get("serializedFile") or meta.get("model_file")
    try:
        with zipfile.ZipFile(mar) as archive:
            digest = hashlib.sha256(archive.read(name)).hexdigest()
    except (KeyError, TypeError, zipfile.BadZipFile, OSError):
        return [f"it holds no model file {name!r}"]
    if digest != meta.get("sha256"):
        return [
            f"its model file {name} has SHA-256 {digest[:12]}..., not the {str(meta.get('sha256'))[:12]}... it records"
        ]
    return []


@dataclass(frozen=True)
class Candidate:
    """Where the candidate comes from: an archive, or an export to archive (`artifacts`/`architecture`)."""

    archive: Path | None = None
    artifacts: Path | None = None
    architecture: str | None = None
    fmt: str | None = None
    version: str | None = None


def prepare(
    target: Target, live: StoredArchive, candidate: Candidate, log: Callable[[str], None]
) -> tuple[StoredArchive, bool]:
    """The candidate's archive in the store, checked, and whether this rollout wrote it there (as
    `MODEL-vVERSION.mar`; an `--archive` already in the store is taken where it is). Refuses
    (RolloutRefused), removing what it wrote, when a check fails."""
    model = live.model
    given = Path(candidate.archive).resolve() if candidate.archive else None
    in_store = given is not None and given.parent == target.store.resolve()
    taken = known_versions(target, model, besides=given if in_store else None)
    version = candidate.version or (describe_archive(given).version if given else None) or next_version(taken)
    try:
        check_version(version)
    except ArchiveError as err:
        raise RolloutRefused(str(err)) from None
    if version in taken:
        raise RolloutRefused(
            f"{model} version {version} exists already (ledger, store or TorchServe); pass another --version"
        )
    if in_store:
        mar = check_given(given, live, version)
    else:
        target_path = target.store / archive_file_name(model, version)
        if target_path.exists():
            raise RolloutRefused(f"{target_path} exists already; pass another --version")
        write = copy_archive if given else archive_export
        mar = write(target, live, candidate, version, target_path, log)
    problems = candidate_problems(live, mar)
    if problems:
        if not in_store:
            mar.unlink(missing_ok=True)
        raise RolloutRefused(f"candidate {model} {version} refused: " + "; ".join(problems))
    target.note(model, version, CHECKED, archive=mar.name, archive_sha256=sha256_file(mar), written=not in_store)
    log(f"checked {mar.name}: same model name, labels, input shape, layout and normalisation; parity passed")
    return StoredArchive(mar, model, version), not in_store


def check_given(mar: Path, live: StoredArchive, version: str) -> Path:
    """An `--archive` must exist and hold `live`'s model at `version` (its manifest's)."""
    if not mar.is_file():
        raise RolloutRefused(f"no archive at {mar}")
    given = describe_archive(mar)
    if given.version != version:
        raise RolloutRefused(f"{mar} holds version {given.version}, not the --version {version} asked for")
    if given.model != live.model:
        raise RolloutRefused(f"{mar} holds model {given.model!r}, not {live.model!r}")
    return mar


def copy_archive(target: Target, live: StoredArchive, candidate: Candidate, version: str, path: Path, log) -> Path:
    mar = check_given(Path(candidate.archive), live, version)
    log(f"copying {mar} into the store as {path.name}")
    temporary = path.with_name(f".{path.name}.part")
    try:
        shutil.copyfile(mar, temporary)
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise RolloutRefused(f"cannot write {path} into the model store: {err.strerror}") from None
    return path


def archive_export(target: Target, live: StoredArchive, candidate: Candidate, version: str, path: Path, log) -> Path:
    live_meta = read_archive_meta(live.path)
    architecture = candidate.architecture or live_meta.get("model")
    fmt = candidate.fmt or format_of(live_meta)
    artifacts = Path(candidate.artifacts or "artifacts")
    live_settings = ServingSettings.from_yaml(read_archive_settings(live.path))  # the successor keeps them
    try:
        return archive_model(architecture, fmt, artifacts, target.store, live.model, live_settings, log, version)
    except OSError as err:
        raise RolloutRefused(
            f"cannot write the candidate's archive into the model store {target.store}: {err.strerror}"
        ) from None


# -- going live -----------------------------------------------------------------------------------------


class GateFailed(RuntimeError):
    pass


class LoadWatch:
    """What TorchServe logs about a version's workers from now on: a worker that failed or died while loading.

    TorchServe retries such a worker for ever; digits takes the first failure as the verdict (a candidate
    whose worker died loading is not put live). The frontend's thread of the worker is `W-PORT-MODEL_VERSION`
    in every line: ts_log.log has its "Retry worker" line after each failure, model_log.log the handler's own
    "Failed to load model" reason, when it had one.
    """

    def __init__(self, run_dir: Path, model: str, version: str) -> None:
        self.logs = Path(run_dir) / "logs"
        self.thread = re.compile(rf"\bW-\d+-{re.escape(model)}_{re.escape(version)}[ -]")
        self.offsets = {name: self._size(name) for name in ("ts_log.log", "model_log.log")}

    def _size(self, name: str) -> int:
        path = self.logs / name
        return path.stat().st_size if path.is_file() else 0

    def _new_lines(self, name: str) -> list[str]:
        path, offset = self.logs / name, self.offsets[name]
        if not path.is_file():
            return []
        with open(path, "rb") as file:
            file.seek(offset if path.stat().st_size >= offset else 0)  # rolled over: the new file from its start
            return [line for line in file.read().decode(errors="replace").splitlines() if self.thread.search(line)]

    def failure(self) -> str | None:
        """Why the version's worker failed while loading, once TorchServe logged that it did; else None."""
        if not any("Retry worker" in line for line in self._new_lines("ts_log.log")):
            return None
        reasons = [
            line.split("Failed to load model", 1)[1]
            for line in self._new_lines("model_log.log")
            if "Failed to load model" in line
        ]
        reason = f"failed to load model{reasons[-1]}" if reasons else "died while loading (see the run folder's logs)"
        return f"its worker {reason}"


def go_live(
    target: Target,
    candidate: StoredArchive,
    live: str,
    tolerance: float,
    log: Callable[[str], None],
    recorded_accuracy: float | None = None,
) -> GateResult:
    """Registers `candidate` (unless it is), gates it, makes it the default and retires `live`.

    Raises RolloutFailed, after withdrawing the candidate, when it does not go live.
    """
    model, version = candidate.model, candidate.version
    try:
        if version not in target.api.versions(model):
            log(f"registering {candidate.path.name} as {model} {version} beside {live} (loading its workers)")
            watch = LoadWatch(target.run_dir, model, version)
            target.api.register(model, candidate.path.name)
            target.api.wait_loaded(model, version, LOAD_TIMEOUT_S, watch.failure)
        target.api.wait_answering(model, version, LOAD_TIMEOUT_S)
        target.note(model, version, REGISTERED)
        log(f"{model} {version} answers on /predictions/{model}/{version}; running the gate")
        result = gate(target, model, version, live, tolerance, recorded_accuracy)
        target.note(model, version, GATED, **result.to_json())
        log(result.summary())
        if not result.passed:
            raise GateFailed(result.summary())
        target.api.set_default(model, version)
    except (ManagementError, GateFailed, ServeError, requests.RequestException) as err:
        reason = failure_reason(target, err)
        withdraw(target, model, version, reason, log)
        raise RolloutFailed(f"{model} {version} did not go live: {reason}. {model} {live} is still live") from None
    target.note(
        model, version, LIVE, previous=live, archive=candidate.path.name, archive_sha256=sha256_file(candidate.path)
    )
    log(f"{model} {version} is live: /predictions/{model} and /v2/models/{model}/infer go to it")
    retire(target, model, live, log)
    return result


def gate(target: Target, model: str, version: str, live: str, tolerance: float, recorded: float | None) -> GateResult:
    token = target.api.inference_token
    if recorded is not None:
        return run_gate(target.state.inference_url, token, model, version, None, tolerance, recorded)
    return run_gate(target.state.inference_url, token, model, version, live, tolerance)


def failure_reason(target: Target, err: Exception) -> str:
    if not is_running(target.state):
        return f"TorchServe stopped during the rollout ({err}); `digits serve` starts it again with the live version"
    return str(err)


def withdraw(target: Target, model: str, version: str, reason: str, log: Callable[[str], None]) -> None:
    """Unregisters a candidate that did not go live (TorchServe may have done it already); records why."""
    try:
        if version in target.api.versions(model) and target.api.default_version(model) != version:
            target.api.unregister(model, version)
        target.note(model, version, WITHDRAWN, reason=reason)
        log(f"withdrew {model} {version}: {reason}")
    except (ManagementError, requests.RequestException) as err:
        target.note(model, version, FAILED, reason=f"{reason}; withdrawing it failed too: {err}")


def retire(target: Target, model: str, version: str, log: Callable[[str], None]) -> None:
    """Drains `version` and unregisters it; a failure leaves it registered for the next run's `recover`."""
    try:
        log(f"draining {model} {version}: waiting until every request it took is answered")
        target.api.drain(model, version, DRAIN_TIMEOUT_S)
        target.api.unregister(model, version)
    except (ManagementError, requests.RequestException) as err:
        log(f"warning: {model} {version} is still registered ({err}); the next rollout or rollback retires it")
        return
    target.note(model, version, RETIRED)
    log(f"retired {model} {version} (its archive stays in the store for `digits rollback {model}`)")


# -- the commands ---------------------------------------------------------------------------------------


def rollout(
    run_dir: Path,
    model: str,
    candidate: Candidate,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> GateResult:
    """Puts a new version of `model` live (see the module docstring); raises RolloutRefused or RolloutFailed."""
    with live_model(run_dir, model, log) as (target, live):
        record_baseline(target, live)
        log(f"{model} {live.version} is live ({live.path.name})")
        stored, written = prepare(target, live, candidate, log)
        try:
            return go_live(target, stored, live.version, tolerance, log)
        except RolloutFailed:
            if written:  # by this rollout: the ledger keeps its record
                stored.path.unlink(missing_ok=True)
            raise
        except BaseException as err:  # interrupted (Ctrl-C): the ledger shows the step it stopped at
            target.note(model, stored.version, FAILED, reason=f"interrupted: {type(err).__name__}")
            raise


def rollback(
    run_dir: Path, model: str, tolerance: float = DEFAULT_TOLERANCE, log: Callable[[str], None] = print
) -> GateResult:
    """Puts the version that was live before the current one live again, the same way as a rollout."""
    with live_model(run_dir, model, log) as (target, live):
        events = target.events(model)
        earlier = [version for version in reversed(live_order(events)) if version != live.version]
        if not earlier:
            raise RolloutRefused(f"the ledger knows no version of {model} that was live before {live.version}")
        previous = catalogue(target.store).get(model, {}).get(earlier[0])
        if previous is None:
            raise RolloutRefused(f"{model} {earlier[0]}'s archive is no longer in {target.store}; put it back first")
        check_recorded_digest(events, previous)
        log(f"rolling {model} back from {live.version} to {previous.version} ({previous.path.name})")
        return go_live(target, previous, live.version, tolerance, log, recorded_accuracy(events, previous.version))


@contextmanager
def live_model(run_dir: Path, model: str, log: Callable[[str], None]) -> Iterator[tuple[Target, StoredArchive]]:
    """How a rollout and a rollback begin: the model's lock held, the server found, the live version and its
    archive known, and what an interrupted run left behind reconciled (`recover`)."""
    check_name(model)
    with model_lock(run_dir, model):
        target = connect(run_dir)
        live = served_archive(target, model)
        recover(target, model, log)
        yield target, live


def check_recorded_digest(events: list[Event], stored: StoredArchive) -> None:
    digest = recorded_digest(events, stored.model, stored.version)
    if digest and sha256_file(stored.path) != digest:
        raise RolloutRefused(
            f"{stored.path} changed since the ledger recorded it; it cannot be trusted as {stored.version}"
        )


def recorded_accuracy(events: list[Event], version: str) -> float | None:
    """The golden-set accuracy `version` had: as a candidate that passed, or as the live reference of a gate."""
    for event in reversed(events):
        if event.step != GATED:
            continue
        if event.version == version and event.get("passed"):
            return event.get("accuracy")
        if event.get("reference") == version:
            return event.get("reference_accuracy")
    return None


@dataclass(frozen=True)
class VersionRow:
    version: str
    archive: str
    sha256: str
    accuracy: float | None
    gate: str  # passed, failed, or -
    live_since: str | None
    state: str  # default, registered, retired, withdrawn, in store


def versions(run_dir: Path, model: str) -> list[VersionRow]:
    """Every version of `model` the store or the ledger knows, with TorchServe's view when it runs."""
    state = read_state(run_dir)
    store = Path(state.store) if state else None
    if store is None:
        raise RolloutRefused(f"no server was started from {run_dir}; `digits serve` first")
    events = read_events(run_dir, store, model)
    stored = catalogue(store).get(model, {}) if store.is_dir() else {}
    registered, default = ({}, None)
    if is_running(state):
        target = connect(run_dir)
        registered, default = target.api.versions(model), target.api.default_version(model)
    names = sorted({*stored, *(e.version for e in events), *registered}, key=version_key)
    if not names:
        raise RolloutRefused(f"neither {store} nor the ledger knows a model {model!r}")
    return [row(name, events, stored.get(name), name in registered, default) for name in names]


def row(
    version: str, events: list[Event], stored: StoredArchive | None, registered: bool, default: str | None
) -> VersionRow:
    own = [e for e in events if e.version == version]
    gates = [e for e in own if e.step == GATED]
    lives = [e for e in own if e.step in (LIVE, BASELINE)]
    if version == default:
        state = "default"
    elif registered:
        state = "registered"
    else:
        state = own[-1].step if own else "in store"
    return VersionRow(
        version,
        stored.path.name if stored else "(not in the store)",
        sha256_file(stored.path)[:12] if stored else "-",
        recorded_accuracy(events, version),
        ("passed" if gates[-1].get("passed") else "failed") if gates else "-",
        lives[-1].time if lives else None,
        state,
    )


def version_key(version: str) -> tuple:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-_]", version.lstrip("v")))
