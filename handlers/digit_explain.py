"""Explanations: which pixels of the framed digit made the model answer as it did (Captum attributions).

One function at the heart, `attribute`: for N digits as the model saw them (the normalised model input, the
28x28 that the OIP `framed` output shows) and a class index per digit, an (N, H, W) float32 map of how much
each pixel added to the model's log-probability of that class. The methods and their settings are the
table `METHODS`; which formats can run which, `methods_for`; each format's default, `DEFAULT_METHODS`.

- `integrated-gradients` (Captum's IntegratedGradients): the path integral of the gradient from the
  background (every pixel at intensity 0, the framed digit's black) to the digit. Needs the model's
  gradients, which only a TorchScript file gives here: onnxruntime and AOTInductor packages run forward
  passes only. A background pixel gets exactly 0 (it does not differ from the baseline), and the map sums to
  the log-probability's change from the blank digit to this one (Captum's completeness).
- `feature-ablation` (Captum's FeatureAblation): each ink pixel of the digit set to the background in turn;
  its value is the drop in log-probability that causes. Forward passes only: every format runs it. Only the
  pixels that differ from the background are features (a background pixel set to the background changes
  nothing, and gets 0), so a digit costs one model row per ink pixel, not one per pixel.
- `occlusion` (Captum's Occlusion): a 4x4 window of background slid over the digit in steps of 2; each
  pixel gets the mean drop in log-probability of the windows that cover it. Forward passes only, a fixed
  169 windows a digit. Its map marks the regions the answer depends on, background beside a stroke included.

Batched: the perturbed (or interpolated) inputs of all the digits go through the model together, Captum
calls of up to `EVAL_ROWS` rows (its `perturbations_per_eval`, `internal_batch_size`), which the predictor
runs in its own chunks (`digit_model.in_chunks`), never one call per perturbation per digit. Digits go
through `GROUP_DIGITS` at a time, which bounds memory (feature ablation: `ABLATION_GROUP` digits of like ink
at a time). Captum is imported on the first explanation, so that a worker which only predicts never loads it.

Imported by bare name like the other handler modules; tests and benchmarks import it with `handlers/` on
sys.path and a predictor from `digit_model.load_predictor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from digit_model import Predictor, gradients_of

INTEGRATED_GRADIENTS = "integrated-gradients"
FEATURE_ABLATION = "feature-ablation"
OCCLUSION = "occlusion"
# Rows of one forward call Captum makes: the perturbations (or path steps) of many digits at once. The
# predictor splits them into its own chunks on the CPU; a GPU takes them whole.
EVAL_ROWS = 1024
# Integrated gradients keeps every activation of a call for its backward pass: fewer rows a call
GRADIENT_ROWS = 256
GROUP_DIGITS = 64  # digits attributed together; their perturbations make up the calls
# Feature ablation perturbs every digit of a group as often as its inkiest digit has ink pixels (a digit with
# fewer runs unchanged rows), so it takes digits in order of ink, in smaller groups of like digits
ABLATION_GROUP = 16


@dataclass(frozen=True)
class Method:
    """An attribution method, with the settings an answer reports."""

    name: str
    gradients: bool  # needs the model's gradients (a TorchScript file); else forward passes only
    settings: Mapping[str, int] = field(default_factory=dict)
    row_cost: int = 1  # model rows' worth of work per input row: a backward pass costs about two forward ones


# baseline: the intensity (0..255) that a removed pixel takes, or that the path starts from: the framed
# digit's background. The defaults and the choice of methods: docs/serving.md, "Explanations".
METHODS = MappingProxyType(
    {
        INTEGRATED_GRADIENTS: Method(
            INTEGRATED_GRADIENTS, gradients=True, settings=MappingProxyType({"baseline": 0, "steps": 32}), row_cost=3
        ),
        FEATURE_ABLATION: Method(FEATURE_ABLATION, gradients=False, settings=MappingProxyType({"baseline": 0})),
        OCCLUSION: Method(
            OCCLUSION, gradients=False, settings=MappingProxyType({"baseline": 0, "window": 4, "stride": 2})
        ),
    }
)
# Each format's default: the gradient method where the file gives gradients (integrated gradients, the
# cheapest per digit); else feature ablation, the most faithful of the forward-only methods in the deletion
# test (docs/serving.md, "Explanations")
DEFAULT_METHODS = MappingProxyType(
    {"torchscript": INTEGRATED_GRADIENTS, "onnx": FEATURE_ABLATION, "pt2": FEATURE_ABLATION}
)

# Called before each model call with the work about to run (model rows, backward passes weighted): raises to
# stop an explanation past its budget
Guard = Callable[[int], None]


def target_tensor(targets: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
    """The targets as a new int64 tensor: a copy, since the caller's may be read-only (a numpy view of a
    request's bytes), which torch warns about when it wraps one."""
    if isinstance(targets, torch.Tensor):
        return targets.to(torch.int64).clone()
    return torch.from_numpy(np.array(targets, dtype=np.int64))


