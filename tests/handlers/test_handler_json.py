"""JSON bodies parsed by the handler instead of TorchServe's worker (handlers/digit_json.py), and UINT8 JSON data
read without a Python loop per value (`digit_oip.uint8_levels`): the same values, the same errors, the same
answers as before, checked against the standard library, against TorchServe's own decoding code, against the
general reader, and against the answers the handler gave when the worker parsed the body."""

from __future__ import annotations

import codecs
import json
import struct
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from digit_errors import RequestError
from digit_json import DECODE_SWITCH, decoded_as_worker, fast_json_available, loads, parameter_types
from digit_oip import any_json_pixels, intensities, json_pixels, uint8_levels
from handler_helpers import MEAN, MODEL_FILES, STD, make_context
from hypothesis import given, settings
from hypothesis import strategies as st
from ts.context import RequestProcessor
from ts.protocol import otf_message_handler

OIP = {"explain": "False"}  # what the frontend adds on /v2/models/NAME/infer
JSON_PARAMETER = {"body": {"content-type": "application/json"}}


def outcome(parse, text: bytes) -> tuple:
    """What parsing gives: the value with its types spelled out (repr tells 1 from 1.0 and True), or the error."""
    try:
        return ("value", repr(parse(text)))
    except (ValueError, RecursionError) as err:
        return ("error", type(err).__name__, str(err))


