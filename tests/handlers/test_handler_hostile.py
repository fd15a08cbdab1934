"""Hostile requests, round 2, through `DigitHandler.handle` as TorchServe calls it: whatever one request holds,
it gets its own answer naming the problem and the rest of its batch is answered."""

from __future__ import annotations

import base64
import codecs
import json
import logging
import struct
import time
import zlib

import numpy as np
import pytest
from costly_images import (
    bmp_rle8,
    gif_with_blocks,
    gif_with_frame_at,
    jpeg_with_stray_bytes,
    png_chunk,
    png_with_chunks,
    png_with_exif,
    progressive_jpeg,
    tiff,
    webp_with_chunks,
    webp_with_exif,
)
from digit_budget import (
    MAX_BMP_RLE_BYTES,
    MAX_EXIF_TAGS,
    MAX_GIF_BLOCKS,
    MAX_JPEG_HEADER_STEPS,
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    MAX_PNG_TEXT_CHUNKS,
    MAX_TIFF_STRIPS,
    MAX_TIFF_TAGS,
    MAX_WEBP_CHUNKS,
)
from handler_helpers import assert_same_answer, make_context, png_bytes, run_batch

DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[6:22, 12:16] = 255  # a "1"
GOOD = {"body": png_bytes(DIGIT)}
SURROGATE = "\ud800"
# A refusal costs milliseconds (the walk stops at its bound); the bound is generous for a shared, busy machine
REFUSAL_S = 1.0


def answers_among_good(served, bad_row: dict, headers: dict | None = None) -> list:
    """Sends `bad_row` between two good requests in one batch; checks the good ones; returns all answers."""
    rows = [GOOD, bad_row, GOOD]
    answers = served(rows) if headers is None else served(rows, [{}, headers, {}])
    assert [answers[0].status, answers[2].status] == [200, 200], (answers[0].body, answers[2].body)
    return answers


@pytest.fixture(params=["onnx", "torchscript"])
def served(request, handlers_by_format, model_dirs):
    handler = handlers_by_format[request.param]
    context = make_context(model_dirs[request.param])
    return lambda rows, headers=None: run_batch(handler, context, rows, headers)


# How TorchServe hands over a lone surrogate: JSON bodies and JSON form parts are parsed into str
LONE_SURROGATES = {
    "json-string": {"body": SURROGATE},
    "json-object": {"body": {"data": SURROGATE}},
    "json-data-url": {"body": {"data": "data:image/png;base64,iVBOR" + SURROGATE}},
    "multipart-json-part": {"data": {"data": "AAAA" + SURROGATE}},
    "text-body": {"body": "iVBORw0KGgo" + SURROGATE},
}


@pytest.mark.parametrize("row", LONE_SURROGATES.values(), ids=LONE_SURROGATES.keys())
def test_a_lone_surrogate_is_its_requests_own_400(served, row) -> None:
    [_, answer, _] = answers_among_good(served, row)
    assert (answer.status, answer.body["type"]) == (400, "BadText"), answer.body
    assert "surrogate" in answer.body["message"] and "\\ud800" in answer.body["message"]


def test_json_text_escaping_a_surrogate_is_a_400(served) -> None:
    [_, answer, _] = answers_among_good(served, {"body": b'{"data": "\\ud800"}'})
    assert (answer.status, answer.body["type"]) == (400, "BadText")


def test_anything_unforeseen_while_reading_one_request_stays_its_own(served, monkeypatch, caplog) -> None:
    """Fault injection at the per-request boundary: the reader raising what no input should make it raise."""
    import digit_batch

    real = digit_batch.read_request

    def failing(row, size, content_type=None):
        if row.get("body") == b"boom":
            raise KeyError("a bug in the handler")
        if row.get("body") == b"oom":
            raise MemoryError
        return real(row, size, content_type)

    monkeypatch.setattr(digit_batch, "read_request", failing)
    with caplog.at_level(logging.ERROR, logger="digit_batch"):
        answers = served([GOOD, {"body": b"boom"}, GOOD, {"body": b"oom"}, GOOD])
    assert [a.status for a in answers] == [200, 500, 200, 413, 200]
    assert answers[1].body["type"] == "InternalError" and "KeyError" in answers[1].body["message"]
    assert answers[3].body["type"] == "TooLarge"
    logged = [record for record in caplog.records if record.name == "digit_batch"]
    assert len(logged) == 2 and all(record.exc_info for record in logged)  # once each, with the traceback


@pytest.mark.parametrize("wrap", ["bytes", "str"])
def test_a_utf8_byte_order_mark_is_accepted(served, wrap: str) -> None:
    pixels = json.dumps({"data": DIGIT.tolist()})
    encoded = base64.b64encode(GOOD["body"]).decode()
    for text in (pixels, encoded):
        body = codecs.BOM_UTF8 + text.encode() if wrap == "bytes" else "\ufeff" + text
        [_, answer, _] = answers_among_good(served, {"body": body})
        assert answer.status == 200, answer.body
        assert_same_answer(answer.body, served([GOOD])[0].body)


