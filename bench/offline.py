"""`digits bench offline`: eager PyTorch, TorchScript, onnxruntime (and int8, .pt2 when exported) side by side,
against the fp32 peak.

Every backend runs the same real MNIST test digits at each batch size, in one process. At each batch size
the backends take turns, ROUNDS times, each turn a slice of the timed seconds, and each backend's times are
pooled: a burst of other work on a shared machine then lands on every backend alike instead of on whichever
one happened to be running (one window per backend let the int8/fp32 ratio of one file more than double
between runs). The peak is a large float32 matmul, measured at the start, after every round of turns and at
the end; the best is kept, the hardest ceiling (measured only at the start and the end, a burst of load
once put it below what onnxruntime itself reached in the same run).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contract import MANIFEST_FILE, normalise
from . import BenchError
from .timing import Latency, flops_per_sample, fp32_peak_gflops, known_fields, machine, time_calls

BATCH_SIZES = (1, 8, 64, 256)
MIN_SECONDS = 1.0  # timed per backend and batch size, after warm-up
ROUNDS = 5  # turns each backend takes at each batch size
# Untimed pause before each turn: the previous runtime's worker threads spin-wait a while after their last
# call (PyTorch's OpenMP pool, onnxruntime's intra-op pool) and would take cores from the next backend.
SETTLE_S = 0.2
PEAK_REPS_BETWEEN_TURNS = 2  # matmuls after each round of turns (the start and the end take the default)

Runner = Callable[[np.ndarray], np.ndarray]  # (N, 1, 28, 28) float32 -> (N, 10) scores


@dataclass(frozen=True)
class OfflineResult:
    """One backend at one batch size."""

    backend: str
    batch_size: int
    samples_per_s: float
    latency: Latency  # per batch
    reps: int
    gflops: float  # from the model's FLOP count
    peak_share: float  # gflops / the best fp32 peak of the run
    # median over the rounds of (this round's GFLOP/s) / (the peak measured right after the round): on a
    # machine whose speed drifts (the peak can vary by half within one run), the like-for-like figure
    paired_peak_share: float


@dataclass
class OfflineReport:
    model: str
    flops_per_sample: int
    peak_gflops: float  # the best of the measurements below
    peak_measurements: list[float]  # GFLOP/s: at the start, after each round of turns, at the end
    min_seconds: float
    rounds: int
    machine: dict
    results: list[OfflineResult] = field(default_factory=list)

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(r.backend for r in self.results))

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({r.batch_size for r in self.results})

    def result(self, backend: str, batch_size: int) -> OfflineResult | None:
        return next((r for r in self.results if (r.backend, r.batch_size) == (backend, batch_size)), None)

    def ratio(self, numerator: str, denominator: str, batch_size: int) -> float | None:
        """Samples per second of one backend over another's, at one batch size (None when either is missing)."""
        top, bottom = self.result(numerator, batch_size), self.result(denominator, batch_size)
        return top.samples_per_s / bottom.samples_per_s if top and bottom else None

    def ratios(self) -> dict[str, float]:
        """The comparisons this benchmark exists for, per batch size."""
        pairs = [
            ("onnxruntime", "eager"),
            ("torchscript", "eager"),
            ("onnxruntime-int8", "onnxruntime"),
            ("aotinductor", "onnxruntime"),
        ]
        found = {}
        for top, bottom in pairs:
            for n in self.batch_sizes:
                value = self.ratio(top, bottom, n)
                if value is not None:
                    found[f"{top} / {bottom} at batch {n}"] = round(value, 3)
        return found

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OfflineReport:
        """The report back from its JSON (`to_dict`), as `digits bench report` reads it."""
        results = [
            OfflineResult(**{**known_fields(OfflineResult, r), "latency": Latency(**r["latency"])})
            for r in data["results"]
        ]
        return cls(**{**known_fields(cls, data), "results": results})


def run_offline(
    artifacts: Path,
    model: str,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    min_seconds: float = MIN_SECONDS,
    rounds: int = ROUNDS,
    threads: int | None = None,
    data_dir: Path | None = None,
    log: Callable[[str], Any] = print,
) -> OfflineReport:
    """Times every exported form of MODEL from ARTIFACTS/MODEL at each batch size; see the module docstring.

    Every backend runs on the same number of intra-op threads: `threads`, else torch's count (OMP_NUM_THREADS,
    else one per core), as a served worker sizes onnxruntime's pool from torch's (`--threads` of an archive).
    """
    check_batch_sizes(batch_sizes)
    set_threads(threads)
    model_dir = Path(artifacts) / model
    eager, meta = load_eager(model_dir, model)
    runners = load_runners(model_dir, eager, model, torch.get_num_threads())
    images = mnist_batch(meta, max(batch_sizes), data_dir)
    log(f"bench offline {model}: measuring the fp32 peak")
    start_peak = fp32_peak_gflops()
    report = OfflineReport(
        model, flops_per_sample(eager, meta["input_shape"]), start_peak, [start_peak], min_seconds, rounds, machine()
    )

    def measure_peak() -> None:
        report.peak_measurements.append(fp32_peak_gflops(reps=PEAK_REPS_BETWEEN_TURNS))

    for n in batch_sizes:
        for name, turns in time_in_turns(runners, images[:n], min_seconds, rounds, measure_peak).items():
            paired = paired_share(n, turns, report.peak_measurements[-rounds:], report.flops_per_sample)
            report.results.append(summarise(name, n, sum(turns, []), report.flops_per_sample, start_peak, paired))
            log(f"  {name:17} batch {n:4}: {report.results[-1].samples_per_s:10.0f} samples/s")
    report.peak_measurements.append(fp32_peak_gflops())
    report.peak_gflops = max(report.peak_measurements)
    report.results = [with_peak(r, report.peak_gflops) for r in report.results]
    return report


