"""Turning a decoded image into an MNIST-style digit: grayscale, white on black, framed as MNIST was made.

MNIST's recipe (LeCun et al.): the digit's bounding box is scaled, keeping its aspect ratio, so that the
longer side is 20 px, then placed in a 28x28 field so that its centre of mass sits at the field's centre.
A digit drawn on a canvas or photographed must go through the same steps, or the model sees a digit of a
size and position it never saw in training. Images are read as (H, W) uint8 intensities; the framed
digit is float32 in 0..255.

This runs once per request inside the worker, so it stays on uint8, in Pillow's C loops, until the digit
is 20 px: on a 280x280 drawing, float work on the whole canvas cost more than decoding the PNG.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from digit_errors import RequestError, bad_request, unsupported
from PIL import Image

# MNIST puts a 20 px box in a 28 px field; for other field sizes we keep that ratio.
BOX_FRACTION = 20 / 28
LIGHT_BACKGROUND = 127.5  # border median above this: dark ink on a light background, so invert
MIN_CONTRAST = 16.0  # ink must stand this far above the background, or there is no digit to read
MAX_NAMED = 10  # blank digits of a stack named by index in its NoDigit message
NOISE_FLOOR = 0.1  # ink fainter than this fraction of the strongest ink is background noise
# Shrinking a crop many times over: Pillow first box-reduces by a whole factor while the image stays at
# least this many times the target, then applies LANCZOS (Image.resize's reducing_gap): a fraction of the
# time on a large drawing, and the same accuracy on MNIST's test digits drawn large.
REDUCING_GAP = 2.0
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_grayscale(image: Image.Image) -> np.ndarray:
    """Returns the image as (H, W) uint8 intensities, transparency laid on white (16-bit samples rounded).

    Raises:
        RequestError: 415 for pixel modes we cannot map to 0..255 intensities.
    """
    if image.mode in _SIXTEEN_BIT:
        return to_uint8(np.asarray(image, dtype=np.float32) / 257.0)  # 65535 -> 255
    if image.mode == "I":
        return _int32_grayscale(np.asarray(image))
    if image.mode == "F":
        raise unsupported("UnsupportedImageMode", "32-bit float images are not supported; send 8 or 16 bits")
    if _has_transparency(image):
        # A canvas exports untouched pixels as transparent: they are paper, so they become white.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    try:
        return np.asarray(image if image.mode == "L" else image.convert("L"))
    except ValueError as err:
        raise unsupported("UnsupportedImageMode", f"cannot read {image.mode} pixels as grayscale: {err}") from None


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _int32_grayscale(pixels: np.ndarray) -> np.ndarray:
    # Older Pillow opens 16-bit PNGs as mode "I": values above 255 can only be 16-bit samples.
    peak = int(pixels.max(initial=0))
    if pixels.min(initial=0) < 0 or peak > 65535:
        raise unsupported("UnsupportedImageMode", "32-bit integer images are not supported; send 8 or 16 bits")
    return to_uint8(pixels / (257.0 if peak > 255 else 1.0))


def to_uint8(gray: np.ndarray) -> np.ndarray:
    """Intensities in 0..255 of any dtype as uint8, rounded to the nearest level."""
    if gray.dtype == np.uint8:
        return gray
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def frame_digit(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Makes an MNIST-style digit of the model's input size from a grayscale image of any size.

    An image already of that size is taken as framed: it is only inverted when its background is light,
    so a 28x28 MNIST digit passes through byte for byte. Either way, an image without ink is no digit.

    Args:
        gray: (H, W) intensities in 0..255 (uint8; other dtypes are rounded to it), any size.
        size: the model's (height, width), from the archive's metadata.

    Returns:
        (height, width) float32 in 0..255, white digit on black.

    Raises:
        RequestError: 400 when the image holds no ink to read.
    """
    gray = to_uint8(gray)
    background = border_median(gray)
    light = background > LIGHT_BACKGROUND
    contrast = ink_contrast(gray, background, light)
    if gray.shape == size:
        return (np.subtract(255, gray, dtype=np.uint8) if light else gray).astype(np.float32)
    ink = ink_image(gray, 255.0 - background if light else background, light, contrast)
    box = max(1, round(min(size) * BOX_FRACTION))
    return centre_by_mass(fit_box(ink.crop(ink.getbbox()), box), size)


def require_ink(digits: np.ndarray) -> np.ndarray:
    """Returns digits already framed when each holds ink by frame_digit's rule, else raises NoDigit.

    Args:
        digits: one (H, W) digit (JSON pixels) or a stack (N, H, W) (an OIP pixel tensor), 0..255, white on
            black; a stack is checked in a few numpy calls, not digit by digit.

    Raises:
        RequestError: 400 NoDigit; for a stack, naming the blank digits by index.
    """
    background = border_median(digits)
    ink_contrast(digits, background, background > LIGHT_BACKGROUND)
    return digits


