"""`digits train` and `digits models`: the training layer's commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import add_data_dir


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a registered model on MNIST",
        description="Train MODEL on MNIST; writes checkpoint.pt, metrics.json, history.png "
        "to OUT/MODEL/. Defaults per model: see `digits models`.",
    )
    p.add_argument("model", metavar="MODEL", help="a registered model (see `digits models`)")
    p.add_argument("--epochs", type=int, help="epochs (default: the model's, see `digits models`)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the model's)")
    p.add_argument("--lr", type=float, help="peak Adam learning rate of the one-cycle schedule (default 1e-3)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value (default: off)")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="output folder (default: artifacts/)")
    add_data_dir(p)
    p.add_argument("--limit", type=int, help="use only the first N training and test images (smoke runs)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same machine, same model")
    p.add_argument(
        "--weights",
        type=Path,
        help="resnet18 only: ImageNet state_dict file to start from; the backbone is frozen and only fc trains",
    )
    p.add_argument("--finetune", action="store_true", help="with --weights: train every layer, not only fc")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.out,
        data_dir=args.data_dir,
        limit=args.limit,
        device=args.device,
        seed=args.seed,
        grad_clip=args.grad_clip,
        weights=args.weights,
        finetune=args.finetune,
        quiet=args.quiet,
    )
    train(config)
    return 0


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models and their training defaults")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from .training.models import get_model, list_models

    print(f"{'model':10} {'epochs':>6} {'batch':>5} {'lr':>7}  description")
    for name in list_models():
        spec = get_model(name)
        print(f"{name:10} {spec.epochs:>6} {spec.batch_size:>5} {spec.lr:>7g}  {spec.description}")
    return 0


COMMANDS = [add_train, add_models]
