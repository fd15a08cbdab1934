"""The golden set the rollout gate sends every candidate: fixed MNIST test digits with their true labels.

625 test digits, every 16th of MNIST's 10,000 (a spread over both halves of the test set, whose writers
differ), sent as 28x28 PNGs, and 125 of them (every 5th) also drawn large in black on a white canvas,
off-centre (`samples.drawn_large`, seed 0): 750 requests, the same every time.

The digits live in the package (`golden.npz`, 0.1 MB), not in the MNIST cache: a rollout runs where the
server runs, which need not have MNIST or a network, and the set must not change with a download. The drawn
ones are rendered from the stored digits at gate time (Pillow's bilinear resize of uint8 images and numpy's
seeded generator); their labels are the stored digits'. `tests/serving/test_golden.py` rebuilds the file from
the MNIST cache and checks it is this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .samples import drawn_large, png_bytes

GOLDEN_FILE = Path(__file__).resolve().with_name("golden.npz")
STRIDE = 16  # every 16th test digit
DRAWN_EVERY = 5  # every 5th of those is also sent drawn large
DRAWN_SEED = 0


@dataclass(frozen=True)
class GoldenSet:
    """The requests of the gate and their true labels."""

    payloads: list[bytes]  # PNG files
    labels: np.ndarray  # (N,) int64, the true label of each payload
    drawn: int  # how many of the payloads (the last ones) are drawn large

    def __len__(self) -> int:
        return len(self.payloads)


def select(test_images: np.ndarray, test_labels: np.ndarray) -> dict[str, np.ndarray]:
    """The stored arrays, from MNIST's test set: indices, images (N, 28, 28) uint8 and labels (N,) uint8."""
    indices = np.arange(0, len(test_images), STRIDE, dtype=np.uint16)
    return {"indices": indices, "images": test_images[indices], "labels": test_labels[indices].astype(np.uint8)}


def write_golden(path: Path, test_images: np.ndarray, test_labels: np.ndarray) -> Path:
    np.savez_compressed(path, **select(test_images, test_labels))
    return path


def load_golden(path: Path = GOLDEN_FILE) -> GoldenSet:
    with np.load(path) as stored:
        images, labels = stored["images"], stored["labels"].astype(np.int64)
    rng = np.random.default_rng(DRAWN_SEED)
    drawn = list(range(0, len(images), DRAWN_EVERY))
    payloads = [png_bytes(image) for image in images]
    payloads += [png_bytes(drawn_large(images[index], rng)) for index in drawn]
    return GoldenSet(payloads, np.concatenate([labels, labels[drawn]]), len(drawn))
