"""Explanation requests: what each asks (method, target), checked against the model; a batch's explanations,
cheapest first within a time budget; the explanation fields of the answers.

Who asks (`digit_oip.read_requests` gathers an `Ask` per request):
  - `/explanations/MODEL` (the frontend's own `explain: True` on a /predictions body): image bytes, base64 or
    `{"data": ...}` as /predictions takes them; a method and a target as JSON keys beside "data", or as form
    fields beside the field "data": `method`, `target`;
  - the Open Inference Protocol: the output `attributions` requested (or the route /v2/models/NAME/explain),
    with the request parameters `method` and `target`;
  - KServe v1 `:explain`: each instance `{"data": ..., "target": LABEL}` may name its own target, and
    `method` (one method a request).
Every digit of a request is explained: a target names a label (by default the digit's predicted one) and the
map is that label's (`digit_explain.attribute`). A request may hold at most MAX_EXPLAINED digits to explain.

Bounded per batch too: the requests run cheapest first (the work `digit_explain.work` foretells), several
small ones of the same method together, and a `Deadline` of EXPLAIN_SHARE of the model's response timeout
is checked before every model call; the explanations it cuts off are refused 503, each alone, and the rest of
the batch is answered. So one costly explanation delays its neighbours by at most one model call past the
deadline and never fails one that ran before it, and the batch answers before TorchServe's response timeout.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from digit_batch import label_value
from digit_errors import RequestError, bad_request, too_large, unavailable, unexpected
from digit_explain import DEFAULT_METHODS, GROUP_DIGITS, METHODS, attribute, methods_for, work
from digit_imaging import to_uint8
from digit_model import DigitMeta, Predictor

logger = logging.getLogger(__name__)

MAX_EXPLAINED = 64  # digits one request may ask to explain
# Share of the model's response timeout that a batch's explanations may take, from the start of the batch:
# decoding, the forward pass and the answers take the rest, well within the other half
EXPLAIN_SHARE = 0.5
DEFAULT_RESPONSE_TIMEOUT = 120  # s: TorchServe's default_response_timeout, for an archive that names none
RESPONSE_TIMEOUT_KEY = "responseTimeout"  # model-config.yaml


@dataclass(frozen=True)
class Ask:
    """What one request asks to explain, as sent; checked against the model by `resolve`."""

    method: Any = None  # a method's name; None: the format's default
    # a label for every digit; or a list of one per digit (KServe v1 instances), None in it for the predicted
    # label; or None: each digit's predicted label
    target: Any = None


@dataclass(frozen=True)
class Explanation:
    """One request's explanations."""

    method: str
    settings: Mapping[str, int]
    targets: np.ndarray  # (N,) class indices explained
    maps: np.ndarray  # (N, H, W) float32


class ExplanationTimeout(Exception):
    """The batch's explanation time ran out before a model call (raised by `Deadline.guard`)."""


class Deadline:
    """The time a batch's explanations may take: `guard` refuses a model call once it has passed."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.end = clock() + seconds

    def guard(self, work: int) -> None:
        if self.clock() >= self.end:
            raise ExplanationTimeout(f"{work} rows left unrun")


def explain_seconds(model_yaml_config: Mapping[str, Any] | None) -> float:
    """EXPLAIN_SHARE of the model's response timeout (model-config.yaml), in seconds."""
    timeout = (model_yaml_config or {}).get(RESPONSE_TIMEOUT_KEY, DEFAULT_RESPONSE_TIMEOUT)
    if type(timeout) is not int or timeout < 1:
        timeout = DEFAULT_RESPONSE_TIMEOUT
    return EXPLAIN_SHARE * timeout


def ask_from_fields(row: Any, body: Any) -> Ask:
    """A /explanations request's method and target: form fields beside "data", else keys of its JSON object."""
    fields = row if isinstance(row, Mapping) else {}
    source = body if isinstance(body, Mapping) and not any(name in fields for name in ("method", "target")) else fields
    return Ask(source.get("method"), source.get("target"))


@dataclass(frozen=True)
class Planned:
    """A request whose explanation was checked: what it will cost, and how it is to run."""

    cost: int  # model rows (`digit_explain.work`)
    index: int  # the request's index in its batch
    method: str
    targets: np.ndarray  # (N,) class indices


