"""On a CUDA machine, TorchServe hands the worker a GPU and the handler runs there."""

from __future__ import annotations

import pytest
import requests
import torch
from digits.serving.server import read_state, read_token
from serving_helpers import port_flags, wait_for

from digits.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_served_models_run_on_the_gpu(store, tmp_path, ports, mnist):
    argv = ["--run-dir", str(tmp_path)]
    assert main(["serve", "--model-store", str(store), *argv, *port_flags(ports)]) == 0
    try:
        state = read_state(tmp_path)
        headers = {"Authorization": f"Bearer {read_token(tmp_path)}"}
        for model in ("cnn", "mlp"):
            response = requests.post(
                f"{state.inference_url}/predictions/{model}",
                headers=headers,
                timeout=30,
                json={"data": mnist.test_images[0].tolist()},
            )
            assert response.status_code == 200 and response.json()["label"] == 7
        log = tmp_path / "logs" / "model_log.log"
        wait_for(lambda: "on cuda:0" in log.read_text(errors="replace"), 30, "the handler's CUDA device in its log")
    finally:
        main(["stop", *argv])
