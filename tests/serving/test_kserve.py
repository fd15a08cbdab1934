"""`digits kserve`: the bundle's manifest against KServe's CRD, and the bundle started exactly as KServe's
TorchServe runtime starts it (../shared/kserve/kserve-torchserve.yaml: its args, its environment, a non-root
user), then asked with tritonclient over OIP. KServe's reference files live beside the repository, not in
it; the tests skip, saying so, where they are absent (set DIGITS_SHARED to their parent elsewhere)."""

from __future__ import annotations

import copy
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
import pytest
import requests
import yaml
from digits.serving.config import Ports
from digits.serving.kserve import Deployment, crd_schema, validate_manifest, write_bundle
from digits.serving.server import find_java
from serving_helpers import free_ports

from digits.cli import main

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("DIGITS_SHARED") or REPO.parent / "shared") / "kserve"
CRD = SHARED / "serving.kserve.io_inferenceservices.yaml"
RUNTIME = SHARED / "kserve-torchserve.yaml"
KSERVE_UID = 1000  # the runtime's securityContext.runAsUser
needs_shared = pytest.mark.skipif(not CRD.is_file(), reason=f"KServe's reference files are not at {SHARED}")


@pytest.fixture(scope="module")
def schema() -> dict:
    if not CRD.is_file():
        pytest.skip(f"KServe's InferenceService CRD is not at {CRD}")
    return crd_schema(CRD)


def manifest_of(store: Path, tmp_path: Path, **deployment) -> dict:
    path = write_bundle(store, tmp_path / "bundle", Deployment(storage_uri="s3://bucket/digits", **deployment))
    return yaml.safe_load(path.read_text())


def test_bundle_layout(store, tmp_path) -> None:
    manifest = manifest_of(store, tmp_path)
    bundle = tmp_path / "bundle"
    assert sorted(p.name for p in (bundle / "model-store").iterdir()) == sorted(p.name for p in store.glob("*.mar"))
    assert {p.name for p in (bundle / "config").iterdir()} == {"config.properties", "metrics.yaml", "log4j2.xml"}
    model = manifest["spec"]["predictor"]["model"]
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert model["modelFormat"] == {"name": "pytorch"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://bucket/digits" and model["resources"]["requests"] == {
        "cpu": "1",
        "memory": "2Gi",
    }
    config = (bundle / "config" / "config.properties").read_text()
    for line in ("disable_token_authorization=true", "enable_model_api=false", "enable_envvars_config=false"):
        assert line in config.splitlines()
    assert "inference_address=http://127.0.0.1:8085" in config and "metrics_address=http://127.0.0.1:8082" in config
    # the metrics port answers any method and Host: loopback, for KServe's queue-proxy to scrape and aggregate
    assert manifest["metadata"]["annotations"] == {
        "serving.kserve.io/enable-metric-aggregation": "true",
        "serving.kserve.io/enable-prometheus-scraping": "true",
    }


@pytest.mark.parametrize("protocol", ["v2", "v1"])
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_manifest_validates_against_the_crd(store, tmp_path, schema, gpu, protocol) -> None:
    manifest = manifest_of(store, tmp_path, gpu=gpu, protocol=protocol)
    assert validate_manifest(manifest, schema) == []
    assert ("nvidia.com/gpu" in manifest["spec"]["predictor"]["model"]["resources"]["limits"]) == gpu
    assert manifest["spec"]["predictor"]["model"]["protocolVersion"] == protocol


