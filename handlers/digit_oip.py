"""Open Inference Protocol (OIP, "KServe v2") requests and answers, on the same handler as /predictions.

How TorchServe 0.12.0 hands them over: `POST /v2/models/NAME/infer` goes to the model's handler with the
raw body as the parameter "body" (frontend `InferenceRequestHandler.handleKFV2Predictions`), like
/predictions, but the frontend marks the two differently: /predictions and /explanations add the header
`url_path`, the KServe routes (`/v2/.../infer`, also `/v1/models/NAME:predict`) add only `explain`. So a
request is OIP when it has `explain` and no `url_path`, or when neither (TorchServe's OIP gRPC
`ModelInfer` sets no headers) and its body is a JSON object with "inputs". A KServe v1 body
(`{"instances": [...]}`, no "inputs") is refused naming the routes digits speaks; v1 is not implemented.
KServe's explain routes (`/v2/models/NAME/explain`, `/v1/models/NAME:explain`) come with `explain: True`
(the frontend adds it after the client's headers, so a client cannot set it) and are refused: no explainer.
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
"probabilities" FP32 [N,classes], "label" INT64 [N], and, only when `outputs` names it, "framed" UINT8
[N,H,W], the digits as the model saw them. Every failure is a `RequestError`, answered `{"error": ...}`.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from digit_batch import Readings, content_types, label_value, read_batch, read_guarded
from digit_contract import OIP_DEFAULT_OUTPUTS, OIP_OUTPUTS
from digit_errors import RequestError, bad_request, too_large
from digit_imaging import require_ink, to_uint8
from digit_inputs import MAX_BODY_BYTES, decode_base64, parse_json, read_image, sniff_format
from digit_model import DigitMeta

MAX_DIGITS = 1024  # digits in one request; TorchServe's max_request_size bounds the bytes first
OUTPUTS = tuple(OIP_OUTPUTS)  # name -> datatype in the contract
DEFAULT_OUTPUTS = OIP_DEFAULT_OUTPUTS
DATATYPES = ("UINT8", "FP32", "BYTES")
HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class OipRequest:
    """One OIP request, read."""

    id: str | None
    digits: np.ndarray  # (N, H, W) float32 0..255, white on black, framed
    outputs: dict[str, bool]  # output name -> sent in the binary extension


@dataclass(frozen=True)
class OipBatch:
    """The OIP requests of a TorchServe batch: which they are, and where each read one's rows lie."""

    indices: frozenset[int]  # request indices that came in as OIP, read or refused
    read: dict[int, OipRequest]
    rows: dict[int, slice]  # request index -> its rows in the batch's digits


def read_requests(data: list[Any], context: Any, meta: DigitMeta) -> tuple[Readings, OipBatch]:
    """Reads /predictions requests as `read_batch` does and OIP requests here; each row names its request."""
    indices = [index for index, row in enumerate(data) if is_oip(row, headers_of(context, index))]
    types = content_types(context, len(data))
    if not indices:
        return read_batch(data, meta, types), OipBatch(frozenset(), {}, {})
    plain_indices = [index for index in range(len(data)) if index not in set(indices)]
    plain = read_batch([data[index] for index in plain_indices], meta, [types[index] for index in plain_indices])
    digits = list(plain.digits)
    rows = [plain_indices[position] for position in plain.rows]
    errors = {plain_indices[position]: error for position, error in plain.errors.items()}
    read, spans = {}, {}
    for index in indices:
        request = read_guarded(
            functools.partial(read_oip, data[index], headers_of(context, index), meta.size), index, len(data)
        )
        if isinstance(request, RequestError):
            errors[index] = request
            continue
        read[index] = request
        spans[index] = slice(len(rows), len(rows) + len(request.digits))
        digits.extend(request.digits)  # (H, W) views, as read_batch gives
        rows.extend([index] * len(request.digits))
    return Readings(len(data), rows, digits, errors), OipBatch(frozenset(indices), read, spans)


def headers_of(context: Any, index: int) -> dict[str, str]:
    """Request `index`'s headers, names in lower case (HTTP's are case-insensitive)."""
    processors = getattr(context, "request_processor", None)
    if not processors or index >= len(processors) or processors[index] is None:
        return {}
    return {str(k).lower(): v for k, v in processors[index].get_request_properties().items() if isinstance(v, str)}


def is_oip(row: Any, headers: Mapping[str, str]) -> bool:
    """Whether the frontend routed this request as KServe's (see the module's docstring)."""
    if "url_path" in headers:
        return False
    if "explain" in headers:
        return True
    body = row.get("body") if isinstance(row, Mapping) else None
    return isinstance(body, Mapping) and "inputs" in body


def read_oip(row: Any, headers: Mapping[str, str], size: tuple[int, int]) -> OipRequest:
    """Reads one OIP inference request into its digits and the outputs it asks for.

    Raises:
        RequestError: 400 for a malformed request (a KServe v1 one included) or a blank digit, 413 past
            MAX_DIGITS, 415 for an element that is no image.
    """
    if headers.get("explain", "").strip().lower() == "true":
        raise bad_request(
            "NoExplainer",
            "this model has no explainer: KServe's explain routes (/v2/models/NAME/explain, "
            "/v1/models/NAME:explain) are not served; send inference requests to /v2/models/NAME/infer",
        )
    envelope, binary = split_body(row, headers)
    tensor = single_input(envelope)
    request, outputs = request_id(envelope), requested_outputs(envelope)  # the envelope before the pixels
    return OipRequest(request, read_tensor(tensor, binary, size), outputs)


