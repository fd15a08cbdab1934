"""Loading what the archive holds: its metadata file, the model file it vouches for, and a runtime for it.

Everything the handler knows about the model (normalisation, labels, input shape, format, digest) comes
from `digits_meta.json`, written by the archive step from the export's metadata; nothing is hard-coded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from digit_contract import LAYOUTS, META_FILE, PT2_META_ENTRY, PT2_REQUIRED_KEYS, REQUIRED_KEYS, RUNTIME_BY_SUFFIX

logger = logging.getLogger(__name__)

REBUILD = "rebuild the archive with `digits archive`"
# Rows of one forward pass on the CPU; a larger batch (several OIP requests of many digits) runs in chunks of
# this size. A conv net's activations outgrow the caches with the batch (the cnn's are about 230 KB a digit), so
# one thread classifies more digits a second at 64 than at 256: `digits bench offline cnn --threads 1
# --batch-sizes 64,256` measures both (docs/tuning.md).
CPU_CHUNK_ROWS = 64

# (N, C, H, W) float32 normalised, on the CPU -> (N, classes) float32 scores (logits or log-probabilities)
Predictor = Callable[[torch.Tensor], torch.Tensor]


class ModelLoadError(RuntimeError):
    """The archive cannot be served as it is; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class DigitMeta:
    """The archive's metadata file, checked."""

    format: str  # "onnx" | "torchscript" | "pt2"
    sha256: str  # hex digest of the model file
    mean: float  # normalisation, applied to intensities scaled to 0..1
    std: float
    labels: tuple[str, ...]  # class index -> label
    input_shape: tuple[int, int, int]  # (C, H, W)
    layout: str  # "NCHW"
    model: str | None = None  # registry name, for the logs
    model_file: str | None = None  # used when the manifest names no serialized file
    test_accuracy: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of one digit."""
        return self.input_shape[1], self.input_shape[2]


def read_metadata(model_dir: Path) -> DigitMeta:
    """Reads and checks `<model_dir>/digits_meta.json`."""
    path = model_dir / META_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: the archive must ship {META_FILE} as an extra file; {REBUILD}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); {REBUILD}") from None
    return parse_metadata(raw, str(path))


def parse_metadata(raw: Any, source: str) -> DigitMeta:
    """Builds a `DigitMeta` from parsed JSON, or fails naming every problem at once."""
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{source} must hold a JSON object, not {type(raw).__name__}; {REBUILD}")
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    problems = [f"missing keys: {', '.join(missing)}"] if missing else metadata_problems(raw)
    if problems:
        raise ModelLoadError(f"{source} is invalid: {'; '.join(problems)}; {REBUILD}")
    known = DigitMeta.__dataclass_fields__
    fields = {key: value for key, value in raw.items() if key in known}
    fields.update(labels=tuple(raw["labels"]), input_shape=tuple(raw["input_shape"]))
    return DigitMeta(**fields)


def metadata_problems(raw: Mapping[str, Any]) -> list[str]:
    """What is wrong with the values of a metadata object that has every required key."""
    checks = {
        "format": raw["format"] in RUNTIME_BY_SUFFIX.values(),
        "sha256": isinstance(raw["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]) is not None,
        "mean": _is_real(raw["mean"]),
        "std": _is_real(raw["std"]) and raw["std"] > 0,
        "labels": _is_labels(raw["labels"]),
        "input_shape": _is_shape(raw["input_shape"]),
        "layout": raw["layout"] in LAYOUTS,
        "model_file": isinstance(raw.get("model_file", ""), str),
    }
    wanted = {
        "format": f"one of {sorted(RUNTIME_BY_SUFFIX.values())}",
        "sha256": "64 lowercase hex digits",
        "mean": "a finite number",
        "std": "a finite number > 0",
        "labels": "a non-empty list of strings",
        "input_shape": "[1, H, W] with H, W > 0 (one channel)",
        "layout": f"one of {list(LAYOUTS)}",
        "model_file": "a file name",
    }
    return [f"{key} is {raw[key]!r:.80}, expected {wanted[key]}" for key, ok in checks.items() if not ok]


def _is_real(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _is_labels(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(label, str) for label in value)


def _is_shape(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(type(x) is int and x > 0 for x in value)
        and value[0] == 1  # the preprocessing makes grayscale digits
    )


def find_model_file(model_dir: Path, manifest: Mapping[str, Any] | None, meta: DigitMeta) -> Path:
    """The manifest's serialized file (TorchServe's record of the archive), else the metadata's model_file."""
    name = ((manifest or {}).get("model") or {}).get("serializedFile") or meta.model_file
    if not name:
        raise ModelLoadError(f"neither MANIFEST.json's serializedFile nor {META_FILE}'s model_file names a model")
    path = model_dir / name
    if not path.is_file():
        raise ModelLoadError(f"model file {path} is missing from the archive; {REBUILD}")
    fmt = RUNTIME_BY_SUFFIX.get(path.suffix)
    if fmt is None:
        raise ModelLoadError(f"model file {path.name} has no known extension; expected {', '.join(RUNTIME_BY_SUFFIX)}")
    if fmt != meta.format:
        raise ModelLoadError(f"model file {path.name} is {fmt} by its extension but {META_FILE} says {meta.format}")
    return path