BREAKAGES = {
    "replicas not a number": (lambda p: p.update(minReplicas="two"), "minReplicas"),
    "unknown scale metric": (lambda p: p.update(scaleMetric="gpu"), "scaleMetric"),
    "unknown field": (lambda p: p.update(replicas=3), "replicas"),
    "model format without name": (lambda p: p["model"]["modelFormat"].pop("name"), "name"),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_a_broken_manifest_fails_naming_the_field(store, tmp_path, schema, case) -> None:
    manifest = copy.deepcopy(manifest_of(store, tmp_path))
    breakage, field = BREAKAGES[case]
    breakage(manifest["spec"]["predictor"])
    problems = validate_manifest(manifest, schema)
    assert problems and any(field in problem for problem in problems), problems


@needs_shared
def test_cli_writes_and_checks_the_bundle(store, tmp_path, capsys) -> None:
    argv = ["kserve", "--model-store", str(store), "--out", str(tmp_path / "b"), "--storage-uri", "pvc://c/digits"]
    assert main([*argv, "--check-against", str(CRD)]) == 0
    assert "validates against" in capsys.readouterr().out


@needs_shared
def test_a_canary_rollout_its_promotion_and_its_rollback_validate(store, tmp_path, schema, capsys) -> None:
    """`--canary 10`: the new bundle's revision takes 10% of the traffic; promote.yaml drops the field (all
    traffic to it), rollback.yaml sets 0 (all traffic back to the revision KServe last rolled out)."""
    out = tmp_path / "b"
    argv = ["kserve", "--model-store", str(store), "--out", str(out), "--storage-uri", "s3://bucket/digits-v2"]
    assert main([*argv, "--canary", "10", "--check-against", str(CRD)]) == 0
    assert capsys.readouterr().out.count("validates against") == 3
    manifests = {
        name: yaml.safe_load((out / name).read_text())
        for name in ("inferenceservice.yaml", "promote.yaml", "rollback.yaml")
    }
    percents = {name: m["spec"]["predictor"].get("canaryTrafficPercent") for name, m in manifests.items()}
    assert percents == {"inferenceservice.yaml": 10, "promote.yaml": None, "rollback.yaml": 0}
    for manifest in manifests.values():
        assert validate_manifest(manifest, schema) == []
        assert manifest["spec"]["predictor"]["model"]["storageUri"] == "s3://bucket/digits-v2"
    broken = copy.deepcopy(manifests["inferenceservice.yaml"])
    broken["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    assert any("canaryTrafficPercent" in problem for problem in validate_manifest(broken, schema))
    for percent in ("0", "100"):
        with pytest.raises(ValueError, match="--canary must be a percentage from 1 to 99"):
            write_bundle(store, tmp_path / percent, Deployment(storage_uri="s3://b/d", canary=int(percent)))


def test_cli_refuses_a_storage_uri_that_is_not_one(store, tmp_path) -> None:
    with pytest.raises(ValueError, match="storage-uri"):
        write_bundle(store, tmp_path / "b", Deployment(storage_uri="my-bucket"))


# ---- the bundle started as KServe's runtime starts it ----


def kserve_user(root: Path) -> tuple[str | None, Path, str]:
    """(user to switch to, bin folder of the Python it runs, why it stays root).

    Not root: ourselves and this interpreter. Root: uid 1000 (the runtime's runAsUser; created if absent).
    A venv on an interpreter only root can read (pyenv under /root) is out of that user's reach, so it gets
    a venv of the system's Python of the same version that sees this venv's packages (a .pth file), as an
    image's own Python would be; where none fits, TorchServe runs as root and says why.
    """
    here = Path(sys.executable).parent
    if os.geteuid() != 0:
        return None, here, ""
    if not shutil.which("useradd") or not shutil.which("runuser"):
        return None, here, "running as root without useradd/runuser"
    try:
        user = pwd.getpwuid(KSERVE_UID).pw_name
    except KeyError:
        subprocess.run(["useradd", "--uid", str(KSERVE_UID), "--no-create-home", "digits-kserve"], check=True)
        user = "digits-kserve"
    for python in (sys.executable, system_python_venv(root)):
        if python and runs_as(user, python):
            return user, Path(python).parent, ""
    return None, here, f"uid {KSERVE_UID} can run neither {sys.executable} nor a system Python {sys.version[:4]}"


def system_python_venv(root: Path) -> str | None:
    """A venv of /usr/bin/pythonX.Y reading this venv's site-packages, with a `torchserve` script; or None."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin")
    if system is None:
        return None
    venv = root / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / "lib" / version / "site-packages" / "digits-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = venv / "bin" / "torchserve"  # what the torchserve console script runs
    script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n")
    script.chmod(0o755)
    return str(venv / "bin" / "python")


def runs_as(user: str, python: str) -> bool:
    probe = [shutil.which("runuser"), "-u", user, "--", python, "-c", "import ts, torch, onnxruntime"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def runtime_container() -> dict:
    if not RUNTIME.is_file():
        pytest.skip(f"KServe's TorchServe runtime is not at {RUNTIME}")
    return yaml.safe_load(RUNTIME.read_text())["spec"]["containers"][0]


@pytest.fixture(scope="module")
def kserve_pod(store):
    """The bundle in a world-readable folder, TorchServe started by the runtime's args and env as uid 1000."""
    container = runtime_container()
    root = Path(tempfile.mkdtemp(prefix="digits-kserve-"))
    root.chmod(0o755)
    user, python_bin, why_root = kserve_user(root)
    bundle = root / "models"  # in place of /mnt/models
    ports = Ports(*free_ports(5))
    write_bundle(store, bundle, Deployment(storage_uri="pvc://claim/digits"), ports, mount=str(bundle))
    home = root / "home"  # the process's working directory: logs/, snapshots; and its TMPDIR (pid file, models)
    (home / "tmp").mkdir(parents=True)
    if user:
        shutil.chown(home, user)
        shutil.chown(home / "tmp", user)
    args = [arg.replace("/mnt/models", str(bundle)) for arg in container["args"]]
    assert args[:2] == ["torchserve", "--start"], args
    env = {e["name"]: e["value"].replace("{{.Labels.serviceEnvelope}}", "kservev2") for e in container["env"]}
    assert env == {"TS_SERVICE_ENVELOPE": "kservev2"}
    java = find_java()
    env |= {
        "PATH": f"{python_bin}:{Path(java).parent}:/usr/bin:/bin",  # the image's python (TorchServe's workers too)
        "JAVA_HOME": str(Path(java).resolve().parent.parent),
        "HOME": str(home),
        # this machine runs other TorchServes; a pod has its own /tmp (TEMP: TorchServe's java.io.tmpdir)
        "TMPDIR": str(home / "tmp"),
        "TEMP": str(home / "tmp"),
    }
    prefix = [shutil.which("runuser"), "-u", user, "--"] if user else []
    out = root / "torchserve.out"  # not a pipe: the server it starts keeps its copy open
    with out.open("wb") as sink:
        started = subprocess.run([*prefix, *args], cwd=home, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=60)
    try:
        assert started.returncode == 0, out.read_text(errors="replace")
        wait_ready(ports, ["cnn", "mlp"], home)
        yield ports, user, why_root, root
    finally:
        with out.open("ab") as sink:
            subprocess.run([*prefix, "torchserve", "--stop"], cwd=home, env=env, stdout=sink, stderr=sink, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def wait_ready(ports: Ports, models: list[str], home: Path, timeout_s: float = 120) -> None:
    """As KServe's wrapper waits: GET management /models/NAME (no key) until a worker is READY."""
    deadline = time.monotonic() + timeout_s
    pending = list(models)
    while pending and time.monotonic() < deadline:
        try:
            description = requests.get(f"http://127.0.0.1:{ports.management}/models/{pending[0]}", timeout=5).json()
            if any(w["status"] == "READY" for w in description[0]["workers"]):
                pending.pop(0)
                continue
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
            pass
        time.sleep(0.5)
    if pending:
        log = home / "logs" / "ts_log.log"
        tail = log.read_text(errors="replace")[-3000:] if log.is_file() else "(no log)"
        pytest.fail(f"{pending} not ready after {timeout_s} s; ts_log.log ends:\n{tail}")


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_started_as_kserve_does_it_answers_oip(kserve_pod, model, mnist, expected_labels) -> None:
    tritonclient_http = pytest.importorskip("tritonclient.http")
    ports, *_ = kserve_pod
    client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{ports.inference}")  # no key: KServe sends none
    digits = np.asarray(mnist.test_images[:7], dtype=np.uint8).reshape(7, 28, 28)
    tensor = tritonclient_http.InferInput("digits", [7, 28, 28], "UINT8")
    tensor.set_data_from_numpy(digits)  # binary
    result = client.infer(model, [tensor])
    np.testing.assert_array_equal(result.as_numpy("label"), expected_labels[model][:7])
    refused = requests.post(
        f"http://127.0.0.1:{ports.inference}/v2/models/{model}/infer",
        json={"inputs": [{"name": "x", "datatype": "INT16", "shape": [1, 784], "data": [0] * 784}]},
        timeout=30,
    )
    assert refused.status_code == 400 and "datatype" in refused.json()["error"]


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_started_as_kserve_does_it_answers_kserve_v1_too(kserve_pod, model) -> None:
    """pytorch/serve's v1 MNIST request, unchanged, where KServe's v1 wrapper may send it (TorchServe's v1
    routes, or /predictions and /explanations): its predictions and explanations, whatever protocol the
    InferenceService names (the handler reads each body's)."""
    ports, *_ = kserve_pod
    body = (Path(__file__).resolve().parent / "data" / "kserve_v1_mnist.json").read_bytes()
    base, headers = f"http://127.0.0.1:{ports.inference}", {"Content-Type": "application/json"}
    predictions = [
        requests.post(f"{base}{path}", data=body, headers=headers, timeout=60)
        for path in (f"/v1/models/{model}:predict", f"/predictions/{model}")
    ]
    assert [p.status_code for p in predictions] == [200, 200] and predictions[0].json() == predictions[1].json()
    [label] = predictions[0].json()["predictions"]
    for path in (f"/v1/models/{model}:explain", f"/explanations/{model}"):
        response = requests.post(f"{base}{path}", data=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        [explanation] = response.json()["explanations"]
        assert explanation["label"] == label and len(explanation["attributions"]) == 28


def test_in_the_pod_what_listens_where(kserve_pod) -> None:
    """Inference, management and gRPC on loopback only (for KServe's wrapper), metrics too (for its queue-proxy)."""
    ports, *_ = kserve_pod
    listening = {
        c.laddr.port: c.laddr.ip.removeprefix("::ffff:")
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr
    }
    for port in (ports.inference, ports.management, ports.grpc_inference, ports.grpc_management, ports.metrics):
        assert listening.get(port) == "127.0.0.1", (port, listening.get(port))


def test_in_the_pod_torchserve_runs_as_non_root(kserve_pod) -> None:
    _, user, why_root, root = kserve_pod
    if why_root:
        pytest.skip(f"TorchServe ran as root here: {why_root}")
    owners = {p.info["uids"].effective for p in psutil.process_iter(["uids", "cmdline"]) if is_ours(p, root)}
    assert len(owners) == 1 and 0 not in owners, owners  # the frontend and its workers, all one non-root user


def is_ours(process: psutil.Process, root: Path) -> bool:
    """TorchServe's frontend (config under `root`) or one of its workers (running from `root`'s venv)."""
    cmdline = " ".join(process.info["cmdline"] or [])
    frontend = "org.pytorch.serve.ModelServer" in cmdline and str(root) in cmdline
    return frontend or ("model_service_worker" in cmdline and str(root) in cmdline)


def test_in_the_pod_the_model_api_is_closed_and_metrics_are_prometheus(kserve_pod) -> None:
    ports, *_ = kserve_pod
    register = requests.post(f"http://127.0.0.1:{ports.management}/models", params={"url": "ghost.mar"}, timeout=10)
    assert register.status_code >= 400
    text = requests.get(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=10).text
    parser = pytest.importorskip("prometheus_client.parser")
    names = {family.name for family in parser.text_string_to_metric_families(text)}
    assert {"ts_inference_requests", "Answers", "DecodeTime"} <= names, sorted(names)


def test_models_listed_for_the_wrapper(store, tmp_path) -> None:
    """KServe's wrapper takes the model names from model_snapshot (else it serves one model named "model")."""
    write_bundle(store, tmp_path / "b", Deployment(storage_uri="pvc://c/d"))
    config = dict(
        line.split("=", 1)
        for line in (tmp_path / "b" / "config" / "config.properties").read_text().splitlines()
        if "=" in line
    )
    assert set(yaml.safe_load(config["model_snapshot"])["models"]) == {"cnn", "mlp"}
    assert urlparse(config["inference_address"]).port == 8085
