"""The handler's copy of the artefact contract (`contract/__init__.py`, which an archive does not ship).

An archive carries the handler alone, so the few names and the one formula it shares with the other layers
are copied here, once; `tests/handlers/test_contract_copy.py` pins each to the contract, so that an archive is
read and fed exactly as it was made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

META_FILE = "digits_meta.json"
RUNTIME_BY_SUFFIX = {".pt": "torchscript", ".onnx": "onnx", ".pt2": "pt2"}  # one suffix, one runtime
PREPROCESSING_KEYS = ("mean", "std", "input_shape", "layout", "labels")  # what an app needs to feed the model
REQUIRED_KEYS = ("format", "sha256", *PREPROCESSING_KEYS)
LAYOUTS = ("NCHW",)
HANDLER_SECTION = "handler"  # model-config.yaml: the handler's own section
THREADS_KEY = "threads"
RESPONSE_LIMIT_KEY = "max_response_size"
TORCHSERVE_MAX_RESPONSE = 6_553_500
PT2_META_ENTRY = "extra/digits_meta.json"
PT2_REQUIRED_KEYS = ("torch_version", "device", "target", "min_batch", "max_batch")
OIP_OUTPUTS = {"probabilities": "FP32", "label": "INT64", "framed": "UINT8", "attributions": "FP32"}
OIP_DEFAULT_OUTPUTS = ("probabilities", "label")
VERSION_HEADER = "Model-Version"  # on every answer: the archive's version
WORKER_HEADER = "Digits-Worker"  # on every answer: a random token of the worker process


def normalise(
    pixels: np.ndarray | Sequence[np.ndarray], mean: float, std: float, input_shape: Sequence[int]
) -> np.ndarray:
    """Intensities 0..255, white digit on black, (N, H, W) (or N arrays (H, W)) -> (N, *input_shape) float32.

    The contract's formula, `(pixel / 255 - mean) / std` in float32, in this order: bit for bit what training
    applied. In place on one fresh array: each torch call's set-up outweighs its work on a batch of 16 digits.
    """
    x = np.array(pixels, dtype=np.float32)  # a fresh (N, H, W) array: safe to scale in place
    x /= np.float32(255.0)
    x -= np.float32(mean)
    x /= np.float32(std)
    return x.reshape(len(x), *input_shape)
