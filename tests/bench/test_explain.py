"""`digits bench explain`: the deletion test and the formats' agreement, through the handler's own engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from digits.bench.explain import (
    Deleter,
    ExplainReport,
    handler_modules,
    mnist_digits,
    probabilities_of,
    spearman_per_digit,
)
from digits.bench.offline import load_eager
from digits.bench.report import explain_markdown

from digits.cli import main

DIGITS = 40


@pytest.fixture(scope="module")
def mlp(int8_artifacts):
    """The suite's mlp (TorchScript, ONNX, int8): its checkpoint metadata and its ONNX predictor, loaded by the
    handler's loader."""
    digit_model, _ = handler_modules()
    _, meta = load_eager(int8_artifacts / "mlp", "mlp")
    return meta, digit_model.load_predictor(int8_artifacts / "mlp" / "model.onnx", torch.device("cpu"))


@pytest.fixture(scope="module")
def deleter(mlp) -> Deleter:
    return Deleter(*mnist_digits(DIGITS, None), mlp[0], seed=0)


def test_explain_bench_writes_json_markdown_and_plot(int8_artifacts, tmp_path, capsys):
    out = tmp_path / "explain"
    args = ["bench", "explain", "mlp", "--artifacts", str(int8_artifacts), "--digits", str(DIGITS), "--threads", "1"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "bench-explain.json").read_text())
    assert report["kind"] == "explain" and report["digits"] == DIGITS
    rows = {(r["source"], r["method"], r["explained"]) for r in report["deletions"]}
    _, engine = handler_modules()
    expected = {("torchscript", m, "predicted") for m in engine.METHODS}
    expected |= {
        (fmt, m, "predicted") for fmt in ("onnx", "onnx-int8") for m in engine.METHODS if m != "integrated-gradients"
    }
    assert {row for row in rows if row[0] != "stock TorchServe example"} == expected
    assert {explained for source, _, explained in rows if source == "stock TorchServe example"} == {
        "class 0",
        "predicted",
    }
    assert report["defaults"] == {fmt: engine.DEFAULT_METHODS[fmt.removesuffix("-int8")] for fmt in report["defaults"]}
    for row in report["deletions"]:
        assert set(row["win_share"]) == {"5", "10", "20"} and all(0 <= v <= 1 for v in row["win_share"].values())
        assert row["meets_target"] == (row["win_share"]["10"] >= 0.9)
    pairs = {(a["method"], a["first"], a["second"]) for a in report["agreements"]}
    assert ("feature-ablation", "torchscript", "onnx") in pairs and ("occlusion", "onnx", "onnx-int8") in pairs
    markdown = (out / "bench-explain.md").read_text()
    assert "| format | method | explained class | wins at k=5 |" in markdown and "Spearman" in markdown
    assert (out / "bench-explain.png").read_bytes().startswith(b"\x89PNG")
    assert markdown in capsys.readouterr().out
    # digits bench report renders the run from its JSON alone: the same table, and the curves as a plot
    assert explain_markdown(ExplainReport.from_dict(report)) == markdown
    performance = tmp_path / "docs" / "performance.md"
    args = ["bench", "report", "--runs", str(tmp_path), "--artifacts", str(int8_artifacts), "--out", str(performance)]
    assert main(args) == 0
    text = performance.read_text()
    assert "## Explanations, faithfulness: mlp (`explain`)" in text and markdown.splitlines()[-1] in text
    assert (tmp_path / "docs" / "performance" / "explain.png").read_bytes().startswith(b"\x89PNG")


def test_the_deletion_test_tells_a_faithful_map_from_a_reversed_one(mlp, deleter):
    """The test can fail: the same map turned upside down (the least helpful pixels first) must lose."""
    meta, predict = mlp
    _, engine = handler_modules()
    score = probabilities_of(predict)
    targets = score(deleter.inputs).argmax(1)
    attributions = engine.attribute(
        predict, deleter.inputs, targets, "feature-ablation", mean=meta["mean"], std=meta["std"]
    )
    faithful = deleter.test("onnx", "feature-ablation", True, "predicted", attributions, score, targets, 0.0)
    reversed_ = deleter.test("onnx", "reversed", False, "predicted", -attributions, score, targets, 0.0)
    assert faithful.win_share[10] >= 0.8 and faithful.mean_drop[10] > 2 * faithful.mean_random_drop[10]
    assert reversed_.win_share[10] <= 0.3 and reversed_.mean_drop[10] < reversed_.mean_random_drop[10]


def test_random_deletions_take_k_percent_of_each_digits_ink_the_same_way_every_run(mlp, deleter):
    again = Deleter(*mnist_digits(DIGITS, None), mlp[0], seed=0)
    other_seed = Deleter(*mnist_digits(DIGITS, None), mlp[0], seed=1)
    for k in (5, 10, 20):
        picks = deleter.random(k)
        for pixels, ink, count in zip(picks, deleter.ink, deleter.counts(k), strict=True):
            assert count == max(1, round(k / 100 * len(ink))) and len(pixels) == count == len(set(pixels))
            assert set(pixels) <= set(ink)
        assert all(np.array_equal(a, b) for a, b in zip(picks, again.random(k), strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(picks, other_seed.random(k), strict=True))


def test_deleted_pixels_become_the_background_the_model_sees(deleter):
    pixels = deleter.random(10)
    deleted = deleter.deleted(pixels).reshape(DIGITS, -1)
    original = deleter.inputs.reshape(DIGITS, -1)
    for row, before, chosen in zip(deleted, original, pixels, strict=True):
        changed = np.flatnonzero((row != before).numpy())
        assert set(changed) == set(chosen)  # every chosen pixel was ink, and only they changed
        assert torch.all(row[chosen] == deleter.background)
    assert deleter.background == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-6)


def test_spearman_agreement_ignores_the_background_both_maps_leave_at_zero():
    base = np.zeros((3, 28, 28), np.float32)
    base[:, 10, 5:15] = np.arange(1, 11)
    same, reversed_, scaled = base[0:1], -base[1:2], 3 * base[2:3] + 0
    assert spearman_per_digit(base[0:1], same)[0] == pytest.approx(1.0)
    assert spearman_per_digit(base[1:2], reversed_)[0] == pytest.approx(-1.0)
    assert spearman_per_digit(base[2:3], scaled)[0] == pytest.approx(1.0)
    assert np.isnan(spearman_per_digit(np.zeros((1, 28, 28)), np.zeros((1, 28, 28)))[0])


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [("--formats", "onnx,tensorrt", "tensorrt"), ("--methods", "lime", "lime"), ("--digits", "0", "--digits")],
)
def test_explain_bench_refuses_an_unknown_choice_naming_the_known_ones(
    int8_artifacts, tmp_path, capsys, flag, value, named
):
    args = ["bench", "explain", "mlp", "--artifacts", str(int8_artifacts), flag, value, "--out", str(tmp_path)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert named in error
    if flag != "--digits":
        assert "known:" in error


def test_explain_bench_names_the_export_a_missing_format_needs(int8_artifacts, tmp_path, capsys):
    args = ["bench", "explain", "mlp", "--artifacts", str(int8_artifacts), "--formats", "pt2", "--digits", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "--pt2" in capsys.readouterr().err


def test_the_bench_runs_the_handlers_files_not_a_copy():
    from digits.handlers import handler_dir

    digit_model, digit_explain = handler_modules()
    assert Path(digit_explain.__file__).parent == Path(digit_model.__file__).parent == handler_dir()
