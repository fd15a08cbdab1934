"""The rules behind `digits rollout`, without a server: which archive a store serves, the ledger's reading,
version numbering, the golden set, and the rule that judges versions under load (bench/switch.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from digits.bench.switch import Answer, Switch, version_problems
from digits.serving import ledger
from digits.serving.archive import ServingSettings, archive_model
from digits.serving.golden import GOLDEN_FILE, load_golden, select
from digits.serving.rollout import next_version, version_key
from digits.serving.store import catalogue, choose_archives


@pytest.fixture(scope="module")
def versions_store(artifacts, tmp_path_factory):
    """cnn 1.0 (cnn.mar) and 2.0 (cnn-v2.0.mar), mlp 1.0."""
    store = tmp_path_factory.mktemp("versions-store")
    settings = ServingSettings(batch_size=8)
    for version in ("1.0", "2.0"):
        archive_model("cnn", "onnx", artifacts, store, settings=settings, log=lambda _: None, version=version)
    archive_model("mlp", "torchscript", artifacts, store, settings=settings, log=lambda _: None)
    return store


def test_versions_sit_side_by_side_and_the_manifest_says_which_is_which(versions_store) -> None:
    found = catalogue(versions_store)
    assert {m: sorted(v) for m, v in found.items()} == {"cnn": ["1.0", "2.0"], "mlp": ["1.0"]}
    assert found["cnn"]["2.0"].path.name == "cnn-v2.0.mar" and found["cnn"]["1.0"].path.name == "cnn.mar"


def test_a_store_serves_one_version_per_model_the_ledgers(versions_store) -> None:
    with pytest.raises(ValueError, match=r"cnn versions 1\.0 \(cnn\.mar\), 2\.0 \(cnn-v2\.0\.mar\) and no ledger"):
        choose_archives(versions_store)
    chosen = choose_archives(versions_store, {"cnn": "2.0"})
    assert [(a.model, a.version) for a in chosen] == [("cnn", "2.0"), ("mlp", "1.0")]
    with pytest.raises(ValueError, match=r"ledger says cnn version 3\.0 is live"):
        choose_archives(versions_store, {"cnn": "3.0"})


def test_two_archives_of_one_version_are_refused(versions_store, tmp_path) -> None:
    store = tmp_path / "store"
    shutil.copytree(versions_store, store)
    shutil.copy(store / "cnn-v2.0.mar", store / "copy.mar")
    with pytest.raises(ValueError, match=r"both hold cnn version 2\.0"):
        catalogue(store)


def test_the_ledger_names_the_live_version_and_the_interrupted_attempts(tmp_path) -> None:
    store = tmp_path / "store"
    ledger.record(tmp_path, store, "cnn", "1.0", ledger.BASELINE)
    ledger.record(tmp_path, store, "cnn", "2.0", ledger.CHECKED)
    ledger.record(tmp_path, store, "cnn", "2.0", ledger.GATED, passed=True, accuracy=0.9)
    ledger.record(tmp_path, store, "cnn", "2.0", ledger.LIVE, previous="1.0")
    ledger.record(tmp_path, store, "cnn", "3.0", ledger.CHECKED)
    ledger.record(tmp_path, store, "cnn", "3.0", ledger.REGISTERED)
    ledger.record(tmp_path, tmp_path / "other", "cnn", "9.0", ledger.BASELINE)
    with open(ledger.ledger_path(tmp_path), "a") as file:
        file.write('{"time": "2026-01-01T00:00:00", "model": "cnn", "vers')  # cut short by a crash
    assert ledger.live_versions(tmp_path, store) == {"cnn": "2.0"}
    events = ledger.read_events(tmp_path, store, "cnn")
    assert ledger.live_order(events) == ["1.0", "2.0"]
    assert ledger.interrupted(events) == ["3.0"]
    assert ledger.passed_gate(events, "2.0") is not None and ledger.passed_gate(events, "3.0") is None
    assert (ledger.ledger_path(tmp_path).stat().st_mode & 0o777) == 0o600


def test_versions_are_numbered_one_major_past_the_highest() -> None:
    assert next_version({"1.0"}) == "2.0"
    assert next_version({"1.0", "2.0", "10", "v3.1"}) == "11.0"
    with pytest.raises(ValueError, match="pass --version"):
        next_version({"blue"})
    assert sorted(["10.0", "2.0", "1.0"], key=version_key) == ["1.0", "2.0", "10.0"]


def test_the_golden_set_is_the_one_in_the_package(mnist) -> None:
    """Rebuilt from the MNIST cache, the stored digits are the same: every 16th test digit, its true label."""
    rebuilt = select(mnist.test_images, mnist.test_labels)
    with np.load(GOLDEN_FILE) as stored:
        for key, value in rebuilt.items():
            assert np.array_equal(stored[key], value), key
    golden = load_golden()
    assert len(golden) == 750 and golden.drawn == 125
    assert golden.labels.tolist() == [*rebuilt["labels"].tolist(), *rebuilt["labels"][::5].tolist()]
    assert all(payload.startswith(b"\x89PNG") for payload in golden.payloads)
    assert load_golden().payloads == golden.payloads  # the same every time


def answer(connection: int, sent: float, done: float, version: str, protocol: str = "png") -> Answer:
    return Answer(connection, protocol, sent, done, 200, version, version if protocol == "oip" else None, True)


SWITCHES = [Switch("1.0", "2.0", began=10.0, ended=10.5), Switch("2.0", "1.0", began=20.0, ended=20.5)]


def test_answers_from_the_live_version_keep_the_rule() -> None:
    answers = [
        answer(0, 9.0, 9.1, "1.0"),
        answer(0, 10.2, 10.3, "1.0"),  # inside the switch window: either version is right
        answer(0, 10.4, 10.6, "2.0"),
        answer(0, 15.0, 15.1, "2.0", "oip"),
        answer(0, 20.6, 20.7, "1.0"),
        answer(1, 10.1, 10.2, "2.0"),  # another connection switched earlier within the window
    ]
    assert version_problems(answers, "1.0", SWITCHES) == []


def test_a_stale_version_a_flap_and_an_early_one_break_the_rule() -> None:
    stale = [answer(0, 10.6, 10.7, "1.0")]  # sent after the switch ended, answered by the old version
    flap = [answer(1, 10.2, 10.25, "2.0"), answer(1, 10.3, 10.35, "1.0")]  # in the window, but back again
    early = [answer(2, 9.0, 9.9, "2.0")]  # answered before the switch began
    mismatch = [Answer(3, "oip", 15.0, 15.1, 200, "2.0", "1.0", True)]  # header and body disagree
    for case in (stale, flap, early, mismatch):
        assert version_problems(case, "1.0", SWITCHES), case
