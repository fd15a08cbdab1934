"""A fast path for the plain PNGs most clients send: libspng (through pyspng) instead of Pillow.

Pillow (`digit_inputs.decode_image`) stays the decoder of record. This module only takes an 8-bit gray or
RGB PNG whose chunks all check out (CRCs included) and none of which changes how Pillow would read its
pixels: no transparency, no palette, no EXIF orientation, no text. Anything else, and anything libspng
fails on, returns None and goes through Pillow, with its checks and its precise error messages. For the
images it takes, the result is the one Pillow gives, pixel for pixel (RGB through Pillow's own "L" formula).

Why: Pillow spends most of a small image's time in Python-level set-up, which libspng does not have; in
TorchServe's worker that set-up is a large part of a 28x28 PNG request (the decode column of `digits bench
http`'s handler split, docs/performance.md, shows what it costs).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

try:
    import pyspng
except ImportError:  # a serving environment without it decodes every image with Pillow (the handler logs which)
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRAY, RGB = 0, 2  # IHDR colour types
# Chunks that leave the pixels as Pillow reads them: Pillow applies no gamma and no colour profile.
HARMLESS_CHUNKS = frozenset({b"IHDR", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"sBIT", b"tIME"})


def fast_png_available() -> bool:
    return pyspng is not None


def decode_plain_png(payload: bytes, max_pixels: int) -> np.ndarray | None:
    """(H, W) uint8 intensities of a plain PNG, or None for anything this path does not vouch for.

    Args:
        payload: the request's bytes, whatever they are.
        max_pixels: images larger than this go to Pillow's path, which refuses them by name.
    """
    if pyspng is None or not payload.startswith(PNG_SIGNATURE):
        return None
    header = plain_png_header(payload)
    if header is None or not 0 < header[0] * header[1] <= max_pixels:
        return None
    width, height, colour = header
    try:
        pixels = pyspng.load(payload)
    except Exception:  # libspng's errors are terse; Pillow's path names the problem for the client
        return None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width):
        return None
    return pixels if colour == GRAY else np.asarray(Image.fromarray(pixels, "RGB").convert("L"))


def plain_png_header(payload: bytes) -> tuple[int, int, int] | None:
    """(width, height, colour type) when every chunk up to IEND is whole, harmless and has a valid CRC."""
    view, position, header = memoryview(payload), len(PNG_SIGNATURE), None
    while position + 12 <= len(payload):
        length, kind = struct.unpack_from(">I4s", payload, position)
        end = position + 12 + length  # length, type, data, CRC
        if end > len(payload) or kind not in HARMLESS_CHUNKS:
            return None
        if zlib.crc32(view[position + 4 : end - 4]) != struct.unpack_from(">I", payload, end - 4)[0]:
            return None
        if kind == b"IHDR":
            header = read_ihdr(payload, position, length)
            if header is None:
                return None
        elif header is None:  # IHDR must come first
            return None
        if kind == b"IEND":
            return header
        position = end
    return None


def read_ihdr(payload: bytes, position: int, length: int) -> tuple[int, int, int] | None:
    """The IHDR's size and colour type when it is 8-bit gray or RGB, standard compression and filter."""
    if length != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(
        ">IIBBBBB", payload, position + 8
    )
    if depth != 8 or colour not in (GRAY, RGB) or compression or filtering or interlace not in (0, 1):
        return None
    return width, height, colour
