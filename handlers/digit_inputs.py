"""Reading one request of a TorchServe batch into a digit: (H, W) float32 intensities, white on black.

What TorchServe 0.12.0 hands the handler, per request (ts/protocol/otf_message_handler.py,
`_retrieve_input_data`, and ts/service.py, `retrieve_data_for_inference`): a dict from parameter name to
value. A plain body is the parameter "body"; each multipart form field and each query-string parameter is
its own parameter. A value is already-parsed JSON for `application/json` (or the raw bytes when it did not
parse), a str for `text/*`, and bytes otherwise.

Accepted: image bytes Pillow can read, the same base64-encoded (bytes or str, data URL or not; a UTF-8
byte-order mark is dropped), JSON
`{"data": pixels}` or bare `pixels`, where pixels are H*W numbers, H rows of W, or [[H rows of W]], raw
0..255 intensities, white digit on black (the MNIST convention, so JSON pixels are used as sent), and
refused like a blank image when they hold no ink. Image files are checked for the work they would cost
(`digit_budget.py`) before any decoder sees them. Every failure is a `RequestError` naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from digit_budget import (
    MAX_IMAGE_SIDE,
    MAX_PIXELS,
    MIN_IMAGE_PIXELS,
    RequestBudget,
    check_decoding_work,
    check_exif,
)
from digit_errors import RequestError, bad_request, prefixed, too_large, unsupported
from digit_imaging import frame_digit, require_ink, to_grayscale
from digit_json import loads
from digit_png import decode_plain_png
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_BODY_BYTES = 16 * 1024 * 1024  # far above any digit photo; TorchServe's max_request_size is the first wall
# Formats a client may send. Naming them also keeps Pillow from trying every plugin it has on hostile
# bytes (EPS would even start Ghostscript). Camera JPEGs in MPO form open through "JPEG".
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
# File signatures of IMAGE_FORMATS (WebP's is split in two: see sniff_format). Bytes that start like one
# of them but that Pillow cannot identify are a corrupt image (zero or impossible size, a cut header), not
# some other kind of body.
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
INPUT_FIELDS = ("data", "body")
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Byte-order marks of encodings JSON text may not use (RFC 8259 wants UTF-8), longest first
FOREIGN_BOMS = {
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}
# Pillow's own decompression-bomb message, "Image size (N pixels) exceeds limit of ..."
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")


def read_request(row: Any, size: tuple[int, int], content_type: str | None = None) -> np.ndarray:
    """Reads one request into a digit of the model's input size.

    Args:
        row: one element of the batch TorchServe passes to `handle`.
        size: the model's (height, width).
        content_type: the request's Content-Type header, when known (it names what an empty row means).

    Returns:
        (height, width) float32 in 0..255.

    Raises:
        RequestError: for anything but a readable digit.
    """
    return read_payload(pick_payload(row, content_type), size)


def pick_payload(row: Any, content_type: str | None = None) -> Any:
    """The request's input: field "data", else "body", else its only field (a multipart upload)."""
    if not isinstance(row, Mapping) or not row:
        raise empty_row(content_type)
    for field in INPUT_FIELDS:
        if field in row:
            return row[field]
    if len(row) == 1:
        return next(iter(row.values()))
    names = ", ".join(repr(str(name))[:40] for name in list(row)[:10])
    raise bad_request("MissingInput", f"no 'data' or 'body' field among the form fields {names}; name one 'data'")


def empty_row(content_type: str | None) -> RequestError:
    """An empty row is an empty body, or a form body TorchServe's frontend could not split into fields."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type in FORM_TYPES:
        return bad_request(
            "MalformedForm",
            f"the {media_type} body holds no complete field: its boundary is missing or wrong, or it is cut short "
            "or garbled; send the image as the whole body, or as a well-formed form field named 'data'",
        )
    return bad_request("EmptyBody", "the request has no body and no form fields; send an image or JSON")


def read_payload(payload: Any, size: tuple[int, int]) -> np.ndarray:
    """Dispatches on what TorchServe made of the body: bytes, text, or parsed JSON."""
    if isinstance(payload, (bytes, bytearray)):
        return read_bytes(bytes(payload), size)
    if isinstance(payload, str):
        return read_bytes(text_bytes(payload), size)
    if isinstance(payload, (list, Mapping)):
        return read_json(payload, size)
    raise bad_request(
        "BadJson", f'expected a JSON object {{"data": [...]}} or a list of pixels, got {type(payload).__name__}'
    )


def text_bytes(text: str) -> bytes:
    """The UTF-8 of text TorchServe decoded or parsed from JSON, which may hold a lone UTF-16 surrogate
    (JSON's "\\ud800" escape): that is not Unicode, cannot be encoded, and is named."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad_request(
            "BadText",
            f"the text holds a lone UTF-16 surrogate ({ascii(text[err.start])} at character {err.start}), which "
            "is not a Unicode character; send valid UTF-8",
        ) from None


