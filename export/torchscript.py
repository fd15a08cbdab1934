"""TorchScript: the format TorchServe and libtorch load without the model's Python code."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import ExportError


@contextmanager
def _torchscript_deprecation_hidden() -> Iterator[None]:
    # TorchScript is deprecated upstream and torch.jit.script/save/load each warn with a FutureWarning, once
    # per submodule for script. TorchServe and libtorch still need the format, so the warning tells a user
    # of `digits export` nothing they can act on. Hide only that message, only around our own calls.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def to_torchscript(model: nn.Module, example: torch.Tensor, log=print) -> torch.jit.ScriptModule:
    """Scripts `model`; traces it only where it cannot be scripted, and then checks the trace.

    Args:
        model: the module to convert, in the mode it should be exported in (eval, normally).
        example: (N, 1, 28, 28) float32 input, N >= 2; used only when tracing.
    """
    with _torchscript_deprecation_hidden():
        try:
            return torch.jit.script(model)
        # FrontendError: Python that TorchScript cannot compile; RuntimeError: types it cannot infer;
        # OSError: no source code to compile (a model shipped as .pyc)
        except (torch.jit.frontend.FrontendError, RuntimeError, OSError) as err:
            reason = str(err).strip().splitlines()[0]
            log(f"torch.jit.script failed ({reason}); tracing {type(model).__name__} instead")
        return _trace_checked(model, example)


def _trace_checked(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    # A trace records one run, so Python control flow and shapes can be baked in: torch.jit.trace re-runs the
    # model on inputs other than the example (another batch size, other values) and fails on any mismatch.
    generator = torch.Generator().manual_seed(0)
    other_inputs = [(torch.randn(n, *example.shape[1:], generator=generator),) for n in (1, 2 * len(example) + 1)]
    try:
        return torch.jit.trace(model, example, check_inputs=other_inputs)
    except torch.jit.TracingCheckError as err:
        raise ExportError(f"{type(model).__name__} cannot be scripted and traces inconsistently: {err}") from None


def save_torchscript(module: torch.jit.ScriptModule, path: Path) -> None:
    with _torchscript_deprecation_hidden():
        torch.jit.save(module, str(path))


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """Loads a TorchScript file on the CPU; raises ExportError for a file that is not one."""
    with _torchscript_deprecation_hidden():
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as err:
            reason = str(err).strip().splitlines()[0]
            raise ExportError(f"{path} is not a loadable TorchScript file: {reason}") from None


def export_torchscript(model: nn.Module, path: Path, example: torch.Tensor, log=print) -> Path:
    """Writes `model` as TorchScript to `path` (the caller decides eval or training mode)."""
    save_torchscript(to_torchscript(model, example, log=log), path)
    return Path(path)
