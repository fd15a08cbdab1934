"""The work an image file asks of its decoder, counted from its bytes before any decoder runs.

A decoder's cost is not bounded by the image's pixel count alone. Each structure below costs a step of a
loop per repetition (Pillow's Python loops, or libjpeg's per-scan pass over every block), and a 10 MB body
can repeat it hundreds of thousands of times, for seconds of one worker's time (docs/security.md, hostile
input, has the costs and the command that measures them). Each bound below keeps a hostile file near the cost of
the largest legitimate image (4096x4096) and far above what real encoders write; the walk that checks it
stops at the bound, so checking costs at most a few milliseconds.

Only counts are checked here. A file cut short or malformed is left to the decoder, which names the problem.

A request may carry many images (an OIP BYTES tensor holds up to 1,024), so each count is also summed over
the request (`RequestBudget`) against a bound of its own, REQUEST_BOUNDS, before any image of it is decoded:
the costliest request then costs about what the costliest single image does, not 1,024 times that. A single
image never meets a request bound before its own bound (each request bound is at least the image's).
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

from digit_errors import too_large

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_SIDE = 4096
# Checked from the header, before any pixel is decoded (digit_inputs.py), whatever TorchServe's
# limit_max_image_pixels says (that switch only lifts Pillow's global limit in TorchServe's own vision handlers).
# Larger images are refused by that check, with its own message, so the bounds below leave them to it.
MAX_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
# A 10 MB PNG in libpng's 8 KB IDAT chunks has 1,280 chunks; Pillow spends a Python step on each
MAX_PNG_CHUNKS = 16_384
# Compressed text chunks (zTXt, iTXt), each of which Pillow inflates up to 1 MB, 64 MB in all before it gives up
MAX_PNG_TEXT_CHUNKS = 16
PNG_COMPRESSED_TEXT = (b"zTXt", b"iTXt")
# Segments (and stray bytes, which Pillow skips one at a time) before a JPEG's first scan: real files have
# a few dozen (EXIF, ICC and XMP split over APP segments, tables)
MAX_JPEG_HEADER_STEPS = 4_096
# libjpeg passes over every block of a component once per progressive scan, so the cost is scans x pixels:
# 16 full scans of the largest image (libjpeg's progressive script writes 10 for colour, 6 for gray)
MAX_JPEG_SCAN_PIXELS = 16 * 4096 * 4096
MAX_JPEG_SCANS = 256  # and a cap of its own, for each scan's fixed cost on small images
# Extensions and sub-blocks before a GIF's first image, which Pillow reads one by one (XMP's "magic
# trailer" alone is 258 one-byte sub-blocks)
MAX_GIF_BLOCKS = 16_384
# Pillow reads a TIFF's strips or tiles one decoder call each (a 4096x4096 image in one-row strips is within
# the bound); and its first IFD tag by tag (65,535 entries possible)
MAX_TIFF_STRIPS = 8_192
MAX_TIFF_TAGS = 1_024
# Pillow decodes RLE-compressed BMPs in Python, byte by byte
MAX_BMP_RLE_BYTES = 512 * 1024
# RIFF chunks of a WebP file, parsed by libwebp one by one
MAX_WEBP_CHUNKS = 16_384
# Entries of an EXIF block's first IFD, which Pillow reads one by one to find the orientation: a JPEG's
# APP1 segment holds at most about 5,000; a PNG eXIf or WebP EXIF chunk can hold 65,535
MAX_EXIF_TAGS = 1_024

TIFF_STRIP_OFFSETS, TIFF_TILE_OFFSETS = 273, 324
BMP_RLE8, BMP_RLE4 = 1, 2
EXIF_ENTRY = 12  # bytes of one IFD entry: tag, type, count, value or offset

# Each image counts at least this many pixels against the request's pixels: every decoder call has a fixed
# cost (Pillow's plugins parse their headers in Python), whatever the image's size
MIN_IMAGE_PIXELS = 64 * 64
# What one request's images may hold in all, by kind of work (the names `check_decoding_work` counts under).
# Each bound costs about what the largest legitimate image does (docs/security.md, hostile input, has the
# costs and the command that measures them); where a legitimate file always holds a few (segments, tags,
# chunks), the bound leaves room for 1,024 such files, and each step of those costs microseconds.
REQUEST_BOUNDS = {
    "pixels": MAX_PIXELS,  # one 4096x4096 image's worth, in as many images as the request holds
    "JPEG scan pixels": MAX_JPEG_SCAN_PIXELS,  # 16 progressive scans of that much
    "JPEG scans": 16 * 1024,
    "JPEG segments and stray bytes": 64 * MAX_JPEG_HEADER_STEPS,
    "PNG chunks": 4 * MAX_PNG_CHUNKS,
    "PNG compressed text chunks": 4 * MAX_PNG_TEXT_CHUNKS,
    "GIF extension blocks": 4 * MAX_GIF_BLOCKS,
    "TIFF strips or tiles": 2 * MAX_TIFF_STRIPS,
    "TIFF tags": 16 * MAX_TIFF_TAGS,
    "BMP RLE bytes": 2 * MAX_BMP_RLE_BYTES,
    "WebP chunks": 4 * MAX_WEBP_CHUNKS,
    "EXIF tags": 16 * MAX_EXIF_TAGS,
}


@dataclass
class RequestBudget:
    """The work one request's images ask of the worker, summed by kind against REQUEST_BOUNDS.

    Charge every image of a request (`charge`, with what `check_decoding_work` counted) before decoding any,
    so that a request over its budget costs milliseconds. Other work a request multiplies per item is charged
    here too, under a kind of its own with its own bound in `bounds` (e.g. explanations: the digits explained
    times what one costs, in forward passes), or in pixels when it competes with decoding for the same time.
    """

    bounds: dict[str, int] = field(default_factory=lambda: dict(REQUEST_BOUNDS))
    spent: Counter = field(default_factory=Counter)

    def charge(self, work: dict[str, int]) -> None:
        """Adds one item's work, kind by kind.

        Raises:
            RequestError: 413 TooMuchDecodingWork naming the kind, the request's total so far and its bound.
        """
        for kind, amount in work.items():
            self.spent[kind] += amount
            bound = self.bounds[kind]
            if self.spent[kind] > bound:
                raise too_large(
                    "TooMuchDecodingWork",
                    f"the request's images hold {self.spent[kind]:,} {kind} so far, over the {bound:,} this server "
                    f"decodes in one request (about what its largest single image costs): send fewer or smaller "
                    f"images a request",
                )


def check_decoding_work(payload: bytes) -> dict[str, int]:
    """Refuses, with a 413 naming the count and its bound, an image that would cost more to decode than the
    largest legitimate one; returns what it counted, by kind (REQUEST_BOUNDS' names), for `RequestBudget`.

    "pixels" is among them where the walk read the image's size: the largest a PNG's IHDR or a JPEG's start of
    frame claims (a decoder may read any of them). Bytes of no known format pass: the decoder refuses them.
    """
    for signature, check in CHECKS:
        if payload.startswith(signature):
            return check(payload)
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return check_webp(payload)
    return {}


def refuse(fmt: str, what: str, bound: int, count: int | None = None, advice: str = "send a plain PNG") -> None:
    """413 naming the structure, how many the file has (or that it has more than the bound), and the bound."""
    found = f"{count:,}" if count is not None else f"more than {bound:,}"
    raise too_large(
        "TooMuchDecodingWork",
        f"the {fmt} file has {found} {what}; this server decodes at most {bound:,}, as each costs decoding "
        f"time: {advice}",
    )


def check_png(payload: bytes) -> dict[str, int]:
    """Counts chunks up to IEND (or the end of the bytes), and compressed text chunks among them."""
    position, chunks, texts, tags, pixels = len(PNG_SIGNATURE), 0, 0, 0, None
    while position + 8 <= len(payload):
        length, kind = struct.unpack_from(">I4s", payload, position)
        if not kind.replace(b"_", b"a").isalnum():  # Pillow's own test of a chunk type (\w{4})
            break  # not a chunk: the decoder stops here and names the corruption
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            refuse("PNG", "chunks", MAX_PNG_CHUNKS)
        texts += kind in PNG_COMPRESSED_TEXT
        if texts > MAX_PNG_TEXT_CHUNKS:
            refuse("PNG", "compressed text chunks", MAX_PNG_TEXT_CHUNKS)
        if kind == b"eXIf":
            tags += check_exif(payload[position + 8 : position + 8 + length]).get("EXIF tags", 0)
        if kind == b"IHDR" and position + 16 <= len(payload):
            width, height = struct.unpack_from(">II", payload, position + 8)
            pixels = max(pixels or 0, width * height)
        if kind == b"IEND":
            break
        position += 12 + length
    counted = {"PNG chunks": chunks, "PNG compressed text chunks": texts, "EXIF tags": tags}
    return counted if pixels is None else {**counted, "pixels": pixels}


def check_jpeg(payload: bytes) -> dict[str, int]:
    """Walks the segments up to the first scan, then counts the scans (SOS markers) against the frame size."""
    position, steps, pixels, frame, tags = 2, 0, 0, False, 0
    while position + 1 < len(payload):
        marker_at = payload.find(b"\xff", position)
        if marker_at < 0:
            break
        steps += 1 + marker_at - position  # stray bytes cost Pillow a loop step each
        if steps > MAX_JPEG_HEADER_STEPS:
            refuse("JPEG", "segments and stray bytes before its first scan", MAX_JPEG_HEADER_STEPS)
        marker = payload[marker_at + 1] if marker_at + 1 < len(payload) else 0
        if marker in (0xFF, 0x00, 0x01) or 0xD0 <= marker <= 0xD9:  # fill, stuffing, markers without a length
            position = marker_at + 1 if marker == 0xFF else marker_at + 2
            continue
        if marker == 0xDA:
            scans = check_jpeg_scans(payload, marker_at, pixels)
            return {**jpeg_work(steps, pixels, frame, tags), "JPEG scans": scans, "JPEG scan pixels": scans * pixels}
        if marker_at + 4 > len(payload):
            break
        (length,) = struct.unpack_from(">H", payload, marker_at + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and marker_at + 9 <= len(payload):
            height, width = struct.unpack_from(">HH", payload, marker_at + 5)  # start of frame
            pixels, frame = max(pixels, height * width), True
        tags += jpeg_tags(marker, payload[marker_at + 4 : marker_at + 2 + length])
        position = marker_at + 2 + length
    return jpeg_work(steps, pixels, frame, tags)


def jpeg_tags(marker: int, segment: bytes) -> int:
    """IFD entries Pillow parses as it opens a JPEG: its EXIF block (APP1) and multi-picture index (APP2)."""
    if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
        return check_exif(segment).get("EXIF tags", 0)
    if marker == 0xE2 and segment.startswith(b"MPF\x00"):
        return check_exif(segment[4:], "MPF index tags").get("EXIF tags", 0)
    return 0


def jpeg_work(steps: int, pixels: int, frame: bool, tags: int) -> dict[str, int]:
    counted = {"JPEG segments and stray bytes": steps, "EXIF tags": tags}
    return {**counted, "pixels": pixels} if frame else counted


def check_jpeg_scans(payload: bytes, first_scan: int, pixels: int) -> int:
    """The file's scans, refused past MAX_JPEG_SCANS or past MAX_JPEG_SCAN_PIXELS with its frame's pixels."""
    # In entropy-coded data a 0xFF byte is followed by 0x00 or a restart marker, so FF DA starts a scan (or
    # sits in a segment between scans: an overcount, never an undercount)
    scans = payload.count(b"\xff\xda", first_scan)
    if scans > MAX_JPEG_SCANS:
        refuse("JPEG", "scans", MAX_JPEG_SCANS, scans)
    if pixels <= MAX_PIXELS and scans * pixels > MAX_JPEG_SCAN_PIXELS:
        bound = max(1, MAX_JPEG_SCAN_PIXELS // max(pixels, 1))
        refuse("JPEG", f"scans of {pixels:,} pixels each", bound, scans)
    return scans


def check_gif(payload: bytes) -> dict[str, int]:
    """Counts extensions and sub-blocks before the first image descriptor."""
    if len(payload) < 13:
        return {}
    flags = payload[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while position < len(payload) and payload[position] == 0x21:  # "!" extension: label, then sub-blocks
        position += 2
        while position < len(payload):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                refuse("GIF", "extension blocks before its first image", MAX_GIF_BLOCKS)
            size = payload[position]
            position += 1 + size
            if size == 0:
                break
    return {"GIF extension blocks": blocks}


def check_tiff(payload: bytes) -> dict[str, int]:
    """Counts the first IFD's entries and its strips or tiles (the count of their offsets); BigTIFF too."""
    order = "<" if payload[:2] == b"II" else ">"
    big = payload[2:4] in (b"+\x00", b"\x00+")
    offset, count_field, entry_field = ("Q", "Q", "HHQ") if big else ("I", "H", "HHI")
    first = 8 if big else 4
    entry_size, count_size = (20, 8) if big else (12, 2)
    if len(payload) < first + struct.calcsize(offset):
        return {}
    (ifd,) = struct.unpack_from(order + offset, payload, first)
    if ifd + count_size > len(payload):
        return {}
    (entries,) = struct.unpack_from(order + count_field, payload, ifd)
    if entries > MAX_TIFF_TAGS:
        refuse("TIFF", "tags in its first image", MAX_TIFF_TAGS, entries)
    strips = 0
    for index in range(entries):
        entry = ifd + count_size + entry_size * index
        if entry + entry_size > len(payload):
            break
        tag, _, count = struct.unpack_from(order + entry_field, payload, entry)
        if tag in (TIFF_STRIP_OFFSETS, TIFF_TILE_OFFSETS):
            if count > MAX_TIFF_STRIPS:
                refuse("TIFF", "strips or tiles", MAX_TIFF_STRIPS, count)
            strips = max(strips, count)
    return {"TIFF tags": entries, "TIFF strips or tiles": strips}


def check_bmp(payload: bytes) -> dict[str, int]:
    """Refuses RLE-compressed pixel data beyond what Pillow's Python decoder reads in a fraction of a second."""
    if len(payload) < 34:
        return {}
    (header_size,) = struct.unpack_from("<I", payload, 14)
    if header_size < 40:  # the OS/2 header has no compression field
        return {}
    (offset,) = struct.unpack_from("<I", payload, 10)
    (compression,) = struct.unpack_from("<I", payload, 30)
    rle_bytes = len(payload) - offset
    if compression not in (BMP_RLE8, BMP_RLE4):
        return {}
    if rle_bytes > MAX_BMP_RLE_BYTES:
        refuse("BMP", "bytes of RLE-compressed pixels", MAX_BMP_RLE_BYTES, rle_bytes, "send PNG")
    return {"BMP RLE bytes": max(rle_bytes, 0)}


def check_exif(exif: bytes | None, what: str = "EXIF tags") -> dict[str, int]:
    """Counts the entries of an EXIF block's first IFD (`exif_block`) that the block really holds, before
    Pillow parses them (JPEG's multi-picture index, `what` "MPF index tags", is the same structure).

    Pillow reads an IFD entry by entry and stops, with a warning, where the bytes end; so what it costs is the
    entries present, not the count the IFD declares (buggy editors write 65,535 over one entry).
    """
    entries = ifd_entries(exif[6:] if exif and exif.startswith(b"Exif\x00\x00") else exif)
    if entries > MAX_EXIF_TAGS:
        refuse("image", what, MAX_EXIF_TAGS, entries)
    return {"EXIF tags": entries} if entries else {}


def ifd_entries(block: bytes | None) -> int:
    """The entries of a TIFF-structured block's first IFD that fit in the block (0 when it is not one)."""
    if not block or len(block) < 8 or block[:2] not in (b"II", b"MM"):
        return 0
    order = "<" if block[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", block, 4)
    if ifd + 2 > len(block):
        return 0
    (declared,) = struct.unpack_from(order + "H", block, ifd)
    return min(declared, (len(block) - ifd - 2) // EXIF_ENTRY)


def check_webp(payload: bytes) -> dict[str, int]:
    """Counts the RIFF container's top-level chunks."""
    position, chunks, tags = 12, 0, 0
    while position + 8 <= len(payload):
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            refuse("WebP", "chunks", MAX_WEBP_CHUNKS)
        kind, size = struct.unpack_from("<4sI", payload, position)
        if kind == b"EXIF":
            tags += check_exif(payload[position + 8 : position + 8 + size]).get("EXIF tags", 0)
        position += 8 + size + (size & 1)  # chunks are padded to even sizes
    return {"WebP chunks": chunks, "EXIF tags": tags}


CHECKS = (
    (PNG_SIGNATURE, check_png),
    (b"\xff\xd8", check_jpeg),
    (b"GIF8", check_gif),
    (b"II*\x00", check_tiff),
    (b"MM\x00*", check_tiff),
    (b"II+\x00", check_tiff),
    (b"MM\x00+", check_tiff),
    (b"BM", check_bmp),
)