def read_bytes(payload: bytes, size: tuple[int, int]) -> np.ndarray:
    """Tells JSON text, base64 text and data URLs from binary image bytes, and reads each."""
    if len(payload) > MAX_BODY_BYTES:
        raise too_large("BodyTooLarge", f"body is {len(payload)} bytes; the limit is {MAX_BODY_BYTES}")
    text = without_bom(payload).strip()
    if not text:
        raise bad_request("EmptyBody", "the body is empty; send an image or JSON")
    if text[:1] in (b"{", b"["):
        return read_json(parse_json(text), size)
    if text[:5].lower() == b"data:":
        return read_image(decode_data_url(text), size, encoded=True)
    if _BASE64_TEXT.fullmatch(text):
        return read_image(decode_base64(text), size, encoded=True)
    return read_image(payload, size)


def without_bom(payload: bytes) -> bytes:
    """Drops a UTF-8 byte-order mark (some editors and Windows tools write one before JSON or base64 text);
    names a UTF-16 or UTF-32 one, which no image format starts with."""
    if payload.startswith(codecs.BOM_UTF8):
        return payload[len(codecs.BOM_UTF8) :]
    for bom, encoding in FOREIGN_BOMS.items():
        if payload.startswith(bom):
            raise unsupported(
                "NotUtf8", f"the body starts with a {encoding} byte-order mark; send JSON or base64 text as UTF-8"
            )
    return payload


def parse_json(text: bytes) -> Any:
    """Parses JSON text that TorchServe forwarded unparsed (sent as bytes, or too deep for it)."""
    try:
        return loads(text)
    except RecursionError:
        raise bad_request("BadJson", "JSON is nested too deeply; send at most [[[...]]]") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise bad_request("BadJson", f"body looks like JSON but does not parse: {err}") from None


def decode_data_url(text: bytes) -> bytes:
    """The bytes of a base64 data URL, `data:[<media type>][;<parameter>=<value>]*;base64,<data>` (RFC 2397)."""
    header, comma, data = text.partition(b",")
    if not comma:
        raise bad_request("BadDataUrl", "the data URL has no comma before its data; send data:image/png;base64,...")
    parameters = [part.strip().lower() for part in header[5:].split(b";")[1:]]
    if b"base64" not in parameters:
        shown = header[:60].decode("ascii", errors="replace")
        raise unsupported(
            "BadDataUrl", f"the data URL {shown!r} is not base64 (no ';base64'); send data:image/png;base64,..."
        )
    if not _BASE64_TEXT.fullmatch(data):
        raise unsupported("NotAnImage", "the data URL's data is not valid base64; send data:image/png;base64,...")
    return decode_base64(data)


def decode_base64(text: bytes) -> bytes:
    """Decodes standard or URL-safe base64, with or without padding or line breaks."""
    compact = re.sub(rb"\s+", b"", text).translate(bytes.maketrans(b"-_", b"+/"))
    compact += b"=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error as err:
        raise unsupported(
            "NotAnImage", f"body is neither an image, nor JSON, nor valid base64 ({err}); send PNG or JPEG bytes"
        ) from None


def read_image(
    payload: bytes, size: tuple[int, int], *, encoded: bool = False, budget: RequestBudget | None = None
) -> np.ndarray:
    """Decodes image bytes and frames the digit they show: plain PNGs through libspng, the rest through Pillow.

    Args:
        budget: the request's, when it holds several images, already charged with this one's `image_work`;
            None for a request of one image, checked here against the bounds of one image.
    """
    if budget is None:
        check_decoding_work(payload)
    gray = decode_plain_png(payload, MAX_PIXELS)
    if gray is None:
        gray = to_grayscale(decode_image(payload, encoded=encoded, budget=budget))
    return frame_digit(gray, size)


