"""Renders MNIST test digits to image files, as a client would send them.

Two looks: the 28x28 digit as MNIST has it (white on black), and the same digit "drawn large": black
ink on a white RGB canvas, scaled up and placed off-centre, like a canvas drawing or a photo of paper.
File names carry the true label (`..._label-7.png`) so reports can show expected next to predicted.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

LABEL_IN_NAME = re.compile(r"_label-(\d)\b")


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """A PNG file's bytes, as a client sends it: of an image, or of an (H, W) uint8 array as a grey one."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drawn_large(digit: np.ndarray, rng: np.random.Generator, canvas: int = 280) -> Image.Image:
    """A (28, 28) uint8 digit as black ink on a white RGB canvas, 5-8x larger, off-centre."""
    side = int(rng.integers(140, 225))
    ink = Image.fromarray(255 - digit, mode="L").resize((side, side), Image.Resampling.BILINEAR)
    page = Image.new("L", (canvas, canvas), 255)
    x, y = (int(rng.integers(0, canvas - side + 1)) for _ in range(2))
    page.paste(ink, (x, y))
    return page.convert("RGB")


def write_samples(
    images: np.ndarray, labels: np.ndarray, out: Path, count: int, drawn: bool = True, seed: int = 0
) -> list[Path]:
    """Writes the first `count` test digits as PNG (and their drawn-large versions); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(seed), []
    for index in range(count):
        label = int(labels[index])
        path = out / f"test-{index:05d}_label-{label}.png"
        Image.fromarray(images[index], mode="L").save(path)
        paths.append(path)
        if drawn:
            path = out / f"drawn-{index:05d}_label-{label}.png"
            drawn_large(images[index], rng).save(path)
            paths.append(path)
    return paths


def label_from_name(path: Path | str) -> int | None:
    match = LABEL_IN_NAME.search(Path(path).name)
    return int(match.group(1)) if match else None
