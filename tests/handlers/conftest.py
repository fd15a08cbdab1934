"""Fixtures for the handler's unit tests.

The handler's modules are imported the way a TorchServe worker imports them: as top-level modules from one
flat folder (`handlers/` here, the model dir inside an archive), so `handlers/` goes on sys.path, as does
this folder for `handler_helpers`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "handlers"), str(HERE)]

from handler_helpers import MODEL_FILES, Answer, TinyNet, make_context, run_batch, write_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def model_dirs(tiny_model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One archive-shaped model dir per format, shared (read-only) by the tests."""
    root = tmp_path_factory.mktemp("model_dirs")
    return {fmt: write_model_dir(root / fmt, tiny_model, fmt) for fmt in MODEL_FILES}


@pytest.fixture(scope="session")
def handlers_by_format(model_dirs: dict[str, Path]) -> dict[str, Any]:
    """An initialised handler per format (loading once keeps the suite fast)."""
    from digit_handler import DigitHandler

    handlers = {}
    for fmt, directory in model_dirs.items():
        handler = DigitHandler()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, and still the way
            handler.initialize(make_context(directory))
        handlers[fmt] = handler
    return handlers


@pytest.fixture(params=sorted(MODEL_FILES))
def served(
    request: pytest.FixtureRequest, handlers_by_format: dict, model_dirs: dict
) -> Callable[[list], list[Answer]]:
    """Runs a batch through the handler of each format in turn."""
    handler = handlers_by_format[request.param]
    context = make_context(model_dirs[request.param])
    return lambda rows: run_batch(handler, context, rows)


@pytest.fixture(scope="session")
def mnist() -> Any:
    """MNIST from the offline cache (uint8 digits, white on black)."""
    from digits.training.data import load_mnist  # fixture data only: the handler itself never imports training

    return load_mnist(log=lambda *args: None)


@pytest.fixture(scope="session")
def mnist_test(mnist: Any) -> tuple[np.ndarray, np.ndarray]:
    """The first 500 MNIST test digits and their labels."""
    return mnist.test_images[:500], mnist.test_labels[:500]