def time_in_turns(
    runners: dict[str, Runner],
    batch: np.ndarray,
    min_seconds: float,
    rounds: int,
    after_round: Callable[[], Any] = lambda: None,
) -> dict[str, list[list[float]]]:
    """Each runner's call times on `batch` (ms), turn by turn, the runners taking `rounds` turns of
    min_seconds / rounds each; `after_round` is called after each round of turns."""
    times: dict[str, list[list[float]]] = {name: [] for name in runners}
    for turn in range(rounds):
        for name, run in runners.items():
            time.sleep(SETTLE_S)
            times[name].append(
                time_calls(
                    lambda run=run: run(batch),
                    min_seconds=min_seconds / rounds,
                    min_reps=max(1, 10 // rounds),
                    warmup_reps=3 if turn == 0 else 1,  # later turns: one call to bring caches back, untimed
                )
            )
        after_round()
    return times


def check_batch_sizes(batch_sizes: Sequence[int]) -> None:
    if not batch_sizes or any(n < 1 for n in batch_sizes):
        raise BenchError(f"batch sizes must be positive integers, got {list(batch_sizes)}")


def load_eager(model_dir: Path, model: str):
    """The eager model from its checkpoint (eval mode) and the checkpoint's metadata."""
    from ..export.convert import find_checkpoint, load_model_checkpoint
    from ..training.checkpoint import rebuild_model

    payload = load_model_checkpoint(find_checkpoint(model_dir, model), model)
    return rebuild_model(payload), payload["metadata"]


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads for this process (eager, TorchScript, .pt2), when given."""
    if threads is None:
        return
    if type(threads) is not int or threads < 1:
        raise BenchError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)


def load_runners(model_dir: Path, eager, model: str, threads: int) -> dict[str, Runner]:
    """Eager, and the exported files that export.json vouches for (the int8 file once `--quantize int8` passed
    its parity; model.pt2 with `--pt2`, on its compiled device), each loaded as a serving worker runs it;
    onnxruntime sessions on `threads` intra-op threads, like torch's."""
    from ..export.exporters import exporters
    from ..export.runners import eager_runner

    files = exported_files(model_dir, model)
    runners: dict[str, Runner] = {"eager": eager_runner(eager)}
    for exporter in exporters():
        if exporter.fmt.name in files:
            backend = exporter.runner(model_dir / files[exporter.fmt.name]["path"], threads)
            runners[backend.name] = backend.run
    return runners


def exported_files(model_dir: Path, model: str) -> dict[str, Any]:
    """export.json's files: format name -> {"path", ...}."""
    manifest_path = model_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BenchError(f"no {manifest_path}: export the model with parity first (`digits export {model}`)")
    return json.loads(manifest_path.read_text())["files"]


def served_rate(artifacts: Path, model: str, fmt: str, batch_size: int, threads: int, seconds: float = 2.0) -> dict:
    """Offline samples per second of the file an archive of `fmt` serves, at one batch size of real MNIST
    test digits on `threads` intra-op threads (torch's count is restored after): what a worker of that many
    threads could reach with no server around it.
    """
    check_batch_sizes([batch_size])
    model_dir = Path(artifacts) / model
    files = exported_files(model_dir, model)
    if fmt not in files:
        raise BenchError(f"{model_dir / MANIFEST_FILE} lists no {fmt} file: export it first")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from ..export.exporters import EXPORTERS

        _, meta = load_eager(model_dir, model)
        backend = EXPORTERS[fmt].runner(model_dir / files[fmt]["path"], threads)
        images = mnist_batch(meta, batch_size, None)
        times = time_calls(lambda: backend.run(images), min_seconds=seconds)
    finally:
        torch.set_num_threads(previous)
    return {
        "backend": backend.name,
        "batch_size": batch_size,
        "threads": threads,
        "samples_per_s": throughput(batch_size, times),
        "seconds": seconds,
    }


def mnist_batch(meta: dict, count: int, data_dir: Path | None) -> np.ndarray:
    """(count, *input_shape) float32: real MNIST test digits, normalised as the checkpoint says, repeated if need be."""
    from ..training.data import load_mnist

    images = load_mnist(data_dir, log=lambda _: None).test_images
    images = np.resize(images, (count, *images.shape[1:]))  # np.resize repeats; 10,000 is far above our batches
    return normalise(images, meta["mean"], meta["std"], meta["input_shape"])


def summarise(
    backend: str, batch_size: int, times_ms: list[float], flops: int, peak_gflops: float, paired_peak_share: float
) -> OfflineResult:
    samples_per_s = throughput(batch_size, times_ms)
    gflops = samples_per_s * flops / 1e9
    return OfflineResult(
        backend,
        batch_size,
        samples_per_s,
        Latency.of(times_ms),
        len(times_ms),
        gflops,
        gflops / peak_gflops,
        paired_peak_share,
    )


def throughput(batch_size: int, times_ms: list[float]) -> float:
    """Samples per second from the mean batch time: what a stream of batches gets, stalls included."""
    return batch_size / (float(np.mean(times_ms)) / 1000)


def paired_share(batch_size: int, turns: list[list[float]], peaks: list[float], flops: int) -> float:
    """Median over the rounds of the turn's GFLOP/s over the peak measured right after that round."""
    shares = [throughput(batch_size, t) * flops / 1e9 / peak for t, peak in zip(turns, peaks, strict=True)]
    return float(np.median(shares))


def with_peak(result: OfflineResult, peak_gflops: float) -> OfflineResult:
    return replace(result, peak_share=result.gflops / peak_gflops)