def test_msgspec_is_the_fast_parser_here() -> None:
    assert fast_json_available(), "msgspec is a dependency (pyproject.toml): without it every body takes json"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # of any size: past 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # lone surrogates included: json writes them as \\ud800 escapes
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(value=JSON_VALUES, ensure_ascii=st.booleans())
def test_loads_gives_what_json_gives(value: Any, ensure_ascii: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", errors="surrogatepass")
    assert outcome(loads, text) == outcome(json.loads, text)


EDGE_TEXTS = {
    "NaN and infinities": b"[NaN, Infinity, -Infinity]",
    "past a double": b"[1e400, -1e400]",
    "integers past 64 bits": b"[18446744073709551616, -9223372036854775809, 1" + b"0" * 400 + b"]",
    "a lone surrogate": b'["\\ud800"]',
    "a UTF-8 byte-order mark": codecs.BOM_UTF8 + b'{"data": [1]}',
    "UTF-16": '{"data": [1, 2]}'.encode("utf-16"),
    "not UTF-8": b'{"data": "\xff\xfe"}',
    "a raw control character": b'["a\x01b"]',
    "duplicate keys": b'{"a": 1, "a": [2]}',
    "trailing text": b'{"a": 1} x',
    "cut short": b'{"inputs": [{"data": [1, 2',
    "empty": b"",
    "whitespace": b" \n ",
    "nested past msgspec's depth": b"[" * 1100 + b"]" * 1100,
    "nested past json's depth": b"[" * 100_000 + b"]" * 100_000,
    "numbers json spells its own way": b"[-0, -0.0, 1E2, 1e-400, 0.1, 5e-324, 123456789012345678]",
    "strings with escapes": b'["\\u00e9\\n\\"", "\\ud83d\\ude00", "\\u0000"]',
    "a scalar": b"7",
}


@pytest.mark.parametrize("name", sorted(EDGE_TEXTS))
def test_loads_answers_as_json_does_where_msgspec_would_not(name: str) -> None:
    assert outcome(loads, EDGE_TEXTS[name]) == outcome(json.loads, EDGE_TEXTS[name])


# --- the worker's decoding, done by the handler -------------------------------------------------------


class FrameSocket:
    """A socket that hands out one frame of TorchServe's frontend-to-worker protocol, a few bytes at a time."""

    def __init__(self, frame: bytes) -> None:
        self.frame, self.position = frame, 0

    def recv(self, length: int) -> bytes:
        chunk = self.frame[self.position : self.position + min(length, 7)]
        self.position += len(chunk)
        return chunk


def parameter_frame(name: str, content_type: str, value: bytes) -> bytes:
    """One input parameter as the frontend sends it (ts/protocol/otf_message_handler.py, `_retrieve_input_data`)."""
    parts = [name.encode(), content_type.encode(), value]
    return b"".join(struct.pack("!i", len(part)) + part for part in parts)


def worker_reads(content_type: str, value: bytes) -> Any:
    """What TorchServe's own worker code makes of one parameter."""
    return otf_message_handler._retrieve_input_data(FrameSocket(parameter_frame("body", content_type, value)))


PARAMETERS = [
    ("application/json", b'{"data": [0, 255, 3]}'),
    ("application/json", b"[[1, 2], [3, 4]]"),
    ("application/json", b'"aGVsbG8="'),
    ("application/json", b"7"),
    ("application/json", b'{"data": [1, 2,'),  # does not parse: forwarded as bytes
    ("application/json", codecs.BOM_UTF8 + b"{}"),
    ("application/json", b'{"x": "\xff"}'),  # not UTF-8
    ("application/json", b"[" * 5000 + b"]" * 5000),  # past json's depth
    ("application/json; charset=utf-8", b"{}"),  # the frontend strips parameters; if one came, no decoding
    ("text/plain", b"aGVsbG8="),
    ("text/plain", b"\xff\xfe"),
    ("image/png", b"\x89PNG\r\n\x1a\n..."),
    ("application/octet-stream", b'{"inputs": []}'),
    ("", b"{}"),
]


@pytest.mark.parametrize(("content_type", "value"), PARAMETERS)
def test_the_handler_decodes_a_parameter_as_torchserves_worker_did(monkeypatch, content_type, value) -> None:
    monkeypatch.delenv(DECODE_SWITCH, raising=False)
    before = worker_reads(content_type, value)["value"]
    monkeypatch.setenv(DECODE_SWITCH, "false")
    received = worker_reads(content_type, value)
    assert isinstance(received["value"], bytearray) and received["value"] == value  # as sent, unparsed now
    types = parameter_types(
        RequestProcessor({"body": {"content-type": received["contentType"]}}).get_request_properties()
    )
    after = decoded_as_worker({"body": received["value"]}, types)["body"]
    assert type(after) is type(before) and after == before


# --- UINT8 JSON data: the fast reader and the general one agree -----------------------------------------

COUNT = 2 * 28 * 28


def pixels_outcome(read, data: Any, count: int = COUNT) -> tuple:
    try:
        values = read(data, "UINT8", count)
        return ("pixels", intensities(values, "UINT8").tolist())
    except RequestError as err:
        return ("refused", err.code, err.kind, err.message)


def general(data: Any, datatype: str, count: int) -> np.ndarray:
    return any_json_pixels(data, datatype, count)


def nest(flat: list, shape: tuple[int, ...]) -> list:
    """`flat` as nested lists of `shape`."""
    return np.asarray(flat, dtype=object).reshape(shape).tolist() if shape else flat


SHAPES = [(COUNT,), (2, 784), (2, 28, 28), (2, 1, 28, 28), (1, 2, 28, 28), (COUNT, 1)]
ODD_VALUES = st.sampled_from([True, False, None, 1.0, 0.5, -1, 256, 2**64, -(2**63) - 1, "7", [], [3], {}])


@settings(max_examples=300, deadline=None)
@given(
    levels=st.lists(st.integers(0, 255), min_size=COUNT, max_size=COUNT),
    shape=st.sampled_from(SHAPES),
    odd=st.lists(st.tuples(st.integers(0, COUNT - 1), ODD_VALUES), max_size=3),
    cut=st.sampled_from([None, "ragged", "short", "long"]),
)
def test_fast_uint8_reading_is_the_general_readers_result(levels, shape, odd, cut) -> None:
    flat = list(levels)
    for position, value in odd:
        flat[position] = value
    data = nest(flat, shape)
    if cut == "ragged" and len(shape) > 1:
        data[-1] = data[-1][:-1]
    elif cut == "short":
        data = data[:-1]
    elif cut == "long":
        data = [*data, data[0]]
    assert pixels_outcome(json_pixels, data) == pixels_outcome(general, data)


@pytest.mark.parametrize("shape", SHAPES)
def test_what_clients_send_takes_the_fast_way(mnist, shape) -> None:
    """Not a vacuous agreement: digits sent flat or nested are read by `uint8_levels`, not the general way."""
    pixels = np.asarray(mnist.test_images[:2], dtype=np.uint8)
    levels = uint8_levels(pixels.reshape(shape).tolist(), COUNT)
    assert levels is not None and levels.dtype == np.uint8 and np.array_equal(levels, pixels.reshape(-1))


@pytest.mark.parametrize(
    "data",
    [
        [True, False] * (COUNT // 2),  # all booleans: np.asarray reads bool, refused
        [1, 0] * (COUNT // 2),  # levels 0 and 1 only: the general way decides (and takes them)
        [True] + [200] * (COUNT - 1),  # a boolean among integers: np.asarray reads 1
        [[]] * 2,
        [],
        [[0] * 784, 5],
        [5, [0] * 784],
    ],
    ids=["booleans", "levels 0-1", "one boolean", "empty rows", "empty", "list then int", "int then list"],
)
def test_fast_uint8_reading_corners(data) -> None:
    assert pixels_outcome(json_pixels, data) == pixels_outcome(general, data)


# --- whole answers: as before, and as an independent reading gives them ------------------------------------


def oip_json(pixels: np.ndarray, nested: bool) -> bytes:
    data = pixels.tolist() if nested else pixels.reshape(-1).tolist()
    tensor = {"name": "digits", "datatype": "UINT8", "shape": list(pixels.shape), "data": data}
    return json.dumps({"inputs": [tensor], "id": "r"}, separators=(",", ":")).encode()


def oip_binary(pixels: np.ndarray) -> tuple[bytes, str]:
    outputs = [{"name": name, "parameters": {"binary_data": True}} for name in ("probabilities", "label")]
    shape, size = list(pixels.shape), pixels.size
    tensor = {"name": "digits", "datatype": "UINT8", "shape": shape, "parameters": {"binary_data_size": size}}
    header = json.dumps({"inputs": [tensor], "outputs": outputs, "id": "r"}).encode()
    return header + pixels.astype(np.uint8).tobytes(), str(len(header))


def handle_raw(handler, context, rows: list, headers: list[dict]) -> list[tuple[int, bytes, dict]]:
    """`handle` as ts/service.py calls it; each request's status, body bytes and headers."""
    context.request_processor = [RequestProcessor(dict(h)) for h in headers]
    context.request_ids = {index: f"request-{index}" for index in range(len(rows))}
    bodies = handler.handle(rows, context)
    return [
        (context.get_response_status(i)[0], body, context.get_response_headers(i) or {})
        for i, body in enumerate(bodies)
    ]


def json_outputs(body: bytes) -> dict[str, list]:
    return {output["name"]: output["data"] for output in json.loads(body)["outputs"]}


def binary_outputs(body: bytes, header_length: int) -> dict[str, np.ndarray]:
    head, offset, outputs = json.loads(body[:header_length]), header_length, {}
    for output in head["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = "<f4" if output["datatype"] == "FP32" else "<i8"
        outputs[output["name"]] = np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(output["shape"])
        offset += size
    return outputs


def independent_probabilities(model_dir, pixels: np.ndarray) -> np.ndarray:
    """The archive's ONNX file run by onnxruntime on the digits normalised as training did: no handler code."""
    session = ort.InferenceSession(str(model_dir / MODEL_FILES["onnx"]), providers=["CPUExecutionProvider"])
    x = ((pixels.astype(np.float32) / 255 - MEAN) / STD).reshape(-1, 1, 28, 28).astype(np.float32)
    scores = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_answers_are_what_they_were_over_many_digits(handlers_by_format, model_dirs, mnist, nested) -> None:
    """1,024 MNIST test digits in requests of 64 and one of 1,024: the body as raw bytes (what the worker hands
    over now) gets the very bytes it got when TorchServe's worker parsed it (what the handler still takes);
    those answers carry the binary extension's values to 7 significant digits, and an independent run of the
    model file on the digits agrees with them."""
    handler, context = handlers_by_format["onnx"], make_context(model_dirs["onnx"])
    images = np.asarray(mnist.test_images[:1024], dtype=np.uint8)
    reference = independent_probabilities(model_dirs["onnx"], images)
    for start, count in [*((s, 64) for s in range(0, 1024, 64)), (0, 1024)]:
        pixels = images[start : start + count]
        body = oip_json(pixels, nested)
        raw_headers = {**OIP, "Content-Type": "application/json", **JSON_PARAMETER}
        [(status, now, _)] = handle_raw(handler, context, [{"body": bytearray(body)}], [raw_headers])
        [(_, before, _)] = handle_raw(handler, context, [{"body": json.loads(body)}], [OIP])
        assert status == 200 and now == before
        binary, length = oip_binary(pixels)
        [(_, raw, headers)] = handle_raw(
            handler, context, [{"body": bytearray(binary)}], [{**OIP, "Inference-Header-Content-Length": length}]
        )
        from_json, from_binary = json_outputs(now), binary_outputs(raw, int(headers["Inference-Header-Content-Length"]))
        assert from_json["label"] == from_binary["label"].tolist()
        assert from_json["probabilities"] == [float(f"{p:.7g}") for p in from_binary["probabilities"].reshape(-1)]
        expected = reference[start : start + count]
        np.testing.assert_allclose(np.reshape(from_json["probabilities"], (count, 10)), expected, atol=2e-6)
        clear = np.sort(expected, axis=1)[:, -1] - np.sort(expected, axis=1)[:, -2] > 1e-4  # no near ties
        assert np.array_equal(np.asarray(from_json["label"])[clear], expected.argmax(axis=1)[clear])
