from __future__ import annotations

import json
import zipfile

import pytest
import yaml
from digits.contract import CONFIG_FILE, META_FILE, TORCHSERVE_MAX_RESPONSE
from digits.serving.archive import ServingSettings
from digits.serving.config import Ports, render_config
from digits.serving.kserve import render_kserve_config

from digits.cli import main


def test_archive_holds_handler_model_metadata_and_settings(store):
    with zipfile.ZipFile(store / "cnn.mar") as mar:
        names = set(mar.namelist())
        meta = json.loads(mar.read(META_FILE))
        settings = yaml.safe_load(mar.read(CONFIG_FILE))
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    assert {"digit_handler.py", "model.onnx", META_FILE, CONFIG_FILE} <= names
    assert not any(n.startswith(("digits/", "training/", "export/", "serving/")) for n in names)
    assert manifest["model"]["handler"] == "digit_handler.py" and manifest["model"]["serializedFile"] == "model.onnx"
    assert meta["format"] == "onnx" and len(meta["sha256"]) == 64 and meta["labels"] == [str(d) for d in range(10)]
    assert "noop_handler.py" not in names  # the benchmarks' ceiling is not the model's code
    assert settings == {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 8,
        "maxBatchDelay": 20,
        "responseTimeout": 120,
        "handler": {"threads": 1, "max_response_size": TORCHSERVE_MAX_RESPONSE},
    }


def test_settings_read_back_from_model_config_are_those_written():
    written = ServingSettings(batch_size=4, max_batch_delay=7, workers=2, response_timeout=30, threads=3)
    assert ServingSettings.from_yaml(written.to_yaml()) == written
    assert ServingSettings.from_yaml({}) == ServingSettings()  # an archive made elsewhere: the defaults


def _args(artifacts, tmp_path, *extra):
    return ["archive", "cnn", "--format", "onnx", "--artifacts", str(artifacts), "--model-store", str(tmp_path), *extra]


def test_archive_refuses_a_model_whose_parity_failed(artifacts, tmp_path, capsys):
    copy = tmp_path / "art" / "cnn"
    copy.mkdir(parents=True)
    for name in ("export.json", "model.onnx"):
        (copy / name).write_bytes((artifacts / "cnn" / name).read_bytes())
    (copy / "parity.json").write_text(json.dumps({"passed": False}))
    assert main(_args(tmp_path / "art", tmp_path)) == 2
    assert "parity FAILED" in capsys.readouterr().err
    (copy / "parity.json").unlink()
    assert main(_args(tmp_path / "art", tmp_path)) == 2
    assert "no parity report" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mar"))


@pytest.mark.parametrize(
    "extra, message",
    [(["--batch-size", "0"], "--batch-size must be at least 1"), (["--name", "../evil"], "--name '../evil'")],
)
def test_archive_bad_settings_are_one_line(artifacts, tmp_path, capsys, extra, message):
    assert main(_args(artifacts, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err


def test_archive_of_an_unexported_model_names_the_command(tmp_path, capsys):
    assert main(["archive", "mlp", "--format", "torchscript", "--artifacts", str(tmp_path)]) == 2
    assert "run `digits export mlp` first" in capsys.readouterr().err


def with_response_limit(mar, out, limit):
    """A copy of archive `mar` whose model-config.yaml says `handler: {max_response_size: limit}`."""
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == CONFIG_FILE:
                settings = yaml.safe_load(data)
                settings["handler"]["max_response_size"] = limit
                data = yaml.safe_dump(settings).encode()
            target.writestr(item, data)
    return out


def test_the_frontends_response_limit_is_the_archives(store, tmp_path):
    """config.properties' max_response_size is what the handlers bound their answers by (model-config.yaml),
    the largest of them, so that no handler builds an answer the frontend would drop with the worker."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with_response_limit(store / "cnn.mar", tmp_path / "a" / "cnn.mar", 1_000_000)
    with_response_limit(store / "mlp.mar", tmp_path / "a" / "mlp.mar", 9_000_000)
    with_response_limit(store / "cnn.mar", tmp_path / "b" / "cnn.mar", 2_000_000)
    for folder, expected in (
        (store, TORCHSERVE_MAX_RESPONSE),
        (tmp_path / "a", 9_000_000),
        (tmp_path / "b", 2_000_000),
    ):
        archives = sorted(folder.glob("*.mar"))
        assert f"max_response_size={expected}\n" in render_config(folder, Ports())
        assert f"max_response_size={expected}\n" in render_kserve_config(archives, Ports())
