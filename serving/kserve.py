"""`digits kserve`: a model store packed as KServe's TorchServe runtime reads it.

KServe copies an InferenceService's `storageUri` to /mnt/models in the pod and starts, as its
`kserve-torchserve` ClusterServingRuntime says, `torchserve --start --model-store=/mnt/models/model-store
--ts-config=/mnt/models/config/config.properties` with `TS_SERVICE_ENVELOPE` set from the protocol version
(`kservev2` for v2); the image's KServe model server (its "wrapper", port 8080, no key) reads the same
config.properties (`inference_address`, `management_address`, the model names in `model_snapshot`) and
forwards OIP requests to TorchServe. The bundle:

    DIR/config/config.properties   TorchServe's config, paths under the mount point
    DIR/config/metrics.yaml        TorchServe's metrics plus the handler's, for Prometheus mode
    DIR/config/log4j2.xml          TorchServe's logging made affordable (serving/log4j2.xml)
    DIR/model-store/*.mar          the store's archives, unchanged
    DIR/inferenceservice.yaml      a v1beta1 InferenceService for KServe
    DIR/promote.yaml, rollback.yaml   with a canary: the same, the canary promoted (all traffic to the new
                                   revision), or rolled back (`canaryTrafficPercent: 0`: all traffic to the
                                   revision KServe last rolled out, which it tracks itself)

Security inside the pod (docs/kserve.md, docs/security.md): TorchServe's inference, management and gRPC APIs listen on
127.0.0.1 only, for the wrapper; keys are off, since the wrapper sends none; the model API stays closed and
`allowed_urls` admits only archives of the mounted store; `enable_envvars_config` stays off, so
TS_SERVICE_ENVELOPE (whose `kservev2` envelope reads only the first request of a batch) and any other TS_*
variable change nothing; the metrics port listens on loopback too, scraped by KServe's queue-proxy, which
Prometheus scrapes in turn (METRICS_ANNOTATIONS).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .archive import ArchiveError
from .config import LOG_CONFIG, Ports, models_entry, render_properties, shared_properties
from .metrics import write_metrics_config
from .store import list_archives

MOUNT = "/mnt/models"  # where KServe puts the storageUri's content
# TorchServe behind the wrapper, as pytorch/serve's kubernetes/kserve/config.properties has it; the wrapper
# itself takes 8080 (HTTP) and 8081 (gRPC), and KServe's runtime scrapes 8082 (prometheus.kserve.io/port)
KSERVE_PORTS = Ports(inference=8085, management=8086, metrics=8082, grpc_inference=7070, grpc_management=7071)
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")
# TorchServe's metrics port answers any method and any Host, without a key (PrometheusMetricsRequestHandler),
# so it listens on the pod's loopback only. KServe's queue-proxy extension (qpext, serverless mode) scrapes it
# there (GET http://localhost:PORT/PATH, from the runtime's prometheus.kserve.io annotations), merges it with
# its own metrics on its aggregate port (9088), and KServe points the pod's prometheus.io annotations at that.
METRICS_ANNOTATIONS = {
    "serving.kserve.io/enable-metric-aggregation": "true",
    "serving.kserve.io/enable-prometheus-scraping": "true",
}

# the InferenceService's protocolVersion: what KServe's model server in the pod speaks to clients. The archives
# answer both, whichever it is (the handler reads the protocol from each body): v2 is the Open Inference
# Protocol; v1 ({"instances": [...]}, :predict and :explain) is what TorchServe's own KServe MNIST example sends
PROTOCOLS = ("v2", "v1")


@dataclass(frozen=True)
class Deployment:
    """What the InferenceService asks of the cluster."""

    name: str = "digits"
    storage_uri: str = ""  # where the bundle is uploaded, e.g. s3://bucket/digits or pvc://claim/digits
    cpu: str = "1"
    memory: str = "2Gi"
    min_replicas: int = 1
    max_replicas: int = 3
    scale_metric: str = "concurrency"
    scale_target: int = 8  # in-flight requests per replica (concurrency), or as scale_metric says
    gpu: bool = False
    canary: int | None = None  # percent of traffic for this bundle's revision, the rest to the last rolled out
    protocol: str = "v2"  # PROTOCOLS

    def validate(self) -> None:
        if not self.storage_uri or "://" not in self.storage_uri:
            raise ValueError(
                "--storage-uri must be a URI KServe can fetch (s3://, gs://, pvc://, https://), "
                f"got {self.storage_uri!r}"
            )
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                "replicas must satisfy 0 <= min <= max and max >= 1, "
                f"got min {self.min_replicas}, max {self.max_replicas}"
            )
        if self.scale_metric not in SCALE_METRICS:
            raise ValueError(f"--scale-metric must be one of {', '.join(SCALE_METRICS)}, got {self.scale_metric!r}")
        if self.scale_target < 1:
            raise ValueError(f"--scale-target must be at least 1, got {self.scale_target}")
        if self.canary is not None and not 1 <= self.canary <= 99:
            raise ValueError(f"--canary must be a percentage from 1 to 99, got {self.canary}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")


def write_bundle(
    store: Path, out: Path, deployment: Deployment, ports: Ports = KSERVE_PORTS, mount: str = MOUNT
) -> Path:
    """Writes the bundle described in the module docstring into `out` (which must not exist or be empty).

    Args:
        mount: where the bundle will be mounted (KServe: /mnt/models); the config's paths point there.

    Returns:
        the path of inferenceservice.yaml.
    """
    deployment.validate()
    ports.validate()
    archives = list_archives(Path(store))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; pick a new folder for the bundle")
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(exist_ok=True)
    for mar in archives:
        shutil.copy2(mar, out / "model-store" / mar.name)
    shutil.copy2(LOG_CONFIG, out / "config" / LOG_CONFIG.name)
    write_metrics_config(out / "config" / "metrics.yaml")
    (out / "config" / "config.properties").write_text(render_kserve_config(archives, ports, mount))
    manifest_path = out / "inferenceservice.yaml"
    manifest_path.write_text(yaml.safe_dump(inference_service(deployment), sort_keys=False))
    if deployment.canary is not None:
        for name, percent in (("promote.yaml", None), ("rollback.yaml", 0)):
            manifest = inference_service(replace(deployment, canary=percent))
            (out / name).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return manifest_path


def render_kserve_config(archives: list[Path], ports: Ports, mount: str = MOUNT) -> str:
    """config.properties for TorchServe inside a KServe pod (see the module docstring for each decision)."""
    try:
        models = models_entry(archives)
    except ArchiveError as err:
        raise ValueError(str(err)) from None
    store = f"{mount}/model-store"
    snapshot = {"name": "startup.cfg", "modelCount": len(models), "models": models}
    lines = {
        # every API on the pod's loopback, metrics too: KServe's queue-proxy scrapes them there (METRICS_ANNOTATIONS)
        **shared_properties(
            store,
            ports,
            "127.0.0.1",
            archives,
            log_config=f"file://{mount}/config/{LOG_CONFIG.name}",
            metrics_config=f"{mount}/config/metrics.yaml",
        ),
        # the models, their batching and workers; the wrapper takes the model names from here too
        "model_snapshot": json.dumps(snapshot),
        "disable_token_authorization": "true",
        "enable_envvars_config": "false",
    }
    return render_properties(
        "# written by `digits kserve` for KServe's TorchServe runtime; regenerate rather than edit", lines
    )


def inference_service(deployment: Deployment) -> dict[str, Any]:
    """A serving.kserve.io/v1beta1 InferenceService running the bundle on KServe's TorchServe runtime, speaking
    the deployment's protocol (OIP, v2, by default; or KServe v1)."""
    resources = {"cpu": deployment.cpu, "memory": deployment.memory}
    if deployment.gpu:
        resources["nvidia.com/gpu"] = "1"
    canary = {} if deployment.canary is None else {"canaryTrafficPercent": deployment.canary}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": deployment.name, "annotations": dict(METRICS_ANNOTATIONS)},
        "spec": {
            "predictor": {
                **canary,
                "minReplicas": deployment.min_replicas,
                "maxReplicas": deployment.max_replicas,
                "scaleMetric": deployment.scale_metric,
                "scaleTarget": deployment.scale_target,
                "model": {
                    "modelFormat": {"name": "pytorch"},
                    "protocolVersion": deployment.protocol,
                    "storageUri": deployment.storage_uri,
                    "resources": {"requests": dict(resources), "limits": dict(resources)},
                },
            }
        },
    }


def crd_schema(crd_path: Path) -> dict[str, Any]:
    """The v1beta1 openAPIV3Schema of KServe's InferenceService CRD file."""
    crd = yaml.safe_load(Path(crd_path).read_text())
    for version in crd["spec"]["versions"]:
        if version["name"] == "v1beta1":
            return version["schema"]["openAPIV3Schema"]
    raise ValueError(f"{crd_path} has no v1beta1 version of the InferenceService CRD")


def validate_manifest(manifest: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """What is wrong with `manifest` against the CRD's schema, strictly: unknown fields count as errors, as
    with `kubectl apply --validate=strict` (the API server would otherwise drop them silently). Empty when
    valid."""
    from jsonschema import Draft7Validator

    validator = Draft7Validator(strict(schema))
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    ]


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its properties and neither
    allows more nor preserves unknown fields (the API server's structural-schema pruning)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result
