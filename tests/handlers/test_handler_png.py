"""The libspng fast path for plain PNGs: the same pixels as Pillow's path, and nothing it should not take."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from digit_errors import RequestError
from digit_imaging import to_grayscale
from digit_inputs import MAX_PIXELS, decode_image, read_request
from digit_png import decode_plain_png, fast_png_available
from handler_helpers import png_bytes
from PIL import Image, PngImagePlugin

pytestmark = pytest.mark.skipif(not fast_png_available(), reason="pyspng is not installed")


def through_pillow(payload: bytes) -> np.ndarray:
    return to_grayscale(decode_image(payload))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """The PNG with one more chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + chunk(kind, data) + png[33:]


def drawing(rng: np.random.Generator, mode: str, size: int = 280) -> Image.Image:
    canvas = np.full((size, size), 255, np.uint8)
    top, left = rng.integers(10, size // 2, 2)
    canvas[top : top + size // 3, left : left + 12] = rng.integers(0, 60)
    return Image.fromarray(canvas).convert(mode)


def test_plain_pngs_decode_to_pillows_pixels(mnist_test) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(d) for d in mnist_test[0][:50]] + [drawing(rng, "L") for _ in range(5)]
    images += [drawing(rng, "RGB") for _ in range(5)] + [Image.fromarray(d).convert("RGB") for d in mnist_test[0][:5]]
    for image in images:
        for options in ({}, {"optimize": True}, {"compress_level": 0}, {"interlace": 1}):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", **options)
            payload = buffer.getvalue()
            fast = decode_plain_png(payload, MAX_PIXELS)
            assert fast is not None, (image.mode, options)
            assert fast.dtype == np.uint8 and np.array_equal(fast, through_pillow(payload)), (image.mode, options)


def test_harmless_chunks_still_take_the_fast_path(mnist_test) -> None:
    png = png_bytes(mnist_test[0][0])
    for kind, data in ((b"gAMA", struct.pack(">I", 45455)), (b"pHYs", struct.pack(">IIB", 2835, 2835, 1))):
        tagged = with_chunk(png, kind, data)
        assert np.array_equal(decode_plain_png(tagged, MAX_PIXELS), mnist_test[0][0])


def test_pngs_that_read_differently_go_to_pillow(mnist_test) -> None:
    digit = mnist_test[0][0]
    png = png_bytes(digit)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    text = io.BytesIO()
    Image.fromarray(digit).save(text, format="PNG", pnginfo=info)
    others = {
        "RGBA (alpha is laid on white)": png_bytes(digit, "RGBA"),
        "LA": png_bytes(digit, "LA"),
        "palette": png_bytes(digit, "P"),
        "16-bit": png_bytes(digit.astype(np.uint16) * 257, "I;16"),
        "tRNS": with_chunk(png, b"tRNS", struct.pack(">H", 0)),
        "eXIf (orientation)": with_chunk(png, b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x00"),
        "text chunk": text.getvalue(),
        "JPEG": png_bytes(digit, fmt="JPEG"),
    }
    for name, payload in others.items():
        assert decode_plain_png(payload, MAX_PIXELS) is None, name


def test_damaged_or_oversized_pngs_go_to_pillow_and_its_errors(mnist_test) -> None:
    png = png_bytes(mnist_test[0][0])
    bad_crc = bytearray(png)
    bad_crc[-20] ^= 0xFF  # inside the last IDAT or its CRC
    damaged = {"bad CRC": bytes(bad_crc), "truncated": png[: len(png) // 2], "no IEND": png[:-12]}
    for name, payload in damaged.items():
        assert decode_plain_png(payload, MAX_PIXELS) is None, name
    assert decode_plain_png(png, max_pixels=28 * 27) is None  # over the limit: Pillow's path refuses it by name
    with pytest.raises(RequestError) as refused:
        read_request({"body": bytes(bad_crc)}, (28, 28))
    assert refused.value.code == 400 and refused.value.kind in ("CorruptImage", "TruncatedImage")


def test_the_fast_path_feeds_the_same_digit_to_the_model(mnist_test) -> None:
    digit = mnist_test[0][3]
    assert np.array_equal(read_request({"body": png_bytes(digit)}, (28, 28)), digit.astype(np.float32))
