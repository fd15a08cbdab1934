"""Every accepted input format gives the answer the model gives the same digit, for both model formats."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from handler_helpers import LABELS, Answer, assert_same_answer, expected_tensor, png_bytes
from PIL import Image


@pytest.fixture(scope="module")
def digit(mnist_test: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """An MNIST test digit (28x28 uint8, white on black)."""
    return mnist_test[0][0]


def assert_answers(answer: Answer, model: torch.nn.Module, pixels: np.ndarray) -> None:
    """The answer is a 200 with the eager model's prediction for `pixels` (28x28, 0..255, white on black)."""
    assert answer.status == 200, answer.body
    assert answer.content_type == "application/json"
    with torch.no_grad():
        probabilities = torch.softmax(model(expected_tensor(pixels)), dim=1)[0].double()
    assert set(answer.body) == {"label", "confidence", "probabilities"}
    assert answer.body["probabilities"] == pytest.approx(probabilities.tolist(), abs=1e-5)
    assert answer.body["label"] == int(LABELS[int(probabilities.argmax())])
    assert isinstance(answer.body["label"], int)
    assert answer.body["confidence"] == pytest.approx(float(probabilities.max()), abs=1e-5)
    assert sum(answer.body["probabilities"]) == pytest.approx(1.0, abs=1e-6)


def decoded_gray(payload: bytes) -> np.ndarray:
    """What Pillow decodes from a (possibly lossy) file, as the expected pixels."""
    return np.asarray(Image.open(io.BytesIO(payload)).convert("L"))


def palette_image(pixels: np.ndarray) -> bytes:
    image = Image.frombytes("P", pixels.shape[::-1], pixels.tobytes())
    image.putpalette([level for index in range(256) for level in (index, index, index)])
    return _save(image, "PNG")


def _save(image: Image.Image, fmt: str, **args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **args)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "args"),
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("JPEG", {"quality": 95})],
)
def test_image_formats(served, tiny_model, digit, fmt: str, args: dict) -> None:
    payload = png_bytes(digit, fmt=fmt, **args)
    [answer] = served([{"body": payload}])
    assert_answers(answer, tiny_model, decoded_gray(payload))


def test_png_of_an_mnist_digit_is_classified_from_its_exact_pixels(served, tiny_model, digit) -> None:
    [answer] = served([{"body": png_bytes(digit)}])
    assert_answers(answer, tiny_model, digit)


def test_gif_uses_its_first_frame(served, tiny_model, mnist_test) -> None:
    first, second = (Image.fromarray(mnist_test[0][index]) for index in (0, 1))
    payload = _save(first, "GIF", save_all=True, append_images=[second], duration=100)
    [answer] = served([{"body": payload}])
    assert_answers(answer, tiny_model, mnist_test[0][0])


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "1", "I;16", "RGBA", "LA"])
def test_image_modes(served, tiny_model, digit, mode: str) -> None:
    if mode == "RGB":
        payload, expected = png_bytes(np.stack([digit] * 3, axis=-1)), digit
    elif mode == "P":
        payload, expected = palette_image(digit), digit
    elif mode == "1":
        binary = digit > 127
        payload, expected = png_bytes(binary), binary.astype(np.uint8) * 255
    elif mode == "I;16":
        payload, expected = png_bytes(digit.astype(np.uint16) * 257), digit
    elif mode == "RGBA":  # a canvas export: black ink whose alpha is the stroke, on a transparent page
        rgba = np.zeros((28, 28, 4), np.uint8)
        rgba[..., 3] = digit
        payload, expected = png_bytes(rgba), digit
    elif mode == "LA":  # white-on-black digit, fully opaque: alpha must not change it
        payload, expected = png_bytes(np.stack([digit, np.full_like(digit, 255)], axis=-1)), digit
    else:
        payload, expected = png_bytes(digit), digit
    assert Image.open(io.BytesIO(payload)).mode == mode
    [answer] = served([{"body": payload}])
    assert_answers(answer, tiny_model, expected)