def verify_sha256(path: Path, expected: str) -> None:
    """Refuses a model file whose digest differs from the one the metadata vouches for."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise ModelLoadError(
            f"model file {path.name} has SHA-256 {actual}, but {META_FILE} expects {expected}: "
            f"the file is corrupt or comes from another export; {REBUILD}"
        )


def choose_device(gpu_id: int | str | None) -> torch.device:
    """`cuda:<gpu_id>` when TorchServe assigned a GPU and CUDA is there, else the CPU; logs which and why."""
    if gpu_id is not None and torch.cuda.is_available():
        device = torch.device(f"cuda:{int(gpu_id)}")
        logger.info("digits handler: running on %s (TorchServe assigned gpu_id %s)", device, gpu_id)
    elif gpu_id is not None:
        device = torch.device("cpu")
        logger.warning("digits handler: running on cpu: TorchServe assigned gpu_id %s but CUDA is unavailable", gpu_id)
    else:
        device = torch.device("cpu")
        logger.info("digits handler: running on cpu (TorchServe assigned no GPU)")
    return device


def keep_fp32_exact() -> None:
    """Undoes the TF32 switch that importing TorchServe's BaseHandler flips on Ampere and newer GPUs.

    ts/torch_handler/base_handler.py calls `torch.set_float32_matmul_precision("high")` at import when the
    GPU's compute capability is 8.0 or more, so every float32 matmul of the worker would run in TF32 (about
    three decimal digits), and cuDNN convolutions use TF32 by default. The served model must be the one whose
    parity the export proved (atol 1e-5 on the logits), so this worker computes in full float32.
    """
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def load_predictor(path: Path, device: torch.device) -> Predictor:
    """Loads the model file with the runtime its extension calls for.

    Raises:
        ModelLoadError: the runtime cannot read the file. Its digest matched the metadata, so the file is
            as exported: the export itself is broken, or the archive was built around a damaged file.
    """
    fmt = RUNTIME_BY_SUFFIX[path.suffix]
    loaders = {"torchscript": load_torchscript, "onnx": load_onnx, "pt2": load_pt2}
    try:
        predict = loaders[fmt](path, device)
        return in_chunks(predict, CPU_CHUNK_ROWS) if device.type == "cpu" else predict
    except ModelLoadError:
        raise
    except Exception as err:  # each runtime has its own error types for an unreadable file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"model file {path.name} cannot be loaded as {fmt} ({type(err).__name__}: {reason}); its SHA-256 "
            f"matches {META_FILE}, so it was archived damaged: re-export the model and {REBUILD}"
        ) from err


def in_chunks(predict: Predictor, rows: int) -> Predictor:
    """`predict` over at most `rows` rows at a time, the scores joined in order (a GPU takes a batch whole);
    its differentiable twin (`gradients_of`), if any, likewise."""

    def chunked(images: torch.Tensor) -> torch.Tensor:
        if len(images) <= rows:
            return predict(images)
        return torch.cat([predict(part) for part in images.split(rows)])

    differentiable = gradients_of(predict)
    return chunked if differentiable is None else with_gradients(chunked, in_chunks(differentiable, rows))


def with_gradients(predict: Predictor, differentiable: Predictor) -> Predictor:
    """Marks `predict` as having a differentiable twin: the same scores, computed with autograd on, which
    explanations by gradient (digit_explain.py) call; predictions keep the inference-mode path."""
    predict.gradients = differentiable  # type: ignore[attr-defined]
    return predict


def gradients_of(predict: Predictor) -> Predictor | None:
    """The predictor's differentiable twin, or None where the model file runs forward passes only (ONNX,
    AOTInductor)."""
    return getattr(predict, "gradients", None)


def load_torchscript(path: Path, device: torch.device) -> Predictor:
    """A TorchScript module on `device`; inputs move there and scores come back to the CPU."""
    module = torch.jit.load(str(path), map_location=device).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)  # explanations differentiate by the input only
    logger.info("digits handler: loaded TorchScript %s on %s", path.name, device)

    def predict(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(images.to(device)).float().cpu()

    def differentiable(images: torch.Tensor) -> torch.Tensor:
        return module(images.to(device)).float().cpu()

    return with_gradients(predict, differentiable)


def load_onnx(path: Path, device: torch.device) -> Predictor:
    """An onnxruntime session, on CUDA when the worker has a GPU and onnxruntime-gpu is installed."""
    import onnxruntime as ort  # only ONNX archives pay for it; a TorchScript worker may lack it

    session = ort.InferenceSession(str(path), sess_options=session_options(ort), providers=onnx_providers(ort, device))
    if len(session.get_inputs()) != 1:
        raise ModelLoadError(f"{path.name} takes {len(session.get_inputs())} inputs; a digit model takes one")
    input_name = session.get_inputs()[0].name
    logger.info("digits handler: loaded ONNX %s with providers %s", path.name, session.get_providers())

    def predict(images: torch.Tensor) -> torch.Tensor:
        # onnxruntime copies CPU inputs to the GPU itself when it runs on CUDA
        return torch.from_numpy(session.run(None, {input_name: images.cpu().numpy()})[0]).float()

    return predict


def load_pt2(path: Path, device: torch.device) -> Predictor:
    """An AOTInductor package on `device`, which must be what it was compiled for. A batch past the package's
    range (many OIP requests of many digits) runs in chunks it takes; an empty one is refused, as the
    compiled code checks no range itself."""
    facts = read_pt2_facts(path)
    check_pt2_loadable(facts, device, path.name)
    index = -1 if device.index is None else device.index  # -1: the CPU, or the current CUDA device
    compiled = torch._inductor.aoti_load_package(str(path), device_index=index)
    low, high = facts["min_batch"], facts["max_batch"]
    logger.info("digits handler: loaded AOTInductor %s on %s (batches %d to %d)", path.name, device, low, high)

    def predict(images: torch.Tensor) -> torch.Tensor:
        if not low <= len(images) <= high:
            raise ValueError(f"{path.name} takes batches of {low} to {high} digits, got {len(images)}")
        with torch.inference_mode():
            return compiled(images.to(device)).float().cpu()

    return in_chunks(predict, high)


def read_pt2_facts(path: Path) -> dict[str, Any]:
    """The package's own metadata (written by `digits export --pt2`), read from the zip without loading code.

    Refuses a forged or foreign file for the reasons, in the words, that export/pt2.py's `read_pt2_metadata`
    gives (tests/handlers/test_loading_matches_export.py holds both to it)."""
    try:
        with zipfile.ZipFile(path) as package:
            names = [n for n in package.namelist() if n.endswith("/" + PT2_META_ENTRY)]
            if len(names) != 1:
                raise ModelLoadError(f"model file {path.name} carries no {PT2_META_ENTRY}; {PT2_REBUILD}")
            facts = json.loads(package.read(names[0]))
    except (zipfile.BadZipFile, OSError) as err:  # load_predictor adds that its digest vouched for it
        raise ValueError(f"{path.name} is not a .pt2 package: {err}") from None
    except ValueError as err:
        raise ModelLoadError(f"model file {path.name}: {PT2_META_ENTRY} is not JSON ({err}); {PT2_REBUILD}") from None
    missing = [key for key in PT2_REQUIRED_KEYS if key not in facts] if isinstance(facts, dict) else PT2_REQUIRED_KEYS
    if missing:
        raise ModelLoadError(f"model file {path.name}: {PT2_META_ENTRY} lacks {', '.join(missing)}; {PT2_REBUILD}")
    return facts


PT2_REBUILD = "re-export it where it will run (`digits export MODEL --pt2`) and rebuild the archive"


def check_pt2_loadable(facts: Mapping[str, Any], device: torch.device, name: str) -> None:
    """Refuses by name a package compiled by another torch, for another device type, CPU ISA or GPU arch."""
    if facts["torch_version"] != torch.__version__:
        raise ModelLoadError(
            f"{name} was compiled by torch {facts['torch_version']}; this worker runs torch {torch.__version__}: "
            f"{PT2_REBUILD}"
        )
    if facts["device"] != device.type:
        raise ModelLoadError(f"{name} was compiled for {facts['device']}; this worker runs on {device}: {PT2_REBUILD}")
    supported = pt2_targets(device)
    if facts["target"] not in supported:
        raise ModelLoadError(
            f"{name} was compiled for {facts['device']} {facts['target']}; this worker's {device.type} runs "
            f"{', '.join(supported)}: {PT2_REBUILD}"
        )


def pt2_targets(device: torch.device) -> list[str]:
    """What compiled code this worker can run: its GPU's architecture, or its CPU's vector instruction sets."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return [f"sm_{major}{minor}"]
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()] or ["no vector ISA"]