def methods_for(predict: Predictor) -> tuple[str, ...]:
    """The methods this predictor can run: all of them with gradients, the forward-only ones without."""
    can_differentiate = gradients_of(predict) is not None
    return tuple(name for name, method in METHODS.items() if can_differentiate or not method.gradients)


def attribute(
    predict: Predictor,
    digits: torch.Tensor,
    targets: torch.Tensor | np.ndarray | list[int],
    method: str,
    settings: Mapping[str, int] | None = None,
    *,
    mean: float,
    std: float,
    guard: Guard | None = None,
) -> np.ndarray:
    """Attributions of each digit's target class, over the digit as the model saw it.

    Args:
        predict: the archive's predictor (`digit_model.load_predictor`); a gradient method needs one that
            has gradients (`methods_for`).
        digits: (N, 1, H, W) float32, normalised as the model takes them.
        targets: N class indices (into the model's labels), one per digit.
        method: a name in `METHODS`.
        settings: the method's settings; a setting left out takes the table's value.
        mean: the archive's normalisation (the metadata's `mean` and `std`), which turns the baseline
            intensity into a model input.
        guard: called with the work of each model call before it runs (`Guard`).

    Returns:
        (N, H, W) float32: each pixel's share of the target's log-probability.

    Raises:
        ValueError: an unknown method, a gradient method on a forward-only predictor, or targets that do
            not fit the digits.
    """
    spec = method_named(method)
    chosen = {**spec.settings, **(settings or {})}
    targets = target_tensor(targets)
    if targets.shape != (len(digits),):
        raise ValueError(f"{len(digits)} digits need {len(digits)} targets, got shape {tuple(targets.shape)}")
    forward = model_function(predict, spec, guard)
    background = input_value(chosen["baseline"], mean, std)
    maps = torch.zeros(digits.shape[0], *digits.shape[2:], dtype=torch.float32)
    for rows in groups(digits, spec.name, background):
        attributed = run_method(spec.name, forward, digits[rows], targets[rows], chosen, background)
        maps[rows] = attributed.detach().reshape(len(rows), *digits.shape[2:]).float().cpu()
    return maps.numpy()


def groups(digits: torch.Tensor, method: str, background: float) -> list[torch.Tensor]:
    """The digits' indices, group by group, as `attribute` runs them (and `work` counts them): in order,
    GROUP_DIGITS at a time; for feature ablation, in order of ink, ABLATION_GROUP at a time."""
    if method != FEATURE_ABLATION:
        return list(torch.arange(len(digits)).split(GROUP_DIGITS))
    order = torch.argsort(ink_counts(digits, background), stable=True)
    return list(order.split(ABLATION_GROUP))


def ink_counts(digits: torch.Tensor, background: float) -> torch.Tensor:
    """Each digit's pixels that differ from the background: its features for feature ablation."""
    return (digits != background).flatten(1).sum(1)


