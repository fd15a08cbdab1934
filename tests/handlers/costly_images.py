"""Image files that are cheap to send and costly to decode, made byte by byte: each repeats the one
structure a decoder loops over (a JPEG's scans, a PNG's chunks, a GIF's sub-blocks, a TIFF's strips or tags,
a BMP's RLE commands, a WebP's chunks) as often as a test asks. Shared by the handler's unit tests and the
hostile corpus over HTTP (tests/serving/hostile_payloads.py).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[5:23, 12:16] = 255  # a "1", white on black


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def progressive_jpeg(side: int, scans: int) -> bytes:
    """A `side` x `side` gray progressive JPEG with `scans` scans: its last scan (a few bytes of end-of-band
    runs on a flat image, yet a pass over every block for libjpeg) repeated."""
    image = Image.new("L", (side, side), 128)
    image.paste(255, (side // 3, side // 5, side // 2, 4 * side // 5))  # some ink
    payload = encode(image, "JPEG", progressive=True)
    base = payload.count(b"\xff\xda")
    assert scans >= base, f"libjpeg writes {base} scans already"
    last = payload.rindex(b"\xff\xda")
    return payload[:-2] + payload[last:-2] * (scans - base) + b"\xff\xd9"


def jpeg_with_stray_bytes(count: int) -> bytes:
    """A digit JPEG with `count` bytes of junk between two of its header segments (Pillow skips them one by one)."""
    payload = encode(Image.fromarray(DIGIT), "JPEG")
    first_segment_end = 4 + struct.unpack_from(">H", payload, 4)[0]  # after SOI and JFIF's APP0
    return payload[:first_segment_end] + b"\x00" * count + payload[first_segment_end:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunks(count: int, kind: bytes = b"zzZz") -> bytes:
    """The digit as PNG with `count` empty ancillary chunks (12 bytes each) after its pixel data."""
    payload = encode(Image.fromarray(DIGIT), "PNG")
    return payload[:-12] + png_chunk(kind, b"") * count + payload[-12:]


def gif_with_blocks(count: int) -> bytes:
    """The digit as GIF with a comment extension of `count` one-byte sub-blocks before its image."""
    payload = encode(Image.fromarray(DIGIT), "GIF")
    image_at = payload.index(b"!") if b"!" in payload[13:] else payload.index(b",")
    return payload[:image_at] + b"!\xfe" + b"\x01a" * count + b"\x00" + payload[image_at:]


def gif_with_frame_at(x: int, y: int) -> bytes:
    """A 28x28 GIF whose one frame is placed at (`x`, `y`), far outside its logical screen."""
    payload = bytearray(encode(Image.fromarray(DIGIT), "GIF"))
    frame = payload.index(b",", 13)
    payload[frame + 1 : frame + 5] = struct.pack("<HH", x, y)
    return bytes(payload)


def tiff(width: int, height: int, rows_per_strip: int | None = None, extra_tags: int = 0) -> bytes:
    """An uncompressed 8-bit gray TIFF, `rows_per_strip` rows a strip, plus `extra_tags` unknown tags."""
    rows_per_strip = rows_per_strip or height
    strips = -(-height // rows_per_strip)
    pixels = np.zeros((height, width), np.uint8)
    pixels[height // 5 : 4 * height // 5, width // 3 : width // 2] = 255
    offsets_at = 8 + pixels.size
    counts_at = offsets_at + 4 * strips
    ifd_at = counts_at + 4 * strips
    offsets = np.arange(strips, dtype="<u4") * (rows_per_strip * width) + 8
    counts = np.full(strips, rows_per_strip * width, dtype="<u4")
    counts[-1] = (height - rows_per_strip * (strips - 1)) * width
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    tags += [(273, 4, strips, offsets_at if strips > 1 else 8), (277, 3, 1, 1), (278, 4, 1, rows_per_strip)]
    tags += [(279, 4, strips, counts_at if strips > 1 else int(counts[0]))]
    tags += [(40000 + index, 3, 1, 0) for index in range(extra_tags)]
    tags.sort()
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *tag) for tag in tags) + bytes(4)
    header = b"II*\x00" + struct.pack("<I", ifd_at)
    return header + pixels.tobytes() + offsets.tobytes() + counts.tobytes() + ifd


def bmp_rle8(width: int, height: int) -> bytes:
    """An 8-bit RLE-compressed BMP of the worst shape for Pillow's Python decoder: runs of one pixel,
    alternating ink and paper, one two-byte command a pixel."""
    row = b"\x01\xff\x01\x00" * (width // 2) + b"\x00\x00"  # end of line
    data = row * height + b"\x00\x01"  # end of bitmap
    palette = b"".join(bytes((level, level, level, 0)) for level in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette + data


def webp_with_chunks(count: int) -> bytes:
    """The digit as an extended (VP8X) WebP with `count` empty unknown chunks before its image."""
    simple = encode(Image.fromarray(DIGIT).convert("RGB"), "WEBP", lossless=False)
    canvas = (27).to_bytes(3, "little") * 2  # width - 1, height - 1
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + canvas
    chunks = vp8x + (b"ZZZZ" + bytes(4)) * count + simple[12:]
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def exif_of_tags(count: int) -> bytes:
    """An EXIF block whose first IFD holds `count` entries, the first an orientation."""
    entries = [struct.pack("<HHII", 0x0112, 3, 1, 1)]
    entries += [struct.pack("<HHII", 1000 + index % 60_000, 3, 1, 1) for index in range(count - 1)]
    return b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, count) + b"".join(entries) + bytes(4)


def png_with_exif(count: int) -> bytes:
    """The digit as PNG with an eXIf chunk of `count` tags."""
    payload = encode(Image.fromarray(DIGIT), "PNG")
    return payload[:33] + png_chunk(b"eXIf", exif_of_tags(count)[6:]) + payload[33:]


def webp_with_exif(count: int) -> bytes:
    """The digit as WebP with an EXIF chunk of `count` tags."""
    return encode(Image.fromarray(DIGIT).convert("RGB"), "WEBP", exif=exif_of_tags(count))


def exif_declaring(declared: int, present: int) -> bytes:
    """An EXIF block whose first IFD declares `declared` entries and holds `present` (as buggy editors write)."""
    block = exif_of_tags(present)  # "Exif\0\0", TIFF header, first IFD at 8: its entry count at byte 14
    return block[:14] + struct.pack("<H", declared) + block[16:]


def jpeg_with_exif(exif: bytes) -> bytes:
    """The digit as a baseline JPEG whose APP1 segment is `exif`."""
    return encode(Image.fromarray(DIGIT), "JPEG", exif=exif)


def png_with_exif_block(exif: bytes) -> bytes:
    """The digit as PNG with `exif` (its "Exif\\0\\0" header dropped) as an eXIf chunk."""
    payload = encode(Image.fromarray(DIGIT), "PNG")
    return payload[:33] + png_chunk(b"eXIf", exif[6:]) + payload[33:]


def webp_with_exif_block(exif: bytes) -> bytes:
    return encode(Image.fromarray(DIGIT).convert("RGB"), "WEBP", exif=exif)


def png_with_exif_profile(count: int) -> bytes:
    """The digit as PNG carrying an EXIF block of `count` tags the old way: ImageMagick's hex text profile."""
    from PIL import PngImagePlugin

    block = exif_of_tags(count)
    text = "\nexif\n" + f"{len(block):8d}\n" + block.hex()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", text, zip=True)
    return encode(Image.fromarray(DIGIT), "PNG", pnginfo=info)


def large_image(fmt: str, side: int = 4096, **save_args) -> bytes:
    """A `side` x `side` digit-like image (one bar of ink) as `fmt`: tiny as lossless WebP or PNG, costly to decode."""
    image = Image.new("L", (side, side), 0)
    image.paste(255, (side // 3, side // 5, side // 2, 4 * side // 5))
    return encode(image, fmt, **save_args)
