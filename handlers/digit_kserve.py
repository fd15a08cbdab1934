"""KServe v1 requests and answers (the protocol of TorchServe's own KServe MNIST example), on the same handler.

TorchServe 0.12.0 routes `POST /v1/models/NAME:predict` and `:explain` to the handler with the raw body (its
frontend's `handleKFV1Predictions`, which writes `explain: True` for `:explain`), and KServe's model server in
front of TorchServe in a pod (the `kserve-torchserve` image's wrapper) may forward a v1 body to
`/predictions/NAME` or `/explanations/NAME` instead. Either way the body decides (`digit_oip.route`): a JSON object
with "instances" (and no "data") is a v1 request.

A request: `{"instances": [INSTANCE, ...]}`, 1 to MAX_DIGITS instances (MAX_EXPLAINED to explain), each an
object `{"data": BASE64_IMAGE or PIXELS}` (what /predictions takes as JSON, e.g. pytorch/serve's
`kubernetes/kserve/kf_request_json/v1/mnist.json`), a base64 image, or a list of pixels; the images' decoding
work is bounded per request, as OIP's (`digit_budget.RequestBudget`). To explain, an
instance may name the label to explain (`"target": 3`; default its predicted label) and the method
(`"method"`, one for the whole request). Answers: `{"predictions": [LABEL, ...]}`, and for `:explain`
`{"explanations": [...]}`, one object per instance (`digit_explanations.explanation_body`). A request that
cannot be read gets its 4xx and KServe's `{"error": "..."}`; an instance that cannot be read fails its
request, naming the instance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from digit_batch import label_value
from digit_errors import bad_request, prefixed, too_large
from digit_explanations import MAX_EXPLAINED, Ask
from digit_inputs import (
    charged_budget,
    decode_base64,
    decode_data_url,
    read_image,
    read_json,
    text_bytes,
    without_bom,
)

MAX_INSTANCES = 1024  # as OIP's MAX_DIGITS: TorchServe's max_request_size bounds the bytes first


@dataclass(frozen=True)
class V1Request:
    """One KServe v1 request, read."""

    digits: np.ndarray  # (N, H, W) float32 0..255, white on black, framed
    ask: Ask | None  # what :explain asks; None for :predict


def read_v1(body: Any, explain: bool, size: tuple[int, int]) -> V1Request:
    """Reads a v1 body's instances into digits, and what an explanation asks.

    Raises:
        RequestError: 400 for a body without a list of instances or an instance that is no digit (named by
            index), 413 past MAX_INSTANCES (MAX_EXPLAINED to explain), 415 for an instance that is no image.
    """
    instances = body.get("instances") if isinstance(body, Mapping) else None
    if not isinstance(instances, list) or not instances:
        raise bad_request(
            "BadRequest", 'a KServe v1 request is {"instances": [{"data": BASE64_PNG}, ...]} with at least one instance'
        )
    limit = MAX_EXPLAINED if explain else MAX_INSTANCES
    if len(instances) > limit:
        what = "explain" if explain else "classify"
        message = f"the request holds {len(instances)} instances; the limit is {limit} to {what} a request"
        raise too_large("TooManyInstances", message)
    ask = instance_ask(instances) if explain else None  # before decoding: a refusal costs nothing
    payloads = []
    for index, instance in enumerate(instances):
        with prefixed(f"instance {index}"):
            payloads.append(instance_payload(instance))
    # the images' decoding work bounded for the request as a whole, as OIP's BYTES (digit_budget.RequestBudget)
    budget = charged_budget(payloads, "instance")
    digits = np.empty((len(instances), *size), dtype=np.float32)
    for index, payload in enumerate(payloads):
        with prefixed(f"instance {index}"):
            if isinstance(payload, bytes):
                digits[index] = read_image(payload, size, encoded=True, budget=budget)
            else:
                digits[index] = read_json(payload, size)
    return V1Request(digits, ask)


def instance_payload(instance: Any) -> bytes | Any:
    """An instance's image file (from base64 text or a data URL), or its pixels as JSON for `read_json`."""
    data = instance.get("data") if isinstance(instance, Mapping) else instance
    if isinstance(instance, Mapping) and "data" not in instance:
        keys = ", ".join(repr(str(key))[:40] for key in list(instance)[:10])
        raise bad_request("BadJson", f'the instance has no "data" key (keys: {keys or "none"})')
    if not isinstance(data, str):
        return data  # pixels, or a wrong kind of value that read_json names
    text = without_bom(text_bytes(data)).strip()
    return decode_data_url(text) if text[:5].lower() == b"data:" else decode_base64(text)


def instance_ask(instances: list[Any]) -> Ask:
    """The request's method (one for all instances) and each instance's target (None: its predicted label)."""
    fields = [instance if isinstance(instance, Mapping) else {} for instance in instances]
    methods = {json.dumps(f["method"], sort_keys=True) for f in fields if "method" in f}
    if len(methods) > 1:
        raise bad_request("BadMethod", f"instances name {len(methods)} methods; one request explains with one method")
    method = next((f["method"] for f in fields if "method" in f), None)
    targets = [f.get("target") for f in fields]
    return Ask(method, None if all(t is None for t in targets) else targets)


def predictions_body(probabilities: np.ndarray, labels: tuple[str, ...]) -> bytes:
    """`{"predictions": [LABEL, ...]}`, the most probable label of each instance."""
    return json.dumps({"predictions": [label_value(labels[i]) for i in probabilities.argmax(axis=1)]}).encode()


def explanations_body(bodies: list[bytes]) -> bytes:
    """`{"explanations": [...]}` from each instance's explanation object."""
    return b'{"explanations":[' + b",".join(bodies) + b"]}"
