"""The rollout gate: the golden set over HTTP on a candidate's own versioned URL, before any client sees it.

The candidate passes when every golden request is answered and its accuracy is at least the reference's
minus the tolerance. The reference is the live version, measured in the same run on its own versioned URL
(`/predictions/NAME/VERSION`: TorchServe 0.12.0 does not route OIP's `/v2/models/NAME/versions/V/infer`),
or, for a rollback, the accuracy the version itself had when it last passed. The agreement (share of golden
digits on which both give the same label) is reported, not judged: a better model disagrees where the old
one was wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .client import classify_many
from .golden import GoldenSet, load_golden

DEFAULT_TOLERANCE = 0.005  # accuracy, absolute: 3.75 of the 750 golden requests
CONCURRENCY = 4


@dataclass(frozen=True)
class GateResult:
    candidate: str  # version
    reference: str  # version, or "recorded" for a rollback judged against its own earlier figure
    accuracy: float  # the candidate's, on the golden set
    reference_accuracy: float
    agreement: float | None  # share of equal labels, when the reference was measured in this run
    tolerance: float
    requests: int
    failed: int  # golden requests not answered 200

    @property
    def passed(self) -> bool:
        return self.failed == 0 and self.accuracy >= self.reference_accuracy - self.tolerance

    def summary(self) -> str:
        agreement = "" if self.agreement is None else f", agreement {self.agreement:.2%}"
        verdict = "PASSED" if self.passed else "FAILED"
        failed = f", {self.failed} of {self.requests} requests failed" if self.failed else ""
        return (
            f"gate {verdict}: {self.candidate} {self.accuracy:.2%} on {self.requests} golden digits against "
            f"{self.reference} {self.reference_accuracy:.2%} - {self.tolerance:.2%}{agreement}{failed}"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def golden_labels(url: str, model: str, version: str, token: str, golden: GoldenSet) -> tuple[np.ndarray, int]:
    """The labels `/predictions/MODEL/VERSION` gives the golden set (-1 where a request failed), and the
    number of failed requests."""
    answers = classify_many(golden.payloads, url, f"{model}/{version}", token, CONCURRENCY)
    labels = np.array([a.label if a.status == 200 and a.label is not None else -1 for a in answers], dtype=np.int64)
    return labels, int((labels < 0).sum())


def run_gate(
    url: str,
    token: str,
    model: str,
    candidate: str,
    reference: str | None,
    tolerance: float = DEFAULT_TOLERANCE,
    recorded_accuracy: float | None = None,
) -> GateResult:
    """Judges `candidate` against the live `reference` version, or against `recorded_accuracy` (rollback)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"--tolerance must be in [0, 1), got {tolerance}")
    golden = load_golden()
    truth = golden.labels
    labels, failed = golden_labels(url, model, candidate, token, golden)
    accuracy = float((labels == truth).mean())
    if reference is None:
        if recorded_accuracy is None:
            raise ValueError("the gate needs a reference version or a recorded accuracy")
        return GateResult(candidate, "recorded", accuracy, recorded_accuracy, None, tolerance, len(truth), failed)
    reference_labels, _ = golden_labels(url, model, reference, token, golden)
    reference_accuracy = float((reference_labels == truth).mean())
    agreement = float((labels == reference_labels).mean())
    return GateResult(candidate, reference, accuracy, reference_accuracy, agreement, tolerance, len(truth), failed)
