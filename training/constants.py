"""The facts about MNIST that every later step needs, decided here once.

They travel as data from here on: in the checkpoint's metadata, the ONNX metadata_props and the
archive's metadata file. Nothing downstream imports this module to re-read them.
"""

from __future__ import annotations

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
INPUT_SHAPE = (1, 28, 28)  # C, H, W
LAYOUT = "NCHW"
NUM_CLASSES = 10
LABELS = [str(d) for d in range(NUM_CLASSES)]