def test_a_black_on_white_28x28_digit_is_inverted_exactly(served, tiny_model, digit) -> None:
    [answer] = served([{"body": png_bytes(255 - digit)}])
    assert_answers(answer, tiny_model, digit)


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda b: base64.b64encode(b), id="bytes"),
        pytest.param(lambda b: base64.b64encode(b).decode(), id="str"),
        pytest.param(lambda b: base64.encodebytes(b), id="line-wrapped"),
        pytest.param(lambda b: base64.urlsafe_b64encode(b).rstrip(b"="), id="urlsafe-unpadded"),
        pytest.param(lambda b: "data:image/png;base64," + base64.b64encode(b).decode(), id="data-url"),
        pytest.param(lambda b: {"data": base64.b64encode(b).decode()}, id="json-data-field"),
    ],
)
def test_base64(served, tiny_model, digit, encode) -> None:
    [answer] = served([{"body": encode(png_bytes(digit))}])
    assert_answers(answer, tiny_model, digit)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(lambda d: {"data": d.flatten().tolist()}, id="object-flat"),
        pytest.param(lambda d: {"data": d.tolist()}, id="object-rows"),
        pytest.param(lambda d: {"data": [d.tolist()]}, id="object-channel"),
        pytest.param(lambda d: d.flatten().tolist(), id="bare-flat"),
        pytest.param(lambda d: d.tolist(), id="bare-rows"),
        pytest.param(lambda d: [d.flatten().tolist()], id="bare-1x784"),
    ],
)
@pytest.mark.parametrize("transport", ["parsed", "bytes", "str"])
def test_json_pixels(served, tiny_model, digit, shape, transport: str) -> None:
    value = shape(digit)
    text = json.dumps(value)
    body = {"parsed": value, "bytes": text.encode(), "str": f"  {text}\n"}[transport]
    [answer] = served([{"body": body}])
    assert_answers(answer, tiny_model, digit)


def test_json_pixels_may_be_floats(served, tiny_model, digit) -> None:
    pixels = np.clip(digit.astype(np.float32) + 0.25, 0, 255)
    [answer] = served([{"body": {"data": pixels.tolist()}}])
    assert answer.status == 200
    with torch.no_grad():
        expected = torch.softmax(tiny_model(((torch.from_numpy(pixels) / 255 - 0.1307) / 0.3081)[None, None]), 1)
    assert answer.body["probabilities"] == pytest.approx(expected[0].tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(lambda png: {"data": png}, id="data-field"),
        pytest.param(lambda png: {"file": png}, id="multipart-single-field"),
        pytest.param(lambda png: {"data": png, "note": b"hello"}, id="data-among-fields"),
        pytest.param(lambda png: {"body": png, "model": "tiny"}, id="body-with-query-parameter"),
        pytest.param(lambda png: {"body": bytearray(png)}, id="bytearray"),
    ],
)
def test_fields_as_torchserve_splits_them(served, tiny_model, digit, row) -> None:
    [answer] = served([row(png_bytes(digit))])
    assert_answers(answer, tiny_model, digit)


def test_a_batch_is_answered_in_request_order(served, tiny_model, mnist_test) -> None:
    digits = mnist_test[0][:8]
    answers = served([{"body": png_bytes(d)} for d in digits])
    for answer, pixels in zip(answers, digits, strict=True):
        assert_answers(answer, tiny_model, pixels)


def test_photos_are_turned_upright_by_their_exif_orientation(served, digit) -> None:
    upright = Image.fromarray(255 - digit).resize((112, 112))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    upright_answer, tagged_answer, untagged_answer = served(
        [{"body": _save(upright, "PNG")}, {"body": _save(stored, "PNG", exif=exif)}, {"body": _save(stored, "PNG")}]
    )
    assert_same_answer(tagged_answer.body, upright_answer.body)
    assert untagged_answer.body != upright_answer.body