def charged_budget(payloads: Sequence[Any], item: str) -> RequestBudget:
    """A request's decoding budget, charged with the work of each of its images (`image_work`) before any is
    decoded: the image files among `payloads` (bytes); other items (JSON pixels) are not decoded as images.

    Raises:
        RequestError: 413 naming the item ("`item` INDEX") whose image is over a bound of one image, or at
            which the request's total passed its bound.
    """
    budget = RequestBudget()
    for index, payload in enumerate(payloads):
        if isinstance(payload, bytes):
            with prefixed(f"{item} {index}"):
                budget.charge(image_work(payload))
    return budget


def image_work(payload: bytes) -> dict[str, int]:
    """What decoding one image of a request will cost, by kind (digit_budget.REQUEST_BOUNDS), from its bytes
    and header alone: `check_decoding_work`'s counts (refusing a file over a bound of one image) and its
    pixels, at least MIN_IMAGE_PIXELS.

    Raises:
        RequestError: 413 for an image over a bound of one image, its pixels included.
    """
    work = check_decoding_work(payload)
    pixels = work["pixels"] if "pixels" in work else header_pixels(payload)
    if pixels > MAX_PIXELS:
        raise too_large(
            "ImageTooLarge",
            f"the image's header claims {pixels:,} pixels; the limit is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}",
        )
    return {**work, "pixels": max(pixels, MIN_IMAGE_PIXELS)}


def header_pixels(payload: bytes) -> int:
    """The pixels of an image as Pillow's header parse gives them (its size before any decoding); 0 for bytes
    it cannot open, which the decoder then refuses by name.

    Raises:
        RequestError: 413 ImageTooLarge when opening alone trips Pillow's own pixel limit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(payload), formats=IMAGE_FORMATS) as image:
                width, height = image.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise pillow_bomb(err) from None  # a frame placed far outside its canvas enlarges it as it opens
        except Exception:  # noqa: BLE001 - unreadable here is unreadable to the decoder, which names why
            return 0
    return width * height


def decode_image(payload: bytes, *, encoded: bool = False, budget: RequestBudget | None = None) -> Image.Image:
    """Opens and fully decodes an image (the first frame of GIF, WebP, TIFF), refusing oversized ones first.

    Args:
        payload: the image file's bytes.
        encoded: whether they came out of base64, for a clearer error message.
        budget: the request's (`read_image`); charged here with the EXIF tags of a PNG's text profile, which
            only Pillow's reading of the file reveals.

    Raises:
        RequestError: 415 when not an image, 413 when too large, 400 when truncated or corrupt.
    """
    with warnings.catch_warnings():
        # a client's broken metadata ("Corrupt EXIF data") is not the server's news: no stderr line in the logs
        warnings.simplefilter("ignore", UserWarning)
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning must refuse too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(payload), formats=IMAGE_FORMATS)  # reads the header only
            check_pixel_count(image)
            image.load()
            exif_tags = check_exif(exif_block(image))
            if budget is not None and not isinstance(image.info.get("exif"), bytes):  # a text profile's tags
                budget.charge(exif_tags)
            ImageOps.exif_transpose(image, in_place=True)  # phone photos are stored sideways, with a tag
        except (RequestError, MemoryError):
            raise
        except UnidentifiedImageError:
            raise unidentified(payload, encoded) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise pillow_bomb(err) from None
        except Exception as err:  # Pillow's plugins raise many types on corrupt data; each is the client's
            raise decode_failure(err) from None
    return image


def exif_block(image: Image.Image) -> bytes | None:
    """The EXIF bytes Pillow's getexif() would parse: the file's EXIF block, or a PNG's hex-encoded text
    profile of it (TIFF's own tags are already bounded by digit_budget.check_tiff)."""
    exif = image.info.get("exif")
    profile = image.info.get("Raw profile type exif")
    if exif is None and isinstance(profile, str):
        try:
            exif = bytes.fromhex("".join(profile.split("\n")[3:]))
        except ValueError:
            return None
    return exif if isinstance(exif, bytes) else None


def pillow_bomb(err: Exception) -> RequestError:
    """Pillow's own pixel limit tripped while opening (a GIF frame placed far outside its canvas stretches
    the image as it opens): said with this server's limit, not Pillow's."""
    found = _PILLOW_PIXELS.search(str(err))
    claimed = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow allows"
    return too_large(
        "ImageTooLarge",
        f"the image would cover {claimed} once decoded (a frame placed outside its canvas enlarges it); the "
        f"limit is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} ({MAX_PIXELS:,} pixels)",
    )


def unidentified(payload: bytes, encoded: bool) -> RequestError:
    """415 for bytes of no image format we read; 400 for a file that starts like one but cannot be read."""
    fmt = sniff_format(payload)
    if fmt is not None:
        return bad_request(
            "CorruptImage",
            f"the body starts like a {fmt} file but its header cannot be read (cut short, corrupt, or an image "
            "of zero pixels); send the whole, valid file",
        )
    what = "base64 payload decodes to bytes that are not" if encoded else "body is not"
    return unsupported("NotAnImage", f"{what} an image ({', '.join(IMAGE_FORMATS)}), nor JSON; check the Content-Type")


def sniff_format(payload: bytes) -> str | None:
    """The image format a file's first bytes announce, if it is one of IMAGE_FORMATS."""
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in SIGNATURES.items() if payload.startswith(magic)), None)


