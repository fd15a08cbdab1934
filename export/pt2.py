"""AOTInductor's `.pt2`: `torch.export` with a dynamic batch, compiled ahead of time for one device.

PyTorch's supported path to deployment (TorchScript is deprecated). The package is a zip holding the
compiled model (a shared library built with `-march=native`, so tied to the CPU family it was built on,
or CUDA kernels for one GPU architecture) and our metadata as `extra/digits_meta.json`, which
`read_pt2_metadata` reads with `zipfile` alone: nothing is compiled or loaded to read it.

What the compiled model does not check, `load_pt2` does, by name and before loading: the torch build that
compiled it (AOTInductor's C++ ABI follows it), the device type, and the CPU's instruction set or the GPU's
compute capability (a mismatch would otherwise fail at load with a linker error, or crash on an illegal
instruction). Its runner refuses a batch outside the exported range, which the compiled code assumes
without checking.
"""

from __future__ import annotations

import copy
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..contract import PT2_META_ENTRY, PT2_REQUIRED_KEYS
from ..training.devices import pick_device
from . import ExportError

MIN_BATCH = 1
# The largest batch a package accepts (the range torch.export and Inductor compile for); it covers every
# caller: parity's whole-set chunks (1,000), the bench's batches, TorchServe's batchSize (16 by default).
MAX_BATCH = 4096
# Inductor options: freezing turns the weights into constants, so that Inductor hands both convolutions and
# both linear layers to oneDNN with the ReLU fused; it needs the compile to run without autograd.
# max_autotune is left out: it multiplies the compile time for little speed on these models. `digits bench
# offline cnn` measures the package beside onnxruntime (its aotinductor rows; docs/tuning.md has the study).
INDUCTOR_CONFIGS = {"freezing": True}
EXTRA_DIR = "extra/"  # where torch's package_pt2 puts its extra_files (torch.export.pt2_archive's EXTRA_DIR)

Pt2Runner = Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) float32 on its device -> (N, classes)


def export_pt2(model: nn.Module, path: Path, example: torch.Tensor, metadata: dict, device: torch.device) -> Path:
    """Exports `model` (in the mode the caller chose) with a dynamic batch, compiles it for `device` and
    writes the package to `path` (which must end in .pt2), with `metadata` plus the build facts inside.

    Args:
        example: (N, C, H, W) float32 with N >= 2: torch.export specialises a dimension of size 1.
        metadata: JSON-serialisable facts (normalisation, labels, checkpoint digest) to carry.
    """
    if example.dim() < 1 or len(example) < 2:
        raise ValueError(f"export needs an example batch of at least 2, got shape {tuple(example.shape)}")
    program = _export_program(copy.deepcopy(model).to(device), example.to(device))  # the caller's model stays put
    options = {**INDUCTOR_CONFIGS, "aot_inductor.package": True}
    with torch.no_grad():  # freezing applies only to a graph compiled without autograd
        # as torch._inductor.aoti_compile_and_package compiles it (which cannot add extra files to the package)
        module = program.module(check_guards=False)
        files = torch._inductor.aot_compile(module, (example.to(device),), options=options)
    extra = {PT2_META_ENTRY.removeprefix(EXTRA_DIR): json.dumps({**metadata, **build_facts(device)}, indent=2)}
    from torch.export.pt2_archive._package import package_pt2

    package_pt2(str(path), aoti_files=files, extra_files=extra)
    return Path(path)


def _export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=MIN_BATCH, max=MAX_BATCH)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # torch.export raises several error types (UserError, guard violations)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"torch.export of {type(model).__name__} failed: {reason}") from None


def resolve_device(name: str) -> torch.device:
    """The device to compile for: `training.devices.pick_device`'s rule, limited to what AOTInductor
    compiles for (a CPU or a CUDA device)."""
    try:
        device = pick_device(name)
    except ValueError as err:
        raise ExportError(str(err)) from None
    if device.type not in ("cpu", "cuda"):
        raise ExportError(f"--device {name}: .pt2 packages are compiled for cpu or cuda")
    return device


