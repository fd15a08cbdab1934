"""`digits bench explain`: are the served explanations faithful, and do the formats agree?

Faithfulness is a deletion test. For each digit, format and method, the k% most attributed pixels are set
to the background, and separately the same number of the digit's ink pixels chosen at random; the drop in
the explained class's probability is recorded for both. An explanation that means something points at the
pixels the answer rests on, so its deletion drops the probability more than a random one: the report gives
the share of digits where it does (the target: at least 90% at k = 10 for each format's default method),
the mean drops, and the curve of mean drops over k (AOPC-style: the area over the perturbation curve).

k counts the digit's ink pixels (intensity above 0), not the 784 of the image: an MNIST digit has about
150, so k% of the image would, at k = 20, be more ink than half the digits have, and the random deletion would
then erase the whole digit and the comparison measure nothing.

The attributions come from the code the server runs, in this process: the handler's engine
(handlers/digit_explain.py `attribute`) on the predictor the handler's loader builds
(digit_model.load_predictor) from the very file an archive ships (export.json's, its SHA-256 checked as a
worker checks it). Not over HTTP: the test needs the model's probabilities for tens of thousands of altered
digits, and the answers are the same without the server's frame, which `digits bench explain-http`
measures instead. The digits are MNIST test digits as 28x28 tensors, what an OIP `UINT8 [N, 28, 28]`
request hands the handler (its `framed` output is the digit itself); the explained class is the predicted
one (the handler's default target).

Beside the formats, the stock TorchServe example's method, computed offline: Captum IntegratedGradients
on the eager model, target 0 whatever the digit, 15 steps, the zero baseline in normalised space (ts 0.12.0
`vision_handler.py` `get_insights`, `base_handler.py` `explain_handle`); the stock MNIST net returns
log-probabilities, so the eager model's logits go through log_softmax first. Its map is tested twice:
against the probability of class 0, the class it explains, and against the predicted class's, the answer a
user asks about.

Agreement: for each method that several formats run, the Spearman rank correlation of two formats' maps of
the same digit, over the pixels that either map scores (the background both leave at 0 would inflate it).

Random choices are seeded per (seed, digit, k): every format and method deletes the same random pixels of a
digit, and a run repeats exactly.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contract import FORMATS as CONTRACT_FORMATS
from ..contract import MANIFEST_FILE, ONNX, ONNX_INT8, PT2, TORCHSCRIPT, normalise
from . import BenchError
from .offline import exported_files, load_eager, set_threads
from .timing import known_fields, machine

KS = (5, 10, 20)  # % of the digit's ink deleted, for the table
CURVE_KS = (0, 2, 5, 10, 15, 20, 30, 40, 50)  # and for the AOPC-style curve
TARGET_K = 10
TARGET_WIN_SHARE = 0.9
DIGITS = 1000
SEED = 0
FORMATS = (TORCHSCRIPT.name, ONNX.name, ONNX_INT8.name, PT2.name)
# format pairs whose maps are compared, for every method both run
PAIRS = (
    (TORCHSCRIPT.name, ONNX.name),
    (TORCHSCRIPT.name, PT2.name),
    (ONNX.name, PT2.name),
    (ONNX.name, ONNX_INT8.name),
    (TORCHSCRIPT.name, ONNX_INT8.name),
)
STOCK = "stock TorchServe example"
STOCK_STEPS = 15  # ts/torch_handler/vision_handler.py: ig.attribute(tensor_data, target=target, n_steps=15)
STOCK_TARGET = 0  # base_handler.explain_handle: a request's "target", else 0, and an image request has none
SCORE_ROWS = 1024  # altered digits scored per forward call (the predictor splits them into its own chunks)

Scorer = Callable[[torch.Tensor], torch.Tensor]  # (N, 1, H, W) normalised -> (N, classes) probabilities


@dataclass(frozen=True)
class Deletion:
    """One row of the table: a format's (or the stock example's) method on every digit."""

    source: str  # a format name, or STOCK
    method: str
    default: bool  # the format's default method
    explained: str  # "predicted", or "class 0" for the stock example's own target
    seconds: float  # wall time of the attributions (the machine may be shared: a rough figure)
    win_share: dict[int, float]  # k -> share of digits whose attributed deletion dropped the probability more
    mean_drop: dict[int, float]  # k -> mean drop of the explained class's probability, attributed deletion
    mean_random_drop: dict[int, float]  # the same for the random ink deletion
    aopc: float  # mean over CURVE_KS of the attributed drop
    random_aopc: float

    @property
    def meets_target(self) -> bool:
        return self.win_share[TARGET_K] >= TARGET_WIN_SHARE


@dataclass(frozen=True)
class Agreement:
    """Two formats' maps of the same digits by one method: Spearman's rho per digit, summarised."""

    method: str
    first: str
    second: str
    median: float
    p10: float  # the 10th percentile: how the worst tenth of digits fare
    mean: float
    digits: int


@dataclass
class ExplainReport:
    model: str
    digits: int
    seed: int
    ks: tuple[int, ...]
    curve_ks: tuple[int, ...]
    defaults: dict[str, str]  # format -> its default method
    settings: dict[str, dict]  # method -> the settings it ran with
    machine: dict
    accuracy: dict[str, float] = field(default_factory=dict)  # format -> share of the digits it reads right
    deletions: list[Deletion] = field(default_factory=list)
    agreements: list[Agreement] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, deletion in zip(data["deletions"], self.deletions, strict=True):
            row["meets_target"] = deletion.meets_target
        return {"kind": "explain", "target": {"k": TARGET_K, "win_share": TARGET_WIN_SHARE}, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExplainReport:
        """The report back from its JSON (`to_dict`), as `digits bench report` reads it (JSON keys k as text)."""
        deletions = [
            Deletion(
                **{
                    **known_fields(Deletion, row),
                    **{name: by_k(row[name]) for name in ("win_share", "mean_drop", "mean_random_drop")},
                }
            )
            for row in data["deletions"]
        ]
        agreements = [Agreement(**known_fields(Agreement, row)) for row in data["agreements"]]
        return cls(
            **{
                **known_fields(cls, data),
                "ks": tuple(data["ks"]),
                "curve_ks": tuple(data["curve_ks"]),
                "deletions": deletions,
                "agreements": agreements,
            }
        )


def by_k(values: dict[str, float]) -> dict[int, float]:
    return {int(k): value for k, value in values.items()}


def handler_module(name: str):
    """One of the handler's modules, imported as a worker imports it: by bare name, from the folder an archive
    ships (so the bench runs the server's code, not a copy)."""
    from ..handlers import handler_dir

    folder = str(handler_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def handler_modules():
    """The handler's digit_model (the loader) and digit_explain (the engine)."""
    return handler_module("digit_model"), handler_module("digit_explain")


def check_choices(formats: Sequence[str] | None, methods: Sequence[str] | None) -> None:
    """Refuses an unknown format or method by name, listing the known ones."""
    known_methods = list(handler_modules()[1].METHODS)
    for kind, chosen, known in (("format", formats, FORMATS), ("method", methods, known_methods)):
        unknown = [name for name in chosen or () if name not in known]
        if unknown:
            raise BenchError(f"unknown {kind}(s) {', '.join(unknown)}; known: {', '.join(known)}")


def run_explain(
    artifacts: Path,
    model: str,
    *,
    digits: int = DIGITS,
    formats: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seed: int = SEED,
    threads: int | None = None,
    stock: bool = True,
    data_dir: Path | None = None,
    log: Callable[[str], Any] = print,
) -> ExplainReport:
    """The deletion test and the agreement of MODEL's exported formats on the first `digits` MNIST test
    digits; see the module docstring. `formats` and `methods` narrow the run (default: every exported format,
    every method it can run)."""
    if digits < 1:
        raise BenchError(f"--digits must be at least 1, got {digits}")
    check_choices(formats, methods)
    set_threads(threads)
    model_dir = Path(artifacts) / model
    eager, meta = load_eager(model_dir, model)
    deleter = Deleter(*mnist_digits(digits, data_dir), meta, seed)
    inputs = deleter.inputs
    engine = handler_modules()[1]
    report = ExplainReport(
        model,
        digits,
        seed,
        KS,
        CURVE_KS,
        {},
        {name: dict(m.settings) for name, m in engine.METHODS.items()},
        machine(),
    )
    maps: dict[tuple[str, str], np.ndarray] = {}  # (format, method) -> (N, H, W)
    for fmt, predict in load_formats(model_dir, model, formats, log).items():
        maps |= explain_format(report, fmt, predict, inputs, deleter, methods, meta, log)
    if stock:
        report.deletions += stock_rows(eager, inputs, deleter, log)
    report.agreements = agreements(maps, log)
    return report


def mnist_digits(count: int, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` MNIST test digits, (N, 28, 28) uint8, and their labels."""
    from ..training.data import load_mnist

    data = load_mnist(data_dir, log=lambda _: None)
    if count > len(data.test_images):
        raise BenchError(f"--digits {count} is more than the {len(data.test_images)} MNIST test digits")
    return data.test_images[:count], data.test_labels[:count]


def load_formats(model_dir: Path, model: str, formats: Sequence[str] | None, log) -> dict[str, Any]:
    """Each exported format's predictor, loaded by the handler's loader on the CPU, after the handler's checks
    of the file's digest (format name -> predictor)."""
    digit_model, _ = handler_modules()
    files = exported_files(model_dir, model)
    wanted = list(formats or [fmt for fmt in FORMATS if fmt in files])
    missing = [fmt for fmt in wanted if fmt not in files]
    if missing:
        command = " ".join(["digits export", model, *(CONTRACT_FORMATS[fmt].export_flags for fmt in missing)])
        raise BenchError(
            f"{model_dir / MANIFEST_FILE} lists no {', '.join(missing)} file: export it first (`{command.strip()}`)"
        )
    predictors = {}
    for fmt in wanted:
        path = model_dir / files[fmt]["path"]
        digit_model.verify_sha256(path, files[fmt]["sha256"])
        predictors[fmt] = digit_model.load_predictor(path, torch.device("cpu"))
        log(f"bench explain {model}: loaded {fmt} ({path.name})")
    return predictors


def explain_format(
    report: ExplainReport,
    fmt: str,
    predict,
    inputs: torch.Tensor,
    deleter: Deleter,
    methods: Sequence[str] | None,
    meta: dict,
    log,
) -> dict[tuple[str, str], np.ndarray]:
    """The format's rows of the table, for every method it runs (or those of `methods` it runs)."""
    engine = handler_modules()[1]
    runtime = ONNX.name if fmt == ONNX_INT8.name else fmt  # the int8 file is an ONNX file to the handler
    default = engine.DEFAULT_METHODS[runtime]
    report.defaults[fmt] = default
    score = probabilities_of(predict)
    probabilities = score(inputs)
    targets = probabilities.argmax(1)
    report.accuracy[fmt] = float((targets.numpy() == deleter.labels).mean())
    maps = {}
    for method in engine.methods_for(predict):
        if methods and method not in methods:
            continue
        start = time.perf_counter()
        attributions = engine.attribute(predict, inputs, targets.numpy(), method, mean=meta["mean"], std=meta["std"])
        seconds = time.perf_counter() - start
        row = deleter.test(fmt, method, method == default, "predicted", attributions, score, targets, seconds)
        report.deletions.append(row)
        maps[(fmt, method)] = attributions
        log(progress_line(row))
    return maps


def probabilities_of(predict) -> Scorer:
    """The predictor's scores as probabilities (softmax of logits or log-probabilities alike), in calls of
    SCORE_ROWS digits."""

    def score(inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.softmax(predict(part).float(), dim=1) for part in inputs.split(SCORE_ROWS)])

    return score


class Deleter:
    """Deletes pixels of the digits (sets them to the background) and measures the probability's drop."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, meta: dict, seed: int) -> None:
        self.inputs = torch.from_numpy(normalise(images, meta["mean"], meta["std"], meta["input_shape"]))
        self.background = float(normalise(np.zeros((1, 1, 1)), meta["mean"], meta["std"], [1, 1, 1]).item())
        self.seed = seed
        self.labels = labels
        self.ink = [np.flatnonzero(image.reshape(-1) > 0) for image in images]  # each digit's ink pixels

    def counts(self, k: int) -> list[int]:
        """Pixels deleted from each digit at k% of its ink (at least one, once k > 0 and there is ink)."""
        return [min(len(ink), max(1, round(k / 100 * len(ink)))) if k else 0 for ink in self.ink]

    def attributed(self, attributions: np.ndarray, k: int) -> list[np.ndarray]:
        """Each digit's k% most attributed pixels (ties: the earlier pixel first)."""
        flat = attributions.reshape(len(attributions), -1)
        return [np.argsort(-row, kind="stable")[:n] for row, n in zip(flat, self.counts(k), strict=True)]

    def random(self, k: int) -> list[np.ndarray]:
        """As many of each digit's ink pixels, drawn at random from a generator seeded by (seed, digit, k)."""
        return [
            np.random.default_rng([self.seed, index, k]).choice(ink, n, replace=False)
            for index, (ink, n) in enumerate(zip(self.ink, self.counts(k), strict=True))
        ]

    def deleted(self, pixels: list[np.ndarray]) -> torch.Tensor:
        """The digits as model inputs with the given pixels of each set to the background."""
        altered = self.inputs.clone().reshape(len(self.inputs), -1)
        for row, chosen in zip(altered, pixels, strict=True):
            row[torch.from_numpy(chosen)] = self.background
        return altered.reshape(self.inputs.shape)

    def drops(self, score: Scorer, pixels: list[np.ndarray], explained: torch.Tensor) -> np.ndarray:
        """Each digit's drop in the explained class's probability when `pixels` are deleted."""
        rows = torch.arange(len(explained))
        before = score(self.inputs)[rows, explained]
        after = score(self.deleted(pixels))[rows, explained]
        return (before - after).numpy()

    def test(
        self,
        source: str,
        method: str,
        default: bool,
        explained_name: str,
        attributions: np.ndarray,
        score: Scorer,
        explained: torch.Tensor,
        seconds: float,
    ) -> Deletion:
        """The deletion test of one map per digit, at KS for the table and CURVE_KS for the curve."""
        wins, drops, random_drops = {}, {}, {}
        for k in sorted(set(KS) | set(CURVE_KS)):
            attributed = self.drops(score, self.attributed(attributions, k), explained)
            random = self.drops(score, self.random(k), explained)
            wins[k], drops[k], random_drops[k] = (
                float((attributed > random).mean()),
                float(attributed.mean()),
                float(random.mean()),
            )
        return Deletion(
            source,
            method,
            default,
            explained_name,
            round(seconds, 2),
            {k: wins[k] for k in KS},
            drops,
            random_drops,
            float(np.mean([drops[k] for k in CURVE_KS])),
            float(np.mean([random_drops[k] for k in CURVE_KS])),
        )


def stock_rows(eager: torch.nn.Module, inputs: torch.Tensor, deleter: Deleter, log) -> list[Deletion]:
    """The stock example's map (IG on the eager model, target 0), tested against class 0 and against the
    predicted class."""
    from captum.attr import IntegratedGradients

    def log_probabilities(x: torch.Tensor) -> torch.Tensor:  # the stock MNIST net's output
        return torch.log_softmax(eager(x), dim=1)

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([torch.softmax(eager(part), dim=1) for part in x.split(SCORE_ROWS)])

    start = time.perf_counter()
    attributions = torch.cat(
        [
            IntegratedGradients(log_probabilities).attribute(part, target=STOCK_TARGET, n_steps=STOCK_STEPS)
            for part in inputs.split(64)  # the stock handler's batch (it ignores batching; a bound on memory)
        ]
    )
    seconds = time.perf_counter() - start
    attributions = attributions.detach().reshape(len(inputs), *inputs.shape[2:]).numpy()
    predicted = score(inputs).argmax(1)
    method = f"integrated-gradients, eager, target {STOCK_TARGET}, {STOCK_STEPS} steps, zero baseline"
    rows = [
        deleter.test(STOCK, method, True, "class 0", attributions, score, torch.full_like(predicted, 0), seconds),
        deleter.test(STOCK, method, True, "predicted", attributions, score, predicted, seconds),
    ]
    for row in rows:
        log(progress_line(row))
    return rows


def agreements(maps: dict[tuple[str, str], np.ndarray], log) -> list[Agreement]:
    """Spearman's rho of two formats' maps per digit, for every pair in PAIRS and method both ran."""
    found = []
    methods = dict.fromkeys(method for _, method in maps)
    for method in methods:
        for first, second in PAIRS:
            if (first, method) in maps and (second, method) in maps:
                rho = spearman_per_digit(maps[(first, method)], maps[(second, method)])
                found.append(
                    Agreement(
                        method,
                        first,
                        second,
                        float(np.nanmedian(rho)),
                        float(np.nanpercentile(rho, 10)),
                        float(np.nanmean(rho)),
                        int(np.isfinite(rho).sum()),
                    )
                )
                log(f"  agreement {method}: {first} vs {second}: median rho {found[-1].median:.3f}")
    return found


def spearman_per_digit(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(N,) Spearman's rho of each digit's two maps over the pixels either scores (NaN when fewer than 3)."""
    from scipy.stats import spearmanr

    rho = np.full(len(first), np.nan)
    for index, (a, b) in enumerate(zip(first.reshape(len(first), -1), second.reshape(len(second), -1), strict=True)):
        scored = (a != 0) | (b != 0)
        if scored.sum() >= 3:
            rho[index] = spearmanr(a[scored], b[scored]).statistic
    return rho


def progress_line(row: Deletion) -> str:
    wins = ", ".join(f"k={k}: {share:.0%}" for k, share in row.win_share.items())
    return (
        f"  {row.source:11} {row.method[:28]:28} ({row.explained}): attributed deletion wins {wins}; "
        f"mean drop at k={TARGET_K}: {row.mean_drop[TARGET_K]:.3f} vs random {row.mean_random_drop[TARGET_K]:.3f} "
        f"({row.seconds:.1f} s)"
    )