def test_a_utf16_byte_order_mark_is_named(served) -> None:
    body = json.dumps({"data": DIGIT.tolist()}).encode("utf-16")
    [_, answer, _] = answers_among_good(served, {"body": body})
    assert (answer.status, answer.body["type"]) == (415, "NotUtf8") and "UTF-16" in answer.body["message"]


@pytest.mark.parametrize(
    "prefix", ["data:image/png;charset=binary;base64,", "DATA:image/png;name=d.png;BASE64,", "data:;base64,"]
)
def test_data_urls_with_parameters_are_accepted(served, prefix: str) -> None:
    url = prefix + base64.b64encode(GOOD["body"]).decode()
    for row in ({"body": url}, {"body": {"data": url}}):
        [_, answer, _] = answers_among_good(served, row)
        assert answer.status == 200, answer.body


@pytest.mark.parametrize(
    ("url", "status", "words"),
    [
        ("data:image/png,%89PNG", 415, "not base64"),
        ("data:image/png;base64", 400, "no comma"),
        ("data:image/png;base64,!!!!", 415, "not valid base64"),
    ],
)
def test_a_data_url_that_cannot_be_read_is_named(served, url: str, status: int, words: str) -> None:
    [_, answer, _] = answers_among_good(served, {"body": url})
    assert answer.status == status and words in answer.body["message"], answer.body


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=xyz", "application/x-www-form-urlencoded"])
def test_a_form_body_the_frontend_could_not_split_is_named(served, content_type: str) -> None:
    """TorchServe hands over an empty row when a form body is garbled or cut short."""
    [_, answer, _] = answers_among_good(served, {}, headers={"Content-Type": content_type})
    assert (answer.status, answer.body["type"]) == (400, "MalformedForm"), answer.body
    assert "boundary" in answer.body["message"]


def test_an_empty_request_without_a_form_type_is_still_an_empty_body(served) -> None:
    [_, answer, _] = answers_among_good(served, {}, headers={"content-type": "image/png"})
    assert (answer.status, answer.body["type"]) == (400, "EmptyBody")


def test_a_gif_frame_far_outside_its_canvas_is_refused_with_this_servers_limit(served) -> None:
    [_, answer, _] = answers_among_good(served, {"body": gif_with_frame_at(65_000, 65_000)})
    assert (answer.status, answer.body["type"]) == (413, "ImageTooLarge")
    assert "4096x4096" in answer.body["message"] and "178956970" not in answer.body["message"]


BLANKS = {
    "white-28x28-png": png_bytes(np.full((28, 28), 255, np.uint8)),
    "black-28x28-png": png_bytes(np.zeros((28, 28), np.uint8)),
    "grey-28x28-png": png_bytes(np.full((28, 28), 128, np.uint8)),
    "white-28x28-bmp": png_bytes(np.full((28, 28), 255, np.uint8), fmt="BMP"),
    "white-29x29-png": png_bytes(np.full((29, 29), 255, np.uint8)),
    "faint-28x28-png": png_bytes(np.pad(np.full((10, 10), 12, np.uint8), 9)),  # ink 12 of 255 above paper
    "json-zeros": {"data": [0] * 784},
    "json-rows-of-255": {"data": [[255] * 28] * 28},
}


@pytest.mark.parametrize("payload", BLANKS.values(), ids=BLANKS.keys())
def test_no_ink_no_digit_at_every_size(served, payload) -> None:
    [_, answer, _] = answers_among_good(served, {"body": payload})
    assert (answer.status, answer.body["type"]) == (400, "NoDigit"), answer.body


def test_every_mnist_test_digit_still_passes_as_28x28_png(served, mnist_test) -> None:
    digits = mnist_test[0][:100]
    answers = served([{"body": png_bytes(digit)} for digit in digits])
    assert all(answer.status == 200 for answer in answers)


COSTLY = {
    # name: (file, the count its message must give)
    "jpeg-1000-scans": (lambda: progressive_jpeg(512, 1000), "1,000 scans"),
    "jpeg-4096-with-17-scans": (lambda: progressive_jpeg(4096, 17), "17 scans"),
    "jpeg-stray-bytes": (lambda: jpeg_with_stray_bytes(1_000_000), f"more than {MAX_JPEG_HEADER_STEPS:,}"),
    "png-800000-chunks": (lambda: png_with_chunks(800_000), f"more than {MAX_PNG_CHUNKS:,} chunks"),
    "png-harmless-chunks": (lambda: png_with_chunks(MAX_PNG_CHUNKS, b"tIME"), f"more than {MAX_PNG_CHUNKS:,}"),
    "gif-sub-blocks": (lambda: gif_with_blocks(4_000_000), f"more than {MAX_GIF_BLOCKS:,}"),
    "tiff-strips": (lambda: tiff(1, 1_000_000, 1), "1,000,000 strips"),
    "tiff-tags": (lambda: tiff(28, 28, extra_tags=MAX_TIFF_TAGS), "tags"),
    "bmp-rle": (lambda: bmp_rle8(1024, 1024), "RLE"),
    "webp-chunks": (lambda: webp_with_chunks(1_000_000), f"more than {MAX_WEBP_CHUNKS:,} chunks"),
    "png-exif-tags": (lambda: png_with_exif(65_535), "65,535 EXIF tags"),
    "webp-exif-tags": (lambda: webp_with_exif(65_535), "65,535 EXIF tags"),
}