def build_facts(device: torch.device) -> dict:
    """What the compiled code depends on, for `check_loadable` to compare at load."""
    return {
        "torch_version": torch.__version__,
        "device": device.type,
        "target": device_target(device),
        "min_batch": MIN_BATCH,
        "max_batch": MAX_BATCH,
    }


def device_target(device: torch.device) -> str:
    """The instruction set the code was compiled for: the CPU's vector ISA, or the GPU's compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "no vector ISA"


def supported_targets(device: torch.device) -> list[str]:
    """Targets whose code this machine runs on `device`."""
    if device.type == "cuda":
        return [device_target(device)]
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()] or ["no vector ISA"]


def read_pt2_metadata(path: Path) -> dict:
    """The package's extra/digits_meta.json, read without compiling or loading anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/{PT2_META_ENTRY}")]
            if len(names) != 1:
                raise ExportError(f"{path} carries no {PT2_META_ENTRY}; re-export with `digits export --pt2`")
            meta = json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, OSError) as err:
        raise ExportError(f"{path} is not a .pt2 package: {err}") from None
    except ValueError as err:
        raise ExportError(
            f"{path}: {PT2_META_ENTRY} is not JSON ({err}); re-export with `digits export --pt2`"
        ) from None
    missing = [k for k in PT2_REQUIRED_KEYS if k not in meta] if isinstance(meta, dict) else PT2_REQUIRED_KEYS
    if missing:
        raise ExportError(f"{path}: {PT2_META_ENTRY} lacks {', '.join(missing)}; re-export with `digits export --pt2`")
    return meta


def check_loadable(meta: dict, device: torch.device, where: str) -> None:
    """Refuses, naming the difference, a package compiled for another torch, device type or target."""
    rerun = "re-export it here with `digits export MODEL --pt2`"
    if meta["torch_version"] != torch.__version__:
        raise ExportError(
            f"{where} was compiled by torch {meta['torch_version']}, this is torch {torch.__version__}; {rerun}"
        )
    if meta["device"] != device.type:
        raise ExportError(f"{where} was compiled for {meta['device']}, this loads it on {device.type}; {rerun}")
    if meta["target"] not in supported_targets(device):
        raise ExportError(
            f"{where} was compiled for {meta['device']} {meta['target']}; this {device.type} runs "
            f"{', '.join(supported_targets(device))}; {rerun}"
        )


def load_pt2(path: Path, device: torch.device | str | None = None) -> Pt2Runner:
    """The package's compiled model on `device` (None: the device it was compiled for), behind a check of
    each batch; raises ExportError for a package this machine must not load (see `check_loadable`)."""
    meta = read_pt2_metadata(path)
    device = torch.device(meta["device"] if device is None else device)
    check_loadable(meta, device, str(path))
    try:
        # device_index -1: the CPU, or the current CUDA device
        index = -1 if device.index is None else device.index
        compiled = torch._inductor.aoti_load_package(str(path), device_index=index)
    except RuntimeError as err:
        raise ExportError(f"{path} cannot be loaded: {str(err).strip().splitlines()[0]}") from None
    return _checked_runner(compiled, meta, str(path))


def _checked_runner(compiled: Callable, meta: dict, where: str) -> Pt2Runner:
    low, high, shape = meta["min_batch"], meta["max_batch"], meta.get("input_shape")

    def run(images: torch.Tensor) -> torch.Tensor:
        check_batch(images, low, high, shape, where)
        return compiled(images)

    return run


def check_batch(images: torch.Tensor, low: int, high: int, input_shape: list[int] | None, where: str) -> None:
    """A clear error for what the compiled code would misread: a batch outside [low, high], a wrong shape."""
    if images.dim() == 0 or not low <= len(images) <= high:
        size = "a 0-d tensor" if images.dim() == 0 else f"a batch of {len(images)}"
        raise ValueError(f"{where} takes batches of {low} to {high} digits, got {size}")
    if input_shape is not None and list(images.shape[1:]) != list(input_shape):
        raise ValueError(f"{where} takes (N, {', '.join(map(str, input_shape))}), got {tuple(images.shape)}")
    if images.dtype != torch.float32:
        raise ValueError(f"{where} takes float32, got {images.dtype}")
