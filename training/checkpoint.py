"""The checkpoint format: a state_dict plus a metadata dict of plain values.

Only tensors, strings, numbers, lists and dicts go in, so `torch.load(..., weights_only=True)` reads it
and a checkpoint can never run code on load.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..contract import CHECKPOINT_KEYS

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not one of ours."""


def save_checkpoint(path: Path, model: nn.Module, metadata: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = Path(path).with_suffix(".partial")
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": state, "metadata": metadata}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """Reads a checkpoint safely and checks its shape; returns {"state_dict", "metadata"}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(refusal(path, err)) from None
    except Exception as err:  # torch raises RuntimeError, EOFError... for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "metadata" not in payload:
        raise CheckpointError(f"{path} is not a digits checkpoint (no state_dict/metadata)")
    missing = [k for k in CHECKPOINT_KEYS if k not in payload["metadata"]]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    return payload


def refusal(path: Path, err: pickle.UnpicklingError) -> str:
    """Names the Python object a refused checkpoint asks for; torch's own first line suggests loading it unsafely."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    if found is None:
        return f"{path} is not a readable checkpoint: {str(err).splitlines()[0]}"
    return (
        f"{path} asks to import {found.group(1)} while loading, which a checkpoint never needs; refused "
        "without running it (checkpoints load with weights_only=True). Use checkpoints written by `digits train`"
    )


def rebuild_model(payload: dict) -> nn.Module:
    """Rebuilds the eval-mode model from the registry and the checkpoint's metadata."""
    from .models import get_model

    meta = payload["metadata"]
    try:
        model = get_model(meta["model"]).build(**meta["model_args"])
        model.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint does not fit model {meta['model']!r}: {str(err).splitlines()[0]}") from None
    return model.eval()