def split_body(row: Any, headers: Mapping[str, str]) -> tuple[dict[str, Any], bytes]:
    """The request's JSON object and the bytes of its binary tensor data (empty without the extension)."""
    body = row.get("body") if isinstance(row, Mapping) else None
    if body is None:
        raise bad_request("BadRequest", "an OIP request needs a JSON body (no form fields); see the KServe v2 API")
    binary = b""
    length = headers.get(HEADER_LENGTH)
    if length is not None and isinstance(body, (bytes, bytearray)):  # parsed by the frontend: no binary part
        if not length.strip().isdigit() or int(length) > len(body):
            raise bad_request(
                "BadHeader", f"Inference-Header-Content-Length is {length[:40]!r}; the body has {len(body)} bytes"
            )
        body, binary = bytes(body[: int(length)]), bytes(body[int(length) :])
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, (bytes, bytearray)):
        if len(body) > MAX_BODY_BYTES:
            raise too_large("BodyTooLarge", f"the JSON part is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
        body = parse_json(bytes(body))
    if not isinstance(body, Mapping):
        kind = type(body).__name__
        raise bad_request("BadRequest", f'an OIP request is a JSON object {{"inputs": [...]}}, got {kind}')
    return dict(body), binary


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
    """Decodes and frames each encoded image; shape [N] (or [-1]) must match the elements sent."""
    if len(shape) != 1 or shape[0] not in (-1, len(elements)):
        raise bad_request(
            "BadShape", f"BYTES input shape is {shape[:6]} for {len(elements)} elements; send [N] (or [-1])"
        )
    if not elements:
        raise bad_request("ElementCount", "the BYTES input holds no elements; send at least one image")
    check_count(len(elements))
    digits = np.empty((len(elements), *size), dtype=np.float32)
    for index, element in enumerate(elements):
        try:
            digits[index] = read_element(element, size)
        except RequestError as err:
            raise RequestError(err.code, err.kind, f"BYTES element {index}: {err.message}") from None
    return digits


def read_element(element: str | bytes, size: tuple[int, int]) -> np.ndarray:
    """One encoded image: base64 text (JSON), or raw image or base64 bytes (binary extension)."""
    if isinstance(element, bytes) and sniff_format(element) is not None:
        return read_image(element, size)
    text = element.encode("utf-8") if isinstance(element, str) else element
    return read_image(decode_base64(text.strip()), size, encoded=True)


def request_id(envelope: Mapping[str, Any]) -> str | None:
    value = envelope.get("id")
    if value is not None and not isinstance(value, str):
        raise bad_request("BadRequest", f"the request's 'id' must be a string, got {type(value).__name__}")
    return value


def requested_outputs(envelope: Mapping[str, Any]) -> dict[str, bool]:
    """Output name -> binary, from `outputs` (default: probabilities and label) and `binary_data_output`."""
    parameters = envelope.get("parameters") or {}
    binary_default = bool(isinstance(parameters, Mapping) and parameters.get("binary_data_output") is True)
    asked = envelope.get("outputs")
    if asked is None:
        return dict.fromkeys(DEFAULT_OUTPUTS, binary_default)
    if not isinstance(asked, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in asked):
        raise bad_request("BadRequest", "request 'outputs' must be a list of {\"name\": ...} objects")
    outputs = {}
    for output in asked:
        if output["name"] not in OUTPUTS:
            raise bad_request(
                "UnknownOutput", f"unknown output {output['name'][:40]!r}; this model has {', '.join(OUTPUTS)}"
            )
        options = output.get("parameters") or {}
        binary = options.get("binary_data", binary_default) if isinstance(options, Mapping) else binary_default
        outputs[output["name"]] = binary is True
    return outputs


def answer(
    request: OipRequest, probabilities: np.ndarray, labels: tuple[str, ...], model: tuple[str, str]
) -> tuple[bytes, int | None]:
    """The response body for one read request, and the JSON part's length when outputs go binary.

    Args:
        probabilities: (N, classes) for the request's digits.
        labels: the archive's labels, class index -> label.
        model: (model_name, model_version).
    """
    tensors = output_tensors(request, probabilities, labels)
    head = {"model_name": model[0], "model_version": model[1]}
    if request.id is not None:
        head["id"] = request.id
    described, binary = [], []
    for name, binary_out in request.outputs.items():
        datatype, values, text = tensors[name]
        entry = f'{{"name":"{name}","datatype":"{datatype}","shape":{json.dumps(list(values.shape))}'
        if binary_out:
            data = values.astype(values.dtype.newbyteorder("<")).tobytes()
            binary.append(data)
            described.append(f'{entry},"parameters":{{"binary_data_size":{len(data)}}}}}')
        else:
            described.append(f'{entry},"data":[{text(values)}]}}')
    header = (json.dumps(head, separators=(",", ":"))[:-1] + ',"outputs":[' + ",".join(described) + "]}").encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)


def output_tensors(request: OipRequest, probabilities: np.ndarray, labels: tuple[str, ...]) -> dict[str, tuple]:
    """Output name -> (datatype, values, JSON text of the values), computed only when asked for."""
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
    # 7 significant digits: what float32 carries; the shortest repr of a float32 as a double is 17
    return ",".join(map("{:.7g}".format, values.reshape(-1).tolist()))


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
