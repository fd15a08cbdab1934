"""Classify images of handwritten digits with an exported model.onnx: onnxruntime, numpy and Pillow only.

    python examples/onnx_app.py digit.png other.jpg --model artifacts/cnn/model.onnx

Everything needed to preprocess comes from the file's metadata_props (written by `digits export`): mean,
std, input_shape (C, H, W), layout and labels. Images are read and framed by the served handler's own code
(`handlers/digit_inputs.py`, `handlers/digit_imaging.py`: numpy and Pillow, plus libspng when installed), so
a drawing gets the same 28x28 input here as from the server: grayscale, inverted when the background is
light, cropped to the ink, scaled, centred by mass, as MNIST was made. The normalisation is the artefact
contract's, in the handler's pinned copy (`handlers/digit_contract.py`). Prints one line per image: file,
label, confidence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
# the handler's modules import each other by bare name, as inside an archive
sys.path.insert(0, str(ROOT / "handlers"))

from digit_contract import LAYOUTS, PREPROCESSING_KEYS, normalise  # noqa: E402
from digit_errors import RequestError  # noqa: E402
from digit_inputs import read_image  # noqa: E402


def load_model(path: Path) -> tuple[ort.InferenceSession, dict]:
    """The session and the decoded preprocessing facts; exits with a message when the file lacks them."""
    if not path.is_file():
        sys.exit(f"onnx_app: no model at {path}; make one with `digits export MODEL`")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in PREPROCESSING_KEYS if k not in props]
    if missing:
        sys.exit(f"onnx_app: {path} lacks metadata {', '.join(missing)}; export it with `digits export`")
    meta = {k: props[k] if k == "layout" else json.loads(props[k]) for k in PREPROCESSING_KEYS}
    if meta["layout"] not in LAYOUTS:
        sys.exit(f"onnx_app: layout {meta['layout']!r} is not supported; this app feeds {', '.join(LAYOUTS)}")
    return session, meta


def frame(path: Path, meta: dict) -> np.ndarray:
    """Image file -> (H, W) float32 0..255, white digit on black, framed as the server frames it."""
    _, height, width = meta["input_shape"]
    try:
        return read_image(path.read_bytes(), (height, width))
    except OSError as err:
        sys.exit(f"onnx_app: cannot read {path}: {err.strerror or err}")
    except RequestError as err:
        sys.exit(f"onnx_app: {path}: {err.kind}: {err.message}")


def preprocess(paths: list[Path], meta: dict) -> np.ndarray:
    """Image files -> (N, C, H, W) float32, framed and normalised as the model expects."""
    digits = np.stack([frame(path, meta) for path in paths])
    return normalise(digits, meta["mean"], meta["std"], meta["input_shape"])


def classify(session: ort.InferenceSession, meta: dict, batch: np.ndarray) -> list[tuple[str, float]]:
    """(N, C, H, W) float32 -> (label, confidence) per image; confidence is the softmax probability."""
    input_name = session.get_inputs()[0].name
    logits = session.run(None, {input_name: batch})[0].astype(np.float64)  # (N, classes)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    best = probs.argmax(axis=1)
    return [(meta["labels"][i], float(probs[n, i])) for n, i in enumerate(best)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Classify digit images with an exported ONNX model.")
    parser.add_argument("images", metavar="IMAGE", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--model", type=Path, required=True, help="model.onnx written by `digits export`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    session, meta = load_model(args.model)
    batch = preprocess(args.images, meta)
    for path, (label, confidence) in zip(args.images, classify(session, meta, batch), strict=True):
        print(f"{path}\t{label}\t{confidence:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
