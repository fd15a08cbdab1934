"""The no-op handler: the benchmarks' ceiling answers every request of a batch and computes nothing."""

from __future__ import annotations

import json
import sys
import zipfile

import pytest
from digits.serving.archive import ServingSettings, archive_noop
from handler_helpers import HANDLERS_DIR, make_context, run_batch


@pytest.fixture
def noop():
    sys.path.insert(0, str(HANDLERS_DIR))
    try:
        import noop_handler

        yield noop_handler
    finally:
        sys.path.remove(str(HANDLERS_DIR))


def test_noop_answers_each_request_and_initialises_on_none(noop, tmp_path):
    assert noop.handle(None, context=None) is None  # TorchServe's initialisation call
    answers = run_batch(noop, make_context(tmp_path), [{"body": b"anything"}, {}, {"data": [1]}])
    assert [(a.status, a.content_type) for a in answers] == [(200, "application/json")] * 3


def test_noop_answers_as_the_digits_handler_does(noop, handlers_by_format, model_dirs, mnist_test):
    """Pre-encoded compact JSON bytes of a prediction's shape and length: the ceiling pays per answer what
    the model pays, no more (TorchServe would encode a dict with json.dumps(indent=2))."""
    from handler_helpers import png_bytes

    [model] = run_batch(
        handlers_by_format["onnx"], make_context(model_dirs["onnx"]), [{"body": png_bytes(mnist_test[0][0])}]
    )
    model_body = json.dumps(model.body, separators=(",", ":")).encode()
    assert isinstance(noop.ANSWER, bytes) and json.loads(noop.ANSWER).keys() == model.body.keys()
    assert noop.ANSWER == json.dumps(json.loads(noop.ANSWER), separators=(",", ":")).encode()  # compact
    assert abs(len(noop.ANSWER) - len(model_body)) <= 40


def test_noop_archive_holds_only_its_handler_and_the_settings(tmp_path):
    mar = archive_noop(tmp_path, settings=ServingSettings(batch_size=16, max_batch_delay=2))
    with zipfile.ZipFile(mar) as archive:
        assert sorted(archive.namelist()) == ["MAR-INF/MANIFEST.json", "model-config.yaml", "noop_handler.py"]
        assert b"batchSize: 16" in archive.read("model-config.yaml")
