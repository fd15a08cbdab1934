"""Classify images of handwritten digits with an exported model.onnx: onnxruntime, numpy and Pillow only.

    python examples/onnx_app.py digit.png other.jpg --model artifacts/cnn/model.onnx

Drawings and photos are framed as MNIST was made (cropped to the ink, scaled, centred by mass), so a
digit drawn large on white classifies like an MNIST one. Everything needed to preprocess comes from the
file's metadata_props (written by `digits export`): mean,
std, input_shape (C, H, W), layout and labels. Prints one line per image: file, label, confidence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

REQUIRED_METADATA = ("mean", "std", "input_shape", "layout", "labels")


def load_model(path: Path) -> tuple[ort.InferenceSession, dict]:
    """The session and the decoded preprocessing facts; exits with a message when the file lacks them."""
    if not path.is_file():
        sys.exit(f"onnx_app: no model at {path}; make one with `digits export MODEL`")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in REQUIRED_METADATA if k not in props]
    if missing:
        sys.exit(f"onnx_app: {path} lacks metadata {', '.join(missing)}; export it with `digits export`")
    meta = {k: props[k] if k == "layout" else json.loads(props[k]) for k in REQUIRED_METADATA}
    if meta["layout"] != "NCHW":
        sys.exit(f"onnx_app: layout {meta['layout']!r} is not supported; this app feeds NCHW")
    return session, meta


def preprocess(path: Path, meta: dict) -> np.ndarray:
    """Image file -> (C, H, W) float32: grayscale, white digit on black, framed like MNIST, normalised."""
    channels, height, width = meta["input_shape"]
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    # MNIST digits are light on dark; a photo or scan of ink on paper is the other way round. Judge by
    # the border, which is background in any reasonably cropped digit.
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:
        pixels = 255.0 - pixels
    if pixels.shape != (height, width):
        pixels = frame_like_mnist(pixels, height, width)
    x = (pixels / 255.0 - meta["mean"]) / meta["std"]
    return np.broadcast_to(x, (channels, height, width)).astype(np.float32)


def frame_like_mnist(ink: np.ndarray, height: int, width: int) -> np.ndarray:
    """As MNIST was made: crop to the ink, fit the longer side to 20/28 of the frame, centre by mass."""
    rows, cols = np.nonzero(ink > 0.2 * ink.max()) if ink.max() > 0 else ([0], [0])
    crop = ink[min(rows) : max(rows) + 1, min(cols) : max(cols) + 1]
    scale = round(20 / 28 * min(height, width)) / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))  # (w, h)
    digit = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    ys, xs = np.indices(digit.shape)
    total = digit.sum() or 1.0
    top = int(round(height / 2 - (ys * digit).sum() / total))
    left = int(round(width / 2 - (xs * digit).sum() / total))
    top = min(max(top, 0), height - digit.shape[0])
    left = min(max(left, 0), width - digit.shape[1])
    frame = np.zeros((height, width), dtype=np.float32)
    frame[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return frame


def classify(session: ort.InferenceSession, meta: dict, batch: np.ndarray) -> list[tuple[str, float]]:
    """(N, C, H, W) float32 -> (label, confidence) per image; confidence is the softmax probability."""
    input_name = session.get_inputs()[0].name
    logits = session.run(None, {input_name: batch})[0].astype(np.float64)  # (N, classes)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    return [(meta["labels"][i], float(probs[n, i])) for n, i in enumerate(best)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify digit images with an exported ONNX model.")
    parser.add_argument("images", metavar="IMAGE", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--model", type=Path, required=True, help="model.onnx written by `digits export`")
    args = parser.parse_args(argv)
    session, meta = load_model(args.model)
    try:
        batch = np.stack([preprocess(path, meta) for path in args.images])
    except (OSError, UnidentifiedImageError) as err:
        sys.exit(f"onnx_app: cannot read image: {err}")
    for path, (label, confidence) in zip(args.images, classify(session, meta, batch), strict=True):
        print(f"{path}\t{label}\t{confidence:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
