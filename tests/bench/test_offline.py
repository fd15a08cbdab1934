"""`digits bench offline` runs on a tiny configuration and writes valid reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from digits.cli import main

MLP_FLOPS = 2 * (784 * 128 + 128 * 10)  # two matmuls, a multiply and an add per weight


def test_offline_bench_writes_json_markdown_and_plot(int8_artifacts, tmp_path, capsys):
    out = tmp_path / "offline"
    args = ["bench", "offline", "mlp", "--artifacts", str(int8_artifacts), "--batch-sizes", "1,4"]
    assert main([*args, "--min-seconds", "0", "--out", str(out)]) == 0
    report = json.loads((out / "bench-offline.json").read_text())
    backends = {(r["backend"], r["batch_size"]) for r in report["results"]}
    assert backends == {(b, n) for b in ("eager", "torchscript", "onnxruntime", "onnxruntime-int8") for n in (1, 4)}
    assert report["flops_per_sample"] == MLP_FLOPS
    # start, after each of the 5 rounds at each of the 2 batch sizes, end
    assert report["peak_gflops"] == max(report["peak_measurements"]) > 0 and len(report["peak_measurements"]) == 12
    for r in report["results"]:
        assert r["samples_per_s"] > 0 and r["reps"] >= 10
        assert 0 < r["latency"]["p50_ms"] <= r["latency"]["p99_ms"]
        assert r["peak_share"] == r["gflops"] / report["peak_gflops"]
        assert r["paired_peak_share"] > 0
    assert "onnxruntime / eager at batch 4" in report["ratios"]
    assert "onnxruntime-int8 / onnxruntime at batch 4" in report["ratios"]
    markdown = (out / "bench-offline.md").read_text()
    assert "| backend | batch | samples/s |" in markdown and "onnxruntime-int8" in markdown
    assert (out / "bench-offline.png").read_bytes().startswith(b"\x89PNG")
    assert markdown in capsys.readouterr().out


def test_offline_bench_of_an_unexported_model_names_the_command(tmp_path, capsys):
    assert main(["bench", "offline", "cnn", "--artifacts", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "digits train cnn" in capsys.readouterr().err


def test_backends_take_turns_so_a_burst_of_load_lands_on_all_of_them():
    from digits.bench.offline import time_in_turns

    calls = []
    runners = {name: (lambda batch, name=name: calls.append(name)) for name in ("a", "b")}
    times = time_in_turns(runners, np.zeros((1, 1, 28, 28), np.float32), min_seconds=0, rounds=3)
    assert [[len(turn) for turn in turns] for turns in times.values()] == [[3, 3, 3]] * 2  # 10 // 3 calls a turn
    turns = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert turns == ["a", "b"] * 3  # a, b, a, b, a, b: each turn one backend's run of calls


def test_offline_bench_refuses_zero_rounds(tmp_path, capsys):
    assert main(["bench", "offline", "mlp", "--artifacts", str(tmp_path), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_the_paired_share_sets_each_round_against_its_own_peak():
    from digits.bench.offline import paired_share

    # two rounds of 1 ms batches of 10 samples with 1 MFLOP each: 10 GFLOP/s; peaks of 20 then 40 GFLOP/s
    assert paired_share(10, [[1.0], [1.0]], [20.0, 40.0], 1_000_000) == pytest.approx((0.5 + 0.25) / 2)
    # a slow round beside a slow peak counts as fully as a fast one beside a fast peak
    assert paired_share(10, [[2.0], [1.0], [1.0]], [5.0, 10.0, 10.0], 1_000_000) == pytest.approx(1.0)


def test_offline_bench_adds_the_pt2_package_when_exported(pt2_export, tmp_path):
    out = tmp_path / "offline"
    args = ["bench", "offline", "mlp", "--artifacts", str(pt2_export.model_dir.parent), "--batch-sizes", "4"]
    assert main([*args, "--min-seconds", "0", "--rounds", "1", "--out", str(out)]) == 0
    report = json.loads((out / "bench-offline.json").read_text())
    assert {r["backend"] for r in report["results"]} == {"eager", "torchscript", "onnxruntime", "aotinductor"}
    assert "aotinductor / onnxruntime at batch 4" in report["ratios"]
    assert "aotinductor" in (out / "bench-offline.md").read_text()


@pytest.fixture
def torch_threads_restored():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_sets_every_backend_onnxruntime_included(int8_artifacts, tmp_path, monkeypatch, torch_threads_restored):
    import onnxruntime
    import torch
    from digits.export import runners

    pools, real_session = [], onnxruntime.InferenceSession

    def session(path, options, **kwargs):  # the real session; records the pool it was given
        pools.append((options.intra_op_num_threads, options.inter_op_num_threads))
        return real_session(path, options, **kwargs)

    monkeypatch.setattr(runners.ort, "InferenceSession", session)
    out = tmp_path / "offline"
    args = ["bench", "offline", "mlp", "--artifacts", str(int8_artifacts), "--batch-sizes", "4", "--threads", "1"]
    assert main([*args, "--min-seconds", "0", "--rounds", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == 1
    assert pools == [(1, 1), (1, 1)]  # fp32 and int8 sessions, not onnxruntime's one-per-core default
    report = json.loads((out / "bench-offline.json").read_text())
    assert report["machine"]["torch_threads"] == 1
    assert "every backend on 1 intra-op thread(s)" in (out / "bench-offline.md").read_text()


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(["bench", "offline", "mlp", "--artifacts", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
