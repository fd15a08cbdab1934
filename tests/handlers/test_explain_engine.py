"""The explanation engine (handlers/digit_explain.py) on each format's real predictor: shapes, what each
method promises, batching into few model calls, the guard, and the methods each format can run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from digit_explain import (
    ABLATION_GROUP,
    DEFAULT_METHODS,
    EVAL_ROWS,
    FEATURE_ABLATION,
    GRADIENT_ROWS,
    GROUP_DIGITS,
    INTEGRATED_GRADIENTS,
    METHODS,
    OCCLUSION,
    attribute,
    methods_for,
    work,
)
from digit_model import CPU_CHUNK_ROWS, gradients_of, in_chunks
from handler_helpers import MEAN, STD

FORMATS = ("torchscript", "onnx", "pt2")


def normalised(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((images.astype(np.float32) / 255 - MEAN) / STD).reshape(len(images), 1, 28, 28)


@pytest.fixture(scope="module")
def digits(mnist_test) -> tuple[np.ndarray, torch.Tensor]:
    images = mnist_test[0][:6]
    return images, normalised(images)


def explain(predict, x, targets, method, **kwargs):
    return attribute(predict, x, targets, method, mean=MEAN, std=STD, **kwargs)


def test_methods_each_format_can_run(handlers_by_format):
    """Gradients only where the file gives them; each format's default among its methods."""
    assert methods_for(handlers_by_format["torchscript"].model) == (INTEGRATED_GRADIENTS, FEATURE_ABLATION, OCCLUSION)
    for fmt in ("onnx", "pt2"):
        assert methods_for(handlers_by_format[fmt].model) == (FEATURE_ABLATION, OCCLUSION)
    for fmt in FORMATS:
        assert DEFAULT_METHODS[fmt] in methods_for(handlers_by_format[fmt].model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_method_of_every_format_maps_each_digit(fmt, handlers_by_format, digits):
    images, x = digits
    predict = handlers_by_format[fmt].model
    for method in methods_for(predict):
        maps = explain(predict, x, [3, 1, 4, 1, 5, 9], method)
        assert maps.shape == (6, 28, 28) and maps.dtype == np.float32, method
        assert np.isfinite(maps).all() and np.abs(maps).sum(axis=(1, 2)).min() > 0, method


def test_integrated_gradients_is_complete_and_leaves_the_background_at_zero(handlers_by_format, digits):
    """Captum's completeness: the map sums to the log-probability's change from the blank digit; a pixel at
    the baseline intensity differs from nothing, so it gets nothing."""
    images, x = digits
    predict = handlers_by_format["torchscript"].model
    targets = predict(x).argmax(1)
    maps = explain(predict, x, targets, INTEGRATED_GRADIENTS)
    blank = torch.full_like(x, -MEAN / STD)
    rows = torch.arange(len(x))
    change = (torch.log_softmax(predict(x), 1) - torch.log_softmax(predict(blank), 1))[rows, targets].numpy()
    # the Riemann sum of 32 steps approximates the integral; a margin far above float32's noise
    assert np.allclose(maps.sum(axis=(1, 2)), change, atol=0.05 * np.abs(change).max() + 1e-3)
    assert (maps[images == 0] == 0).all()


def test_feature_ablation_is_each_ink_pixels_own_effect(handlers_by_format, digits):
    """A pixel's value is the drop in log-probability when that pixel alone turns background; the background
    gets exactly 0 (it costs no model rows)."""
    images, x = digits
    predict = handlers_by_format["onnx"].model
    maps = explain(predict, x[:1], [4], FEATURE_ABLATION)
    assert (maps[0][images[0] == 0] == 0).all()
    background = torch.tensor(-MEAN / STD).float()
    for row, column in np.argwhere(images[0] > 0)[::17]:
        without = x[:1].clone()
        without[0, 0, row, column] = background
        drop = torch.log_softmax(predict(torch.cat([x[:1], without])), 1)[:, 4]
        assert math.isclose(maps[0, row, column], float(drop[0] - drop[1]), rel_tol=1e-3, abs_tol=1e-5)


@pytest.mark.parametrize("method", [FEATURE_ABLATION, OCCLUSION, INTEGRATED_GRADIENTS])
def test_a_digit_gets_its_map_whatever_its_batch(method, handlers_by_format, digits):
    """Alone or among others, first or last: the same map (shapley-sampling's orders come from a fixed seed)."""
    images, x = digits
    predict = handlers_by_format["torchscript"].model
    together = explain(predict, x, [7] * 6, method)
    alone = explain(predict, x[5:], [7], method)
    again = explain(predict, x[5:], [7], method)
    assert np.allclose(together[5], alone[0], rtol=1e-4, atol=1e-6)
    assert np.array_equal(alone, again)


@pytest.mark.parametrize("method", [FEATURE_ABLATION, OCCLUSION])
def test_formats_agree_on_forward_only_methods(method, handlers_by_format, digits):
    """The same model in three files: the same maps, to the parity the export proves on the scores."""
    _, x = digits
    maps = {fmt: explain(handlers_by_format[fmt].model, x, [2] * 6, method) for fmt in FORMATS}
    scale = np.abs(maps["torchscript"]).max()
    for fmt in ("onnx", "pt2"):
        assert np.allclose(maps[fmt], maps["torchscript"], atol=1e-3 * scale), fmt


def test_the_chosen_target_is_the_one_explained(handlers_by_format, digits):
    _, x = digits
    predict = handlers_by_format["onnx"].model
    for_three = explain(predict, x[:1], [3], OCCLUSION)
    for_eight = explain(predict, x[:1], [8], OCCLUSION)
    assert not np.allclose(for_three, for_eight)
    both = explain(predict, torch.cat([x[:1], x[:1]]), [3, 8], OCCLUSION)
    assert np.allclose(both, np.concatenate([for_three, for_eight]), rtol=1e-4, atol=1e-6)


def counting(predict):
    """The real runtime of `predict` behind in_chunks, counting the calls it gets and their rows."""
    calls: list[int] = []
    runtime = predict

    def counted(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return runtime(images)

    return in_chunks(counted, CPU_CHUNK_ROWS), calls


@pytest.mark.parametrize("method", [OCCLUSION, FEATURE_ABLATION])
@pytest.mark.parametrize("count", [1, 7, 64, 70])
def test_perturbations_of_all_digits_share_model_calls(method, count, handlers_by_format, mnist_test):
    """F perturbations of each of N digits (occlusion's 169 windows; feature ablation's ink pixels of the
    inkiest digit, plus the background): 1 + ceil(F / P) Captum calls a group, each of P perturbations of every
    digit of the group (P = EVAL_ROWS // N), run in chunks of CPU_CHUNK_ROWS rows; not F + 1 calls per digit."""
    images = mnist_test[0][:count]
    x = normalised(images)
    predict, runtime_calls = counting(handlers_by_format["onnx"].model)
    captum_calls: list[int] = []
    explain(predict, x, [1] * count, method, guard=captum_calls.append)
    ink = (images > 0).reshape(count, -1).sum(1)
    if method == OCCLUSION:
        sizes, features = [len(g) for g in np.array_split(ink, range(GROUP_DIGITS, count, GROUP_DIGITS))], None
    else:  # in order of ink, ABLATION_GROUP like digits at a time
        ordered = np.sort(ink, kind="stable")
        chunks = np.array_split(ordered, range(ABLATION_GROUP, count, ABLATION_GROUP))
        sizes, features = [len(g) for g in chunks], [int(g.max()) + 1 for g in chunks]
    expected_captum = sum(
        1 + math.ceil((169 if features is None else features[i]) / max(1, EVAL_ROWS // size))
        for i, size in enumerate(sizes)
    )
    assert len(captum_calls) == expected_captum
    assert sum(captum_calls) == sum(runtime_calls) == work(x, method, mean=MEAN, std=STD)
    assert max(runtime_calls) <= CPU_CHUNK_ROWS
    assert len(runtime_calls) == sum(math.ceil(rows / CPU_CHUNK_ROWS) for rows in captum_calls)


def test_feature_ablation_groups_digits_of_like_ink(handlers_by_format, mnist_test):
    """64 digits of unequal ink: in groups of like ink, the model runs far fewer rows than 64 times the
    inkiest digit's ink, and each digit's map is the one it gets alone."""
    images = mnist_test[0][:64]
    x = normalised(images)
    predict = handlers_by_format["onnx"].model
    ink = (images > 0).reshape(64, -1).sum(1)
    assert work(x, FEATURE_ABLATION, mean=MEAN, std=STD) < 0.75 * 64 * (ink.max() + 2)
    maps = explain(predict, x, [3] * 64, FEATURE_ABLATION)
    for index in (int(ink.argmin()), int(ink.argmax()), 17):
        alone = explain(predict, x[index : index + 1], [3], FEATURE_ABLATION)[0]
        assert np.allclose(maps[index], alone, rtol=1e-4, atol=1e-7), index


def test_integrated_gradients_steps_share_model_calls(handlers_by_format, mnist_test):
    """32 steps of 64 digits: 8 calls of 256 rows (GRADIENT_ROWS), each with its backward pass."""
    x = normalised(mnist_test[0][:64])
    captum_calls: list[int] = []
    explain(handlers_by_format["torchscript"].model, x, [1] * 64, INTEGRATED_GRADIENTS, guard=captum_calls.append)
    row_cost = METHODS[INTEGRATED_GRADIENTS].row_cost
    assert captum_calls == [GRADIENT_ROWS * row_cost] * (64 * 32 // GRADIENT_ROWS)


@pytest.mark.parametrize("count", [2, 70])
def test_work_is_known_before_the_model_runs(count, handlers_by_format, mnist_test):
    """`work` foretells what the guard sees, for every method, over groups of unequal ink."""
    x = normalised(mnist_test[0][:count])
    for method in METHODS:
        seen: list[int] = []
        explain(handlers_by_format["torchscript"].model, x, [0] * count, method, guard=seen.append)
        assert sum(seen) == work(x, method, mean=MEAN, std=STD), method


def test_a_guard_stops_the_explanation_before_the_model_runs(handlers_by_format, digits):
    _, x = digits
    predict, runtime_calls = counting(handlers_by_format["onnx"].model)

    def refuse(work: int) -> None:
        raise TimeoutError(f"no budget for {work}")

    with pytest.raises(TimeoutError):
        explain(predict, x, [0] * 6, FEATURE_ABLATION, guard=refuse)
    assert runtime_calls == []


def test_refusals_name_the_problem(handlers_by_format, digits):
    _, x = digits
    with pytest.raises(ValueError, match="unknown method 'lime'; the methods are integrated-gradients"):
        explain(handlers_by_format["onnx"].model, x, [0] * 6, "lime")
    with pytest.raises(ValueError, match="needs the model's gradients"):
        explain(handlers_by_format["pt2"].model, x, [0] * 6, INTEGRATED_GRADIENTS)
    with pytest.raises(ValueError, match="6 digits need 6 targets"):
        explain(handlers_by_format["onnx"].model, x, [0], OCCLUSION)


def test_predictions_keep_inference_mode(handlers_by_format, digits):
    """The prediction path builds no autograd graph; only the differentiable twin does."""
    _, x = digits
    predict = handlers_by_format["torchscript"].model
    assert not predict(x.requires_grad_()).requires_grad
    assert gradients_of(predict)(x.detach().requires_grad_()).requires_grad
    assert gradients_of(handlers_by_format["onnx"].model) is None


def test_a_digit_the_model_is_sure_of_still_gets_a_map(tiny_model, digits):
    """With weights scaled up, the model's float32 log-probability of its label rounds to 0 and single pixels
    cannot move it; renormalised in float64 the map still ranks the ink (every method)."""
    import copy

    images, x = digits
    sure = copy.deepcopy(tiny_model)
    with torch.no_grad():
        sure.fc.weight *= 250  # the label's logit some 25 above the others': their mass about 1e-11
        sure.fc.bias *= 250

    def predict(rows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return sure(rows)

    scores = predict(x[:1])
    label = int(scores.argmax())
    assert scores[0, label] == 0 and scores[0].exp().sum() == 1  # in float32, exactly sure
    for method in (FEATURE_ABLATION, OCCLUSION):
        maps = explain(predict, x[:1], [label], method)
        # float32 rounding blanked every pixel (0 or one ulp); in float64 most ink pixels score. Where the
        # kernels round the logits decides a few pixels more or less (104-116 of 116 on AVX2 and AVX-512): a
        # margin, not a machine's count
        assert np.count_nonzero(maps[0][images[0] > 0]) > 0.5 * np.count_nonzero(images[0]), method


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_predictor_explains_as_the_cpu_one(model_dirs, handlers_by_format, digits):
    """TorchScript on the GPU (gradients there, Captum's inputs on the CPU): the CPU's maps, to float32
    kernel differences."""
    from digit_model import keep_fp32_exact, load_predictor

    keep_fp32_exact()
    _, x = digits
    path = model_dirs["torchscript"] / "model.pt"
    on_gpu = load_predictor(path, torch.device("cuda:0"))
    for method in (INTEGRATED_GRADIENTS, FEATURE_ABLATION, OCCLUSION):
        cpu = explain(handlers_by_format["torchscript"].model, x, [1] * 6, method)
        gpu = explain(on_gpu, x, [1] * 6, method)
        assert np.allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max()), method
