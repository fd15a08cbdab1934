"""Open Inference Protocol (OIP, "KServe v2") requests and answers, on the same handler as /predictions.

How TorchServe 0.12.0 hands them over: `POST /v2/models/NAME/infer` goes to the model's handler with the
raw body as the parameter "body" (frontend `InferenceRequestHandler.handleKFV2Predictions`), like
/predictions. Which protocol a request speaks is decided by its body (`route`): an object with "inputs" is
OIP wherever it was sent (TorchServe's OIP gRPC `ModelInfer` sets no headers at all), a KServe v1 body
(`{"instances": [...]}`) is read by digit_kserve.py, anything else is a /predictions request, except that a
body of neither kind sent to a KServe route gets OIP's error. /explanations and KServe's explain routes
(`/v2/models/NAME/explain`, `/v1/models/NAME:explain`) come with `explain: True`, written by the frontend
after the client's headers: the request asks for explanations (digit_explanations.py; on the OIP explain
route, the output "attributions" is added). No header a client can set changes how another request is read,
nor how its own OIP body is (see `route`).
TorchServe's `kservev2` envelope (TS_SERVICE_ENVELOPE) is not used: it reads only request 0 of a batch; the
bundle keeps it off.

A request: one input tensor, any name:
  - UINT8 or FP32 pixel intensities 0..255, white digit on black, shape [N,H,W], [N,1,H,W] or [N,H*W];
    an FP32 tensor whose values all lie in [0, 1] is read as scaled 0..1 (x 255); a tensor with any blank
    digit (no ink by /predictions' rule, `digit_imaging.require_ink`) is refused NoDigit, naming it by index;
  - BYTES, shape [N] (or [-1]: as many as sent), each element an encoded image (base64 in JSON; raw or
    base64 bytes in the binary extension), framed as /predictions frames images.
JSON `data` (flat or nested) or the binary tensor data extension (`Inference-Header-Content-Length`,
`binary_data_size`, `binary_data`/`binary_data_output`), for inputs and outputs alike. Outputs:
"probabilities" FP32 [N,classes], "label" INT64 [N], and, only when `outputs` names them, "framed" UINT8
[N,H,W], the digits as the model saw them, and "attributions" FP32 [N,H,W], their explanations (the request
parameters "method" and "target" choose). Every failure is a `RequestError`, answered `{"error": ...}`.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import itertools
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from digit_batch import Readings, content_types, label_value, read_batch, read_guarded
from digit_contract import OIP_DEFAULT_OUTPUTS, OIP_OUTPUTS, TORCHSERVE_MAX_RESPONSE
from digit_errors import RequestError, bad_request, prefixed, too_large
from digit_explanations import MAX_EXPLAINED, Ask, ask_from_fields
from digit_imaging import require_ink, to_uint8
from digit_inputs import (
    MAX_BODY_BYTES,
    charged_budget,
    decode_base64,
    parse_json,
    read_image,
    sniff_format,
    text_bytes,
)
from digit_json import decoded_as_worker, parameter_types
from digit_kserve import V1Request, read_v1
from digit_model import DigitMeta

MAX_DIGITS = 1024  # digits in one request; TorchServe's max_request_size bounds the bytes first
OUTPUTS = tuple(OIP_OUTPUTS)  # name -> datatype in the contract
DEFAULT_OUTPUTS = OIP_DEFAULT_OUTPUTS
ATTRIBUTIONS = "attributions"  # the output that asks for explanations (digit_explanations.py)
DATATYPES = ("UINT8", "FP32", "BYTES")
HEADER_LENGTH = "inference-header-content-length"
PREDICTIONS, OIP_V2, KSERVE_V1 = "predictions", "oip", "kserve-v1"  # the protocols `route` tells apart
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class OipRequest:
    """One OIP request, read."""

    id: str | None
    digits: np.ndarray  # (N, H, W) float32 0..255, white on black, framed
    outputs: dict[str, bool]  # output name -> sent in the binary extension
    ask: Ask | None = None  # what the `attributions` output asks to explain; None when not requested


@dataclass(frozen=True)
class OipBatch:
    """The KServe requests of a TorchServe batch (OIP and v1): which they are, and where each read one's rows
    lie; and every request's explanation ask, whatever its protocol."""

    indices: frozenset[int]  # request indices that came in as OIP or KServe v1, read or refused
    read: dict[int, OipRequest | V1Request]
    rows: dict[int, slice]  # request index -> its rows in the batch's digits
    protocols: dict[int, str] = field(default_factory=dict)  # request index -> OIP_V2 or KSERVE_V1
    asks: dict[int, Ask] = field(default_factory=dict)  # request index -> what it asks to explain, if anything


