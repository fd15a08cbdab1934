"""A corpus of malformed requests, each with the answer it must get, for the hostile-input test over HTTP.

Each entry is a request as `requests.post` keyword arguments and the status and error `type` the handler
must answer with (None: TorchServe's frontend answers before the handler sees the request). The image
files are made here, byte by byte where a real encoder would refuse to write them (a header that claims
100000x100000 pixels, a zero-sized image), so that the corpus needs no fixture files.
"""

from __future__ import annotations

import base64
import codecs
import io
import json
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from digits.serving.config import MAX_REQUEST_BYTES
from PIL import Image

# the costly files are shared with the handler's unit tests, whose folder is not on this one's path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "handlers"))
from costly_images import (  # noqa: E402
    bmp_rle8,
    exif_declaring,
    exif_of_tags,
    gif_with_blocks,
    gif_with_frame_at,
    jpeg_with_stray_bytes,
    large_image,
    png_with_chunks,
    png_with_exif,
    png_with_exif_block,
    progressive_jpeg,
    tiff,
    webp_with_chunks,
    webp_with_exif,
)

DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[5:23, 12:16] = 255  # a "1", white on black
# noise compresses badly, so that cutting a file in half cuts into its pixel data
NOISE = (np.random.default_rng(0).random((96, 128)) * 255).astype(np.uint8)
JSON = {"Content-Type": "application/json"}
BINARY = {"Content-Type": "application/octet-stream"}
TEXT = {"Content-Type": "text/plain"}


@dataclass(frozen=True)
class Hostile:
    """One malformed request and the answer it must get."""

    name: str
    request: dict[str, Any]  # keyword arguments of requests.post
    status: int
    kind: str | None  # the handler's error type, or None when TorchServe itself answers (or for OIP's `error`)
    words: tuple[str, ...] = field(default=())  # the message must name the problem with these
    path: str = "/predictions/cnn"