def work(
    digits: torch.Tensor, method: str, settings: Mapping[str, int] | None = None, *, mean: float, std: float
) -> int:
    """The work `attribute` will hand its guard for these digits, in all: model rows, backward passes
    weighted, known before any model call (feature ablation's depends on the ink of each group of digits)."""
    spec = method_named(method)
    chosen = {**spec.settings, **(settings or {})}
    background = input_value(chosen["baseline"], mean, std)
    height, width = digits.shape[2:]
    total = 0
    for rows in groups(digits, spec.name, background):
        if spec.name == INTEGRATED_GRADIENTS:
            evaluations = chosen["steps"]
        elif spec.name == FEATURE_ABLATION:
            # one row per ink pixel of the group's inkiest digit, one for the background, one unperturbed
            evaluations = int(ink_counts(digits[rows], background).max()) + 2
        else:
            window, stride = chosen["window"], chosen["stride"]
            evaluations = (1 + (height - window) // stride) * (1 + (width - window) // stride) + 1
        total += evaluations * len(rows) * spec.row_cost
    return total


def method_named(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; the methods are {', '.join(METHODS)}")
    return METHODS[method]


def model_function(predict: Predictor, method: Method, guard: Guard | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What Captum calls: the model's log-probabilities in float64 (any model's scores, logits or
    log-probabilities, become log-probabilities), after `guard` has passed the call's work."""
    run = predict
    if method.gradients:
        run = gradients_of(predict)
        if run is None:
            raise ValueError(f"{method.name} needs the model's gradients; this model file runs forward passes only")

    def forward(rows: torch.Tensor) -> torch.Tensor:
        if guard is not None:
            guard(len(rows) * method.row_cost)
        # in float64: for a digit the model is sure of, the target's float32 log-probability sits within an ulp
        # of 0 and one pixel's change vanishes; renormalised in float64 it becomes minus the others'
        # probability mass, which their well-resolved log-probabilities carry
        return torch.log_softmax(run(rows).double(), dim=1)

    return forward


def run_method(
    name: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    digits: torch.Tensor,
    targets: torch.Tensor,
    settings: Mapping[str, int],
    background: float,
) -> torch.Tensor:
    """One group of digits through Captum's implementation of the method."""
    import captum.attr as attr  # here, not at the top: a worker that only predicts never pays for it

    rows = max(1, EVAL_ROWS // len(digits))  # perturbations a call, so that a call holds about EVAL_ROWS rows
    if name == INTEGRATED_GRADIENTS:
        return attr.IntegratedGradients(forward).attribute(
            digits,
            baselines=background,
            target=targets,
            n_steps=settings["steps"],
            internal_batch_size=max(len(digits), GRADIENT_ROWS),
        )
    if name == OCCLUSION:
        window, stride = settings["window"], settings["stride"]
        return attr.Occlusion(forward).attribute(
            digits,
            sliding_window_shapes=(1, window, window),
            strides=(1, stride, stride),
            baselines=background,
            target=targets,
            perturbations_per_eval=rows,
        )
    inked = digits != background
    values = attr.FeatureAblation(forward).attribute(
        digits, baselines=background, target=targets, feature_mask=ink_features(inked), perturbations_per_eval=rows
    )
    # the background's one feature changes nothing; its value is 0 up to the kernels' rounding, made exact
    return values * inked


def ink_features(inked: torch.Tensor) -> torch.Tensor:
    """Feature ids for feature ablation, digit by digit: 1, 2, ... for the ink pixels in raster order, 0 for
    the whole background (the same ids in every digit are ablated in the same model call)."""
    flat = inked.flatten(1).long()
    return (flat.cumsum(1) * flat).reshape(inked.shape)


def input_value(intensity: float, mean: float, std: float) -> float:
    """The model input of a pixel of `intensity` (0..255), in float32 steps in the contract's order
    (`digit_contract.normalise`), so that a pixel at the baseline equals it to the bit."""
    value = np.float32(intensity) / np.float32(255.0)
    return float((value - np.float32(mean)) / np.float32(std))