def read_requests(
    data: list[Any], context: Any, meta: DigitMeta, response_limit: int = TORCHSERVE_MAX_RESPONSE
) -> tuple[Readings, OipBatch]:
    """Reads /predictions requests as `read_batch` does and OIP requests here; each row names its request.

    Each request is routed once (`route`), its body parsed at most once: a /predictions body that `route`
    parsed goes on parsed, and one it could not parse is refused with the error the /predictions reader gives.
    """
    headers = [headers_of(context, index) for index in range(len(data))]
    data = [as_received(row, headers[index], context, index) for index, row in enumerate(data)]
    routes = [guarded_route(row, headers[index], index, len(data)) for index, row in enumerate(data)]
    indices = [index for index, routed in enumerate(routes) if routed.protocol != PREDICTIONS]
    refused = {index: r.problem for index, r in enumerate(routes) if r.protocol == PREDICTIONS and r.problem}
    types = content_types(context, len(data))
    plain_indices = [index for index, r in enumerate(routes) if r.protocol == PREDICTIONS and not r.problem]
    plain_rows = [plain_row(data[index], routes[index]) for index in plain_indices]
    plain = read_batch(plain_rows, meta, [types[index] for index in plain_indices])
    asks = {index: ask_from_fields(data[index], routes[index].body) for index in plain_indices if routes[index].explain}
    if len(plain_indices) == len(data):
        return plain, OipBatch(frozenset(), {}, {}, asks=asks)
    digits = list(plain.digits)
    rows = [plain_indices[position] for position in plain.rows]
    errors = {plain_indices[position]: error for position, error in plain.errors.items()}
    for index, problem in refused.items():  # logged as any refusal is
        errors[index] = read_guarded(functools.partial(raise_error, problem), index, len(data))
    read, spans = {}, {}
    frame = AnswerFrame(model_identity(context), meta.labels, response_limit)
    for index in indices:
        if routes[index].protocol == KSERVE_V1:
            reader = functools.partial(read_kserve_v1, routes[index], meta.size)
        else:
            reader = functools.partial(read_oip, routes[index], meta.size, frame)
        request = read_guarded(reader, index, len(data))
        if isinstance(request, RequestError):
            errors[index] = request
            continue
        read[index] = request
        if request.ask is not None:
            asks[index] = request.ask
        spans[index] = slice(len(rows), len(rows) + len(request.digits))
        digits.extend(request.digits)  # (H, W) views, as read_batch gives
        rows.extend([index] * len(request.digits))
    protocols = {index: routes[index].protocol for index in indices}
    return Readings(len(data), rows, digits, errors), OipBatch(frozenset(indices), read, spans, protocols, asks)


def headers_of(context: Any, index: int) -> dict[str, str]:
    """Request `index`'s headers as the frontend passed them: names as spelled (its map is case-sensitive)."""
    return {str(k): v for k, v in request_properties(context, index).items() if isinstance(v, str)}


def request_properties(context: Any, index: int) -> Mapping[str, Any]:
    """Request `index`'s headers (strings) and its parameters' content types (dicts), as ts/service.py keeps them."""
    processors = getattr(context, "request_processor", None)
    if not processors or index >= len(processors) or processors[index] is None:
        return {}
    return processors[index].get_request_properties()


def as_received(row: Any, headers: Mapping[str, str], context: Any, index: int) -> Any:
    """The row as this reader expects it, the worker's own JSON decoding being off (digit_json.py): the raw
    bytes for a request that came through a KServe route, what the worker would have made of it otherwise."""
    if kserve_route(headers):
        return row
    return decoded_as_worker(row, parameter_types(request_properties(context, index)))


def kserve_route(headers: Mapping[str, str]) -> bool:
    """Whether the frontend marked the request as sent to a KServe route: `explain` and no `url_path` (see `route`)."""
    return "explain" in headers and "url_path" not in headers


@dataclass(frozen=True)
class Route:
    """How one request is read (`route`): its protocol, whether it asks for an explanation, its body parsed."""

    protocol: str  # PREDICTIONS, OIP_V2 or KSERVE_V1
    explain: bool  # the frontend's own `explain: True`: /explanations and KServe's explain routes
    body: Any = None  # the JSON body, when `route` parsed it (or the frontend did); None otherwise
    binary: bytes = b""  # the binary tensor data extension's bytes, after its JSON part
    problem: RequestError | None = None  # a body that cannot be read: the request's own 4xx, in its protocol


