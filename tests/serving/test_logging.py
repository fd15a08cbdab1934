"""TorchServe's logs under digits serve: each line once, in its own file, and a console that stays small."""

from __future__ import annotations

import io
from collections import Counter

import requests
from PIL import Image


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_log_line_is_written_once_and_the_console_keeps_only_warnings(server, mnist):
    headers = {"Authorization": f"Bearer {server.token}"}
    for pixels in mnist.test_images[:50]:
        response = requests.post(f"{server.url}/predictions/cnn", data=_png(pixels), headers=headers, timeout=30)
        assert response.status_code == 200
    logs = server.run_dir / "logs"
    ts_log = (logs / "ts_log.log").read_text(errors="replace").splitlines()
    assert not any("[DEBUG]" in line for line in ts_log)  # TorchServe's default: several DEBUG lines a request
    # without additivity="false", access-log and metrics lines were copied here, and org.pytorch.serve's twice
    assert not any(" ACCESS_LOG - " in line or " TS_METRICS - " in line for line in ts_log)
    events = [line for line in ts_log if line[:2] == "20"]  # timestamped lines; banners span several lines
    assert events and max(Counter(events).values()) == 1
    assert "POST /predictions/cnn" in (logs / "access_log.log").read_text(errors="replace")
    console = (logs / "torchserve.out").read_text(errors="replace")
    assert "[INFO ]" not in console and len(console) < 100_000  # digits never rotates this file
