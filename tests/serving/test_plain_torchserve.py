"""docs/serving.md's plain command, exactly as written, on the config `digits config` writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
from serving_helpers import port_flags

from digits.cli import main

SERVING_DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
PLAIN = "torchserve --start --ncs --model-store model_store --ts-config torchserve.properties"


def test_the_serving_page_shows_the_plain_command():
    assert PLAIN in SERVING_DOC.read_text()


def test_plain_torchserve_command_serves_the_store(store, tmp_path, mnist, ports, monkeypatch):
    shutil.copytree(store, tmp_path / "model_store")
    inference = ports[0]
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--out", "torchserve.properties", *port_flags(ports)]) == 0
    # its own temp dir: TorchServe keeps one pid file per temp dir, and the test server has the default one
    env = {**os.environ, "TMPDIR": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # output to a file: TorchServe's Java process inherits it and outlives the launcher, so a pipe never closes
    with open(tmp_path / "torchserve.out", "wb") as out:
        subprocess.run(PLAIN.split(), cwd=tmp_path, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert _classify(tmp_path, inference, mnist.test_images[0].tolist()) == 200
    finally:
        subprocess.run(["torchserve", "--stop", "--foreground"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)


def _classify(cwd: Path, port: int, rows: list, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            token = json.loads((cwd / "key_file.json").read_text())["inference"]["key"]
            response = requests.post(
                f"http://127.0.0.1:{port}/predictions/cnn",
                json={"data": rows},
                headers={"Authorization": f"Bearer {token}"},
                timeout=5,
            )
            if response.status_code == 200:
                return 200
        except (OSError, KeyError, ValueError, requests.RequestException):
            pass
        time.sleep(0.5)
    return 0
