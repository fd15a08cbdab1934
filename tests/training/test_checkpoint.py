"""No pickle from outside: a checkpoint that smuggles a Python global is refused, and never runs it."""

from __future__ import annotations

import os

import pytest
import torch
from digits.training.checkpoint import CheckpointError, load_checkpoint

from digits.cli import main


class Smuggled:
    """Pickles as a call to os.mkdir: loading it unsafely would create a folder."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def smuggling_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    metadata = {"model": "mlp", "model_args": {}, "input_shape": [1, 28, 28], "mean": 0.1, "std": 0.3}
    torch.save({"format": 1, "state_dict": {}, "metadata": {**metadata, "labels": Smuggled(str(marker))}}, path)
    return path, marker


def test_a_checkpoint_smuggling_a_global_is_refused_by_name_and_never_runs(tmp_path):
    path, marker = smuggling_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert f"{path} asks to import posix.mkdir" in message or f"{path} asks to import nt.mkdir" in message
    assert "weights_only=True" in message and "weights_only=False" not in message
    assert not marker.exists()


def test_export_of_a_smuggling_checkpoint_is_one_line_and_exit_code_2(tmp_path, capsys):
    path, marker = smuggling_checkpoint(tmp_path)
    (tmp_path / "mlp").mkdir()
    path.rename(tmp_path / "mlp" / "checkpoint.pt")
    assert main(["export", "mlp", "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "asks to import" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
