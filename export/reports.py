"""What a parity check found, for people (markdown) and programs (JSON): `parity.md`, `parity.json`,
`parity-int8.md`, `parity-int8.json`. Each report names the CPU it was made on (see `export.cpu`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .cpu import describe_cpu, summary


@dataclass
class ParityCheck:
    """One backend at one batch size (or over the whole set, in chunks), against eager."""

    backend: str
    ort_optimization: str | None
    batch_size: int
    samples: int
    # None where the backend raised instead of answering
    max_abs_diff: float | None
    max_rel_diff: float | None  # |value - eager| / max(|eager|, atol / rtol): see export.parity._relative_floor
    mean_abs_diff: float | None
    tolerance_used: float | None  # max |value - eager| / (atol + rtol * |eager|): above 1.0 fails
    argmax_agreement: float
    accuracy: float
    passed: bool
    # the element furthest outside the tolerance (or closest to it): [sample, class], eager and exported
    worst_index: list[int] = field(default_factory=list)
    worst_reference: float | None = None
    worst_value: float | None = None
    failure: str | None = None


@dataclass
class ParityReport:
    model: str
    atol: float
    rtol: float
    samples: int
    reference_accuracy: float  # eager, over all `samples`
    checks: list[ParityCheck]
    cpu: dict = field(default_factory=describe_cpu)  # where it ran: float kernels round differently per CPU

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [c.failure for c in self.checks if c.failure]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "samples": self.samples,
            "reference_accuracy": self.reference_accuracy,
            "checks": [asdict(c) for c in self.checks],
            "cpu": self.cpu,
        }

    def to_markdown(self) -> str:
        """The table a person reads, with a verdict and, on failure, what failed where."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"# Parity: {self.model} {verdict}",
            "",
            f"Eager PyTorch against the exported files loaded back from disk, on {self.samples} MNIST test digits. "
            f"An element passes when |exported - eager| <= {self.atol:g} + {self.rtol:g} * |eager|; a check also "
            f"needs argmax agreement 1.0. Relative differences are taken against max(|eager|, atol / rtol). "
            f"Eager accuracy: {self.reference_accuracy:.2%}.",
            "",
            summary(self.cpu),
            "",
            *_table(self.checks),
        ]
        if self.failures:
            lines += ["", "Failures:", *(f"- {f}" for f in self.failures)]
        return "\n".join(lines) + "\n"


@dataclass
class PredictionParity:
    """A quantised file against eager, on predictions only (see `export.parity`)."""

    model: str
    backend: str  # e.g. "onnxruntime int8"
    samples: int
    argmax_agreement: float
    accuracy: float
    reference_accuracy: float  # eager's
    min_agreement: float
    max_accuracy_diff: float
    cpu: dict = field(default_factory=describe_cpu)  # where it ran: int8 kernels differ between CPUs
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"# Parity: {self.model} {self.backend} {verdict}",
            "",
            f"Predictions against eager PyTorch on {self.samples} MNIST test digits: argmax agreement must be at "
            f"least {self.min_agreement:.1%} and accuracy within {self.max_accuracy_diff * 100:.1f} points of eager's.",
            "",
            summary(self.cpu),
            "",
            "| backend | samples | argmax agreement | accuracy | eager accuracy | result |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            f"| {self.backend} | {self.samples} | {self.argmax_agreement:.4f} | {self.accuracy:.2%} | "
            f"{self.reference_accuracy:.2%} | {'pass' if self.passed else 'FAIL'} |",
        ]
        if self.failure:
            lines += ["", f"Failure: {self.failure}"]
        return "\n".join(lines) + "\n"


def _table(checks: Sequence[ParityCheck]) -> list[str]:
    header = [
        "backend",
        "ORT optimisation",
        "batch",
        "samples",
        "max abs diff",
        "max rel diff",
        "mean abs diff",
        "tolerance used",
        "argmax agreement",
        "accuracy",
        "result",
    ]
    rows = [
        [
            c.backend,
            c.ort_optimization or "-",
            str(c.batch_size),
            str(c.samples),
            _number(c.max_abs_diff),
            _number(c.max_rel_diff),
            _number(c.mean_abs_diff),
            "-" if c.tolerance_used is None else f"{c.tolerance_used:.0%}",
            f"{c.argmax_agreement:.4f}",
            f"{c.accuracy:.2%}",
            "pass" if c.passed else "FAIL",
        ]
        for c in checks
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
