"""The ways of running a model that parity compares: eager PyTorch, and the exported files loaded back.

A runner maps (N, 1, 28, 28) float32 normalised digits to (N, classes) float32 scores; a `Backend` is a
named runner for an exported file (`export.parity` compares each with the eager reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from . import ExportError
from .onnx import INPUT_NAME, OUTPUT_NAME
from .pt2 import load_pt2, read_pt2_metadata
from .torchscript import load_torchscript

ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL")

Runner = Callable[[np.ndarray], np.ndarray]  # (N, 1, 28, 28) float32 -> (N, 10) float32 logits


@dataclass(frozen=True)
class Backend:
    """One way of running the exported model, compared against eager."""

    name: str  # "torchscript", "onnxruntime" or "aotinductor"
    ort_optimization: str | None  # onnxruntime's graph optimisation level, None for the others
    run: Runner

    @property
    def label(self) -> str:
        return f"{self.name} ({self.ort_optimization})" if self.ort_optimization else self.name


def eager_runner(model: nn.Module) -> Runner:
    """The reference: the model as it is (eval mode, normally), on the CPU, without autograd."""

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    return run


def torchscript_backend(path: Path) -> Backend:
    module = load_torchscript(path)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return Backend("torchscript", None, run)


def onnxruntime_backend(path: Path, optimization: str, threads: int | None = None) -> Backend:
    """onnxruntime on the CPU at one graph optimisation level (a name from `ORT_LEVELS`).

    `threads`: its intra-op pool (and no inter-op pool), as the handler sizes it; None: onnxruntime's own
    default, one thread per physical core, whatever torch is set to.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own pybind error types, none exported
        raise ExportError(f"onnxruntime cannot load {path}: {str(err).strip().splitlines()[0]}") from None
    if len(session.get_inputs()) != 1:  # as the handler refuses it (handlers/digit_model.py, load_onnx)
        raise ExportError(f"{path} takes {len(session.get_inputs())} inputs; a digit model takes one")

    def run(images: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    return Backend("onnxruntime", optimization, run)


def pt2_backend(path: Path) -> Backend:
    """model.pt2 loaded back from disk, on the device it was compiled for (its metadata says which)."""
    device = torch.device(read_pt2_metadata(path)["device"])
    compiled = load_pt2(path)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return compiled(torch.from_numpy(images).to(device)).cpu().numpy()

    return Backend("aotinductor", None, run)


def file_backends(torchscript_path: Path, onnx_path: Path) -> list[Backend]:
    """What `digits export` and `digits verify` compare: TorchScript, and ONNX with and without graph
    optimisation. The unoptimised run matters: onnxruntime's optimiser deletes a Dropout node left by an
    export in training mode, which would hide that bug."""
    return [torchscript_backend(torchscript_path), *(onnxruntime_backend(onnx_path, lvl) for lvl in ORT_LEVELS)]
