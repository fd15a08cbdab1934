"""The one parity check: do the exported files compute what the eager model computes?

Used by `digits export`, `digits verify` and the tests alike; the tolerances live here and nowhere else.
An element passes when |value - eager| <= atol + rtol * |eager| (numpy's `allclose` rule); a check also
needs the predicted class (argmax) to agree with eager on every sample.

A quantised file cannot meet logit tolerances by design, so it is judged on predictions instead
(`check_prediction_parity`): argmax agreement with eager and accuracy close to eager's, over the test set.

The runners it compares live in `export.runners`, the reports it returns in `export.reports`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .reports import ParityCheck, ParityReport, PredictionParity
from .runners import Backend, Runner

ATOL = 1e-5
RTOL = 1e-4
# 1 and 2 catch a batch size baked in at export (the example batch is 2); 17 is odd and not a power of two;
# 256 is a serving-sized batch
BATCH_SIZES = (1, 2, 17, 256)
FULL_SET_BATCH = 1000  # chunk size for the whole-test-set pass; bounds memory for resnet18
# int8 against eager, over the test digits: predictions that change, and accuracy that moves either way
INT8_MIN_AGREEMENT = 0.995
INT8_MAX_ACCURACY_DIFF = 0.002  # 0.2 percentage points


def check_prediction_parity(
    reference: Runner, backend: Backend, images: np.ndarray, labels: np.ndarray, *, model: str = ""
) -> PredictionParity:
    """A quantised backend against eager on predictions, over all `images` (normalised, as for check_parity)."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images, and some: got {len(images)} images, {len(labels)} labels")
    expected = _run_chunked(reference, images).argmax(1)
    actual = _run_chunked(backend.run, images).argmax(1)
    result = PredictionParity(
        model=model,
        backend=backend.label,
        samples=len(images),
        argmax_agreement=float(np.mean(actual == expected)),
        accuracy=float(np.mean(actual == labels)),
        reference_accuracy=float(np.mean(expected == labels)),
        min_agreement=INT8_MIN_AGREEMENT,
        max_accuracy_diff=INT8_MAX_ACCURACY_DIFF,
    )
    result.failure = _prediction_failure(result)
    return result


def _prediction_failure(result: PredictionParity) -> str | None:
    problems = []
    if result.argmax_agreement < result.min_agreement:
        changed = round((1 - result.argmax_agreement) * result.samples)
        problems.append(
            f"argmax agreement {result.argmax_agreement:.4f} < {result.min_agreement} ({changed} predictions changed)"
        )
    diff = result.accuracy - result.reference_accuracy
    if abs(diff) > result.max_accuracy_diff + 1e-12:  # the margin absorbs float error at exactly 0.2 points
        problems.append(
            f"accuracy {result.accuracy:.2%} is {diff * 100:+.2f} points from eager's {result.reference_accuracy:.2%}"
        )
    return f"{result.backend}: " + "; ".join(problems) if problems else None


def check_parity(
    reference: Runner,
    backends: Sequence[Backend],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    model: str = "",
    atol: float = ATOL,
    rtol: float = RTOL,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> ParityReport:
    """Compares every backend with the eager reference, per batch size and over all `images`.

    Args:
        reference: the eager model as a runner (see `eager_runner`).
        images: (N, 1, 28, 28) float32, normalised; N >= max(batch_sizes). Real test digits, not noise:
            argmax agreement and accuracy mean something only on real data.
        labels: (N,) int true classes, for accuracy.
    """
    _check_arguments(images, labels, atol, rtol, batch_sizes)
    full_reference = _run_chunked(reference, images)
    checks = []
    for backend in backends:
        for n in batch_sizes:
            checks.append(_check_batch(backend, reference(images[:n]), images[:n], labels[:n], n, atol, rtol))
        checks.append(_check_full_set(backend, full_reference, images, labels, atol, rtol))
    accuracy = float(np.mean(full_reference.argmax(1) == labels))
    return ParityReport(model, atol, rtol, len(images), accuracy, checks)


def check_tolerances(atol: float, rtol: float) -> None:
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"tolerances must be non-negative, got atol={atol}, rtol={rtol}")


def _check_arguments(images: np.ndarray, labels: np.ndarray, atol: float, rtol: float, batch_sizes) -> None:
    check_tolerances(atol, rtol)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) < max(batch_sizes):
        raise ValueError(f"parity at batch size {max(batch_sizes)} needs that many images, got {len(images)}")