@pytest.mark.parametrize("name", COSTLY)
def test_files_that_cost_more_than_the_largest_image_are_refused_before_decoding(served, name: str) -> None:
    make, words = COSTLY[name]
    payload = make()
    start = time.perf_counter()
    [_, answer, _] = answers_among_good(served, {"body": payload})
    seconds = time.perf_counter() - start
    assert (answer.status, answer.body["type"]) == (413, "TooMuchDecodingWork"), answer.body
    assert words in answer.body["message"], answer.body["message"]
    assert seconds < REFUSAL_S, f"{name}: {seconds:.2f} s"  # before the bounds: 2-12 s each


WITHIN_BOUNDS = {
    "jpeg-4096-with-16-scans": lambda: progressive_jpeg(4096, 16),
    "jpeg-256-with-256-scans": lambda: progressive_jpeg(256, MAX_JPEG_SCANS),
    "png-with-16000-chunks": lambda: png_with_chunks(16_000),
    "gif-with-16000-blocks": lambda: gif_with_blocks(16_000),
    "tiff-of-8192-strips": lambda: tiff(64, MAX_TIFF_STRIPS, 1),
    "tiff-with-1000-tags": lambda: tiff(28, 28, extra_tags=1_000),
    "bmp-rle-at-the-bound": lambda: bmp_rle8(510, 510),
    "webp-with-16000-chunks": lambda: webp_with_chunks(16_000),
    "png-with-1024-exif-tags": lambda: png_with_exif(MAX_EXIF_TAGS),
    "webp-with-1024-exif-tags": lambda: webp_with_exif(MAX_EXIF_TAGS),
}


@pytest.mark.parametrize("name", WITHIN_BOUNDS)
def test_files_within_the_bounds_are_read(served, name: str) -> None:
    payload = WITHIN_BOUNDS[name]()
    [_, answer, _] = answers_among_good(served, {"body": payload})
    assert answer.status == 200, answer.body


def test_the_bmp_at_the_bound_is_at_the_bound() -> None:
    rle_bytes = len(bmp_rle8(510, 510)) - (14 + 40 + 1024)
    assert MAX_BMP_RLE_BYTES - 8_000 < rle_bytes <= MAX_BMP_RLE_BYTES


@pytest.mark.parametrize("kind", [b"zzZz", b"1234", b"a_b_"])
def test_png_chunks_of_any_type_pillow_reads_are_counted(served, kind: bytes) -> None:
    """Pillow walks any four word characters as a chunk type, before IHDR or after it."""
    before_header = png_with_chunks(0)[:8] + (png_with_chunks(1, kind)[-24:-12]) * (MAX_PNG_CHUNKS + 1)
    for payload in (png_with_chunks(MAX_PNG_CHUNKS, kind), before_header + png_with_chunks(0)[8:]):
        [_, answer, _] = answers_among_good(served, {"body": payload})
        assert (answer.status, answer.body["type"]) == (413, "TooMuchDecodingWork"), answer.body


def test_a_body_of_zeros_behind_a_png_signature_is_corrupt_not_costly(served) -> None:
    [_, answer, _] = answers_among_good(served, {"body": b"\x89PNG\r\n\x1a\n" + bytes(1_000_000)})
    assert (answer.status, answer.body["type"]) == (400, "CorruptImage")


def test_a_baseline_jpeg_claiming_too_many_pixels_is_refused_by_the_pixel_limit(served) -> None:
    payload = bytearray(progressive_jpeg(64, 6))
    frame = payload.index(b"\xff\xc2")  # progressive start of frame: length, precision, height, width
    payload[frame + 5 : frame + 9] = struct.pack(">HH", 60_000, 60_000)
    [_, answer, _] = answers_among_good(served, {"body": bytes(payload)})
    assert (answer.status, answer.body["type"]) == (413, "ImageTooLarge")


def test_compressed_text_chunks_are_counted(served) -> None:
    """Pillow inflates each zTXt up to 1 MB, 64 MB in all, before it gives up."""
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 1_000_000, 9))
    plain = png_bytes(DIGIT)
    for count, expected in [(MAX_PNG_TEXT_CHUNKS, 200), (MAX_PNG_TEXT_CHUNKS + 1, 413)]:
        [_, answer, _] = answers_among_good(served, {"body": plain[:33] + text * count + plain[33:]})
        assert answer.status == expected, answer.body
    assert "compressed text chunks" in answer.body["message"]
