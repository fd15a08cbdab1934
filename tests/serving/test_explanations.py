"""Explanations on a real TorchServe started by `digits serve`, for every archive format, on every route:
/explanations (requests), OIP's `attributions` output and /v2/models/NAME/explain (tritonclient, JSON and
binary), KServe v1 :predict and :explain (requests, with pytorch/serve's own v1 MNIST request), and the
`digits explain` command writing its figures.

One server of its own holds the four formats: cnn as TorchScript and ONNX (the session's `artifacts`), mlp as
int8 ONNX (`int8_artifacts`) and as `.pt2` (`pt2_export`).
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from digits.serving.archive import ServingSettings, archive_model
from digits.serving.server import read_state, read_token
from PIL import Image
from serving_helpers import PORT_FLAGS, free_ports, port_flags

from digits.cli import main

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the dev extra) is needed")

V1_MNIST = Path(__file__).resolve().parent / "data" / "kserve_v1_mnist.json"  # pytorch/serve v0.12.0, unchanged
DEFAULTS = {
    "ts": "integrated-gradients",
    "onnx": "feature-ablation",
    "int8": "feature-ablation",
    "pt2": "feature-ablation",
}
MODELS = tuple(DEFAULTS)
KEYS = {"label", "confidence", "probabilities", "target", "method", "settings", "model_name", "model_version"}


@pytest.fixture(scope="module")
def served(artifacts, int8_artifacts, pt2_export, tmp_path_factory):
    """(inference URL, headers, metrics URL) of a TorchServe holding the four formats as ts, onnx, int8, pt2."""
    tmp = tmp_path_factory.mktemp("explain-serve")
    store, settings = tmp / "store", ServingSettings(batch_size=8, max_batch_delay=50)
    sources = {
        "ts": ("cnn", "torchscript", artifacts),
        "onnx": ("cnn", "onnx", artifacts),
        "int8": ("mlp", "onnx-int8", int8_artifacts),
        "pt2": ("mlp", "pt2", pt2_export.model_dir.parent),
    }
    for name, (model, fmt, folder) in sources.items():
        archive_model(model, fmt, folder, store, name, settings, log=lambda _: None)
    argv = ["--run-dir", str(tmp / "run")]
    assert main(["serve", "--model-store", str(store), *argv, *port_flags(free_ports(len(PORT_FLAGS)))]) == 0
    try:
        state = read_state(tmp / "run")
        yield state.inference_url, {"Authorization": f"Bearer {read_token(tmp / 'run')}"}, state.metrics_url
    finally:
        assert main(["stop", *argv]) == 0


@pytest.fixture(scope="module")
def digits(mnist) -> np.ndarray:
    return np.asarray(mnist.test_images[:8], dtype=np.uint8).reshape(8, 28, 28)


def png(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


def post(served, path: str, **kwargs) -> requests.Response:
    url, headers, _ = served
    return requests.post(f"{url}{path}", headers={**headers, **kwargs.pop("headers", {})}, timeout=120, **kwargs)


def predicted(served, model: str, digit: np.ndarray) -> dict:
    response = post(served, f"/predictions/{model}", data=png(digit), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("model", MODELS)
def test_explanations_take_every_body_predictions_take(served, digits, model) -> None:
    """PNG bytes, base64 text, {"data": pixels}: one answer each, the prediction and its explanation."""
    prediction = predicted(served, model, digits[0])
    bodies = [
        {"data": png(digits[0]), "headers": {"Content-Type": "image/png"}},
        {"data": base64.b64encode(png(digits[0])), "headers": {"Content-Type": "text/plain"}},
        {"json": {"data": digits[0].tolist()}},
    ]
    maps = []
    for body in bodies:
        response = post(served, f"/explanations/{model}", **body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == KEYS | {"framed", "attributions"}
        assert answer["label"] == answer["target"] == prediction["label"]
        assert answer["method"] == DEFAULTS[model] and answer["model_name"] == model
        assert np.array_equal(answer["framed"], digits[0])
        maps.append(np.asarray(answer["attributions"], dtype=np.float32))
        assert maps[-1].shape == (28, 28) and np.abs(maps[-1]).max() > 0
    assert all(np.allclose(m, maps[0], rtol=1e-4, atol=1e-6 * np.abs(maps[0]).max()) for m in maps)


@pytest.mark.parametrize("model", ["ts", "int8"])
def test_a_batch_answers_each_explanation_or_error_on_its_own(served, digits, model) -> None:
    """Sent together (they share batches): each request its own answer or 4xx, as predictions get them."""
    requests_ = [
        {"data": png(digits[1]), "headers": {"Content-Type": "image/png"}},
        {"data": b"not an image at all", "headers": {"Content-Type": "application/octet-stream"}},
        {"json": {"data": [0] * 784}},
        {"json": {"data": digits[2].tolist(), "method": "lime"}},
        {"json": {"data": digits[2].tolist(), "target": 12}},
        {"json": {"data": digits[3].tolist(), "method": "occlusion", "target": 4}},
    ]
    with ThreadPoolExecutor(len(requests_)) as pool:
        answers = list(pool.map(lambda body: post(served, f"/explanations/{model}", **body), requests_))
    assert [a.status_code for a in answers] == [200, 415, 400, 400, 400, 200], [a.text for a in answers]
    assert "feature-ablation, occlusion" in answers[3].json()["message"]
    assert "the labels are 0, 1, 2" in answers[4].json()["message"]
    assert answers[5].json()["method"] == "occlusion" and answers[5].json()["target"] == 4


def test_gradients_only_where_the_file_gives_them(served, digits) -> None:
    body = {"data": digits[0].tolist(), "method": "integrated-gradients"}
    assert post(served, "/explanations/ts", json=body).json()["method"] == "integrated-gradients"
    for model in ("onnx", "int8", "pt2"):
        response = post(served, f"/explanations/{model}", json=body)
        assert response.status_code == 400 and response.json()["type"] == "MethodNotOffered", response.text


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", MODELS)
def test_oip_attributions_with_tritonclient(served, digits, model, binary) -> None:
    """The `attributions` output (FP32 [N, 28, 28]) beside `label`, the request parameters choosing method and
    target; each map the one /explanations gives for that digit and choice."""
    client = tritonclient_http.InferenceServerClient(urlparse(served[0]).netloc, connection_timeout=120)
    tensor = tritonclient_http.InferInput("digits", [4, 28, 28], "UINT8")
    tensor.set_data_from_numpy(digits[:4], binary_data=binary)
    outputs = [tritonclient_http.InferRequestedOutput(name, binary_data=binary) for name in ("label", "attributions")]
    choice = {"method": "occlusion", "target": 3}
    # a copy of the headers: tritonclient adds its own to the dict it is given
    result = client.infer(model, [tensor], outputs=outputs, headers=dict(served[1]), parameters=choice)
    maps = result.as_numpy("attributions")
    assert maps.dtype == np.float32 and maps.shape == (4, 28, 28)
    parameters = result.get_output("attributions")["parameters"]
    assert (parameters["method"], parameters["target"], parameters["window"]) == ("occlusion", 3, 4)
    labels = result.as_numpy("label").tolist()
    assert labels == [predicted(served, model, digit)["label"] for digit in digits[:4]]
    single = post(
        served, f"/explanations/{model}", json={"data": digits[2].tolist(), "method": "occlusion", "target": 3}
    )
    expected = np.asarray(single.json()["attributions"], dtype=np.float32)
    assert np.allclose(maps[2], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_oip_explain_route_and_the_explained_limit(served, digits) -> None:
    """/v2/models/NAME/explain answers the outputs with attributions (default method, predicted labels);
    more than 64 digits to explain are refused 413 naming the limit, and predicting them is not."""
    body = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2, 28, 28], "data": digits[:2].tolist()}]}
    response = post(served, "/v2/models/onnx/explain", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert set(outputs) == {"probabilities", "label", "attributions"}
    assert outputs["attributions"]["parameters"] == {"method": "feature-ablation", "baseline": 0, "target": "predicted"}
    many = np.repeat(digits[:1], 65, axis=0)
    bulk = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [65, 28, 28], "data": many.tolist()}]}
    refused = post(served, "/v2/models/onnx/explain", json=bulk)
    assert refused.status_code == 413 and "the limit is 64" in refused.json()["error"]
    assert post(served, "/v2/models/onnx/infer", json=bulk).status_code == 200


@pytest.mark.parametrize("model", MODELS)
def test_kserve_v1_predict_and_explain(served, model) -> None:
    """pytorch/serve's kubernetes/kserve/kf_request_json/v1/mnist.json, as sent: {"predictions": [2]}; on
    :explain one explanation of its instance, for the "target" it names (0); on /predictions and /explanations
    too, where KServe's model server in a pod forwards v1 bodies."""
    body = V1_MNIST.read_bytes()
    digit = np.asarray(Image.open(io.BytesIO(base64.b64decode(json.loads(body)["instances"][0]["data"]))))
    label = predicted(served, model, digit)["label"]
    if model in ("ts", "onnx"):  # the cnn, trained briefly: right on this clear 2 (the mlp may not be)
        assert label == 2
    headers = {"Content-Type": "application/json"}
    for path in (f"/v1/models/{model}:predict", f"/predictions/{model}"):
        response = post(served, path, data=body, headers=headers)
        assert response.status_code == 200 and response.json() == {"predictions": [label]}, (path, response.text)
    for path in (f"/v1/models/{model}:explain", f"/explanations/{model}"):
        response = post(served, path, data=body, headers=headers)
        assert response.status_code == 200, (path, response.text)
        [explanation] = response.json()["explanations"]
        assert set(explanation) == KEYS | {"framed", "attributions"}
        assert (explanation["label"], explanation["target"], explanation["method"]) == (label, 0, DEFAULTS[model])