@dataclass(frozen=True)
class Job:
    """One request to explain: its digits as the model takes them and the classes it predicted for them."""

    ask: Ask
    digits: torch.Tensor  # (N, 1, H, W) normalised
    predicted: np.ndarray  # (N,) class indices


def explain_jobs(
    jobs: Mapping[int, Job], predict: Predictor, meta: DigitMeta, deadline: Deadline
) -> dict[int, Explanation | RequestError]:
    """Each request's explanations, or its own error: 400 for a method or target the model does not offer,
    413 past MAX_EXPLAINED digits, 503 when the batch's time ran out first, 500 for a fault of this server."""
    results: dict[int, Explanation | RequestError] = {}
    planned = []
    for index, job in jobs.items():
        try:
            method, targets = resolve(job, predict, meta)
        except RequestError as err:
            logger.info("request %d: explanation refused: %d %s: %s", index, err.code, err.kind, err.message)
            results[index] = err
            continue
        planned.append(Planned(work(job.digits, method, mean=meta.mean, std=meta.std), index, method, targets))
    planned.sort(key=lambda plan: (plan.cost, plan.index))  # cheapest first, then in request order
    for group in rounds(planned, jobs):
        results.update(run_round(group, jobs, predict, meta, deadline))
    return results


def rounds(planned: list[Planned], jobs: Mapping[int, Job]) -> list[list[Planned]]:
    """Consecutive requests of one method, up to GROUP_DIGITS digits together, attributed in one call."""
    groups: list[list[Planned]] = []
    for plan in planned:
        last = groups[-1] if groups else None
        digits = len(jobs[plan.index].digits)
        if (
            last
            and last[0].method == plan.method
            and sum(len(jobs[p.index].digits) for p in last) + digits <= GROUP_DIGITS
        ):
            last.append(plan)
        else:
            groups.append([plan])
    return groups


def run_round(
    group: list[Planned], jobs: Mapping[int, Job], predict: Predictor, meta: DigitMeta, deadline: Deadline
) -> dict[int, Explanation | RequestError]:
    """One call of the engine for the round's requests; its failure is theirs alone."""
    indices = [plan.index for plan in group]
    method = group[0].method
    digits = torch.cat([jobs[index].digits for index in indices])
    targets = np.concatenate([plan.targets for plan in group])
    try:
        maps = attribute(predict, digits, targets, method, mean=meta.mean, std=meta.std, guard=deadline.guard)
        if not np.isfinite(maps).all():
            raise ValueError("the model's log-probabilities are not finite for some of these digits")
    except ExplanationTimeout:
        error = timed_out(deadline, method, predict)
        logger.info("requests %s: explanation refused: %d %s", indices, error.code, error.kind)
        return dict.fromkeys(indices, error)
    except Exception as err:  # noqa: BLE001 - one round's fault stays its requests'
        logger.exception("requests %s: unexpected %s while explaining them", indices, type(err).__name__)
        return dict.fromkeys(indices, failed(err))
    results: dict[int, Explanation | RequestError] = {}
    start = 0
    for plan in group:
        end = start + len(plan.targets)
        results[plan.index] = Explanation(method, METHODS[method].settings, plan.targets, maps[start:end])
        start = end
    return results


def failed(err: Exception) -> RequestError:
    """A round's own 500 (a 413 when it ran out of memory), said as explaining, not reading."""
    error = unexpected(err)
    message = error.message.replace("reading this request", "explaining this request")
    return RequestError(error.code, error.kind, message)


def timed_out(deadline: Deadline, method: str, predict: Predictor) -> RequestError:
    return unavailable(
        "ExplanationTimeout",
        f"this batch's explanations ran out of their {deadline.seconds:g} s (half the model's response timeout) "
        f"before this request's {method} was computed; retry, send fewer digits a request, or ask for a cheaper "
        f"method (this model offers {', '.join(methods_for(predict))})",
    )