def route(row: Any, headers: Mapping[str, str]) -> Route:
    """Decides how a request is read, from its body and only from headers a client cannot forge.

    The protocol is the body's: a JSON object with "inputs" (as a JSON body, or as the binary extension's
    JSON part) is an OIP (v2) request; one with "instances" and no "data" a KServe v1 request; anything else
    a /predictions request. A body of neither kind that came through a KServe route is answered as OIP (its
    error names what OIP expects). What the frontend says, and how a client could say it too (TorchServe
    0.12.0's InferenceRequestHandler copies the client's headers into a case-sensitive map, then writes its
    own): a KServe route is one where the frontend wrote `explain` and no `url_path` (/predictions always
    writes `url_path`; a client that adds one to its KServe request only changes how its own odd body is
    read). An explanation is asked by the exact-case `explain` header alone, which the frontend writes last on
    /predictions, /explanations and the KServe routes (a client's `Explain` is another key, and its `explain`
    is overwritten); on /invocations, /models/NAME/invoke and /NAME/predict the frontend writes none, so there
    a client's `explain` header changes its own request only.
    """
    explain = headers.get("explain", "").strip().lower() == "true"
    kserve = kserve_route(headers)
    extension = any(name.lower() == HEADER_LENGTH for name in headers)
    try:
        body, binary = parse_body(row, headers, kserve)
    except RequestError as err:
        return Route(OIP_V2 if kserve or extension else PREDICTIONS, explain, problem=err)
    return Route(body_protocol(body) or (OIP_V2 if kserve else PREDICTIONS), explain, body, binary)


def guarded_route(row: Any, headers: Mapping[str, str], index: int, count: int) -> Route:
    """`route` inside the per-request boundary: what it did not foresee is this request's own 500."""
    routed = read_guarded(functools.partial(route, row, headers), index, count)
    return Route(PREDICTIONS, False, problem=routed) if isinstance(routed, RequestError) else routed


def raise_error(error: RequestError) -> None:
    raise error


def body_protocol(body: Any) -> str | None:
    """OIP_V2 or KSERVE_V1 for the JSON objects of those protocols; None for any other body."""
    if not isinstance(body, Mapping):
        return None
    if "inputs" in body:
        return OIP_V2
    if "instances" in body and "data" not in body:
        return KSERVE_V1
    return None


def parse_body(row: Any, headers: Mapping[str, str], kserve: bool) -> tuple[Any, bytes]:
    """The request's JSON body, parsed, and the bytes of its binary tensor data (empty without the extension).

    Only a body that may be an OIP or v1 object is parsed: one in the binary extension, one that came through
    a KServe route, or bytes that start as a JSON object; anything else comes back None, for the /predictions
    reader (which reads a form field "data" before the body).

    Raises:
        RequestError: 400 for a malformed Inference-Header-Content-Length or JSON; 413 past MAX_BODY_BYTES.
    """
    body = row.get("body") if isinstance(row, Mapping) else None
    length = binary_header(headers)
    if body is None or (not kserve and "data" in row):
        return None, b""
    if not isinstance(body, (bytes, bytearray, str)):  # JSON the frontend parsed (application/json): no binary part
        if length is not None:
            header_length(length)  # still a client's mistake to name
        return body, b""
    payload = text_bytes(body) if isinstance(body, str) else bytes(body)
    if length is not None:
        split = header_length(length, len(payload))
        return parse_json_part(payload[:split]), payload[split:]
    if kserve:
        return parse_json_part(payload), b""
    # what the /predictions reader would parse (digit_inputs.read_bytes), the same text, so the same answer
    text = (payload[len(codecs.BOM_UTF8) :] if payload.startswith(codecs.BOM_UTF8) else payload).strip()
    if text[:1] == b"{" and len(payload) <= MAX_BODY_BYTES:
        return parse_json(text), b""
    return None, b""


def binary_header(headers: Mapping[str, str]) -> str | None:
    """The Inference-Header-Content-Length header in any spelling (the client's own header)."""
    values = {value for name, value in headers.items() if name.lower() == HEADER_LENGTH}
    if len(values) > 1:
        raise bad_request("BadHeader", "Inference-Header-Content-Length is sent twice with different values")
    return next(iter(values), None)


