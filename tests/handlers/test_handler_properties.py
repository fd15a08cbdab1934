"""Whatever a client sends, the handler answers with a digit or with its own 4xx; it never raises anything else."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from datetime import timedelta

import digit_oip
import numpy as np
import pytest
from digit_contract import TORCHSERVE_MAX_RESPONSE
from digit_errors import RequestError
from digit_imaging import MIN_CONTRAST
from digit_inputs import read_request
from digit_oip import AnswerFrame, OipRequest, answer_bound, read_oip, route
from handler_helpers import make_context, png_bytes, run_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

# Pillow warns about the corrupt files these tests make on purpose
pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning:PIL\.")

SIZE = (28, 28)
FRAME = AnswerFrame(("tiny", "1.0"), tuple("0123456789"), TORCHSERVE_MAX_RESPONSE)
# "never hang": an example over the deadline fails (generous: these inputs take milliseconds, on a busy box too)
FAST = settings(max_examples=150, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow])


def digit_or_own_error(row: object) -> np.ndarray | RequestError:
    """Reads a request; the only exception allowed out is a RequestError with a 4xx the issue names."""
    try:
        digit = read_request(row, SIZE)
    except RequestError as err:
        assert err.code in (400, 413, 415) and err.message
        json.dumps(err.body())
        return err
    assert digit.shape == SIZE and digit.dtype == np.float32
    assert np.isfinite(digit).all() and digit.min() >= 0 and digit.max() <= 255
    return digit


def _sample_files() -> list[bytes]:
    digit = np.zeros((28, 28), np.uint8)
    digit[5:23, 10:18] = 200
    large = np.asarray(Image.fromarray(255 - digit).resize((90, 70)))
    files = [png_bytes(digit, fmt=fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")]
    files += [png_bytes(large, mode="RGBA"), png_bytes(large, mode="P", fmt="GIF"), png_bytes(large, mode="1")]
    frames = [Image.fromarray(np.roll(digit, shift, axis=1)) for shift in range(4)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    sixteen_bit = png_bytes(large.astype(np.uint16) * 257)
    cmyk = [png_bytes(large, mode="CMYK", fmt=fmt) for fmt in ("JPEG", "TIFF")]
    return [*files, animated.getvalue(), sixteen_bit, *cmyk]


SAMPLE_FILES = _sample_files()
MAGIC = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
]


@FAST
@given(st.binary(max_size=2048), st.sampled_from(["body", "data", "file"]))
def test_random_bytes(payload: bytes, field: str) -> None:
    digit_or_own_error({field: payload})


@FAST
@given(st.sampled_from(MAGIC), st.binary(max_size=512))
def test_random_bytes_behind_image_signatures(magic: bytes, rest: bytes) -> None:
    digit_or_own_error({"body": magic + rest})


@FAST
@given(st.sampled_from(SAMPLE_FILES), st.data())
def test_damaged_image_files(payload: bytes, data: st.DataObject) -> None:
    damaged = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(damaged)))
    digit_or_own_error({"body": bytes(damaged[:cut])})


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def _gif_claiming(width: int, height: int) -> bytes:
    gif = bytearray(SAMPLE_FILES[3])
    gif[6:10] = struct.pack("<HH", width, height)  # the logical screen, which Pillow takes as the image size
    return bytes(gif)


@settings(FAST, max_examples=60)  # fewer: a size just under the limit decodes up to 16 M pixels
@given(
    st.integers(0, 2**31 - 1) | st.integers(4000, 4200),
    st.integers(0, 2**31 - 1) | st.integers(4000, 4200),
    st.sampled_from([_png_claiming, _gif_claiming]),
)
def test_claimed_image_sizes_are_refused_from_the_header(width: int, height: int, make) -> None:
    """A header may claim any size over a few bytes of data: over 4096x4096 pixels is a 413, never a decode."""
    if make is _gif_claiming:
        width, height = width % 65536, height % 65536  # GIF stores 16 bits
    outcome = digit_or_own_error({"body": make(width, height)})
    if width * height > 4096 * 4096:
        assert isinstance(outcome, RequestError) and outcome.code == 413, outcome
    elif width * height == 0 and make is _png_claiming:  # a GIF's frame may be larger than its 0x0 screen
        assert isinstance(outcome, RequestError) and outcome.code == 400, outcome


@FAST
@given(st.integers(1, 200_000), st.sampled_from(["text", "bytes"]))
def test_json_nested_to_any_depth_is_a_400(depth: int, transport: str) -> None:
    text = "[" * depth + "]" * depth
    outcome = digit_or_own_error({"body": text if transport == "text" else text.encode()})
    assert isinstance(outcome, RequestError) and outcome.code == 400


@FAST
@given(st.text(max_size=300))
def test_random_text(text: str) -> None:
    digit_or_own_error({"body": text})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=30) | st.dictionaries(st.sampled_from(["data", "x"]), children, max_size=3)
    ),
    max_leaves=60,
)


@FAST
@given(JSON_VALUES)
def test_random_json_parsed_or_as_text(value: object) -> None:
    digit_or_own_error({"body": value})
    digit_or_own_error({"body": json.dumps(value).encode()})


PIXEL_VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-300, 300) | st.just(255.0)


@FAST
@given(
    arrays(
        np.float64,
        st.sampled_from([(784,), (28, 28), (1, 28, 28), (1, 784), (783,), (28, 27), (2, 28, 28), (0,)]),
        elements=PIXEL_VALUES,
    )
)
def test_random_pixel_arrays_are_accepted_exactly_when_valid(pixels: np.ndarray) -> None:
    valid_shape = pixels.size == 784 and pixels.shape != (2, 28, 28)
    valid_values = bool(np.isfinite(pixels).all() and (pixels >= 0).all() and (pixels <= 255).all())
    outcome = digit_or_own_error({"body": {"data": pixels.tolist()}})
    if not (valid_shape and valid_values):
        assert isinstance(outcome, RequestError) and outcome.code == 400 and outcome.kind != "NoDigit"
    elif np.ptp(pixels) < MIN_CONTRAST:  # nearly uniform: no ink, no digit, as for images
        assert isinstance(outcome, RequestError) and outcome.kind == "NoDigit"
    elif isinstance(outcome, RequestError):  # ink, but not standing out from the border's median
        assert outcome.kind == "NoDigit"
        digit = pixels.reshape(SIZE)
        border = np.concatenate([digit[0], digit[-1], digit[1:-1, 0], digit[1:-1, -1]])
        background = np.median(border)  # light paper: ink is darker; dark paper: ink is lighter
        assert (background - digit.min() if background > 127.5 else digit.max() - background) < MIN_CONTRAST
    else:
        assert np.array_equal(outcome, pixels.reshape(SIZE).astype(np.float32))


@FAST
@given(
    st.integers(1, 80),
    st.integers(1, 80),
    st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "CMYK"]),
    st.sampled_from(["PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG"]),
    st.integers(0, 2**32 - 1),
)
def test_random_images_of_any_size_and_mode(width: int, height: int, mode: str, fmt: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((height, width)) < rng.random()).astype(np.uint8) * 255).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot store this mode: nothing a client could send
    digit_or_own_error({"body": buffer.getvalue()})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=64) | JSON_VALUES | st.sampled_from(SAMPLE_FILES), min_size=1, max_size=6))
def test_any_batch_gets_one_answer_per_request(handlers_by_format, model_dirs, payloads: list) -> None:
    handler = handlers_by_format["onnx"]
    answers = run_batch(handler, make_context(model_dirs["onnx"]), [{"body": p} for p in payloads])
    for answer in answers:
        if answer.status == 200:
            assert math.isclose(sum(answer.body["probabilities"]), 1.0, abs_tol=1e-6)
        else:
            assert answer.status in (400, 413, 415) and answer.body["code"] == answer.status


def blank_by_reference(digit: np.ndarray) -> bool:
    """/predictions' rule written out on its own: the strongest ink is < MIN_CONTRAST from the border's median."""
    border = np.concatenate([digit[0], digit[-1], digit[1:-1, 0], digit[1:-1, -1]])
    background = np.median(border)
    return (background - digit.min() if background > 127.5 else digit.max() - background) < MIN_CONTRAST


BORDER = [(row, col) for row in range(SIZE[0]) for col in range(SIZE[1]) if row in (0, 27) or col in (0, 27)]


@st.composite
def pixel_stacks(draw) -> np.ndarray:
    """1-6 digits, each a stroke of one level on paper of another (the contrast often at or near the
    threshold, MIN_CONTRAST = 16), with up to 60 of the 108 border pixels set anew: (N, 28, 28) uint8."""
    stack = np.empty((draw(st.integers(1, 6)), *SIZE), dtype=np.uint8)
    for digit in stack:
        paper = draw(st.integers(0, 255) | st.sampled_from([127, 128]))  # 127.5: the light-paper boundary
        digit[:] = paper
        top, left = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        contrast = draw(st.sampled_from([-16, -15, 15, 16]) | st.integers(-40, 40) | st.integers(-255, 255))
        digit[top : top + 6, left : left + 3] = np.clip(paper + contrast, 0, 255)
        for _ in range(draw(st.integers(0, 60))):
            digit[draw(st.sampled_from(BORDER))] = draw(st.integers(0, 255))
    return stack


@FAST
@given(pixel_stacks(), st.sampled_from(["UINT8 binary", "UINT8 JSON", "FP32 JSON"]))
def test_pixel_tensors_are_refused_exactly_when_a_digit_is_blank(stack: np.ndarray, encoding: str) -> None:
    """An OIP pixel tensor gets NoDigit exactly when some digit is blank by the single-digit rule (FP32 all
    within [0, 1] read as scaled 0..1), and the message names the first one."""
    datatype = encoding.split()[0]
    tensor = {"name": "x", "datatype": datatype, "shape": list(stack.shape)}
    if encoding == "UINT8 binary":
        header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": stack.size}}]}).encode()
        row, headers = {"body": header + stack.tobytes()}, {"inference-header-content-length": str(len(header))}
    else:
        data = stack.tolist() if datatype == "UINT8" else stack.astype(np.float32).tolist()
        row, headers = {"body": {"inputs": [{**tensor, "data": data}]}}, {}
    seen = stack.astype(np.float32) * (255 if datatype == "FP32" and stack.max() <= 1 else 1)
    blank = [index for index, digit in enumerate(seen) if blank_by_reference(digit)]
    try:
        request = read_oip(route(row, headers), SIZE, FRAME)
    except RequestError as err:
        assert blank and err.kind == "NoDigit" and err.message.startswith(f"digit {blank[0]}: no digit found"), err
        assert len(blank) == 1 or f"; {len(blank)} digits are blank: " in err.message
        return
    assert not blank
    np.testing.assert_array_equal(request.digits, seen)


@FAST
@given(
    st.none() | st.text(max_size=200),
    st.integers(1, 40),
    st.dictionaries(st.sampled_from(["probabilities", "label", "framed"]), st.booleans(), min_size=1),
    st.sampled_from([tuple("0123456789"), ("cat", "dog"), ("-9223372036854775808", "0", "é")]),
    st.text(min_size=1, max_size=30),
)
def test_the_answer_bound_is_never_under_the_answer(
    request_id: str | None, count: int, outputs: dict[str, bool], labels: tuple[str, ...], model_name: str
) -> None:
    """Whatever id (control characters, astral planes), outputs, labels and model name: `answer` never writes
    more than `answer_bound` says, so a request within the limit is never dropped by TorchServe's frontend."""
    rng = np.random.default_rng(count)
    digits = rng.integers(0, 256, (count, *SIZE)).astype(np.float32)
    probabilities = rng.dirichlet(np.full(len(labels), 0.05), count).astype(np.float32)
    probabilities[0, 0] = np.float32(1e-45)  # the widest "{:.7g}" text a float32 has
    request = OipRequest(request_id, digits, outputs)
    frame = AnswerFrame((model_name, "1.0"), labels, TORCHSERVE_MAX_RESPONSE)
    body, _ = digit_oip.answer(request, probabilities, labels, frame.model)
    bound, _ = answer_bound(request, frame)
    assert len(body) <= bound
