"""A TorchServe batch on its way through the model: the readable digits as one tensor, the rest as errors.

Reading is per request (each may fail alone); normalisation, the forward pass and the softmax are one
batch operation each.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from digit_contract import normalise as contract_normalise
from digit_errors import RequestError, unexpected
from digit_inputs import read_request
from digit_model import DigitMeta

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Batch:
    """One TorchServe batch after reading."""

    size: int  # requests in the batch, readable or not
    rows: list[int]  # request index of each row of `digits`
    digits: torch.Tensor  # (len(rows), C, H, W) float32, normalised
    errors: dict[int, RequestError] = field(default_factory=dict)  # request index -> why it was refused
    probabilities: torch.Tensor | None = None  # (len(rows), classes), after inference

    def with_probabilities(self, probabilities: torch.Tensor) -> Batch:
        return dataclasses.replace(self, probabilities=probabilities)


@dataclass(frozen=True)
class Readings:
    """One TorchServe batch read request by request, before it becomes a tensor."""

    size: int  # requests in the batch, readable or not
    rows: list[int]  # request index of each digit
    digits: list[np.ndarray]  # (H, W) float32 0..255, white on black, one per readable request
    errors: dict[int, RequestError]  # request index -> why it was refused


def read_batch(data: list[Any], meta: DigitMeta, content_types: list[str | None] | None = None) -> Readings:
    """Reads each request into a digit; one that fails is kept aside with its error, the rest go on.

    Whatever reading one request raises stays that request's: a `RequestError` is its 4xx; anything else is
    a fault of this server (a library raising what it should not, a bug here), logged once with its traceback
    and answered as that request's own 500. Nothing raised while reading one request reaches its batch.

    Args:
        data: the rows TorchServe passes to `handle`.
        meta: the archive's metadata (the model's input size).
        content_types: each request's Content-Type header, where known (`content_types`).
    """
    digits, rows, errors = [], [], {}
    for index, row in enumerate(data):
        content_type = content_types[index] if content_types else None
        digit = read_guarded(functools.partial(read_request, row, meta.size, content_type), index, len(data))
        if isinstance(digit, RequestError):
            errors[index] = digit
        else:
            digits.append(digit)
            rows.append(index)
    return Readings(len(data), rows, digits, errors)


def read_guarded(read: Callable[[], T], index: int, count: int) -> T | RequestError:
    """The per-request boundary, for every protocol: request `index` of `count` read by `read`, or its own
    error. A `RequestError` is its 4xx, logged as a line; anything else is this server's fault, logged once
    with its traceback and answered as the request's own 500 (`unexpected`)."""
    try:
        return read()
    except RequestError as err:
        logger.info("request %d of %d refused: %d %s: %s", index, count, err.code, err.kind, err.message)
        return err
    except Exception as err:  # noqa: BLE001 - the per-request boundary: see the docstring
        logger.exception("request %d of %d: unexpected %s while reading it", index, count, type(err).__name__)
        return unexpected(err)


def content_types(context: Any, count: int) -> list[str | None]:
    """Each request's Content-Type header, from the HTTP headers TorchServe hands the handler in `context`.

    TorchServe keeps a header's name as the client spelled it, beside one dict per form field (ts/service.py,
    `retrieve_data_for_inference`), hence the case-blind search for a string value.
    """
    found: list[str | None] = []
    for index in range(count):
        headers = context.get_all_request_header(index) or {}
        found.append(next((v for k, v in headers.items() if k.lower() == "content-type" and isinstance(v, str)), None))
    return found


def assemble(readings: Readings, meta: DigitMeta) -> Batch:
    """The readable digits as one normalised tensor."""
    return Batch(
        size=readings.size, rows=readings.rows, digits=normalise(readings.digits, meta), errors=readings.errors
    )


def normalise(digits: list[np.ndarray], meta: DigitMeta) -> torch.Tensor:
    """Stacks (H, W) 0..255 digits into (N, C, H, W), scaled to 0..1 and standardised like training
    (the contract's formula, `digit_contract.normalise`)."""
    if not digits:
        return torch.empty((0, *meta.input_shape))
    return torch.from_numpy(contract_normalise(digits, meta.mean, meta.std, meta.input_shape))


def to_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over classes: right for logits and for log-probabilities alike (log_softmax is idempotent)."""
    return torch.softmax(scores.double(), dim=1)


def prediction_bodies(probabilities: torch.Tensor, labels: tuple[str, ...]) -> list[bytes]:
    """One JSON body `{"label", "confidence", "probabilities"}` per row, numbers to 7 significant digits.

    Seven digits are what the model's float32 logits carry. Written with one %-format a label rather than
    json.dumps, whose shortest round-trip repr of 11 doubles was most of postprocessing.
    The label is the first of the most probable classes.
    """
    templates = body_templates(labels)
    bodies = []
    for row in probabilities.tolist():
        confidence = max(row)
        bodies.append((templates[row.index(confidence)] % (confidence, *row)).encode())
    return bodies


@functools.lru_cache(maxsize=8)
def body_templates(labels: tuple[str, ...]) -> list[str]:
    """Per label, the body with %-placeholders for the confidence and each class's probability."""
    numbers = ",".join(["%.7g"] * len(labels))
    # the label as JSON (strings quoted and escaped), its %-signs doubled so that formatting leaves them be
    return [
        f'{{"label":{json.dumps(label_value(label)).replace("%", "%%")},"confidence":%.7g,"probabilities":[{numbers}]}}'
        for label in labels
    ]


def label_value(label: str) -> int | str:
    """MNIST's labels "0".."9" answer as ints, as clients compare them with digits; other labels as given."""
    return int(label) if label.isascii() and label.isdigit() else label


def json_body(body: dict[str, Any]) -> bytes:
    """An error body as compact JSON bytes, through json's C encoder."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