def header_length(value: str, body_size: int | None = None) -> int:
    """The JSON part's length from Inference-Header-Content-Length: ASCII digits, at most the body's size.

    `str.isdigit` alone admits other scripts' digits and superscripts ("²"), which `int` then rejects.
    """
    digits = value.strip()
    bound = MAX_BODY_BYTES if body_size is None else body_size
    if not (digits.isascii() and digits.isdigit()) or len(digits) > len(str(bound)) or int(digits) > bound:
        raise bad_request(
            "BadHeader",
            f"Inference-Header-Content-Length is {ascii(value[:40])}: it must be the length in bytes of the "
            f"request's JSON part, in ASCII digits, at most the body's {bound} bytes",
        )
    return int(digits)


def parse_json_part(text: bytes) -> Any:
    """JSON text of an OIP request (or of a /predictions JSON object), size-checked, parsed once."""
    if len(text) > MAX_BODY_BYTES:
        raise too_large("BodyTooLarge", f"the JSON part is {len(text)} bytes; the limit is {MAX_BODY_BYTES}")
    return parse_json(text)


def plain_row(row: Any, routed: Route) -> Any:
    """A /predictions request's row for `read_batch`, its body replaced by the JSON `route` parsed from it."""
    if routed.body is None or row.get("body") is routed.body:
        return row
    return {**row, "body": routed.body}


def read_oip(routed: Route, size: tuple[int, int], frame: AnswerFrame) -> OipRequest:
    """Reads one routed OIP inference request into its digits, the outputs it asks for and, when one of them
    is `attributions` (always on the route /v2/models/NAME/explain), what it asks to explain.

    Raises:
        RequestError: 400 for a malformed request (a KServe v1 one included) or a blank digit, 413 past
            MAX_DIGITS (MAX_EXPLAINED with attributions) or when its answer could exceed `frame.limit`
            (`check_answer_size`), 415 for an element that is no image.
    """
    if routed.problem is not None:
        raise routed.problem
    envelope = oip_envelope(routed.body)
    tensor = single_input(envelope)
    request, outputs = request_id(envelope), requested_outputs(envelope)  # the envelope before the pixels
    ask = None
    if routed.explain and ATTRIBUTIONS not in outputs:
        outputs[ATTRIBUTIONS] = binary_default(envelope)
    if ATTRIBUTIONS in outputs:
        ask = explanation_ask(envelope)
        check_explained_count(tensor["shape"][0])
    read = OipRequest(request, read_tensor(tensor, routed.binary, size), outputs, ask)
    check_answer_size(read, frame)
    return read


def explanation_ask(envelope: Mapping[str, Any]) -> Ask:
    """The request parameters `method` and `target` (digit_explanations.py checks them against the model)."""
    parameters = envelope.get("parameters")
    parameters = parameters if isinstance(parameters, Mapping) else {}
    return Ask(parameters.get("method"), parameters.get("target"))


def check_explained_count(digits: int) -> None:
    """Refuses before decoding a tensor that declares more digits than a request may explain ([-1]: counted
    after decoding, by digit_explanations.resolve)."""
    if digits > MAX_EXPLAINED:
        raise too_large(
            "TooManyToExplain",
            f"the request asks attributions of {digits} digits; the limit is {MAX_EXPLAINED} a request: send them "
            f"in requests of at most {MAX_EXPLAINED}, or ask attributions of fewer",
        )


def read_kserve_v1(routed: Route, size: tuple[int, int]) -> V1Request:
    """Reads one routed KServe v1 request (digit_kserve.py)."""
    if routed.problem is not None:
        raise routed.problem
    return read_v1(routed.body, routed.explain, size)


def oip_envelope(body: Any) -> dict[str, Any]:
    """The request's JSON object; anything else is named."""
    if body is None:
        raise bad_request("BadRequest", "an OIP request needs a JSON body (no form fields); see the KServe v2 API")
    if not isinstance(body, Mapping):
        kind = type(body).__name__
        raise bad_request("BadRequest", f'an OIP request is a JSON object {{"inputs": [...]}}, got {kind}')
    return dict(body)