def ink_contrast(gray: np.ndarray, background: Any, light: Any) -> Any:
    """How far the strongest ink stands from the background (the border's median), on 0..255.

    The one rule for images of every size, for JSON pixels and for OIP pixel tensors: a nearly uniform image
    holds no digit (a blank 28x28 image used to be read as a "1" at 15% confidence, while a 29x29 one was
    refused).

    Args:
        gray: one image (H, W), or a stack (N, H, W).
        background: the border's median (`border_median`): a float, or (N,) for a stack.
        light: whether the background is light (dark ink): a bool, or (N,) for a stack.

    Returns:
        The contrast: a float, or (N,) float64 for a stack.

    Raises:
        RequestError: 400 NoDigit when it is under MIN_CONTRAST (for a stack: in any digit, named by index).
    """
    if gray.ndim == 2:  # one image, up to 4096x4096: only the reduction its background calls for
        contrast = background - float(gray.min()) if light else float(gray.max()) - background
        if contrast < MIN_CONTRAST:
            raise no_digit(contrast)
        return contrast
    # a stack: the brightest ink of each, and the darkest only where the background is light (rare in
    # tensors): each reduction costs as much as the border medians at N = 1024
    flat = gray.reshape(len(gray), -1)
    contrasts = flat.max(axis=1) - background
    light_rows = np.flatnonzero(light)
    if light_rows.size:
        contrasts[light_rows] = background[light_rows] - flat[light_rows].min(axis=1)
    blank = np.flatnonzero(contrasts < MIN_CONTRAST)
    if blank.size:
        raise no_digit(float(contrasts[blank[0]]), blank)
    return contrasts


def no_digit(contrast: float, blank: np.ndarray | None = None) -> RequestError:
    """NoDigit for one image, or for the digits of a stack at indices `blank` (`contrast`: the first one's)."""
    message = (
        f"no digit found: the image is nearly uniform (ink contrast {max(contrast, 0.0):.0f} of 255, "
        f"at least {MIN_CONTRAST:.0f} needed)"
    )
    if blank is None:
        return bad_request("NoDigit", message)
    named = ", ".join(map(str, blank[:MAX_NAMED].tolist())) + (", ..." if len(blank) > MAX_NAMED else "")
    also = f"; {len(blank)} digits are blank: {named}" if len(blank) > 1 else ""
    return bad_request("NoDigit", f"digit {blank[0]}: {message}{also}")


def border_median(gray: np.ndarray) -> Any:
    """The median of the outermost pixels: what the background looks like.

    Returns:
        A float for one image (H, W); (N,) float64 for a stack (N, H, W), one median per image.
    """
    indices = border_indices(gray.shape[-2:])
    border = gray.take(indices) if gray.ndim == 2 else gray.reshape(len(gray), -1).take(indices, axis=1)
    middle = border.shape[-1] // 2
    # np.partition rather than np.median: the same value, without sorting the whole border
    ordered = np.partition(border, (middle - 1, middle), axis=-1)
    low = middle if border.shape[-1] % 2 else middle - 1  # an odd count has one middle
    if gray.ndim == 2:  # python floats: each operation on numpy's scalars costs more than the arithmetic
        return (float(ordered[low]) + float(ordered[middle])) / 2
    return (ordered[:, low].astype(np.float64) + ordered[:, middle]) / 2


@functools.lru_cache(maxsize=64)
def border_indices(shape: tuple[int, int]) -> np.ndarray:
    """Flat indices of an image's outermost pixels, each once: one `take` instead of four slices joined
    (cached: clients mostly send one size)."""
    edge = np.zeros(shape, dtype=bool)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    return np.flatnonzero(edge)


def ink_image(gray: np.ndarray, background: float, light: bool, contrast: float) -> Image.Image:
    """The image as ink: light strokes on black, the background at 0, the strongest ink at 255, faint
    noise zeroed. Photos have grey paper and grey ink; MNIST has black background and full-white strokes.

    Each output level depends only on the input level, so it is one 256-entry table that Pillow applies
    in a single pass (`Image.point`), inversion of dark-on-light images included.

    Args:
        gray: (H, W) uint8 as sent.
        background: the border's median, on the ink's scale (already inverted when `light`).
        light: dark ink on light paper, to be inverted.
        contrast: the strongest ink's distance from the background (`ink_contrast`), at least MIN_CONTRAST.
    """
    levels = np.arange(256, dtype=np.float64)
    if light:
        levels = 255.0 - levels  # dark ink on light paper becomes light ink on black
    table = np.clip(levels - background, 0.0, None) * (255.0 / contrast)
    table[table < NOISE_FLOOR * 255.0] = 0.0
    return Image.fromarray(gray).point(np.rint(table).astype(np.uint8).tolist())


def fit_box(ink: Image.Image, box: int) -> np.ndarray:
    """Scales so that the longer side is `box` pixels, keeping the aspect ratio, peak back at 255.

    Returns:
        (h, w) float32 in 0..255, max(h, w) == box.
    """
    width, height = ink.size
    scale = box / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # Pillow wants (W, H)
    # LANCZOS widens its kernel when shrinking, so it anti-aliases like MNIST's normalisation did
    resized = np.asarray(ink.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP), np.float32)
    peak = float(resized.max())
    # thin strokes fade when shrunk a lot, and MNIST strokes peak at full white
    return np.clip(resized * (255.0 / peak), 0.0, 255.0) if peak > 0 else resized


def centre_by_mass(digit: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pastes `digit` into a black field of `size`, its centre of mass on the field's centre.

    MNIST's centres of mass sit at (14.0, 14.0) in index coordinates of the 28x28 field (measured over
    the test set), that is at (H / 2, W / 2); shifts are whole pixels, clamped so no ink is cut off.
    """
    field = np.zeros(size, dtype=np.float32)
    height, width = digit.shape
    mass = float(digit.sum())
    centre_y = float((digit.sum(axis=1) * np.arange(height)).sum()) / mass if mass else (height - 1) / 2
    centre_x = float((digit.sum(axis=0) * np.arange(width)).sum()) / mass if mass else (width - 1) / 2
    top = int(np.clip(round(size[0] / 2 - centre_y), 0, size[0] - height))
    left = int(np.clip(round(size[1] / 2 - centre_x), 0, size[1] - width))
    field[top : top + height, left : left + width] = digit
    return field
