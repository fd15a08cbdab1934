"""`digits bench offline`, `http`, `explain` and `explain-http`: the benchmarks, each writing JSON, markdown and
a plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import add_artifacts, add_data_dir, add_serving_settings
from .contract import FORMATS, ONNX

DEFAULT_OUT = Path("runs") / "bench"


def show(paths: list[Path]) -> int:
    """Prints a bench run's markdown table and where its files went; the command's exit status."""
    print(paths[1].read_text(), end="")
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the exported models offline, or a served model over HTTP",
        description="Side-by-side benchmarks, each against a ceiling measured in the same run.",
    )
    kinds = p.add_subparsers(dest="bench", required=True, metavar="KIND")
    add_offline(kinds)
    add_http(kinds)
    add_explain(kinds)
    add_explain_http(kinds)
    add_switch(kinds)
    add_report(kinds)


def add_offline(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "offline",
        help="eager vs TorchScript vs onnxruntime (vs .pt2) in-process, against the measured fp32 peak",
        description="Time eager PyTorch, TorchScript, onnxruntime (and the int8 file and model.pt2, when "
        "exported; model.pt2 as aotinductor, on the device it was compiled for) on MNIST "
        "test digits at each batch size; writes bench-offline.json, .md and .png to OUT.",
    )
    p.add_argument("model", metavar="MODEL", help="an exported model (see `digits export`)")
    add_artifacts(p)
    p.add_argument("--batch-sizes", type=_int_list, default=(1, 8, 64, 256), help="default 1,8,64,256")
    p.add_argument(
        "--min-seconds", type=float, default=1.0, help="timed seconds per backend and batch size (default 1)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="turns the backends take at each batch size, sharing those seconds (default 5)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="intra-op threads of every backend, onnxruntime's included (default: torch's, OMP_NUM_THREADS "
        "or one per core); 1 compares with an archive's default worker",
    )
    p.add_argument("--out", type=Path, help="output folder (default: runs/bench/MODEL-offline)")
    p.set_defaults(func=run_offline)


def run_offline(args: argparse.Namespace) -> int:
    from .bench.offline import run_offline as measure
    from .bench.report import write_offline

    if args.min_seconds < 0 or args.rounds < 1:
        raise ValueError(
            f"--min-seconds must be at least 0 and --rounds at least 1, got {args.min_seconds} and {args.rounds}"
        )
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    report = measure(
        args.artifacts,
        args.model,
        batch_sizes=args.batch_sizes,
        min_seconds=args.min_seconds,
        rounds=args.rounds,
        threads=args.threads,
    )
    paths = write_offline(report, args.out or DEFAULT_OUT / f"{args.model}-offline")
    return show(paths)


def add_http(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "http",
        help="a served model against the no-op handler, over HTTP",
        description="Archive MODEL and a no-op handler with the same batch settings, start TorchServe for the "
        "run, and load both with the same body at each concurrency; writes bench-http.json, .md and .png to OUT.",
    )
    p.add_argument("--model", default="cnn", help="an exported model (default cnn)")
    p.add_argument("--format", default=ONNX.name, choices=list(FORMATS), help=f"file to serve (default {ONNX.name})")
    add_artifacts(p)
    p.add_argument("--input", type=Path, help="request body (default: MNIST test digit 0 as a 28x28 PNG)")
    p.add_argument(
        "--oip",
        type=int,
        default=0,
        metavar="N",
        help="send Open Inference Protocol requests of N MNIST test digits each (a UINT8 tensor) to "
        "/v2/models/MODEL/infer instead of --input to /predictions; rows add digits/s and their share of the "
        "served file's offline rate at batch N on the workers' threads, timed after the loads",
    )
    p.add_argument(
        "--encoding",
        default="binary",
        choices=["binary", "json"],  # bench.http.OIP_ENCODINGS, which is imported only when a bench runs
        help="with --oip: the tensor in the binary extension, outputs binary (default; Triton's clients), or "
        "json: its values in the JSON body, outputs in JSON (hand-written clients)",
    )
    p.add_argument("--concurrency", type=_int_list, default=(1, 4, 16, 64), help="default 1,4,16,64")
    p.add_argument("--requests", type=int, default=4000, help="requests per target and concurrency (default 4000)")
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="alternate no-op and model this many times per concurrency, --requests split over them (default 4)",
    )
    # TorchServe's frontend is Java: its JIT (C2) keeps compiling through many thousands of requests, raising
    # the no-op's rate as it goes, and the two targets share that code (compare --warmup 0 with the default;
    # docs/tuning.md)
    p.add_argument("--warmup", type=int, default=16000, help="warm-up requests per target (default 16000)")
    add_serving_settings(p, of=" of both archives")
    p.add_argument(
        "--load-generator",
        default="ab",
        choices=["ab", "python"],
        help="ab (ApacheBench; default) or python (needs nothing installed, may be the bottleneck)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: runs/bench/MODEL-FORMAT-http)")
    p.set_defaults(func=run_http)


def run_http(args: argparse.Namespace) -> int:
    from .bench.http import HttpPlan
    from .bench.http import run_http as measure
    from .bench.report import write_http
    from .serving.archive import ServingSettings

    if args.rounds < 1 or args.requests // args.rounds < max(args.concurrency) or args.warmup < 0:
        raise ValueError(
            f"--requests / --rounds must be at least the highest concurrency ({max(args.concurrency)}), --rounds "
            f"at least 1 and --warmup at least 0; got {args.requests}, {args.rounds} and {args.warmup}"
        )
    out = (args.out or DEFAULT_OUT / f"{args.model}-{args.format}-http").resolve()
    settings = ServingSettings(
        batch_size=args.batch_size, max_batch_delay=args.max_batch_delay, workers=args.workers, threads=args.threads
    )
    settings.validate()
    if not 0 <= args.oip <= 1024 or (args.oip and args.input):
        raise ValueError(f"--oip takes 1-1024 digits a request (the handler's limit), without --input; got {args.oip}")
    if args.encoding != "binary" and not args.oip:
        raise ValueError(f"--encoding {args.encoding} is the encoding of OIP requests: give --oip N too")
    body = oip_input(out, args.oip, args.encoding) if args.oip else args.input or default_input(out)
    plan = HttpPlan(
        model=args.model,
        fmt=args.format,
        artifacts=args.artifacts,
        body=body,
        concurrency=args.concurrency,
        requests=args.requests,
        rounds=args.rounds,
        warmup=args.warmup,
        settings=settings,
        generator=args.load_generator,
        oip_digits=args.oip,
        oip_encoding=args.encoding,
    )
    report = measure(plan, out / "torchserve")
    paths = write_http(report, out)
    return show(paths)


def oip_input(out: Path, digits: int, encoding: str) -> Path:
    """An OIP request of the first `digits` MNIST test digits in `encoding`, written into the output folder."""
    from .bench.http import oip_body
    from .training.data import load_mnist

    data = load_mnist(log=lambda _: None)
    suffix = ".json" if encoding == "json" else ".bin"
    return oip_body(data.test_images[:digits], out / f"oip-{digits}-digits{suffix}", encoding)


def default_input(out: Path) -> Path:
    """MNIST test digit 0 as the 28x28 PNG a client would send, written into the output folder."""
    from .serving.samples import write_samples
    from .training.data import load_mnist

    data = load_mnist(log=lambda _: None)
    [path] = write_samples(data.test_images, data.test_labels, out, 1, drawn=False)
    return path


def add_explain(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "explain",
        help="are the explanations faithful (a deletion test), and do the formats' maps agree",
        description="Explain MNIST test digits with every exported format and method through the handler's own "
        "engine (in this process, on the predictor a worker loads), then delete the k% most attributed ink "
        "pixels and as many random ones (seeded) and compare the drops of the explained class's probability; "
        "also the stock TorchServe example's method (IG on the eager model, target 0) and the Spearman "
        "agreement of the formats' maps. Writes bench-explain.json, .md and .png to OUT.",
    )
    p.add_argument("model", metavar="MODEL", help="an exported model (see `digits export`)")
    add_artifacts(p)
    p.add_argument("--digits", type=int, default=1000, help="MNIST test digits explained (default 1000)")
    add_data_dir(p)
    p.add_argument(
        "--formats",
        type=_name_list,
        help=f"comma-separated formats (default: every exported one of {', '.join(FORMATS)})",
    )
    p.add_argument("--methods", type=_name_list, help="comma-separated methods (default: every one a format runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random deletions (default 0)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's); 1 as a served worker has")
    p.add_argument("--no-stock", action="store_true", help="leave out the stock TorchServe example's method")
    p.add_argument("--out", type=Path, help="output folder (default: runs/bench/MODEL-explain)")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    from .bench.explain import run_explain as measure
    from .bench.report import write_explain

    report = measure(
        args.artifacts,
        args.model,
        digits=args.digits,
        formats=args.formats,
        methods=args.methods,
        seed=args.seed,
        threads=args.threads,
        stock=not args.no_stock,
        data_dir=args.data_dir,
    )
    paths = write_explain(report, args.out or DEFAULT_OUT / f"{args.model}-explain")
    return show(paths)


def add_explain_http(kinds: argparse._SubParsersAction) -> None:
    from .bench.explain_http import DIGITS, OIP_DIGITS, OIP_REQUESTS, REQUESTS, SETTINGS

    p = kinds.add_parser(
        "explain-http",
        help="what an explanation costs over HTTP, per format and method, beside a prediction",
        description="Archive MODEL once per exported format, serve them from one TorchServe, and time one client "
        "alone: one digit a request to /predictions and, per method, /explanations (latency percentiles), and N "
        "digits a request over OIP, predictions and attributions (digits per second). Writes "
        "bench-explain-http.json, .md and .png to OUT.",
    )
    p.add_argument("--model", default="cnn", help="an exported model (default cnn)")
    add_artifacts(p)
    p.add_argument("--formats", type=_name_list, help="comma-separated formats (default: every exported one)")
    p.add_argument("--methods", type=_name_list, help="comma-separated methods (default: every one a format runs)")
    p.add_argument(
        "--digits",
        type=int,
        default=DIGITS,
        help=f"distinct digits the one-digit requests cycle through (default {DIGITS})",
    )
    p.add_argument(
        "--requests", type=int, default=REQUESTS, help=f"one-digit requests per format and method (default {REQUESTS})"
    )
    p.add_argument(
        "--oip", type=int, default=OIP_DIGITS, metavar="N", help=f"digits an OIP request (default {OIP_DIGITS})"
    )
    p.add_argument(
        "--oip-requests",
        type=int,
        default=OIP_REQUESTS,
        help=f"OIP requests per format and method (default {OIP_REQUESTS})",
    )
    # batch size 1: one client alone never fills a batch, and a larger one makes TorchServe hold each request
    # for the batch delay first
    add_serving_settings(p, of=" of every archive", default=SETTINGS)
    p.add_argument("--out", type=Path, help="output folder (default: runs/bench/MODEL-explain-http)")
    p.set_defaults(func=run_explain_http)


def run_explain_http(args: argparse.Namespace) -> int:
    from .bench.explain_http import CostPlan, parse_formats
    from .bench.explain_http import run_explain_http as measure
    from .bench.report import write_explain_http
    from .serving.archive import ServingSettings

    settings = ServingSettings(
        batch_size=args.batch_size, max_batch_delay=args.max_batch_delay, workers=args.workers, threads=args.threads
    )
    settings.validate()
    out = (args.out or DEFAULT_OUT / f"{args.model}-explain-http").resolve()
    plan = CostPlan(
        model=args.model,
        artifacts=args.artifacts,
        formats=parse_formats(args.formats, args.artifacts, args.model),
        methods=args.methods,
        settings=settings,
        digits=args.digits,
        requests=args.requests,
        oip_digits=args.oip,
        oip_requests=args.oip_requests,
    )
    report = measure(plan, out / "torchserve")
    paths = write_explain_http(report, out)
    return show(paths)


def add_switch(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "switch",
        help="latency and lost requests across `digits rollout` and `digits rollback` under load",
        description="Serve MODEL as version 1.0 on a TorchServe of the run's own, load it with PNG and OIP "
        "connections, roll version 2.0 (the same export) out and back, and report every request's fate and "
        "p50/p99 latency per phase; writes bench-switch.json and .md to OUT.",
    )
    p.add_argument("--model", default="cnn", help="an exported model (default cnn)")
    p.add_argument("--format", default=ONNX.name, choices=list(FORMATS), help=f"file to serve (default {ONNX.name})")
    add_artifacts(p)
    p.add_argument("--steady", type=float, default=20, help="seconds of load alone before, between, after (20)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/bench/MODEL-FORMAT-switch)")
    p.set_defaults(func=run_switch)


def run_switch(args: argparse.Namespace) -> int:
    from .bench.switch import SwitchPlan, write_switch
    from .bench.switch import run_switch as measure

    if args.steady <= 0:
        raise ValueError(f"--steady must be positive, got {args.steady}")
    out = (args.out or DEFAULT_OUT / f"{args.model}-{args.format}-switch").resolve()
    report = measure(SwitchPlan(args.model, args.format, args.artifacts, args.steady), out / "torchserve")
    paths = write_switch(report, out)
    print(paths[1].read_text(), end="")
    print(f"wrote {', '.join(map(str, paths))}")
    failed = report["summary"]["failed"] or report["summary"]["wrong"] or report["version_problems"]
    return 1 if failed else 0


def add_report(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "report",
        help="write docs/performance.md (and its plots) whole from one run's bench JSON and the artifacts",
        description="Render every bench-KIND.json under RUNS, after the training and export figures read from "
        "ARTIFACTS/MODEL/ (metrics.json, parity.json, parity-int8.json), into OUT and the folder of plots beside "
        "it (OUT without .md), both replaced whole, headed by the machine, the date, the versions and --command. "
        "With --readme, also replace the headline table between the README's markers.",
    )
    p.add_argument(
        "--runs", type=Path, default=DEFAULT_OUT, help="the bench steps' output folders (default: runs/bench)"
    )
    add_artifacts(p)
    p.add_argument("--out", type=Path, default=Path("docs") / "performance.md", help="default: docs/performance.md")
    p.add_argument("--command", default="make bench", help="the command that ran the steps, for the header")
    p.add_argument(
        "--headline",
        action="append",
        default=[],
        metavar="RUN",
        help="a run (its folder name) whose headline figures join the table; repeat for several",
    )
    p.add_argument("--readme", type=Path, help="a README whose headline table to replace (e.g. README.md)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from .bench.performance import write_report

    out = write_report(args.runs, args.artifacts, args.out, args.command, args.headline, args.readme)
    print(f"wrote {out} and {out.with_suffix('')}/" + (f"; the headline in {args.readme}" if args.readme else ""))
    return 0


COMMANDS = [add_bench]
