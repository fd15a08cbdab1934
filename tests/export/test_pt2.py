"""model.pt2 (`digits export --pt2`): proven in the same parity report, self-describing, and refused by name
where it must not run. One AOTInductor compile of the mlp serves the whole file (`pt2_export`, tests/conftest.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from digits.contract import PT2
from digits.export import ExportError
from digits.export.convert import export_model
from digits.export.metadata import sha256_file
from digits.export.parity import BATCH_SIZES
from digits.export.pt2 import MAX_BATCH, load_pt2, read_pt2_metadata, resolve_device

from digits.cli import main


@pytest.fixture
def pt2_copy(pt2_export, tmp_path):
    """A private artifacts folder holding a copy of the pt2 export's mlp/."""
    shutil.copytree(pt2_export.model_dir, tmp_path / "mlp")
    return tmp_path


def test_the_package_is_proven_in_the_same_report_and_listed(pt2_export):
    checks = [c for c in pt2_export.report.checks if c.backend == "aotinductor"]
    assert [c.batch_size for c in checks] == [*BATCH_SIZES, 1000]  # and the whole set, in chunks of 1000
    assert all(c.passed for c in checks) and checks[-1].samples == 1000
    manifest = json.loads((pt2_export.model_dir / "export.json").read_text())
    assert manifest["files"]["pt2"] == {"path": PT2.file, "sha256": sha256_file(pt2_export.model_dir / PT2.file)}


def test_export_time_is_reported_per_step_and_in_total(pt2_export):
    seconds = pt2_export.seconds
    assert {"torchscript", "onnx", "pt2", "parity", "total"} <= seconds.keys()
    assert seconds["total"] >= seconds["pt2"] + seconds["onnx"] > 0


def test_the_package_carries_the_checkpoint_facts_readable_without_compiling(pt2_export):
    meta = read_pt2_metadata(pt2_export.model_dir / PT2.file)  # zipfile alone
    manifest = json.loads((pt2_export.model_dir / "export.json").read_text())
    for key in ("model", "mean", "std", "labels", "input_shape", "layout", "checkpoint_sha256"):
        assert meta[key] == manifest[key], key
    assert meta["torch_version"] == torch.__version__
    assert (meta["device"], meta["min_batch"], meta["max_batch"]) == (resolve_device("auto").type, 1, MAX_BATCH)
    assert "pixel / 255" in meta["normalisation"]


@pytest.mark.parametrize("batch", [0, MAX_BATCH + 1])
def test_a_batch_outside_the_range_is_refused_with_a_clear_error(pt2_export, batch):
    run = load_pt2(pt2_export.model_dir / PT2.file)  # on the device it was compiled for
    device = read_pt2_metadata(pt2_export.model_dir / PT2.file)["device"]
    with pytest.raises(ValueError, match=f"takes batches of 1 to {MAX_BATCH} digits, got a batch of {batch}"):
        run(torch.zeros(batch, 1, 28, 28, device=device))
    with pytest.raises(ValueError, match=r"takes \(N, 1, 28, 28\), got \(2, 1, 28, 27\)"):
        run(torch.zeros(2, 1, 28, 27, device=device))
    assert run(torch.zeros(MAX_BATCH, 1, 28, 28, device=device)).shape == (MAX_BATCH, 10)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"torch_version": "2.0.0"}, "was compiled by torch 2.0.0, this is torch"),
        ({"device": "cuda", "target": "sm_90"}, "was compiled for cuda, this loads it on cpu"),
        ({"device": "cpu", "target": "neon"}, "was compiled for cpu neon; this cpu runs"),
    ],
)
def test_a_package_compiled_elsewhere_is_refused_by_name_at_load(pt2_export, tmp_path, forge_pt2, changes, named):
    forged = forge_pt2(pt2_export.model_dir / PT2.file, tmp_path / "model.pt2", **changes)
    with pytest.raises(ExportError, match=named):
        load_pt2(forged, "cpu")


def test_verify_rechecks_the_package_and_refuses_a_foreign_one(pt2_copy, forge_pt2, tmp_path, capsys):
    assert main(["verify", "mlp", "--artifacts", str(pt2_copy)]) == 0
    assert "aotinductor" in (pt2_copy / "mlp" / "parity.md").read_text()
    package = pt2_copy / "mlp" / PT2.file
    forge_pt2(shutil.copy(package, tmp_path / "original.pt2"), package, torch_version="2.0.0")
    assert main(["verify", "mlp", "--artifacts", str(pt2_copy)]) == 2
    assert "was compiled by torch 2.0.0" in capsys.readouterr().err


def test_exporting_without_pt2_removes_the_package_compiled_from_the_replaced_model(pt2_copy):
    logged = []
    assert export_model(pt2_copy, "mlp", samples=256, log=logged.append).passed
    assert not (pt2_copy / "mlp" / PT2.file).exists()
    assert "pt2" not in json.loads((pt2_copy / "mlp" / "export.json").read_text())["files"]
    assert any("removed" in line and PT2.file in line for line in logged)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ExportError, match="--device cuda: CUDA is not available here"):
        resolve_device("cuda")
    with pytest.raises(ExportError, match="--device 'gpu0' is not a device"):
        resolve_device("gpu0")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_on_a_gpu_compiles_for_cuda_and_passes_parity(pt2_copy):
    result = export_model(pt2_copy, "mlp", formats=["pt2"], device="cuda", samples=1000, log=lambda _: None)
    assert result.passed, result.report.failures
    meta = read_pt2_metadata(pt2_copy / "mlp" / PT2.file)
    assert meta["device"] == "cuda" and meta["target"].startswith("sm_")
    with pytest.raises(ExportError, match="was compiled for cuda, this loads it on cpu"):
        load_pt2(pt2_copy / "mlp" / PT2.file, "cpu")
