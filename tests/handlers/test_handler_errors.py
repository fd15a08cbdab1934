"""A bad request gets its own 4xx and a JSON body naming the problem; the rest of its batch is answered."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from digit_errors import RequestError
from handler_helpers import assert_same_answer, make_context, png_bytes, run_batch
from PIL import Image, ImageDraw


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` 8-bit gray pixels, with almost no data: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def text_bomb_png(megabytes: int = 16) -> bytes:
    """A valid 28x28 PNG plus a zTXt chunk of a few KB that inflates to `megabytes` MB."""
    plain = png_bytes(DIGIT)
    data = b"Comment\x00\x00" + zlib.compress(b"A" * (megabytes << 20), 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    return plain[:33] + chunk + plain[33:]  # after the signature and IHDR


def nested_list(depth: int) -> list:
    """A list nested `depth` deep, built without recursion."""
    value: list = [0]
    for _ in range(depth):
        value = [value]
    return value


def image_file(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[6:22, 12:16] = 255  # a "1"
GOOD_PNG = png_bytes(DIGIT)
NOISE = (np.random.default_rng(0).random((120, 160)) * 255).astype(np.uint8)

BAD_REQUESTS = {
    # (row, status, type)
    "no-fields": ({}, 400, "EmptyBody"),
    "empty-body": ({"body": b""}, 400, "EmptyBody"),
    "blank-body": ({"body": b" \r\n\t"}, 400, "EmptyBody"),
    "empty-str": ({"body": ""}, 400, "EmptyBody"),
    "two-unnamed-fields": ({"a": GOOD_PNG, "b": GOOD_PNG}, 400, "MissingInput"),
    "not-a-dict-row": (GOOD_PNG, 400, "EmptyBody"),
    "text": ({"body": "hello, is this the digit service?"}, 415, "NotAnImage"),
    "binary-junk": ({"body": bytes(range(256)) * 4}, 415, "NotAnImage"),
    "other-image-format": ({"body": image_file(Image.fromarray(DIGIT), "PCX")}, 415, "NotAnImage"),
    "base64-of-junk": ({"body": base64.b64encode(b"not an image at all")}, 415, "NotAnImage"),
    "bad-base64": ({"body": "iVBORw0KGgo=AAAA=="}, 415, "NotAnImage"),
    "truncated-png": ({"body": png_bytes(NOISE)[:2000]}, 400, "TruncatedImage"),
    "png-signature-only": ({"body": b"\x89PNG\r\n\x1a\n"}, 400, "CorruptImage"),
    "zero-sized-png": ({"body": png_header(0, 0)}, 400, "CorruptImage"),
    "truncated-16-bit-png": ({"body": png_bytes(NOISE.astype(np.uint16) * 257)[:3000]}, 400, "TruncatedImage"),
    "truncated-cmyk-jpeg": ({"body": png_bytes(NOISE, mode="CMYK", fmt="JPEG")[:1500]}, 400, "TruncatedImage"),
    "truncated-jpeg": ({"body": png_bytes(NOISE, fmt="JPEG")[:1500]}, 400, "TruncatedImage"),
    "truncated-base64-png": ({"body": base64.b64encode(png_bytes(NOISE)[:2000])}, 400, "TruncatedImage"),
    "corrupt-webp": ({"body": png_bytes(NOISE, fmt="WEBP")[:300]}, 400, "CorruptImage"),
    "float-tiff": (
        {"body": image_file(Image.fromarray(DIGIT.astype(np.float32)), "TIFF")},
        415,
        "UnsupportedImageMode",
    ),
    "blank-canvas": ({"body": image_file(Image.new("RGB", (200, 100), "white"))}, 400, "NoDigit"),
    "over-4096x4096": ({"body": png_header(4097, 4096)}, 413, "ImageTooLarge"),
    "pillow-warns": ({"body": png_header(10_000, 10_000)}, 413, "ImageTooLarge"),
    "pillow-refuses": ({"body": png_header(100_000, 100_000)}, 413, "ImageTooLarge"),
    "png-text-chunk-bomb": ({"body": text_bomb_png()}, 413, "ImageTooLarge"),
    "body-over-16-MiB": ({"body": b"\x89PNG" + bytes(16 * 1024 * 1024)}, 413, "BodyTooLarge"),
    "malformed-json": ({"body": b'{"data": [1, 2,'}, 400, "BadJson"),
    "deep-json-text": ({"body": b"[" * 100_000 + b"]" * 100_000}, 400, "BadJson"),
    "deep-json-parsed": ({"body": nested_list(50_000)}, 400, "BadShape"),
    "json-without-data": ({"body": {"pixels": [0] * 784}}, 400, "BadJson"),
    "json-number": ({"body": 7}, 400, "BadJson"),
    "json-null": ({"body": None}, 400, "BadJson"),
    "json-string-data-not-base64": ({"body": {"data": "seven"}}, 415, "NotAnImage"),
    "783-values": ({"body": [0] * 783}, 400, "BadShape"),
    "27-rows": ({"body": [[0] * 28] * 27}, 400, "BadShape"),
    "ragged-rows": ({"body": [[0] * 28] * 27 + [[0] * 27]}, 400, "BadShape"),
    "three-channels": ({"body": [[[0] * 28] * 28] * 3}, 400, "BadShape"),
    "rows-of-lists": ({"body": [[[0]] * 28] * 28}, 400, "BadPixels"),
    "data-is-object": ({"body": {"data": {"a": 1}}}, 400, "BadShape"),
    "nan": ({"body": [float("nan")] + [0] * 783}, 400, "BadPixels"),
    "infinity": ({"body": [0] * 783 + [float("inf")]}, 400, "BadPixels"),
    "nan-in-json-text": ({"body": b"[NaN" + b", 0" * 783 + b"]"}, 400, "BadPixels"),
    "negative": ({"body": [-1] + [0] * 783}, 400, "BadPixels"),
    "above-255": ({"body": [0] * 100 + [255.5] + [0] * 683}, 400, "BadPixels"),
    "huge-int": ({"body": [10**400] + [0] * 783}, 400, "BadPixels"),
    "string-pixel": ({"body": ["12"] + [0] * 783}, 400, "BadPixels"),
    "boolean-pixel": ({"body": [True] + [0] * 783}, 400, "BadPixels"),
    "null-pixel": ({"body": [None] + [0] * 783}, 400, "BadPixels"),
}


@pytest.mark.parametrize(("row", "status", "kind"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_its_4xx_and_json_body(served, row, status: int, kind: str) -> None:
    [answer] = served([row])
    assert answer.status == status, answer.body
    assert answer.content_type == "application/json"
    assert answer.body["code"] == status
    assert answer.body["type"] == kind
    assert len(answer.body["message"]) > 10
    assert answer.phrase == answer.body["message"][:200]
    json.dumps(answer.body)  # TorchServe serialises it with json.dumps


def test_a_4096x4096_image_is_accepted(served) -> None:
    image = Image.new("1", (4096, 4096), 0)
    ImageDraw.Draw(image).rectangle((1000, 800, 1400, 3000), fill=1)
    [answer] = served([{"body": image_file(image)}])
    assert answer.status == 200, answer.body


def test_a_batch_mixing_good_and_bad_requests(served, mnist_test) -> None:
    digits = mnist_test[0][:3]
    good = [
        {"body": png_bytes(digits[0])},
        {"body": {"data": digits[1].tolist()}},
        {"data": base64.b64encode(png_bytes(digits[2]))},
    ]
    batch = [
        good[0],
        {"body": b"{nope"},
        good[1],
        {"body": png_bytes(NOISE)[:2000]},
        {"body": png_header(5000, 5000)},
        good[2],
        {},
    ]
    answers = served(batch)
    assert [a.status for a in answers] == [200, 400, 200, 400, 413, 200, 400]
    for index, row in zip((0, 2, 5), good, strict=True):
        [alone] = served([row])
        assert answers[index].body["label"] == alone.body["label"]
        assert answers[index].body["probabilities"] == pytest.approx(alone.body["probabilities"], abs=1e-6)


def test_a_batch_of_only_bad_requests_skips_the_model(served) -> None:
    answers = served([{"body": b""}, {"body": b"junk\x00"}])
    assert [a.status for a in answers] == [400, 415]


def test_reason_phrase_is_one_short_printable_line() -> None:
    error = RequestError(400, "BadJson", "line one\r\nline two \u00e9" + "x" * 500)
    phrase = error.phrase()
    assert "\r" not in phrase and "\n" not in phrase and phrase.isascii()
    assert len(phrase) == 200 and phrase.startswith("line one  line two")
    assert error.body()["message"] == error.message


@pytest.mark.parametrize("header", ["explain", "describe"])
def test_one_requests_header_cannot_switch_the_batch_into_other_modes(handlers_by_format, model_dirs, header) -> None:
    """BaseHandler.handle would explain (Captum) or describe the whole batch when request 0 has such a header:
    here `explain: True` (what the frontend writes on /explanations) explains request 0 alone, and `describe`
    changes nothing.

    `url_path` is what the frontend adds to every /predictions and /explanations request (digit_oip.route)."""
    context = make_context(model_dirs["onnx"])
    rows = [{"body": GOOD_PNG}, {"body": GOOD_PNG}]
    answers = run_batch(handlers_by_format["onnx"], context, rows, headers=[{header: "True", "url_path": ""}, {}])
    assert [a.status for a in answers] == [200, 200]
    prediction = {key: answers[0].body[key] for key in answers[1].body}
    assert_same_answer(prediction, answers[1].body)
    assert ("attributions" in answers[0].body) == (header == "explain")