def test_kserve_v1_errors(served, digits) -> None:
    headers = {"Content-Type": "application/json"}
    bad = {"instances": [{"data": digits[0].tolist()}, {"data": "bm90IGFuIGltYWdl"}]}
    response = post(served, "/v1/models/onnx:predict", json=bad, headers=headers)
    assert response.status_code == 415 and response.json()["error"].startswith("instance 1: ")
    many = {"instances": [{"data": digits[0].tolist()}] * 65}
    response = post(served, "/v1/models/onnx:explain", json=many, headers=headers)
    assert response.status_code == 413 and "the limit is 64 to explain" in response.json()["error"]


def test_digits_explain_writes_a_figure_per_file(served, digits, tmp_path, capsys) -> None:
    files = []
    for index in range(2):
        files.append(tmp_path / f"digit-{index}.png")
        files[-1].write_bytes(png(digits[index]))
    url, headers, _ = served
    token = headers["Authorization"].removeprefix("Bearer ")
    out = tmp_path / "figures"
    # --token=KEY: a key may start with "-", which argparse would take for an option
    argv = ["explain", *map(str, files), "--model", "onnx", f"--url={url}", f"--token={token}", f"--out={out}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for index, file in enumerate(files):
        figure = out / f"digit-{index}.explained.png"
        with Image.open(figure) as image:
            assert image.format == "PNG" and image.width > image.height > 300
        label = predicted(served, "onnx", digits[index])["label"]
        line = next(line for line in printed.splitlines() if line.startswith(str(file)))
        assert line.split()[1:5:3] == [str(label), "feature-ablation"] and str(figure) in line
    assert main([*argv[:2], "--model", "onnx", f"--url={url}", f"--token={token}", "--method", "lime"]) == 1
    assert "error 400" in capsys.readouterr().out


def answers_counted(metrics_url: str) -> Counter:
    """Answers_total on the metrics port by (model, protocol, status, error type); ExplainTime observations."""
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client (the dev extra) is needed")
    counts: Counter = Counter()
    for family in parser.text_string_to_metric_families(requests.get(f"{metrics_url}/metrics", timeout=10).text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "Answers_total":
                key = (labels["ModelName"], labels["Protocol"], labels["Status"], labels["ErrorType"])
                counts[key] += sample.value
            elif sample.name == "ExplainTime_count":
                counts[("ExplainTime", labels["ModelName"])] += sample.value
    return counts


def test_explanations_are_counted_on_the_metrics_port(served, digits) -> None:
    """/explanations counts as `predictions`, v1 as `kserve-v1`, a refused method under its error type; every
    batch that explains observes ExplainTime."""
    before = answers_counted(served[2])
    post(served, "/explanations/onnx", json={"data": digits[0].tolist()})
    post(served, "/explanations/onnx", json={"data": digits[0].tolist(), "method": "lime"})
    post(served, "/v1/models/onnx:explain", json={"instances": [{"data": digits[1].tolist()}]})
    post(served, "/v1/models/onnx:predict", json={"instances": [{"data": digits[1].tolist()}]})
    expected = {
        ("onnx", "predictions", "200", "OK"): 1,
        ("onnx", "predictions", "400", "UnknownMethod"): 1,
        ("onnx", "kserve-v1", "200", "OK"): 2,
    }
    deadline = time.monotonic() + 15  # the frontend reads the worker's metric lines asynchronously
    while True:
        after = answers_counted(served[2])
        delta = {key: after[key] - before[key] for key in expected}
        if delta == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert delta == expected
    assert 1 <= after[("ExplainTime", "onnx")] - before[("ExplainTime", "onnx")] <= 3
