"""MNIST-style preprocessing: MNIST digits pass through exactly; digits drawn any other way are framed like them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from digit_imaging import border_median, frame_digit
from handler_helpers import expected_tensor, make_context, model_inputs, png_bytes, run_batch, write_model_dir
from PIL import Image
from torch import nn


def test_mnist_digits_reach_the_model_exactly_as_in_training(handlers_by_format, model_dirs, mnist_test) -> None:
    digits = mnist_test[0][:200]
    for fmt, handler in handlers_by_format.items():
        answers, seen = model_inputs(handler, make_context(model_dirs[fmt]), [{"body": png_bytes(d)} for d in digits])
        assert [a.status for a in answers] == [200] * len(digits) and len(seen) == len(digits)
        for index, digit in enumerate(digits):
            assert torch.equal(seen[index : index + 1], expected_tensor(digit)), index


def draw_large(digit: np.ndarray, rng: np.random.Generator, *, canvas: tuple[int, int] = (400, 360)) -> bytes:
    """The digit as a person would draw it: black ink on a white RGB canvas, 4-12x larger, off-centre."""
    scale = int(rng.integers(4, 13))
    ink = Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    page = Image.new("RGB", canvas, "white")
    position = (int(rng.integers(0, canvas[0] - 28 * scale)), int(rng.integers(0, canvas[1] - 28 * scale)))
    page.paste(ink.convert("RGB"), position)
    return png_bytes(np.asarray(page))


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(digit.shape)
    return float((rows * digit).sum() / digit.sum()), float((cols * digit).sum() / digit.sum())


def test_a_large_off_centre_digit_is_framed_like_mnist(mnist_test) -> None:
    rng = np.random.default_rng(1)
    differences = []
    for digit in mnist_test[0][:20]:
        framed = frame_digit(
            np.asarray(Image.open(io.BytesIO(draw_large(digit, rng))).convert("L"), np.float32), (28, 28)
        )
        ink = np.argwhere(framed > 0)
        height, width = ink.max(axis=0) - ink.min(axis=0) + 1
        assert max(height, width) == 20  # longer side scaled to 20 px
        assert np.allclose(centre_of_mass(framed), (14, 14), atol=0.5)  # MNIST's centre, to the whole pixel
        assert framed.max() == pytest.approx(255) and framed.min() == 0
        differences.append(np.abs(framed - digit).mean())
    # close to the original pixel for pixel (a one-pixel shift of an MNIST digit costs about 30)
    assert np.mean(differences) < 10


def test_light_background_is_judged_from_the_border() -> None:
    page = np.full((50, 40), 230, np.float32)
    page[10:40, 18:22] = 20  # dark stroke on light paper
    framed = frame_digit(page, (28, 28))
    assert border_median(page) == 230 and framed.max() == 255 and framed[0, 0] == 0
    dark = 255 - page  # the same digit, already light on dark: not inverted
    assert np.array_equal(frame_digit(dark, (28, 28)), framed)


@pytest.mark.parametrize("shape", [(28, 28), (1, 5), (5, 1), (2, 2), (3, 7), (280, 280), (51, 40)])
def test_border_median_is_the_median_of_the_outermost_pixels(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        outer = np.ones(shape, dtype=bool)
        outer[1:-1, 1:-1] = False  # every pixel of the first and last row and column, each once
        assert border_median(image) == np.median(image[outer])
    stack = rng.integers(0, 256, (5, *shape), dtype=np.uint8)  # a stack (an OIP tensor): one median per image
    np.testing.assert_array_equal(border_median(stack), [np.median(image[outer]) for image in stack])


def test_aspect_ratio_is_kept() -> None:
    page = np.zeros((300, 300), np.float32)
    page[50:250, 140:190] = 255  # a 200x50 bar
    framed = frame_digit(page, (28, 28))
    ink = np.argwhere(framed > 0)
    height, width = ink.max(axis=0) - ink.min(axis=0) + 1
    assert (height, width) == (20, 5)


@pytest.fixture(scope="module")
def ridge_model(mnist) -> nn.Module:
    """A linear classifier fitted in closed form on 6000 MNIST training digits: no training loop, ~80% right.

    Linear models are sensitive to a digit's exact size and position, which is what the framing must get right.
    """
    data = mnist
    pixels = torch.from_numpy(data.train_images[:6000].reshape(6000, -1)).double() / 255.0
    features = torch.cat([(pixels - 0.1307) / 0.3081, torch.ones(6000, 1, dtype=torch.float64)], dim=1)
    targets = nn.functional.one_hot(torch.from_numpy(data.train_labels[:6000]), 10).double()
    weights = torch.linalg.solve(
        features.T @ features + 10.0 * torch.eye(785, dtype=torch.float64), features.T @ targets
    )
    linear = nn.Linear(784, 10)
    with torch.no_grad():
        linear.weight.copy_(weights[:784].T)
        linear.bias.copy_(weights[784])
    return nn.Sequential(nn.Flatten(), linear).eval()


def test_digits_drawn_large_on_white_classify_like_mnist_ones(ridge_model, mnist_test, tmp_path) -> None:
    from digit_handler import DigitHandler

    directory = write_model_dir(tmp_path / "ridge", ridge_model, "onnx")
    handler, context = DigitHandler(), make_context(directory)
    handler.initialize(context)
    digits, labels = mnist_test[0][:300], mnist_test[1][:300]
    rng = np.random.default_rng(0)
    original = run_batch(handler, context, [{"body": png_bytes(d)} for d in digits])
    drawn = run_batch(handler, context, [{"body": draw_large(d, rng)} for d in digits])
    original_labels = np.array([a.body["label"] for a in original])
    drawn_labels = np.array([a.body["label"] for a in drawn])
    accuracy, drawn_accuracy = (original_labels == labels).mean(), (drawn_labels == labels).mean()
    assert accuracy > 0.75  # the model itself is sound
    assert drawn_accuracy >= accuracy - 0.03, (accuracy, drawn_accuracy)
    # a linear model flips its answer on small changes near its boundaries; the drawn digits still mostly agree
    assert (drawn_labels == original_labels).mean() >= 0.85