def resolve(job: Job, predict: Predictor, meta: DigitMeta) -> tuple[str, np.ndarray]:
    """The method and the class index of each digit to explain, checked.

    Raises:
        RequestError: 400 naming the allowed values for an unknown method, one this format cannot run, or a
            target outside the labels; 413 past MAX_EXPLAINED digits.
    """
    count = len(job.digits)
    if count > MAX_EXPLAINED:
        raise too_large(
            "TooManyToExplain",
            f"the request asks to explain {count} digits; the limit is {MAX_EXPLAINED} a request: send them in "
            f"requests of at most {MAX_EXPLAINED}",
        )
    return check_method(job.ask.method, predict, meta), check_targets(job.ask.target, job.predicted, meta.labels)


def check_method(method: Any, predict: Predictor, meta: DigitMeta) -> str:
    offered = methods_for(predict)
    if method is None:
        return DEFAULT_METHODS[meta.format]
    name = as_text(method)
    if name in offered:
        return name
    allowed = f"this {meta.format} model offers {', '.join(offered)} (default {DEFAULT_METHODS[meta.format]})"
    if name in METHODS:
        needs = f"method {name!r} needs the model's gradients, which a {meta.format} file does not give"
        raise bad_request("MethodNotOffered", f"{needs}; {allowed}")
    raise bad_request("UnknownMethod", f"unknown method {shown(method)}; {allowed}")


def check_targets(target: Any, predicted: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
    """Class indices to explain: the predicted ones where no target is named."""
    if target is None:
        return predicted.astype(np.int64)
    if isinstance(target, list):
        if len(target) != len(predicted):
            raise bad_request("BadTarget", f"{len(target)} targets for {len(predicted)} digits; name one a digit")
        return np.asarray(
            [predicted[i] if t is None else class_index(t, labels) for i, t in enumerate(target)], dtype=np.int64
        )
    return np.full(len(predicted), class_index(target, labels), dtype=np.int64)


def class_index(target: Any, labels: tuple[str, ...]) -> int:
    """The class of a target label as sent: the label itself (7 or "7"), as the answers name it."""
    if type(target) is int or isinstance(target, (str, bytes, bytearray)):
        text = str(target) if type(target) is int else as_text(target).strip()
        if text in labels:
            return labels.index(text)
    raise bad_request(
        "BadTarget", f"target {shown(target)} is not a label of this model; the labels are {', '.join(labels)}"
    )


def as_text(value: Any) -> str:
    """A form field's value (bytes, or text) or a JSON string as text; anything else as its repr."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else repr(value)


def shown(value: Any) -> str:
    return ascii(as_text(value)[:40]) if isinstance(value, (str, bytes, bytearray)) else ascii(value)[:40]


def explanation_body(
    prediction: bytes,
    explanation: Explanation,
    position: int,
    framed: np.ndarray,
    labels: tuple[str, ...],
    model: tuple[str, str],
) -> bytes:
    """One digit's explanation object: its prediction body (`digit_batch.prediction_bodies`) with the label
    explained, the method, its settings, the model's name and version, the framed digit and the map.

    Args:
        prediction: the digit's `{"label", "confidence", "probabilities"}` body.
        position: the digit's row among the explanation's.
        framed: the digit as the model saw it, (H, W) 0..255.
        model: (model_name, model_version).
    """
    fields = {
        "target": label_value(labels[int(explanation.targets[position])]),
        "method": explanation.method,
        "settings": dict(explanation.settings),
        "model_name": model[0],
        "model_version": model[1],
    }
    described = json.dumps(fields, separators=(",", ":"))[1:-1]
    pixels = rows_text(to_uint8(framed), "%d")
    attributions = rows_text(explanation.maps[position], "%.7g")
    return b'%s,%s,"framed":%s,"attributions":%s}' % (
        prediction[:-1],
        described.encode(),
        pixels.encode(),
        attributions.encode(),
    )


def rows_text(values: np.ndarray, number: str) -> str:
    """An (H, W) array as JSON rows, each number %-formatted."""
    row = "[" + ",".join([number] * values.shape[1]) + "]"
    return "[" + ",".join(row % tuple(line) for line in values.tolist()) + "]"


def oip_parameters(explanation: Explanation, ask: Ask, labels: tuple[str, ...]) -> dict[str, Any]:
    """The `attributions` output's parameters (OIP parameters are scalars): the method, each setting, and the
    target: the label named, or "predicted" (each digit's `label` output)."""
    target = "predicted" if ask.target is None else label_value(labels[int(explanation.targets[0])])
    return {"method": explanation.method, **dict(explanation.settings), "target": target}
