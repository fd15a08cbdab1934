"""The work an image file asks of its decoder, counted from its bytes before any decoder runs.

A decoder's cost is not bounded by the image's pixel count alone. Each structure below costs a step of a
loop per repetition (Pillow's Python loops, or libjpeg's per-scan pass over every block), and a 10 MB body
can repeat it hundreds of thousands of times, for seconds of one worker's time (docs/security.md, hostile
input, has the costs and the command that measures them). Each bound below keeps a hostile file near the cost of
the largest legitimate image (4096x4096) and far above what real encoders write; the walk that checks it
stops at the bound, so checking costs at most a few milliseconds.

Only counts are checked here. A file cut short or malformed is left to the decoder, which names the problem.
"""

from __future__ import annotations

import struct

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


def check_decoding_work(payload: bytes) -> None:
    """Refuses, with a 413 naming the count and its bound, an image that would cost more to decode than the
    largest legitimate one. Bytes of no known format pass: the decoder refuses them."""
    for signature, check in CHECKS:
        if payload.startswith(signature):
            check(payload)
            return
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        check_webp(payload)


def refuse(fmt: str, what: str, bound: int, count: int | None = None, advice: str = "send a plain PNG") -> None:
    """413 naming the structure, how many the file has (or that it has more than the bound), and the bound."""
    found = f"{count:,}" if count is not None else f"more than {bound:,}"
    raise too_large(
        "TooMuchDecodingWork",
        f"the {fmt} file has {found} {what}; this server decodes at most {bound:,}, as each costs decoding "
        f"time: {advice}",
    )


def check_png(payload: bytes) -> None:
    """Counts chunks up to IEND (or the end of the bytes), and compressed text chunks among them."""
    position, chunks, texts = len(PNG_SIGNATURE), 0, 0
    while position + 8 <= len(payload):
        length, kind = struct.unpack_from(">I4s", payload, position)
        if not kind.replace(b"_", b"a").isalnum():  # Pillow's own test of a chunk type (\w{4})
            return  # not a chunk: the decoder stops here and names the corruption
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            refuse("PNG", "chunks", MAX_PNG_CHUNKS)
        texts += kind in PNG_COMPRESSED_TEXT
        if texts > MAX_PNG_TEXT_CHUNKS:
            refuse("PNG", "compressed text chunks", MAX_PNG_TEXT_CHUNKS)
        if kind == b"IEND":
            return
        position += 12 + length


def check_jpeg(payload: bytes) -> None:
    """Walks the segments up to the first scan, then counts the scans (SOS markers) against the frame size."""
    position, steps, pixels = 2, 0, 0
    while position + 1 < len(payload):
        marker_at = payload.find(b"\xff", position)
        if marker_at < 0:
            return
        steps += 1 + marker_at - position  # stray bytes cost Pillow a loop step each
        if steps > MAX_JPEG_HEADER_STEPS:
            refuse("JPEG", "segments and stray bytes before its first scan", MAX_JPEG_HEADER_STEPS)
        marker = payload[marker_at + 1] if marker_at + 1 < len(payload) else 0
        if marker in (0xFF, 0x00, 0x01) or 0xD0 <= marker <= 0xD9:  # fill, stuffing, markers without a length
            position = marker_at + 1 if marker == 0xFF else marker_at + 2
            continue
        if marker == 0xDA:
            check_jpeg_scans(payload, marker_at, pixels)
            return
        if marker_at + 4 > len(payload):
            return
        (length,) = struct.unpack_from(">H", payload, marker_at + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and marker_at + 9 <= len(payload):
            height, width = struct.unpack_from(">HH", payload, marker_at + 5)  # start of frame
            pixels = max(pixels, height * width)
        position = marker_at + 2 + length


def check_jpeg_scans(payload: bytes, first_scan: int, pixels: int) -> None:
    # In entropy-coded data a 0xFF byte is followed by 0x00 or a restart marker, so FF DA starts a scan (or
    # sits in a segment between scans: an overcount, never an undercount)
    scans = payload.count(b"\xff\xda", first_scan)
    if scans > MAX_JPEG_SCANS:
        refuse("JPEG", "scans", MAX_JPEG_SCANS, scans)
    if pixels <= MAX_PIXELS and scans * pixels > MAX_JPEG_SCAN_PIXELS:
        bound = max(1, MAX_JPEG_SCAN_PIXELS // max(pixels, 1))
        refuse("JPEG", f"scans of {pixels:,} pixels each", bound, scans)


def check_gif(payload: bytes) -> None:
    """Counts extensions and sub-blocks before the first image descriptor."""
    if len(payload) < 13:
        return
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


def check_tiff(payload: bytes) -> None:
    """Counts the first IFD's entries and its strips or tiles (the count of their offsets); BigTIFF too."""
    order = "<" if payload[:2] == b"II" else ">"
    big = payload[2:4] in (b"+\x00", b"\x00+")
    offset, count_field, entry_field = ("Q", "Q", "HHQ") if big else ("I", "H", "HHI")
    first = 8 if big else 4
    entry_size, count_size = (20, 8) if big else (12, 2)
    if len(payload) < first + struct.calcsize(offset):
        return
    (ifd,) = struct.unpack_from(order + offset, payload, first)
    if ifd + count_size > len(payload):
        return
    (entries,) = struct.unpack_from(order + count_field, payload, ifd)
    if entries > MAX_TIFF_TAGS:
        refuse("TIFF", "tags in its first image", MAX_TIFF_TAGS, entries)
    for index in range(entries):
        entry = ifd + count_size + entry_size * index
        if entry + entry_size > len(payload):
            return
        tag, _, count = struct.unpack_from(order + entry_field, payload, entry)
        if tag in (TIFF_STRIP_OFFSETS, TIFF_TILE_OFFSETS) and count > MAX_TIFF_STRIPS:
            refuse("TIFF", "strips or tiles", MAX_TIFF_STRIPS, count)


def check_bmp(payload: bytes) -> None:
    """Refuses RLE-compressed pixel data beyond what Pillow's Python decoder reads in a fraction of a second."""
    if len(payload) < 34:
        return
    (header_size,) = struct.unpack_from("<I", payload, 14)
    if header_size < 40:  # the OS/2 header has no compression field
        return
    (offset,) = struct.unpack_from("<I", payload, 10)
    (compression,) = struct.unpack_from("<I", payload, 30)
    rle_bytes = len(payload) - offset
    if compression in (BMP_RLE8, BMP_RLE4) and rle_bytes > MAX_BMP_RLE_BYTES:
        refuse("BMP", "bytes of RLE-compressed pixels", MAX_BMP_RLE_BYTES, rle_bytes, "send PNG")


def check_exif(exif: bytes | None) -> None:
    """Counts the entries of an EXIF block's first IFD (`exif_block`), before Pillow parses them."""
    if not exif:
        return
    if exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    if len(exif) < 8 or exif[:2] not in (b"II", b"MM"):
        return
    order = "<" if exif[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", exif, 4)
    if ifd + 2 > len(exif):
        return
    (entries,) = struct.unpack_from(order + "H", exif, ifd)
    if entries > MAX_EXIF_TAGS:
        refuse("image", "EXIF tags", MAX_EXIF_TAGS, entries)


def check_webp(payload: bytes) -> None:
    """Counts the RIFF container's top-level chunks."""
    position, chunks = 12, 0
    while position + 8 <= len(payload):
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            refuse("WebP", "chunks", MAX_WEBP_CHUNKS)
        (size,) = struct.unpack_from("<I", payload, position + 4)
        position += 8 + size + (size & 1)  # chunks are padded to even sizes


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