def single_input(envelope: Mapping[str, Any]) -> Mapping[str, Any]:
    """The request's one input tensor, checked for the fields every tensor has."""
    inputs = envelope.get("inputs")
    if inputs is None and "instances" in envelope:
        raise bad_request(
            "KServeV1",
            'this is a KServe v1 request ({"instances": [...]}), which digits does not speak: send an Open '
            'Inference Protocol (v2) request {"inputs": [...]} to /v2/models/NAME/infer, or an image or '
            '{"data": pixels} to /predictions/NAME',
        )
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        got = f"{len(inputs)} inputs" if isinstance(inputs, list) else f"'inputs' {type(inputs).__name__}"
        raise bad_request("BadRequest", f"send exactly one input tensor in 'inputs' (any name); got {got}")
    tensor = inputs[0]
    if tensor.get("datatype") not in DATATYPES:
        raise bad_request(
            "BadDatatype", f"input datatype is {str(tensor.get('datatype'))[:40]!r}; send one of {', '.join(DATATYPES)}"
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or any(type(dim) is not int for dim in shape):
        raise bad_request("BadShape", f"input shape must be a list of integers, got {str(shape)[:80]}")
    return tensor


def read_tensor(tensor: Mapping[str, Any], binary: bytes, size: tuple[int, int]) -> np.ndarray:
    """The input's digits as (N, H, W) float32 0..255.

    Raises:
        RequestError: as `read_oip`; 400 NoDigit naming the first blank digit by index (the rule of
            /predictions, `require_ink`, all digits at once).
    """
    parameters = tensor.get("parameters") or {}
    binary_size = parameters.get("binary_data_size") if isinstance(parameters, Mapping) else None
    if binary_size is not None:
        if type(binary_size) is not int or binary_size != len(binary):
            raise bad_request(
                "BadBinaryData", f"binary_data_size is {binary_size!r} but {len(binary)} bytes follow the JSON header"
            )
    elif "data" not in tensor:
        raise bad_request("MissingData", "the input has neither 'data' nor a binary_data_size parameter")
    if tensor["datatype"] == "BYTES":
        elements = split_bytes(binary) if binary_size is not None else json_elements(tensor["data"])
        return read_images(elements, tensor["shape"], size)
    count = pixel_tensor_count(tensor["shape"], size)
    if binary_size is not None:
        values = binary_pixels(binary, tensor["datatype"], count)
    else:
        values = json_pixels(tensor["data"], tensor["datatype"], count)
    digits = intensities(values, tensor["datatype"]).reshape(-1, *size)
    # uint8 values (binary UINT8) are the same levels in a quarter of the bytes: half the time to check
    require_ink(values.reshape(digits.shape) if values.dtype == np.uint8 else digits)
    return digits


def pixel_tensor_count(shape: list[int], size: tuple[int, int]) -> int:
    """Elements of a [N,H,W], [N,1,H,W] or [N,H*W] tensor, N checked."""
    height, width = size
    accepted = ([height, width], [1, height, width], [height * width])
    if shape[1:] not in accepted or shape[0] < 1:
        raise bad_request(
            "BadShape",
            f"input shape is {shape[:6]}; send [N,{height},{width}], [N,1,{height},{width}] or [N,{height * width}] "
            "with N >= 1",
        )
    check_count(shape[0])
    return shape[0] * height * width


def check_count(digits: int) -> None:
    if digits > MAX_DIGITS:
        raise too_large("TooManyDigits", f"the request holds {digits} digits; the limit is {MAX_DIGITS} a request")


def binary_pixels(binary: bytes, datatype: str, count: int) -> np.ndarray:
    """UINT8 or little-endian FP32 values from the binary extension, as many as the shape says."""
    dtype = np.dtype(np.uint8) if datatype == "UINT8" else np.dtype("<f4")
    if len(binary) != count * dtype.itemsize:
        raise bad_request(
            "ElementCount",
            f"the shape holds {count} {datatype} elements ({count * dtype.itemsize} bytes); {len(binary)} bytes came",
        )
    return np.frombuffer(binary, dtype=dtype)


def json_pixels(data: Any, datatype: str, count: int) -> np.ndarray:
    """JSON `data`, flat or nested, as numbers: integers for UINT8, numbers for FP32."""
    if not isinstance(data, list):
        raise bad_request("BadData", f"input 'data' must be a JSON list, got {type(data).__name__}")
    levels = uint8_levels(data, count) if datatype == "UINT8" else None
    return levels if levels is not None else any_json_pixels(data, datatype, count)


def uint8_levels(data: list, count: int) -> np.ndarray | None:
    """UINT8 `data` as uint8 levels read in C, or None where `any_json_pixels` must decide.

    `bytes()` reads a flat list of integers 0..255 without a Python loop per value and refuses anything else;
    nested lists are flattened level by level, all lists of a level of one length (regular, as np.asarray
    wants them). This is `any_json_pixels`' result for the requests clients send, in a fraction of its time
    (np.asarray inspects every value's type first). Anything else goes the general way, which names the
    problem as before: another type, a value out of range, ragged lists, the wrong count, and data whose
    levels are all 0 or 1 (which np.asarray reads as booleans when JSON sent true and false).
    """
    level = data
    try:
        while level and isinstance(level[0], list):
            if len(set(map(len, level))) != 1:
                return None
            level = list(itertools.chain.from_iterable(level))
        levels = np.frombuffer(bytes(level), dtype=np.uint8)
    except (TypeError, ValueError):
        return None
    return levels if levels.size == count and levels.max() > 1 else None


def any_json_pixels(data: list, datatype: str, count: int) -> np.ndarray:
    """JSON `data` of any shape and type, checked: integers for UINT8, numbers for FP32."""
    try:
        values = np.asarray(data)
    except (ValueError, OverflowError):
        raise bad_request("BadData", "input 'data' is ragged: nested lists of unequal lengths") from None
    kinds = "iu" if datatype == "UINT8" else "iuf"
    if values.dtype.kind not in kinds:
        what = "integers" if datatype == "UINT8" else "numbers"
        raise bad_request("BadData", f"{datatype} input 'data' must hold only {what}; found {values.dtype.name} values")
    if values.size != count:
        raise bad_request("ElementCount", f"the shape holds {count} elements; 'data' has {values.size}")
    return values.reshape(-1)


def intensities(values: np.ndarray, datatype: str) -> np.ndarray:
    """Checked 0..255 intensities as float32; an FP32 tensor all within [0, 1] is read as scaled 0..1."""
    if datatype == "UINT8":
        if values.dtype != np.uint8 and (values.min() < 0 or values.max() > 255):
            raise bad_request("BadPixels", f"UINT8 values must be 0..255; found {values.min()}..{values.max()}")
        return values.astype(np.float32)
    pixels = values.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise bad_request("BadPixels", "FP32 values must be finite; found NaN or infinity")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 255:
        raise bad_request("BadPixels", f"FP32 values must be intensities 0..255 (or 0..1); found {low:g}..{high:g}")
    return pixels * np.float32(255) if high <= 1 else pixels


def json_elements(data: Any) -> list[str]:
    """BYTES elements of JSON `data`: strings (base64-encoded images)."""
    if not isinstance(data, list) or not all(isinstance(element, str) for element in data):
        raise bad_request("BadData", "BYTES input 'data' must be a JSON list of strings, each a base64-encoded image")
    return data


def split_bytes(binary: bytes) -> list[bytes]:
    """BYTES elements of the binary extension: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise bad_request("BadBinaryData", f"BYTES data ends inside the length of element {len(elements)}")
        (length,) = struct.unpack_from("<I", binary, offset)
        if offset + 4 + length > len(binary):
            raise bad_request("BadBinaryData", f"BYTES element {len(elements)} claims {length} bytes past the end")
        elements.append(binary[offset + 4 : offset + 4 + length])
        offset += 4 + length
        check_count(len(elements))
    return elements


def read_images(elements: list[str] | list[bytes], shape: list[int], size: tuple[int, int]) -> np.ndarray:
    """Decodes and frames each encoded image; shape [N] (or [-1]) must match the elements sent.

    The request's decoding work is bounded as a whole, not image by image: every image is measured from its
    bytes and header (`image_work`) and charged to the request's budget before any is decoded.
    """
    if len(shape) != 1 or shape[0] not in (-1, len(elements)):
        raise bad_request(
            "BadShape", f"BYTES input shape is {shape[:6]} for {len(elements)} elements; send [N] (or [-1])"
        )
    if not elements:
        raise bad_request("ElementCount", "the BYTES input holds no elements; send at least one image")
    check_count(len(elements))
    payloads = [element_image(index, element) for index, element in enumerate(elements)]
    budget = charged_budget([payload for payload, _ in payloads], "BYTES element")
    digits = np.empty((len(elements), *size), dtype=np.float32)
    for index, (payload, encoded) in enumerate(payloads):
        with named_element(index):
            digits[index] = read_image(payload, size, encoded=encoded, budget=budget)
    return digits


def named_element(index: int) -> contextlib.AbstractContextManager[None]:
    """Prefixes a RequestError raised for one element with the element's index."""
    return prefixed(f"BYTES element {index}")


def element_image(index: int, element: str | bytes) -> tuple[bytes, bool]:
    """One element's image file, and whether it came out of base64: raw image or base64 bytes (binary
    extension), or base64 text (JSON)."""
    if isinstance(element, bytes) and sniff_format(element) is not None:
        return element, False
    text = element.encode("utf-8") if isinstance(element, str) else element
    with named_element(index):
        return decode_base64(text.strip()), True


def request_id(envelope: Mapping[str, Any]) -> str | None:
    value = envelope.get("id")
    if value is not None and not isinstance(value, str):
        raise bad_request("BadRequest", f"the request's 'id' must be a string, got {type(value).__name__}")
    return value


def requested_outputs(envelope: Mapping[str, Any]) -> dict[str, bool]:
    """Output name -> binary, from `outputs` (default: probabilities and label) and `binary_data_output`."""
    binary = binary_default(envelope)
    asked = envelope.get("outputs")
    if asked is None:
        return dict.fromkeys(DEFAULT_OUTPUTS, binary)
    if not isinstance(asked, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in asked):
        raise bad_request("BadRequest", "request 'outputs' must be a list of {\"name\": ...} objects")
    outputs = {}
    for output in asked:
        if output["name"] not in OUTPUTS:
            raise bad_request(
                "UnknownOutput", f"unknown output {output['name'][:40]!r}; this model has {', '.join(OUTPUTS)}"
            )
        options = output.get("parameters") or {}
        binary_out = options.get("binary_data", binary) if isinstance(options, Mapping) else binary
        outputs[output["name"]] = binary_out is True
    return outputs


def binary_default(envelope: Mapping[str, Any]) -> bool:
    """The request parameter `binary_data_output`: whether outputs go binary unless they say otherwise."""
    parameters = envelope.get("parameters") or {}
    return bool(isinstance(parameters, Mapping) and parameters.get("binary_data_output") is True)


@dataclass(frozen=True)
class AnswerFrame:
    """What each OIP answer of a model holds besides its outputs, and the most bytes an answer may take."""

    model: tuple[str, str]  # (model_name, model_version), as `answer` writes them
    labels: tuple[str, ...]  # the archive's labels: the classes of "probabilities", the values of "label"
    limit: int  # TorchServe's max_response_size (digit_handler.response_limit)


# The widest JSON text `answer` writes for one value, its comma included: a probability by "{:.7g}"
# ("4.940656e-324") and an 8-bit level; the fixed text of one output's entry, name to shape and parameters
FLOAT_TEXT, LEVEL_TEXT, OUTPUT_ENTRY = 14, 4, 192
ATTRIBUTION_PARAMETERS = 256  # the attributions' own parameters: the method, its settings, the target


def answer_bound(request: OipRequest, frame: AnswerFrame) -> tuple[int, dict[str, int]]:
    """An upper bound of the bytes `answer` writes for `request`, and its parts ("id" and each output's data).

    TorchServe 0.12.0's frontend reads a worker's reply with a length before each part; any length over
    max_response_size (CodecUtils.readLength, ModelResponseDecoder) throws, the frontend drops the connection
    and the worker dies with its whole batch. The limit holds for each request's body on its own, so each is
    bounded here, from what the request asked for, before any answer is built.
    """
    count, pixels = len(request.digits), int(np.prod(request.digits.shape[1:]))
    label_text = max(len(str(value)) for value in label_ids(frame.labels).tolist()) + 1
    widths = {
        "probabilities": (len(frame.labels), 4, FLOAT_TEXT),
        "label": (1, 8, label_text),
        "framed": (pixels, 1, LEVEL_TEXT),
        ATTRIBUTIONS: (pixels, 4, FLOAT_TEXT),
    }
    head = {"model_name": frame.model[0], "model_version": frame.model[1]}
    parts = {"id": len(json.dumps(request.id)) if request.id is not None else 0}
    for name, binary in request.outputs.items():
        per_digit, itemsize, text = widths[name]
        parts[name] = OUTPUT_ENTRY + count * per_digit * (itemsize if binary else text)
    if ATTRIBUTIONS in request.outputs:
        parts[ATTRIBUTIONS] += ATTRIBUTION_PARAMETERS
    return len(json.dumps(head)) + len(',"id":,"outputs":[]}') + sum(parts.values()), parts


def check_answer_size(request: OipRequest, frame: AnswerFrame) -> None:
    """Refuses, as this request's 413 AnswerTooLarge, a request whose answer could exceed `frame.limit`.

    Nothing is cut: an id echoed in part would no longer identify its request, and a client that asked for
    N digits' outputs must get all of them or none; the message says what to ask for instead.
    """
    bound, parts = answer_bound(request, frame)
    if bound <= frame.limit:
        return
    advice = []
    if parts["id"] > frame.limit // 4:
        advice.append(f"a shorter id (its JSON text takes {parts['id']:,} bytes; non-ASCII characters take 6 each)")
    if request.outputs.get("framed") is False:
        advice.append("'framed' in binary (its output parameter binary_data) or not at all")
    advice.append(f"fewer digits a request (this one holds {len(request.digits)})")
    raise too_large(
        "AnswerTooLarge",
        f"the answer could take {bound:,} bytes, over the {frame.limit:,} bytes TorchServe carries in one answer "
        f"(its max_response_size); ask for {', or '.join(advice)}",
    )


def answer(
    request: OipRequest,
    probabilities: np.ndarray,
    labels: tuple[str, ...],
    model: tuple[str, str],
    attributions: tuple[np.ndarray, Mapping[str, Any]] | None = None,
) -> tuple[bytes, int | None]:
    """The response body for one read request, and the JSON part's length when outputs go binary.

    Args:
        probabilities: (N, classes) for the request's digits.
        labels: the archive's labels, class index -> label.
        model: (model_name, model_version).
        attributions: the request's explanations, when it asked for them: (N, H, W) float32 maps and the
            output's parameters (the method, its settings, the target).
    """
    tensors = output_tensors(request, probabilities, labels)
    parameters: dict[str, Mapping[str, Any]] = {}
    if attributions is not None:
        tensors[ATTRIBUTIONS] = (OIP_OUTPUTS[ATTRIBUTIONS], attributions[0].astype(np.float32), join_floats)
        parameters[ATTRIBUTIONS] = attributions[1]
    head = {"model_name": model[0], "model_version": model[1]}
    if request.id is not None:
        head["id"] = request.id
    described, binary = [], []
    for name, binary_out in request.outputs.items():
        datatype, values, text = tensors[name]
        entry = f'{{"name":"{name}","datatype":"{datatype}","shape":{json.dumps(list(values.shape))}'
        extra = parameters.get(name, {})
        if binary_out:
            data = values.astype(values.dtype.newbyteorder("<")).tobytes()
            binary.append(data)
            described.append(f'{entry},"parameters":{json.dumps({**extra, "binary_data_size": len(data)})}}}')
        elif extra:
            described.append(f'{entry},"parameters":{json.dumps(extra)},"data":[{text(values)}]}}')
        else:
            described.append(f'{entry},"data":[{text(values)}]}}')
    header = (json.dumps(head, separators=(",", ":"))[:-1] + ',"outputs":[' + ",".join(described) + "]}").encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)