def onnx_providers(ort: Any, device: torch.device) -> list[Any]:
    """CUDA (on TorchServe's GPU) then CPU when possible, else CPU alone, saying why."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        logger.warning("digits handler: ONNX runs on cpu: install onnxruntime-gpu for CUDAExecutionProvider")
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


def session_options(ort: Any) -> Any:
    """One intra-op thread pool as large as torch's, and no inter-op pool.

    onnxruntime's default takes every core regardless of how many workers TorchServe runs; torch's
    count honours OMP_NUM_THREADS (what TorchServe sets for torchrun workers, and the knob operators use
    to share cores between workers), so one setting governs both runtimes of a worker.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


def check_predictor(predict: Predictor, meta: DigitMeta) -> None:
    """A warm-up forward pass on two blank digits, so that a wrong model fails the load, not the first batch."""
    try:
        scores = predict(torch.zeros(2, *meta.input_shape))
    except Exception as err:  # any runtime's failure here means the model does not fit the metadata
        raise ModelLoadError(
            f"warm-up forward pass on a batch of 2 digits {list(meta.input_shape)} failed: {err}; "
            "the model must take (N, C, H, W) float32 with a dynamic batch dimension"
        ) from err
    if tuple(scores.shape) != (2, len(meta.labels)):
        raise ModelLoadError(
            f"the model maps a batch of 2 digits {list(meta.input_shape)} to scores of shape {list(scores.shape)}; "
            f"expected [2, {len(meta.labels)}] (one score per label), with a dynamic batch dimension"
        )
