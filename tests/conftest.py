"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.convert import export_model
from training.train import TrainConfig, train


@pytest.fixture(scope="session")
def int8_artifacts(tmp_path_factory) -> Path:
    """An artifacts folder holding mlp trained on 10,000 digits (about 90% accurate), exported with int8.

    Briefer training leaves predictions so close to the boundary that int8 rightly fails its parity; this
    one passes with a margin (agreement about 0.997). Read-only: copy before changing anything.
    """
    out = tmp_path_factory.mktemp("int8-artifacts")
    train(TrainConfig(model="mlp", epochs=1, limit=10_000, out=out, quiet=True), log=lambda _: None)
    result = export_model(out, "mlp", quantize="int8", log=lambda _: None)
    assert result.passed, result.int8_report
    return out