def encode(image: Image.Image, fmt: str, **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def half(payload: bytes) -> bytes:
    return payload[: len(payload) // 2]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, extra_chunk: bytes = b"") -> bytes:
    """A tiny PNG whose header claims `width` x `height` 8-bit gray pixels: a decompression bomb's shape."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    body = png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + header + extra_chunk + body


def png_text_bomb(megabytes: int = 64) -> bytes:
    """A 28x28 PNG carrying a zTXt chunk of ~64 KB that inflates to `megabytes` MB."""
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (megabytes << 20), 9))
    return png_claiming(28, 28, text)


def text_bombs(count: int) -> bytes:
    """`count` zTXt chunks that each inflate to about 1 MB, as far as Pillow inflates one."""
    return png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 1_000_000, 9)) * count


def tiff_claiming(width: int, height: int) -> bytes:
    """A baseline 8-bit gray TIFF, one strip, whose tags claim `width` x `height`."""
    data_offset = 8 + 2 + 12 * 9 + 4
    tags = [(256, width), (257, height), (258, 8), (259, 1), (262, 1), (273, data_offset), (277, 1), (278, height)]
    entries = [struct.pack("<HHII", tag, 4, 1, value) for tag, value in [*tags, (279, 64)]]  # all LONG
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(64)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG with its start-of-frame header patched to claim `width` x `height`."""
    payload = bytearray(encode(Image.fromarray(DIGIT), "JPEG"))
    sof = payload.index(b"\xff\xc0")  # baseline start of frame: length, precision, height, width
    payload[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(payload)


def bmp_claiming(width: int, height: int) -> bytes:
    payload = bytearray(encode(Image.fromarray(DIGIT), "BMP"))
    payload[18:26] = struct.pack("<ii", width, height)  # BITMAPINFOHEADER biWidth, biHeight
    return bytes(payload)


def gif_claiming(width: int, height: int) -> bytes:
    payload = bytearray(encode(Image.fromarray(DIGIT), "GIF"))
    payload[6:10] = struct.pack("<HH", width, height)  # logical screen
    return bytes(payload)


def webp_claiming(width: int, height: int) -> bytes:
    payload = bytearray(encode(Image.fromarray(DIGIT).convert("RGB"), "WEBP", lossless=False))
    assert payload[12:16] == b"VP8 " and payload[23:26] == b"\x9d\x01\x2a"  # lossy key frame
    payload[26:30] = struct.pack("<HH", width, height)  # 14 bits each, scale bits zero
    return bytes(payload)


def animated_gif(frames: int, digit: np.ndarray = DIGIT) -> bytes:
    images = [Image.fromarray(np.roll(digit, shift, axis=1)) for shift in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=10)


def nested_json_text(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def pixels_json(values: list[Any]) -> bytes:
    """784 pixels as JSON text, `values` first (json.dumps writes NaN and Infinity as Python does)."""
    return json.dumps({"data": values + [0] * (784 - len(values))}).encode()


def sixteen_bit_png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels.astype(np.uint16) * 257), "PNG")  # 255 -> 65535


def cmyk(pixels: np.ndarray, fmt: str) -> bytes:
    return encode(Image.fromarray(pixels).convert("CMYK"), fmt, **({"quality": 100} if fmt == "JPEG" else {}))


def image_corpus() -> list[Hostile]:
    """Truncated, corrupt and zero-sized files of each format, including 16-bit, CMYK and animated ones."""
    png, gray_rgb = encode(Image.fromarray(NOISE), "PNG"), Image.fromarray(NOISE).convert("RGB")
    corrupt_png = bytearray(png)
    corrupt_png[60:80] = bytes(20)  # inside IDAT: the CRC no longer matches
    return [
        Hostile("png-signature-only", {"data": png[:8], "headers": BINARY}, 400, "CorruptImage", ("PNG",)),
        Hostile("truncated-png", {"data": half(png), "headers": BINARY}, 400, "TruncatedImage", ("cut short",)),
        Hostile("corrupt-png", {"data": bytes(corrupt_png), "headers": BINARY}, 400, "CorruptImage"),
        Hostile("truncated-jpeg", {"data": half(encode(gray_rgb, "JPEG")), "headers": BINARY}, 400, "TruncatedImage"),
        Hostile("truncated-gif", {"data": half(encode(gray_rgb, "GIF")), "headers": BINARY}, 400, "TruncatedImage"),
        Hostile("truncated-bmp", {"data": half(encode(gray_rgb, "BMP")), "headers": BINARY}, 400, "TruncatedImage"),
        Hostile("truncated-tiff", {"data": half(encode(gray_rgb, "TIFF")), "headers": BINARY}, 400, "TruncatedImage"),
        Hostile("corrupt-webp", {"data": half(encode(gray_rgb, "WEBP")), "headers": BINARY}, 400, "CorruptImage"),
        Hostile("zero-sized-png", {"data": png_claiming(0, 0), "headers": BINARY}, 400, "CorruptImage", ("PNG",)),
        Hostile("zero-sized-tiff", {"data": tiff_claiming(0, 0), "headers": BINARY}, 400, "CorruptImage", ("TIFF",)),
        Hostile(
            "truncated-16-bit-png", {"data": half(sixteen_bit_png(NOISE)), "headers": BINARY}, 400, "TruncatedImage"
        ),
        Hostile("truncated-cmyk-jpeg", {"data": half(cmyk(NOISE, "JPEG")), "headers": BINARY}, 400, "TruncatedImage"),
        Hostile("truncated-cmyk-tiff", {"data": half(cmyk(NOISE, "TIFF")), "headers": BINARY}, 400, "TruncatedImage"),
        Hostile(
            "float-tiff",
            {"data": encode(Image.fromarray(DIGIT.astype(np.float32)), "TIFF"), "headers": BINARY},
            415,
            "UnsupportedImageMode",
            ("32-bit",),
        ),
        Hostile(
            "animated-gif-cut-in-frame-1", {"data": animated_gif(3)[:60], "headers": BINARY}, 400, "TruncatedImage"
        ),
        Hostile("blank-canvas", {"data": encode(Image.new("RGB", (300, 200), "white"), "PNG")}, 400, "NoDigit"),
        Hostile("not-an-image-format", {"data": encode(Image.fromarray(DIGIT), "PCX")}, 415, "NotAnImage"),
    ]


def bomb_corpus() -> list[Hostile]:
    """Images over the pixel limit, refused from their header; a PNG whose text chunk inflates to 64 MB."""
    too_large = ("limit",)
    return [
        Hostile("png-4097x4096", {"data": png_claiming(4097, 4096)}, 413, "ImageTooLarge", ("4097x4096", "4096")),
        Hostile("png-100000x100000", {"data": png_claiming(100_000, 100_000)}, 413, "ImageTooLarge", too_large),
        Hostile("jpeg-60000x60000", {"data": jpeg_claiming(60_000, 60_000)}, 413, "ImageTooLarge", too_large),
        Hostile("gif-65535x65535", {"data": gif_claiming(65_535, 65_535)}, 413, "ImageTooLarge", too_large),
        Hostile("bmp-100000x100000", {"data": bmp_claiming(100_000, 100_000)}, 413, "ImageTooLarge", too_large),
        Hostile("tiff-100000x100000", {"data": tiff_claiming(100_000, 100_000)}, 413, "ImageTooLarge", too_large),
        Hostile("webp-16383x16383", {"data": webp_claiming(16_383, 16_383)}, 413, "ImageTooLarge", too_large),
        Hostile("png-text-chunk-bomb", {"data": png_text_bomb()}, 413, "ImageTooLarge", ("decompress",)),
    ]


def json_corpus() -> list[Hostile]:
    """Wrong and deeply nested JSON, NaN and infinities, huge numbers, strings, wrong shapes."""
    rows = [[0] * 28 for _ in range(28)]
    return [
        Hostile("malformed-json", {"data": b'{"data": [1, 2,', "headers": JSON}, 400, "BadJson", ("parse",)),
        Hostile("json-without-data", {"json": {"pixels": [0] * 784}}, 400, "BadJson", ('"data"',)),
        Hostile("json-null", {"data": b"null", "headers": JSON}, 400, "BadJson"),
        Hostile("json-number", {"data": b"7", "headers": JSON}, 400, "BadJson"),
        Hostile("deep-json", {"data": nested_json_text(100_000), "headers": JSON}, 400, "BadJson", ("nested",)),
        Hostile("deep-json-as-bytes", {"data": nested_json_text(100_000), "headers": BINARY}, 400, "BadJson"),
        Hostile("deep-but-parsed-json", {"data": nested_json_text(500), "headers": JSON}, 400, "BadShape"),
        Hostile("nan", {"data": pixels_json([float("nan")]), "headers": JSON}, 400, "BadPixels", ("finite",)),
        Hostile("infinity", {"data": pixels_json([float("inf")]), "headers": JSON}, 400, "BadPixels", ("finite",)),
        Hostile("1e400", {"data": b'{"data": [1e400' + b", 0" * 783 + b"]}", "headers": JSON}, 400, "BadPixels"),
        Hostile("int-of-400-digits", {"data": pixels_json([10**400]), "headers": JSON}, 400, "BadPixels", ("10**15",)),
        Hostile(
            "int-of-5000-digits", {"data": b"[" + b"9" * 5000 + b", 0" * 783 + b"]", "headers": JSON}, 400, "BadJson"
        ),
        Hostile("negative-pixel", {"json": {"data": [-1] + [0] * 783}}, 400, "BadPixels", ("0..255",)),
        Hostile("pixel-over-255", {"json": {"data": [256] + [0] * 783}}, 400, "BadPixels", ("0..255",)),
        Hostile("string-pixels", {"json": {"data": ["0"] * 784}}, 400, "BadPixels", ("str",)),
        Hostile("boolean-pixel", {"json": {"data": [True] + [0] * 783}}, 400, "BadPixels", ("bool",)),
        Hostile("783-pixels", {"json": {"data": [0] * 783}}, 400, "BadShape", ("783",)),
        Hostile("27-rows", {"json": {"data": rows[:27]}}, 400, "BadShape", ("27",)),
        Hostile("three-channels", {"json": {"data": [rows, rows, rows]}}, 400, "BadShape"),
        Hostile("huge-string", {"json": {"data": "A" * 5_000_001}}, 415, "NotAnImage", ("base64",)),
    ]


def transport_corpus() -> list[Hostile]:
    """Empty bodies, prose, invalid base64, odd form fields, and bodies at TorchServe's size limit."""
    at_limit = b"\x89PNG\r\n\x1a\n" + bytes(MAX_REQUEST_BYTES - 8)
    return [
        Hostile("empty-body", {"data": b"", "headers": BINARY}, 400, "EmptyBody", ("empty",)),
        Hostile("whitespace-body", {"data": b" \r\n\t ", "headers": TEXT}, 400, "EmptyBody", ("empty",)),
        Hostile("prose", {"data": "what digit is this? é".encode(), "headers": TEXT}, 415, "NotAnImage"),
        Hostile("binary-junk", {"data": bytes(range(256)) * 8, "headers": BINARY}, 415, "NotAnImage"),
        Hostile("invalid-base64", {"data": b"iVBORw0KGgo=AAAA==", "headers": TEXT}, 415, "NotAnImage", ("base64",)),
        Hostile("base64-of-junk", {"data": b"bm90IGFuIGltYWdlIGF0IGFsbA==", "headers": TEXT}, 415, "NotAnImage"),
        Hostile("data-url-of-junk", {"json": {"data": "data:image/png;base64,AAAA"}}, 415, "NotAnImage"),
        Hostile("two-unnamed-form-fields", {"files": {"a": b"1", "b": b"2"}}, 400, "MissingInput", ("'data'",)),
        Hostile("empty-form-field", {"files": {"data": ("d.png", b"", "image/png")}}, 400, "EmptyBody"),
        Hostile("body-at-the-size-limit", {"data": at_limit, "headers": BINARY}, 400, "CorruptImage"),
        # over max_request_size Netty answers before any handler: no JSON body, the reason phrase names it
        Hostile("body-over-the-size-limit", {"data": at_limit + b"\x00", "headers": BINARY}, 413, None, ("Too Large",)),
    ]


def surrogate_corpus() -> list[Hostile]:
    """A lone UTF-16 surrogate wherever TorchServe hands the handler a str: it failed whole batches."""
    lone = b'"\\ud800"'  # JSON's escape for the lone surrogate U+D800
    part = ("d.json", b'{"data": ' + lone + b"}", "application/json")
    return [
        Hostile("surrogate-json-string", {"data": lone, "headers": JSON}, 400, "BadText", ("surrogate",)),
        Hostile("surrogate-in-data", {"data": b'{"data": ' + lone + b"}", "headers": JSON}, 400, "BadText"),
        Hostile(
            "surrogate-in-data-url",
            {"data": b'{"data": "data:image/png;base64,\\ud800"}', "headers": JSON},
            400,
            "BadText",
        ),
        Hostile("surrogate-in-multipart-json-part", {"files": {"data": part}}, 400, "BadText"),
        Hostile("surrogate-in-json-rows", {"data": b'{"data": [' + lone + b"]}", "headers": JSON}, 400, "BadShape"),
    ]


def costly_corpus() -> list[Hostile]:
    """Files that cost seconds of decoding each before the handler counted their structure (digit_budget.py)."""
    work = "TooMuchDecodingWork"
    return [
        Hostile("jpeg-of-1000-scans", {"data": progressive_jpeg(1024, 1000)}, 413, work, ("1,000 scans",)),
        Hostile("jpeg-4096-of-20-scans", {"data": progressive_jpeg(4096, 20)}, 413, work, ("20 scans",)),
        Hostile("jpeg-of-9-mb-stray-bytes", {"data": jpeg_with_stray_bytes(9_000_000)}, 413, work),
        Hostile("png-of-800000-chunks", {"data": png_with_chunks(800_000)}, 413, work, ("chunks",)),
        Hostile("png-of-harmless-chunks", {"data": png_with_chunks(800_000, b"tIME")}, 413, work, ("chunks",)),
        Hostile("gif-of-4-million-sub-blocks", {"data": gif_with_blocks(4_000_000)}, 413, work, ("blocks",)),
        Hostile("tiff-of-a-million-strips", {"data": tiff(1, 1_000_000, 1)}, 413, work, ("strips",)),
        Hostile("tiff-of-25000-tags", {"data": tiff(28, 28, extra_tags=25_000)}, 413, work, ("tags",)),
        Hostile("bmp-of-8-mb-rle", {"data": bmp_rle8(2048, 2048)}, 413, work, ("RLE",)),
        Hostile("webp-of-a-million-chunks", {"data": webp_with_chunks(1_000_000)}, 413, work, ("chunks",)),
        Hostile("png-exif-of-65535-tags", {"data": png_with_exif(65_535)}, 413, work, ("EXIF",)),
        Hostile("png-of-200-text-bombs", {"data": png_claiming(28, 28, text_bombs(200))}, 413, work, ("text",)),
        Hostile("webp-exif-of-65535-tags", {"data": webp_with_exif(65_535)}, 413, work, ("EXIF",)),
        Hostile("gif-frame-at-65000", {"data": gif_with_frame_at(65_000, 65_000)}, 413, "ImageTooLarge", ("4096",)),
    ]


def misleading_corpus() -> list[Hostile]:
    """Requests whose refusal used to name the wrong problem, and blank images that used to get a digit."""
    multipart = {"Content-Type": "multipart/form-data; boundary=xyz"}
    unterminated = b'--xyz\r\nContent-Disposition: form-data; name="data"; filename="d.png"\r\n\r\n\x89PNG'
    white = Image.new("L", (28, 28), 255)
    return [
        Hostile("garbage-multipart", {"data": b"garbage", "headers": multipart}, 400, "MalformedForm", ("boundary",)),
        Hostile("unterminated-multipart", {"data": unterminated, "headers": multipart}, 400, "MalformedForm"),
        Hostile("utf16-json", {"data": json.dumps({"data": [0]}).encode("utf-16"), "headers": JSON}, 415, "NotUtf8"),
        Hostile("data-url-not-base64", {"data": b"data:image/png,%89PNG", "headers": TEXT}, 415, "BadDataUrl"),
        Hostile("blank-28x28-png", {"data": encode(white, "PNG")}, 400, "NoDigit", ("no digit",)),
        Hostile("blank-28x28-bmp", {"data": encode(white, "BMP")}, 400, "NoDigit"),
        Hostile("blank-29x29-png", {"data": encode(Image.new("L", (29, 29), 255), "PNG")}, 400, "NoDigit"),
        Hostile("json-of-zeros", {"json": {"data": [0] * 784}}, 400, "NoDigit"),
    ]


def corpus() -> list[Hostile]:
    entries = image_corpus() + bomb_corpus() + json_corpus() + transport_corpus()
    entries += surrogate_corpus() + costly_corpus() + misleading_corpus()
    names = [entry.name for entry in entries]
    assert len(set(names)) == len(names), "corpus names must be unique"
    return entries


def with_bom(digit: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return codecs.BOM_UTF8 + json.dumps({"data": digit.tolist()}).encode(), JSON


def data_url_with_parameter(digit: np.ndarray) -> tuple[bytes, dict[str, str]]:
    url = "data:image/png;charset=binary;base64," + base64.b64encode(encode(Image.fromarray(digit), "PNG")).decode()
    return json.dumps({"data": url}).encode(), JSON


# Requests refused or misread before round 2 that are unambiguous: body and headers, from a 28x28 digit
UNUSUAL_BUT_VALID_REQUESTS: dict[str, Callable[[np.ndarray], tuple[bytes, dict[str, str]]]] = {
    "json-with-utf8-bom": with_bom,
    "data-url-with-a-parameter": data_url_with_parameter,
}
# The costliest JPEG within the bounds (4096x4096, 16 progressive scans): answered, not refused
LARGEST_PROGRESSIVE_JPEG = progressive_jpeg(4096, 16)


# Hostile-looking images that are legitimate digits, made from a 28x28 digit: each must be answered 200, with
# the label the plain PNG of the same digit gets (the first frame is the digit; 16 bits map back exactly).
UNUSUAL_BUT_VALID: dict[str, Callable[[np.ndarray], bytes]] = {
    "16-bit-png": sixteen_bit_png,
    "cmyk-jpeg": lambda digit: cmyk(digit, "JPEG"),
    "cmyk-tiff": lambda digit: cmyk(digit, "TIFF"),
    "animated-gif-of-400-frames": lambda digit: animated_gif(400, digit),
    "apng-of-4-frames": lambda digit: encode(
        Image.fromarray(digit), "PNG", save_all=True, append_images=[Image.fromarray(digit.T.copy())] * 3
    ),
}


# ---- round 3: OIP requests that multiplied a per-image cost, answers past TorchServe's response limit ----

INFER = "/v2/models/cnn/infer"


def oip_images(images: list[bytes], binary: bool = True, **envelope: Any) -> dict[str, Any]:
    """An OIP BYTES request of `images` as `requests.post` arguments: the binary extension or base64 JSON."""
    if not binary:
        data = [base64.b64encode(image).decode() for image in images]
        tensor = {"name": "i", "datatype": "BYTES", "shape": [len(images)], "data": data}
        return {"data": json.dumps({"inputs": [tensor], **envelope}), "headers": JSON}
    data = b"".join(struct.pack("<I", len(image)) + image for image in images)
    tensor = {"name": "i", "datatype": "BYTES", "shape": [len(images)], "parameters": {"binary_data_size": len(data)}}
    header = json.dumps({"inputs": [tensor], **envelope}, ensure_ascii=False).encode()
    assert len(header) + len(data) <= MAX_REQUEST_BYTES, "TorchServe would refuse it before the handler sees it"
    return {"data": header + data, "headers": {**BINARY, "Inference-Header-Content-Length": str(len(header))}}


def oip_digits(count: int = 1, **envelope: Any) -> dict[str, Any]:
    """An OIP UINT8 request of `count` copies of the corpus's digit, as JSON (UTF-8, non-ASCII unescaped:
    1,750,000 "é" are 3.5 MB, as the issue sent them)."""
    tensor = {"name": "x", "datatype": "UINT8", "shape": [count, 784], "data": np.tile(DIGIT.ravel(), count).tolist()}
    body = json.dumps({"inputs": [tensor], **envelope}, ensure_ascii=False).encode()
    assert len(body) <= MAX_REQUEST_BYTES, "TorchServe would refuse it before the handler sees it"
    return {"data": body, "headers": JSON}


def with_header_length(value: str | bytes, content_type: dict[str, str] = BINARY) -> dict[str, Any]:
    """A valid OIP JSON request whose Inference-Header-Content-Length is `value` (a str goes out as Latin-1,
    as HTTP/1.1 header bytes; TorchServe's Netty reads them back the same way), sent as the binary extension
    is (octet-stream) or as JSON, which TorchServe parses before the handler sees it."""
    request = oip_digits()
    return {**request, "headers": {**content_type, "Inference-Header-Content-Length": value}}


def answer_size_corpus() -> list[Hostile]:
    """Requests whose answer would exceed TorchServe's max_response_size (6,553,500 bytes): each its own 413."""
    limit = ("max_response_size",)
    framed_json = [{"name": "framed"}, {"name": "probabilities"}]
    return [
        Hostile("id-of-1750000-e-acute", oip_digits(id="é" * 1_750_000), 413, None, (*limit, "shorter id"), INFER),
        Hostile("id-of-control-characters", oip_digits(id="\x01" * 1_100_000), 413, None, limit, INFER),
        Hostile("id-of-astral-characters", oip_digits(id="\U0001f600" * 600_000), 413, None, limit, INFER),
        Hostile(
            "framed-as-json-and-a-long-id",
            oip_digits(1024, id="x" * 3_500_000, outputs=framed_json),
            413,
            None,
            (*limit, "'framed' in binary"),
            INFER,
        ),
        Hostile(
            "e-acute-id-in-binary-extension",
            oip_images([encode(Image.fromarray(DIGIT), "PNG")], id="é" * 1_750_000),
            413,
            None,
            limit,
            INFER,
        ),
    ]


def request_budget_corpus() -> list[Hostile]:
    """Images each within the bounds of one image, summed over a request past one large image's worth."""
    webp, png = large_image("WEBP", lossless=True), large_image("PNG", compress_level=9)  # 512 fit in 10 MiB
    pixels = ("16,777,216", "in one request")
    return [
        Hostile("1024-lossless-4096-webps-binary", oip_images([webp] * 1024), 413, None, pixels, INFER),
        Hostile("128-lossless-4096-webps-json", oip_images([webp] * 128, binary=False), 413, None, pixels, INFER),
        Hostile("512-4096-pngs-binary", oip_images([png] * 512), 413, None, pixels, INFER),
        Hostile("64-pngs-of-2000-chunks", oip_images([png_with_chunks(2_000)] * 64), 413, None, ("PNG chunks",), INFER),
        Hostile(
            "20-pngs-of-1000-exif-tags",
            oip_images([png_with_exif_block(exif_of_tags(1_000))] * 20),
            413,
            None,
            ("EXIF tags", "in one request"),
            INFER,
        ),
        Hostile(
            "100-pngs-of-text-chunks",
            oip_images([png_claiming(28, 28, text_bombs(1))] * 100),
            413,
            None,
            ("compressed text chunks",),
            INFER,
        ),
    ]


def header_and_route_corpus() -> list[Hostile]:
    """Malformed binary-extension headers; route confusions a client's headers or body used to cause."""
    name = ("Inference-Header-Content-Length",)
    header = [
        Hostile(f"header-length-{label}", with_header_length(value), 400, None, name, INFER)
        for label, value in [
            ("superscript-two", "\u00b2"),
            ("5000-digits", "9" * 5_000),
            ("superscripts", "\u00b3\u00b9"),
            ("arabic-indic-digits-as-utf8", "\u0661\u0662".encode()),
            ("plus-sign", "+12"),
            ("minus-sign", "-1"),
            ("inner-space", "1 2"),
            ("hex", "0x10"),
            ("past-the-body", "999999"),
        ]
    ]
    v1 = {"json": {"instances": [DIGIT.tolist()]}}
    as_json = with_header_length("\u00b2", JSON)
    return [
        *header,
        Hostile("header-length-superscript-two-on-json", as_json, 400, None, name, INFER),
        Hostile("kserve-v1-body-on-predictions", v1, 400, None, ("KServe v1",)),
        Hostile("oip-body-on-explanations", oip_digits(), 400, None, ("no explainer",), "/explanations/cnn"),
        Hostile(
            "oip-on-v2-explain-with-url-path",
            {**oip_digits(), "headers": {**JSON, "url_path": ""}},
            400,
            None,
            ("no explainer",),
            "/v2/models/cnn/explain",
        ),
    ]


def round3_corpus() -> list[Hostile]:
    entries = answer_size_corpus() + request_budget_corpus() + header_and_route_corpus()
    names = [entry.name for entry in entries + corpus()]
    assert len(set(names)) == len(names), "corpus names must be unique"
    return entries


def exif_declaring_more(fmt: str) -> Callable[[np.ndarray], bytes]:
    """The digit as `fmt` whose EXIF block declares 65,535 tags and holds one (junk metadata, a valid image)."""
    exif = exif_declaring(65_535, 1)

    def make(digit: np.ndarray) -> bytes:
        if fmt == "PNG":
            plain = encode(Image.fromarray(digit), "PNG")
            return plain[:33] + png_chunk(b"eXIf", exif[6:]) + plain[33:]  # after IHDR
        if fmt == "WEBP":
            return encode(Image.fromarray(digit).convert("RGB"), "WEBP", lossless=True, exif=exif)
        return encode(Image.fromarray(digit), "JPEG", quality=100, exif=exif)

    return make


UNUSUAL_BUT_VALID.update(
    {f"{fmt.lower()}-exif-declaring-65535-tags": exif_declaring_more(fmt) for fmt in ("JPEG", "PNG", "WEBP")}
)
