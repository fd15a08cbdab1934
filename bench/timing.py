"""What every benchmark needs: latency percentiles, timed repetitions, FLOPs, the fp32 peak, the machine."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..export.cpu import cpu_flags, cpu_model

PEAK_MATMUL_SIZE = 2048  # 17 GFLOP a product: long enough to reach the peak, short enough to repeat
PEAK_REPS = 8


@dataclass(frozen=True)
class Latency:
    """Percentiles of per-call (or per-request) times, in milliseconds."""

    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, milliseconds: Sequence[float]) -> Latency:
        if len(milliseconds) == 0:
            raise ValueError("no timings to summarise")
        p50, p90, p99 = np.percentile(np.asarray(milliseconds, dtype=np.float64), [50, 90, 99])
        return cls(float(p50), float(p90), float(p99))


def known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` that are fields of the dataclass `cls`: a report's JSON carries derived figures
    (ratios, rates) beside them."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


def time_calls(
    call: Callable[[], object], *, min_seconds: float, min_reps: int = 10, warmup_reps: int = 3
) -> list[float]:
    """Calls `call` `warmup_reps` times untimed, then until both `min_seconds` and `min_reps` are reached.

    Returns:
        The wall time of each timed call, in ms.
    """
    for _ in range(warmup_reps):  # first calls pay for allocation, kernel selection, lazy initialisation
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - started < min_seconds:
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def flops_per_sample(model: nn.Module, input_shape: Sequence[int]) -> int:
    """The model's own FLOP count for one sample (2 per multiply-add), from PyTorch's FLOP counter."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


def fp32_peak_gflops(size: int = PEAK_MATMUL_SIZE, reps: int = PEAK_REPS) -> float:
    """This machine's fp32 peak as measured here: the best GFLOP/s of a large float32 matmul (MKL, all cores)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    best_ms = min(time_calls(lambda: torch.mm(a, b), min_seconds=0, min_reps=reps, warmup_reps=2))
    return 2 * size**3 / (best_ms / 1000) / 1e9


def machine() -> dict:
    """What ran the benchmark, when and how: CPU, cores, memory, threads, versions, how busy the machine was
    when it started, the UTC time and the command line (`digits bench report` heads its report with these)."""
    return {
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "cpu_flags": cpu_flags(),  # AVX-512, VNNI, AMX: what int8 and float kernels run here
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "versions": {
            **{package: version(package) for package in ("torch", "onnxruntime", "torchserve")},
            "java": java_version(),
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["digits", *sys.argv[1:]]) if Path(sys.argv[0]).name == "digits" else None,
    }


def java_version() -> str | None:
    """The version TorchServe's frontend runs on (`java -version`), or None without Java."""
    from ..serving.server import ServeError, find_java

    try:
        done = subprocess.run([find_java(), "-version"], capture_output=True, text=True, timeout=30)
    except (ServeError, OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "([^"]+)"', done.stderr + done.stdout)
    return found.group(1) if found else None
