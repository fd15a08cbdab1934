"""The no-op handler: the benchmarks' ceiling answers every request of a batch and computes nothing."""

from __future__ import annotations

import sys
import zipfile

import pytest
from handler_helpers import HANDLERS_DIR

from serving.archive import ServingSettings, archive_noop


@pytest.fixture
def noop():
    sys.path.insert(0, str(HANDLERS_DIR))
    try:
        import noop_handler

        yield noop_handler
    finally:
        sys.path.remove(str(HANDLERS_DIR))


def test_noop_answers_each_request_and_initialises_on_none(noop):
    assert noop.handle(None, context=None) is None  # TorchServe's initialisation call
    assert noop.handle([{"body": b"anything"}, {}, {"data": [1]}], context=None) == [noop.ANSWER] * 3


def test_noop_archive_holds_only_its_handler_and_the_settings(tmp_path):
    mar = archive_noop(tmp_path, settings=ServingSettings(batch_size=16, max_batch_delay=2))
    with zipfile.ZipFile(mar) as archive:
        assert sorted(archive.namelist()) == ["MAR-INF/MANIFEST.json", "model-config.yaml", "noop_handler.py"]
        assert b"batchSize: 16" in archive.read("model-config.yaml")