def output_tensors(request: OipRequest, probabilities: np.ndarray, labels: tuple[str, ...]) -> dict[str, tuple]:
    """Output name -> (datatype, values, JSON text of the values), computed only when asked for (attributions
    come from `answer`'s caller)."""
    tensors: dict[str, tuple] = {}
    if "probabilities" in request.outputs:
        tensors["probabilities"] = (OIP_OUTPUTS["probabilities"], probabilities.astype(np.float32), join_floats)
    if "label" in request.outputs:
        tensors["label"] = (OIP_OUTPUTS["label"], label_ids(labels)[probabilities.argmax(axis=1)], join_ints)
    if "framed" in request.outputs:
        tensors["framed"] = (OIP_OUTPUTS["framed"], to_uint8(request.digits), join_ints)
    return tensors


def label_ids(labels: tuple[str, ...]) -> np.ndarray:
    """Class index -> INT64 label: the label itself for labels "0".."9" (MNIST's), else the class index."""
    values = [label_value(label) for label in labels]
    if all(isinstance(value, int) and abs(value) < 2**63 for value in values):
        return np.asarray(values, dtype=np.int64)
    return np.arange(len(labels), dtype=np.int64)


def join_floats(values: np.ndarray) -> str:
    # 7 significant digits: what float32 carries; the shortest repr of a float32 as a double is 17. One
    # %-format over all of them, as digit_batch.prediction_bodies does, saves a call per number
    return float_template(values.size) % tuple(values.reshape(-1).tolist())


@functools.lru_cache(maxsize=8)
def float_template(count: int) -> str:
    """`count` placeholders for 7 significant digits, comma-separated (answers are mostly of a few sizes)."""
    return ",".join(["%.7g"] * count)


def join_ints(values: np.ndarray) -> str:
    return ",".join(map(str, values.reshape(-1).tolist()))


def error_body(error: RequestError) -> bytes:
    """OIP's error object: `{"error": "..."}`."""
    return json.dumps({"error": error.message}, separators=(",", ":")).encode()


def model_identity(context: Any) -> tuple[str, str]:
    """(model_name, model_version) for answers: the frontend's name for the model and the archive's version."""
    manifest = getattr(context, "manifest", None) or {}
    version = (manifest.get("model") or {}).get("modelVersion") or "1.0"
    return str(context.model_name), str(version)
