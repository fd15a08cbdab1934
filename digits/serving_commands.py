"""Subcommands that drive TorchServe and its clients.

archive, config, serve, stop, token, predict, explain, samples, evaluate, kserve, ui.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .arguments import add_artifacts, add_data_dir, add_serving_settings
from .contract import DEFAULT_VERSION, FORMATS

DEFAULT_STORE = Path("model_store")


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run-dir",
        type=Path,
        help="TorchServe's run folder: config, key file, logs "
        "(default: $DIGITS_RUN_DIR, else ~/.local/state/digits/torchserve)",
    )


def _add_ports(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inference-port", type=int, default=8080, help="default 8080")
    p.add_argument("--management-port", type=int, default=8081, help="default 8081")
    p.add_argument("--metrics-port", type=int, default=8082, help="default 8082")
    p.add_argument("--grpc-inference-port", type=int, default=7070, help="TorchServe's gRPC inference API (7070)")
    p.add_argument("--grpc-management-port", type=int, default=7071, help="TorchServe's gRPC management API (7071)")
    p.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="HOST",
        help="address to listen on (default 127.0.0.1; anything else warns: see docs/security.md)",
    )


def _run_dir(args: argparse.Namespace) -> Path:
    from .serving.config import default_run_dir

    return (args.run_dir or default_run_dir()).resolve()


def _ports(args: argparse.Namespace):
    from .serving.config import Ports

    return Ports(
        args.inference_port,
        args.management_port,
        args.metrics_port,
        args.grpc_inference_port,
        args.grpc_management_port,
    )


def _warn_if_exposed(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: binding TorchServe to {host}: it is reachable from other machines; keep token "
            "authorisation on and put TLS and a firewall in front (docs/security.md)",
            file=sys.stderr,
        )


def add_archive(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "archive",
        help="pack an exported model into a TorchServe .mar",
        description="Pack DIR/MODEL's exported model, its metadata and the digits handler into "
        "STORE/NAME.mar. Refuses a model whose parity report is missing or failed.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument(
        "--format",
        required=True,
        choices=list(FORMATS),
        help="which exported file to serve ("
        + "; ".join(
            f"{f.name}: `digits export MODEL {f.export_flags}` first" for f in FORMATS.values() if f.export_flags
        )
        + ")",
    )
    add_artifacts(p)
    p.add_argument("--model-store", type=Path, default=DEFAULT_STORE, help="default: model_store/")
    p.add_argument("--name", help="model name in TorchServe and the URL (default: MODEL)")
    add_serving_settings(p)
    p.add_argument("--response-timeout", type=int, default=120, help="seconds (default 120)")
    p.add_argument(
        "--version",
        default=DEFAULT_VERSION,
        help=f"the model's version in TorchServe (default {DEFAULT_VERSION}, written to NAME.mar; another to "
        "NAME-vVERSION.mar)",
    )
    p.set_defaults(func=run_archive)


def run_archive(args: argparse.Namespace) -> int:
    from .serving.archive import ServingSettings, archive_model

    settings = ServingSettings(args.batch_size, args.max_batch_delay, args.workers, args.response_timeout, args.threads)
    archive_model(args.model, args.format, args.artifacts, args.model_store, args.name, settings, version=args.version)
    return 0


def add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="write TorchServe's config.properties for a model store",
        description="Write the config.properties `digits serve` uses, for running the plain "
        "`torchserve --start` command yourself: one version per model, the one the run folder's ledger says is "
        "live. Prints the file's path.",
    )
    p.add_argument("--model-store", type=Path, default=DEFAULT_STORE, help="default: model_store/")
    p.add_argument("--out", type=Path, help="file to write (default: RUN_DIR/config.properties)")
    _add_run_dir(p)
    _add_ports(p)
    p.set_defaults(func=run_config)


def run_config(args: argparse.Namespace) -> int:
    from .serving.config import render_config
    from .serving.ledger import live_versions
    from .serving.metrics import write_metrics_config
    from .serving.store import choose_archives

    _ports(args).validate()
    _warn_if_exposed(args.bind)
    out = args.out or _run_dir(args) / "config.properties"
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = write_metrics_config(out.with_name("metrics.yaml"))  # the handler's metrics, for Prometheus mode
    metrics.chmod(0o600)  # beside a config that may sit in the run folder, its owner's alone
    store = args.model_store.resolve()
    archives = [stored.path for stored in choose_archives(store, live_versions(_run_dir(args), store))]
    out.write_text(render_config(store, _ports(args), args.bind, metrics_config=metrics, archives=archives))
    print(out)
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start TorchServe on the model store and wait until every model answers",
        description="Write config.properties, start TorchServe (token authorisation on, loopback only, model "
        "registration admitting only the store's own archives, for `digits rollout`), one version per model: the "
        "one the run folder's ledger says is live; wait until every model answers a prediction, print the URLs. "
        "Runs in the background unless --foreground.",
    )
    p.add_argument("--model-store", type=Path, default=DEFAULT_STORE, help="default: model_store/")
    _add_run_dir(p)
    _add_ports(p)
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the models (default 60)")
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops TorchServe")
    p.add_argument(
        "--no-registration",
        action="store_true",
        help="keep TorchServe's model registration closed (enable_model_api=false): no `digits rollout` then",
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .serving import server

    run_dir, ports = _run_dir(args), _ports(args)
    ports.validate()
    _warn_if_exposed(args.bind)
    registration = not args.no_registration
    state, launcher = server.launch(args.model_store, run_dir, ports, args.bind, args.foreground, registration)
    try:
        server.wait_until_ready(state, run_dir, timeout=args.timeout)
    except server.ServeError:
        server.stop(run_dir)
        raise
    _print_ready(state, run_dir)
    if args.foreground:
        try:
            launcher.wait()
        except KeyboardInterrupt:
            server.stop(run_dir)
            print("TorchServe stopped")
    return 0


def _print_ready(state, run_dir: Path) -> None:
    print(f"TorchServe is up (pid {state.pid}), run folder {run_dir}")
    print(f"  inference   {state.inference_url}/predictions/<model>")
    print(f"  management  {state.management_url}/models")
    print(f"  metrics     {state.metrics_url}/metrics")
    print(f"  models      {', '.join(state.models)}")
    print("  token       digits token  (management: digits token --management)")
    print("  logs        " + str(run_dir / "logs"))
    print("  stop        digits stop")


def add_stop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stop", help="stop the TorchServe that `digits serve` started")
    _add_run_dir(p)
    p.set_defaults(func=run_stop)


def run_stop(args: argparse.Namespace) -> int:
    from .serving.server import stop

    state = stop(_run_dir(args))
    print(f"TorchServe stopped (pid {state.pid})" if state else "TorchServe is not running")
    return 0


def add_token(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="print the current TorchServe key (inference, or --management)")
    p.add_argument("--management", action="store_true", help="the management API's key")
    p.add_argument(
        "--refresh", action="store_true", help="ask TorchServe for a new key first (keys expire after 60 min)"
    )
    _add_run_dir(p)
    p.set_defaults(func=run_token)


def run_token(args: argparse.Namespace) -> int:
    from .serving.server import read_token, refresh_token

    kind = "management" if args.management else "inference"
    print(refresh_token(_run_dir(args), kind) if args.refresh else read_token(_run_dir(args), kind))
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image or JSON files with a running TorchServe")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--model", default="cnn", help="model name on the server (default cnn)")
    p.add_argument("--url", help="inference URL (default: the one `digits serve` started)")
    p.add_argument("--token", help="inference key (default: read from the run folder)")
    _add_run_dir(p)
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from .serving.client import predict_files
    from .serving.samples import label_from_name

    results = predict_files(args.files, args.model, _run_dir(args), args.url, args.token)
    width = max(len(r.file) for r in results)
    print(f"{'file':{width}}  expected  predicted  confidence")
    for r in results:
        expected = label_from_name(r.file)
        shown = f"{r.label:>9}  {r.confidence:10.4f}" if r.status == 200 else f"error {r.status}: {r.error}"
        print(f"{r.file:{width}}  {'-' if expected is None else expected:>8}  {shown}")
    return 0 if all(r.status == 200 for r in results) else 1


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="ask a running TorchServe why it gives image files their labels; draw each answer as a PNG",
        description="Send each file to /explanations/MODEL, print its label and the label explained, and write "
        "OUT/<file>.explained.png: the 28x28 digit as the model saw it beside its attribution map (red: pixels "
        "that raised the explained label's log-probability, blue: pixels that lowered it). The method defaults to "
        "the archive format's (integrated-gradients for TorchScript, feature-ablation for ONNX and .pt2; "
        "docs/serving.md, Explanations).",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--model", default="cnn", help="model name on the server (default cnn)")
    p.add_argument(
        "--method",
        help="integrated-gradients (TorchScript archives only), feature-ablation or occlusion (default: the format's)",
    )
    p.add_argument("--target", help="the label to explain (default: the predicted one)")
    p.add_argument("--out", type=Path, default=Path("explanations"), help="folder for the PNGs (default explanations/)")
    p.add_argument("--url", help="inference URL (default: the one `digits serve` started)")
    p.add_argument("--token", help="inference key (default: read from the run folder)")
    _add_run_dir(p)
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from .serving.explanations import draw, explain_files, figure_path

    results = explain_files(args.files, args.model, _run_dir(args), args.url, args.token, args.method, args.target)
    width = max(len(r.file) for r in results)
    print(f"{'file':{width}}  label  confidence  explained  method                figure")
    taken: set[Path] = set()
    for index, r in enumerate(results):
        if r.status != 200:
            print(f"{r.file:{width}}  error {r.status}: {r.error}")
            continue
        figure = draw(r, figure_path(args.out, r.file, index, taken))
        print(f"{r.file:{width}}  {r.label!s:>5}  {r.confidence:10.4f}  {r.target!s:>9}  {r.method:20}  {figure}")
    return 0 if all(r.status == 200 for r in results) else 1


def add_samples(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "samples",
        help="write MNIST test digits as PNG files to send to the server",
        description="Write the first COUNT MNIST test digits as 28x28 PNGs and, drawn large in "
        "black on a white 280x280 RGB canvas, off-centre. Names carry the label.",
    )
    p.add_argument("--out", type=Path, default=Path("samples"), help="default: samples/")
    p.add_argument("--count", type=int, default=5, help="digits to write (default 5)")
    add_data_dir(p)
    p.set_defaults(func=run_samples)


def run_samples(args: argparse.Namespace) -> int:
    from .serving.samples import write_samples
    from .training.data import load_mnist

    if not 1 <= args.count <= 10_000:
        raise ValueError(f"--count must be between 1 and 10000, got {args.count}")
    data = load_mnist(args.data_dir, log=lambda _: None)
    paths = write_samples(data.test_images, data.test_labels, args.out, args.count)
    print(f"wrote {len(paths)} PNG files to {args.out}/")
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy of a served model on MNIST test digits, over HTTP",
        description="Send COUNT MNIST test digits as PNG files to a running TorchServe and report "
        "the accuracy; --drawn sends them drawn large in black on a white canvas.",
    )
    p.add_argument("--model", default="cnn", help="model name on the server (default cnn)")
    p.add_argument("--count", type=int, default=1000, help="test digits to send (default 1000, at most 10000)")
    p.add_argument("--drawn", action="store_true", help="send each digit drawn large, off-centre, on white RGB")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--url", help="inference URL (default: the one `digits serve` started)")
    add_data_dir(p)
    _add_run_dir(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .serving.client import classify_many, resolve_endpoint
    from .serving.samples import drawn_large, png_bytes
    from .training.data import load_mnist

    if not 1 <= args.count <= 10_000 or args.concurrency < 1:
        raise ValueError(f"--count must be 1-10000 and --concurrency positive, got {args.count}, {args.concurrency}")
    url, token = resolve_endpoint(_run_dir(args), args.url, None)
    data, rng = load_mnist(args.data_dir, log=lambda _: None), np.random.default_rng(0)
    digits = data.test_images[: args.count]
    payloads = [png_bytes(drawn_large(digit, rng) if args.drawn else digit) for digit in digits]
    start = time.perf_counter()
    results = classify_many(payloads, url, args.model, token, args.concurrency)
    seconds = time.perf_counter() - start
    right = sum(
        r.status == 200 and r.label == int(y) for r, y in zip(results, data.test_labels[: args.count], strict=True)
    )
    failed = sum(r.status != 200 for r in results)
    look = "drawn large on white" if args.drawn else "28x28 PNG"
    print(
        f"{args.model}: {right}/{args.count} right ({right / args.count:.2%}), {failed} failed, {look}, "
        f"{args.count / seconds:.0f} requests/s at concurrency {args.concurrency}"
    )
    return 0 if failed == 0 else 1


def add_kserve(sub: argparse._SubParsersAction) -> None:
    from .serving.kserve import KSERVE_PORTS, MOUNT, PROTOCOLS, SCALE_METRICS, Deployment

    defaults = Deployment()
    p = sub.add_parser(
        "kserve",
        help="pack a model store for KServe's TorchServe runtime, with an InferenceService manifest",
        description="Write OUT/config/config.properties, OUT/model-store/*.mar and OUT/inferenceservice.yaml "
        "(KServe v1beta1, modelFormat pytorch, protocolVersion v2 or v1). Upload OUT to STORAGE_URI; "
        "`kubectl apply -f OUT/inferenceservice.yaml`. See docs/kserve.md.",
    )
    p.add_argument("--model-store", type=Path, default=DEFAULT_STORE, help="default: model_store/")
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder for the bundle")
    p.add_argument("--storage-uri", required=True, help="where you will upload OUT (s3://..., gs://..., pvc://...)")
    p.add_argument("--name", default=defaults.name, help=f"the InferenceService's name (default {defaults.name})")
    p.add_argument("--cpu", default=defaults.cpu, help=f"CPU request and limit per replica (default {defaults.cpu})")
    p.add_argument("--memory", default=defaults.memory, help=f"memory per replica (default {defaults.memory})")
    p.add_argument("--min-replicas", type=int, default=defaults.min_replicas, help="default %(default)s")
    p.add_argument("--max-replicas", type=int, default=defaults.max_replicas, help="default %(default)s")
    p.add_argument("--scale-metric", choices=SCALE_METRICS, default=defaults.scale_metric, help="default %(default)s")
    p.add_argument(
        "--scale-target", type=int, default=defaults.scale_target, help="per replica, in --scale-metric's unit"
    )
    p.add_argument("--gpu", action="store_true", help="ask for one NVIDIA GPU per replica")
    p.add_argument(
        "--canary",
        type=int,
        metavar="PERCENT",
        help="a canary rollout: this bundle's revision takes PERCENT of the traffic, the revision KServe last "
        "rolled out the rest; also writes promote.yaml and rollback.yaml (docs/kserve.md)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=defaults.protocol,
        help="the InferenceService's protocolVersion: v2, the Open Inference Protocol (default), or v1, KServe v1 "
        "(:predict, :explain); the archives answer both either way",
    )
    p.add_argument("--check-against", type=Path, metavar="CRD_YAML", help="validate the manifest against this CRD")
    p.add_argument("--mount", default=MOUNT, help=f"where the bundle is mounted (KServe: {MOUNT})")
    p.add_argument("--inference-port", type=int, default=KSERVE_PORTS.inference, help="TorchServe's, behind KServe's")
    p.add_argument("--management-port", type=int, default=KSERVE_PORTS.management, help="default %(default)s")
    p.add_argument("--metrics-port", type=int, default=KSERVE_PORTS.metrics, help="KServe scrapes 8082")
    p.add_argument("--grpc-inference-port", type=int, default=KSERVE_PORTS.grpc_inference, help="default %(default)s")
    p.add_argument("--grpc-management-port", type=int, default=KSERVE_PORTS.grpc_management, help="default %(default)s")
    p.set_defaults(func=run_kserve)


def run_kserve(args: argparse.Namespace) -> int:
    import yaml

    from .serving.kserve import Deployment, crd_schema, validate_manifest, write_bundle

    deployment = Deployment(
        args.name,
        args.storage_uri,
        args.cpu,
        args.memory,
        args.min_replicas,
        args.max_replicas,
        args.scale_metric,
        args.scale_target,
        args.gpu,
        args.canary,
        args.protocol,
    )
    manifest = write_bundle(args.model_store, args.out, deployment, _ports(args), args.mount)
    manifests = [manifest, *(manifest.with_name(n) for n in ("promote.yaml", "rollback.yaml") if args.canary)]
    for path in manifests if args.check_against else []:
        problems = validate_manifest(yaml.safe_load(path.read_text()), crd_schema(args.check_against))
        if problems:
            print(f"{path} does not validate against {args.check_against}:", *problems, sep="\n  ", file=sys.stderr)
            return 1
        print(f"{path} validates against {args.check_against}")
    print(f"bundle in {args.out}; upload it to {args.storage_uri}, then: kubectl apply -f {manifest}")
    return 0


def add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="serve a page to draw digits on and see the served models answer",
        description="Serve one page on 127.0.0.1:PORT, next to a running `digits serve`: draw a digit (mouse, "
        "pen or touch) or give an image file, and see the label, the ten probabilities, the latency and the "
        "28x28 image the model saw. The page's server forwards to TorchServe with the key from the run folder; "
        "the browser never holds it. Runs until Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0: any free port)")
    p.add_argument("--url", help="TorchServe's inference URL (default: the one `digits serve` started)")
    _add_run_dir(p)
    p.set_defaults(func=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    from .serving.ui import TorchServeLink, make_server

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    server = make_server(args.port, TorchServeLink(_run_dir(args), args.url))
    print(f"digits ui: open http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("digits ui stopped")
    finally:
        server.server_close()
    return 0


COMMANDS = [
    add_archive,
    add_config,
    add_serve,
    add_stop,
    add_token,
    add_predict,
    add_explain,
    add_samples,
    add_evaluate,
    add_kserve,
    add_ui,
]