# Pillow inflates PNG text and ICC chunks only up to PngImagePlugin.MAX_TEXT_CHUNK each, and MAX_TEXT_MEMORY
# in all, and then raises one of these
_CHUNK_BOMBS = ("decompressed data too large", "too much memory used in text chunks")


def decode_failure(err: Exception) -> RequestError:
    """Names what went wrong inside Pillow: a truncated file, a chunk that inflates too far, or corruption."""
    if isinstance(err, OSError) and "truncated" in str(err).lower():
        return bad_request("TruncatedImage", f"the image file is cut short ({err}); send the whole file")
    if isinstance(err, ValueError) and any(bomb in str(err).lower() for bomb in _CHUNK_BOMBS):
        return too_large("ImageTooLarge", f"a compressed chunk of the image decompresses past the limit ({err})")
    return bad_request("CorruptImage", f"image cannot be decoded: {type(err).__name__}: {err}")


def check_pixel_count(image: Image.Image) -> None:
    """Refuses decompression bombs: a few KB of PNG can claim gigapixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise too_large(
            "ImageTooLarge",
            f"{image.format} image is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}",
        )
    if width * height == 0:
        raise bad_request("CorruptImage", f"{image.format} image is {width}x{height} pixels: it holds nothing")


def read_json(value: Any, size: tuple[int, int]) -> np.ndarray:
    """Reads `{"data": pixels}` or bare pixels, validated value by value."""
    if isinstance(value, Mapping):
        if "data" not in value:
            keys = ", ".join(repr(str(key))[:40] for key in list(value)[:10])
            raise bad_request("BadJson", f'JSON object has no "data" key (keys: {keys or "none"})')
        value = value["data"]
        if isinstance(value, str):  # {"data": "<base64 image>"}
            return read_bytes(text_bytes(value), size)
    return require_ink(pixels_from_json(value, size))


def pixels_from_json(value: Any, size: tuple[int, int]) -> np.ndarray:
    """Checks shape and values without recursing: deep nesting is just a wrong shape here."""
    height, width = size
    rows = _pixel_rows(value, height, width)
    flat = [number for row in rows for number in row]
    for index, number in enumerate(flat):
        if type(number) not in (int, float):  # type(), not isinstance: True is an int but not a pixel
            raise bad_request("BadPixels", f"pixel {index} is {type(number).__name__}, not a number")
        if not (isinstance(number, int) or math.isfinite(number)):
            raise bad_request("BadPixels", f"pixel {index} is {number}; pixels must be finite")
        if not 0 <= number <= 255:
            raise bad_request("BadPixels", f"pixel {index} is {_show(number)}; raw intensities are 0..255")
    return np.asarray(flat, dtype=np.float32).reshape(size)


def _show(number: int | float) -> str:
    # str() of a gigantic int is slow, and refused past 4300 digits
    return repr(number) if isinstance(number, float) or abs(number) < 10**15 else "an integer over 10**15"


def _pixel_rows(value: Any, height: int, width: int) -> list[list[Any]]:
    """Accepts H*W numbers, H rows of W, or one channel of H rows of W; returns the rows."""
    expected = f"{height * width} numbers, {height} rows of {width}, or [[{height} rows of {width}]]"
    if not isinstance(value, list):
        raise bad_request("BadShape", f"pixels must be a JSON list of {expected}, got {type(value).__name__}")
    if len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if len(value) == height * width and not any(isinstance(v, list) for v in value):
        return [value]
    if len(value) == height and all(isinstance(row, list) and len(row) == width for row in value):
        return value
    raise bad_request("BadShape", f"pixels must be {expected}; got a list of {len(value)}")
