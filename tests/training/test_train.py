from __future__ import annotations

import json

import pytest
import torch
import torchvision
from digits.training.checkpoint import load_checkpoint, rebuild_model
from digits.training.constants import LABELS, MNIST_MEAN, MNIST_STD
from digits.training.devices import pick_device
from digits.training.models import list_models
from digits.training.train import TrainConfig, train

from digits.cli import main


def _train(tmp_path, model="mlp", **overrides):
    config = TrainConfig(
        model=model,
        out=tmp_path,
        limit=overrides.pop("limit", 1000),
        epochs=overrides.pop("epochs", 2),
        quiet=True,
        **overrides,
    )
    return train(config, log=lambda _: None)


@pytest.mark.parametrize("model", list_models())
def test_smoke_run_writes_three_files_and_the_loss_falls(tmp_path, model):
    result = _train(tmp_path, model, limit=512 if model == "resnet18" else 2000)
    out = tmp_path / model
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "metrics.json", "history.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [row["train_loss"] for row in metrics["history"]]
    assert losses[-1] < losses[0]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["epochs"] == 2
    assert {"test_loss", "train_seconds", "history"} <= metrics.keys()
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.metrics["test_accuracy"] == metrics["test_accuracy"]


def test_checkpoint_loads_with_weights_only_and_carries_the_metadata(tmp_path):
    _train(tmp_path, "cnn", epochs=1)
    raw = torch.load(tmp_path / "cnn" / "checkpoint.pt", weights_only=True)
    meta = raw["metadata"]
    assert (meta["mean"], meta["std"], meta["labels"]) == (MNIST_MEAN, MNIST_STD, LABELS)
    assert meta["model"] == "cnn" and meta["input_shape"] == [1, 28, 28]
    assert meta["model_args"] == {"channels1": 32, "channels2": 64, "hidden": 128}
    assert len(meta["data_sha256"]) == 64 and meta["torch_version"] == torch.__version__
    model = rebuild_model(load_checkpoint(tmp_path / "cnn" / "checkpoint.pt"))
    assert not model.training


def test_same_seed_gives_the_same_model(tmp_path):
    # on this machine: another CPU's kernels round differently, so no test compares models across machines
    _train(tmp_path / "a", seed=7)
    _train(tmp_path / "b", seed=7)
    _train(tmp_path / "c", seed=8)
    a, b, c = (torch.load(tmp_path / d / "mlp" / "checkpoint.pt", weights_only=True)["state_dict"] for d in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


def test_transfer_learning_trains_fc_only_unless_finetune(tmp_path):
    weights = tmp_path / "imagenet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # ImageNet-shaped, made here
    _train(tmp_path / "frozen", "resnet18", weights=weights, limit=256, epochs=1)
    _train(tmp_path / "tuned", "resnet18", weights=weights, finetune=True, limit=256, epochs=1)
    source = torch.load(weights, weights_only=True)
    frozen = torch.load(tmp_path / "frozen/resnet18/checkpoint.pt", weights_only=True)["state_dict"]
    tuned = torch.load(tmp_path / "tuned/resnet18/checkpoint.pt", weights_only=True)["state_dict"]
    assert torch.equal(frozen["layer3.0.conv1.weight"], source["layer3.0.conv1.weight"])
    assert not torch.equal(tuned["layer3.0.conv1.weight"], source["layer3.0.conv1.weight"])
    assert frozen["fc.weight"].shape == (10, 512)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "lenet"], "unknown model 'lenet'; known: cnn, mlp, resnet18"),
        (["train", "mlp", "--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["train", "mlp", "--limit", "-5"], "--limit must be a positive number of images, got -5"),
        (["train", "resnet18", "--weights", "/nonexistent/w.pt"], "weights file '/nonexistent/w.pt' does not exist"),
        (["train", "mlp", "--weights", "/nonexistent/w.pt"], "--weights is the resnet18 transfer-learning path"),
        (["train", "mlp", "--device", "cuda:7"], "--device cuda:7"),
        (["train", "mlp", "--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    if argv[-1].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_checkpoint_of_another_architecture_as_weights_is_refused(tmp_path, capsys):
    _train(tmp_path, "cnn", epochs=1, limit=200)
    argv = ["train", "resnet18", "--weights", str(tmp_path / "cnn" / "checkpoint.pt"), "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a ResNet-18 state_dict" in err and len(err.strip().splitlines()) == 1


def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda(tmp_path):
    result = _train(tmp_path, "cnn", epochs=1, device="cuda")
    assert result.metrics["device"].startswith("cuda")
