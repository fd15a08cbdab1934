"""The handler ships alone inside the .mar and keeps its own copy of the artefact contract: pinned here.

Each name `handlers/digit_contract.py` copies from `contract/` must equal the contract's, and its
normalisation must give the contract's numbers bit for bit, or an archive would be read or fed differently
from how it was made. The modules that use the copy must take it from there, not keep another.
"""

from __future__ import annotations

import digit_batch
import digit_contract
import digit_model
import digit_oip
import numpy as np
import pytest

from digits import contract

COPIED = (
    "META_FILE",
    "LAYOUTS",
    "PREPROCESSING_KEYS",
    "HANDLER_SECTION",
    "THREADS_KEY",
    "RESPONSE_LIMIT_KEY",
    "TORCHSERVE_MAX_RESPONSE",
    "PT2_META_ENTRY",
    "PT2_REQUIRED_KEYS",
    "OIP_OUTPUTS",
    "OIP_DEFAULT_OUTPUTS",
    "VERSION_HEADER",
    "WORKER_HEADER",
)


@pytest.mark.parametrize("name", COPIED)
def test_each_copied_name_is_the_contracts(name: str) -> None:
    assert getattr(digit_contract, name) == getattr(contract, name)


def test_the_handler_loads_every_runtime_of_the_contract_by_its_suffix() -> None:
    expected = {fmt.suffix: fmt.runtime for fmt in contract.FORMATS.values()}
    assert digit_contract.RUNTIME_BY_SUFFIX == expected


def test_the_handler_requires_the_keys_the_contract_says() -> None:
    assert digit_contract.REQUIRED_KEYS == contract.ARCHIVE_REQUIRED_KEYS
    assert set(digit_model.DigitMeta.__dataclass_fields__) == set(contract.ARCHIVE_META_KEYS)


def test_the_modules_use_the_one_copy() -> None:
    assert digit_model.META_FILE is digit_contract.META_FILE
    assert digit_model.RUNTIME_BY_SUFFIX is digit_contract.RUNTIME_BY_SUFFIX
    assert digit_model.PT2_REQUIRED_KEYS is digit_contract.PT2_REQUIRED_KEYS
    assert digit_oip.OUTPUTS == tuple(digit_contract.OIP_OUTPUTS)
    assert digit_oip.DEFAULT_OUTPUTS is digit_contract.OIP_DEFAULT_OUTPUTS


def test_the_handler_normalises_every_intensity_as_the_contract_does(mnist) -> None:
    meta = digit_model.DigitMeta(
        format="onnx",
        sha256="0" * 64,
        mean=0.1307,
        std=0.3081,
        labels=tuple("0123456789"),
        input_shape=(1, 16, 16),
        layout="NCHW",
    )
    levels = np.arange(256, dtype=np.float32).reshape(16, 16)  # every intensity a digit can hold
    handler = digit_batch.normalise([levels], meta).numpy()
    assert np.array_equal(handler, contract.normalise(levels[None], meta.mean, meta.std, meta.input_shape))
    digits = mnist.test_images[:64]
    meta_28 = digit_model.DigitMeta(**{**meta.__dict__, "input_shape": (1, 28, 28)})
    handler = digit_batch.normalise([d.astype(np.float32) for d in digits], meta_28).numpy()
    assert np.array_equal(handler, contract.normalise(digits, meta.mean, meta.std, meta_28.input_shape))