def _check_batch(backend: Backend, expected, images, labels, n: int, atol: float, rtol: float) -> ParityCheck:
    try:
        actual = backend.run(images)
    # any error from the runtime (a baked-in batch size, a bad graph) is this check's result, not a crash
    except Exception as err:
        return _errored(backend, n, len(images), err)
    return compare(backend, expected, actual, labels, n, atol, rtol)


def _check_full_set(backend: Backend, expected, images, labels, atol: float, rtol: float) -> ParityCheck:
    try:
        actual = _run_chunked(backend.run, images)
    except Exception as err:  # as in _check_batch
        return _errored(backend, FULL_SET_BATCH, len(images), err)
    return compare(backend, expected, actual, labels, min(FULL_SET_BATCH, len(images)), atol, rtol)


def _run_chunked(run: Runner, images: np.ndarray) -> np.ndarray:
    return np.concatenate([run(images[i : i + FULL_SET_BATCH]) for i in range(0, len(images), FULL_SET_BATCH)])


def compare(
    backend: Backend,
    expected: np.ndarray,
    actual: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    atol: float,
    rtol: float,
) -> ParityCheck:
    """One check from eager logits `expected` and the backend's `actual`, both (N, classes)."""
    if actual.shape != expected.shape:
        error = ValueError(f"logits of shape {actual.shape}, eager {expected.shape}")
        return _errored(backend, batch_size, len(expected), error)
    if not np.isfinite(actual).all():
        return _errored(backend, batch_size, len(expected), ValueError("non-finite logits (NaN or inf)"))
    expected, actual = expected.astype(np.float64), actual.astype(np.float64)  # exact differences
    diff = np.abs(actual - expected)
    allowed = atol + rtol * np.abs(expected)
    excess = diff / np.maximum(allowed, np.finfo(np.float64).tiny)  # > 1 outside the tolerance
    worst = np.unravel_index(int(np.argmax(excess)), diff.shape)
    disagree = np.flatnonzero(actual.argmax(1) != expected.argmax(1))
    check = ParityCheck(
        backend=backend.name,
        ort_optimization=backend.ort_optimization,
        batch_size=batch_size,
        samples=len(expected),
        max_abs_diff=float(diff.max()),
        max_rel_diff=float((diff / np.maximum(np.abs(expected), _relative_floor(atol, rtol))).max()),
        mean_abs_diff=float(diff.mean()),
        tolerance_used=float(excess.max()),
        argmax_agreement=1.0 - len(disagree) / len(expected),
        accuracy=float(np.mean(actual.argmax(1) == labels)),
        passed=bool(excess.max() <= 1.0) and len(disagree) == 0,
        worst_index=[int(i) for i in worst],
        worst_reference=float(expected[worst]),
        worst_value=float(actual[worst]),
    )
    if not check.passed:
        check.failure = _failure_message(backend, check, float(allowed[worst]), disagree)
    return check


def _relative_floor(atol: float, rtol: float) -> float:
    # Below |eager| = atol / rtol the absolute term dominates the tolerance, so the relative difference of a
    # near-zero logit says nothing about passing; measuring it there would only make the column look alarming.
    return max(atol / rtol if rtol > 0 else atol, 1e-12)


def _failure_message(backend: Backend, check: ParityCheck, allowed: float, disagree: np.ndarray) -> str:
    """Where it failed: the backend, the batch size, the worst element and/or the changed predictions."""
    i, j = check.worst_index
    problems = []
    if abs(check.worst_value - check.worst_reference) > allowed:
        problems.append(
            f"logits[{i}, {j}] = {check.worst_value:.7g}, eager {check.worst_reference:.7g} "
            f"(|diff| {abs(check.worst_value - check.worst_reference):.3g}, allowed {allowed:.3g})"
        )
    if len(disagree):
        problems.append(f"argmax differs on {len(disagree)} of {check.samples} samples (first: sample {disagree[0]})")
    return f"{backend.label} at batch size {check.batch_size} ({check.samples} samples): " + "; ".join(problems)


def _errored(backend: Backend, batch_size: int, samples: int, err: BaseException) -> ParityCheck:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ParityCheck(
        backend=backend.name,
        ort_optimization=backend.ort_optimization,
        batch_size=batch_size,
        samples=samples,
        max_abs_diff=None,
        max_rel_diff=None,
        mean_abs_diff=None,
        tolerance_used=None,
        argmax_agreement=0.0,
        accuracy=0.0,
        passed=False,
        failure=f"{backend.label} at batch size {batch_size} ({samples} samples): {type(err).__name__}: {reason}",
    )
