"""Trains one registered model on MNIST and writes checkpoint.pt, metrics.json and history.png."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from .. import contract
from .checkpoint import save_checkpoint
from .constants import INPUT_SHAPE, LABELS, LAYOUT, MNIST_MEAN, MNIST_STD
from .data import MnistData, load_mnist
from .devices import pick_device
from .models import freeze_backbone, get_model, load_imagenet_weights
from .plots import plot_history


@dataclass
class TrainConfig:
    """Everything that decides a training run. `None` fields take the model's registered default."""

    model: str
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    out: Path = Path("artifacts")
    data_dir: Path | None = None
    limit: int | None = None
    device: str = "auto"
    seed: int = 0
    grad_clip: float | None = None
    weights: Path | None = None
    finetune: bool = False
    quiet: bool = False

    def resolved(self) -> TrainConfig:
        """Fills defaults from the registry and validates; raises ValueError naming the bad value."""
        spec = get_model(self.model)
        defaults = {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr}
        filled = TrainConfig(**{**asdict(self), **{k: v for k, v in defaults.items() if getattr(self, k) is None}})
        _validate(filled)
        return filled


def _validate(config: TrainConfig) -> None:
    if config.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {config.epochs}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    if not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")
    if config.limit is not None and config.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {config.limit}")
    if config.grad_clip is not None and not config.grad_clip > 0:
        raise ValueError(f"--grad-clip must be positive, got {config.grad_clip}")
    if config.weights is not None and config.model != "resnet18":
        raise ValueError(f"--weights is the resnet18 transfer-learning path; {config.model!r} takes none")
    if config.finetune and config.weights is None:
        raise ValueError("--finetune unfreezes pretrained weights: give --weights FILE too")
    if config.weights is not None and not Path(config.weights).is_file():
        raise ValueError(f"weights file {str(config.weights)!r} does not exist")


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds every generator training draws from; on CUDA also pins cuDNN to deterministic kernels.

    Without the cuDNN switches, two runs with one seed on a GPU end apart after one epoch (cuDNN's autotuner
    and its atomics-based backward kernels); CPU runs on one machine are bit-identical either way. Another
    CPU rounds differently: the same seed there gives a slightly different model.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> (N, 1, 28, 28) float32, normalised with the MNIST statistics (the contract's formula)."""
    return torch.from_numpy(contract.normalise(images, MNIST_MEAN, MNIST_STD, INPUT_SHAPE))


def make_loaders(data: MnistData, config: TrainConfig, generator: torch.Generator) -> tuple[DataLoader, DataLoader]:
    n_train = min(config.limit or len(data.train_labels), len(data.train_labels))
    n_test = min(config.limit or len(data.test_labels), len(data.test_labels))
    train = TensorDataset(normalise(data.train_images[:n_train]), torch.from_numpy(data.train_labels[:n_train]))
    test = TensorDataset(normalise(data.test_images[:n_test]), torch.from_numpy(data.test_labels[:n_test]))
    return (
        DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=generator),
        DataLoader(test, batch_size=512),
    )


def build_model(config: TrainConfig) -> tuple[nn.Module, dict]:
    """The registered model, with ImageNet weights and a frozen backbone when --weights is given."""
    spec = get_model(config.model)
    model_args = asdict(spec.make_config())
    model = spec.build(**model_args)
    if config.weights is not None:
        state = torch.load(config.weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ValueError(f"weights file {str(config.weights)!r} holds no state_dict")
        try:
            load_imagenet_weights(model, state)
        except ValueError as err:
            raise ValueError(f"weights file {str(config.weights)!r}: {err}") from None
        if not config.finetune:
            freeze_backbone(model)
    return model, model_args


def train_one_epoch(model, loader, optimizer, scheduler, device, config: TrainConfig, desc: str) -> dict:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    show = not config.quiet and sys.stderr.isatty()
    bar = tqdm(loader, desc=desc, disable=not show, leave=False, unit="batch")
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = loss_fn(logits, labels)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += loss_fn(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"test_loss": total_loss / seen, "test_accuracy": correct / seen, "test_samples": seen}


def train(config: TrainConfig, log=print) -> TrainResult:
    """Runs one training job end to end. Raises ValueError / DataError for bad input."""
    config = config.resolved()
    device = pick_device(config.device)
    generator = seed_everything(config.seed)
    model, model_args = build_model(config)
    data = load_mnist(config.data_dir, log=log)
    train_loader, test_loader = make_loaders(data, config, generator)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    # one-cycle: warm up, then anneal to ~0 by the last step; gets the guide models to target in few epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(train_loader)
    )
    log(
        f"training {config.model} on {device} for {config.epochs} epoch(s), "
        f"{len(train_loader.dataset)} train / {len(test_loader.dataset)} test images"
    )
    history, start = [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row |= train_one_epoch(
            model,
            train_loader,
            optimizer,
            scheduler,
            device,
            config,
            desc=f"{config.model} epoch {epoch}/{config.epochs}",
        )
        row |= evaluate(model, test_loader, device)
        row["seconds"] = time.perf_counter() - epoch_start
        history.append(row)
        log(
            f"epoch {epoch}/{config.epochs}: train loss {row['train_loss']:.4f}, test loss "
            f"{row['test_loss']:.4f}, test accuracy {row['test_accuracy']:.2%} ({row['seconds']:.1f} s)"
        )
    return _write_outputs(config, model, model_args, data, history, time.perf_counter() - start, log)


def _write_outputs(config, model, model_args, data, history, seconds, log) -> TrainResult:
    out_dir = Path(config.out) / config.model
    out_dir.mkdir(parents=True, exist_ok=True)
    last = history[-1]
    metadata = {
        "model": config.model,
        "model_args": model_args,
        "input_shape": list(INPUT_SHAPE),
        "layout": LAYOUT,
        "mean": MNIST_MEAN,
        "std": MNIST_STD,
        "labels": list(LABELS),
        "test_accuracy": last["test_accuracy"],
        "test_samples": last["test_samples"],
        "epochs": config.epochs,
        "seed": config.seed,
        "torch_version": str(torch.__version__),  # a plain str: TorchVersion is no weights_only type
        "data_source": data.source,
        "data_sha256": data.sha256,
        "pretrained_weights": str(config.weights) if config.weights else None,
    }
    save_checkpoint(out_dir / contract.CHECKPOINT_FILE, model, metadata)
    metrics = {
        "model": config.model,
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "test_samples": last["test_samples"],
        "epochs": config.epochs,
        "train_seconds": seconds,
        "seconds_per_epoch": seconds / config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "device": str(next(model.parameters()).device),
        "history": history,
    }
    (out_dir / contract.METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    title = f"{config.model}: {last['test_accuracy']:.2%} test accuracy"
    plot_history(history, out_dir / contract.HISTORY_PLOT, title=title)
    log(
        f"wrote {out_dir}/checkpoint.pt, metrics.json, history.png "
        f"(test accuracy {last['test_accuracy']:.2%}, {seconds:.0f} s)"
    )
    return TrainResult(out_dir, metrics)
