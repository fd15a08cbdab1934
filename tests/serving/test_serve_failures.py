"""`digits serve` refuses clearly, exit code 2, instead of hanging or starting half a server."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from serving_helpers import port_flags

from digits.cli import main
from serving.archive import META_NAME


def _tampered_copy(store, tmp_path):
    bad_store = tmp_path / "store"
    bad_store.mkdir()
    with zipfile.ZipFile(store / "cnn.mar") as source, zipfile.ZipFile(bad_store / "cnn.mar", "w") as target:
        for item in source.infolist():
            payload = source.read(item)
            if item.filename == META_NAME:
                meta = json.loads(payload)
                meta["sha256"] = "0" * 64
                payload = json.dumps(meta).encode()
            target.writestr(item, payload)
    return bad_store


def test_model_with_a_wrong_sha256_fails_serve_fast(store, tmp_path, ports, capsys):
    bad_store = _tampered_copy(store, tmp_path)
    argv = ["--run-dir", str(tmp_path / "run")]
    flags = port_flags(ports)
    assert main(["serve", "--model-store", str(bad_store), *argv, *flags, "--timeout", "60"]) == 2
    err = capsys.readouterr().err
    assert "model(s) cnn failed to load: model file model.onnx has SHA-256" in err
    assert "0" * 64 in err
    assert main(["stop", *argv]) == 0
    assert "not running" in capsys.readouterr().out  # serve cleaned up after itself


def test_serve_without_java_says_so(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert main(["serve", "--model-store", str(store), "--run-dir", str(tmp_path)]) == 2
    assert "Java was not found" in capsys.readouterr().err


def test_serve_without_archives_names_the_command_to_run(tmp_path, capsys):
    if shutil.which("java") is None:
        pytest.skip("needs java to get past the first check")
    assert main(["serve", "--model-store", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "holds no .mar archives; run `digits archive MODEL` first" in capsys.readouterr().err
