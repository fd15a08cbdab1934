"""The guide models and the registry that names them.

Every later step (export, archive, handler metadata) finds a model by its registry name and rebuilds it
from the config dataclass saved in the checkpoint, so nothing downstream guesses hyperparameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .constants import INPUT_SHAPE, NUM_CLASSES


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: how to build it and how to train it by default."""

    name: str
    description: str
    config_cls: type
    builder: Callable[[Any], nn.Module]
    epochs: int
    batch_size: int
    lr: float

    def build(self, **config_args: Any) -> nn.Module:
        """Builds the model from constructor arguments (as saved in a checkpoint)."""
        return self.builder(self.make_config(**config_args))

    def make_config(self, **config_args: Any) -> Any:
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(config_args) - known)
        if unknown:
            raise ValueError(
                f"model {self.name!r} does not take {', '.join(unknown)}; it takes {', '.join(sorted(known))}"
            )
        return self.config_cls(**config_args)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, *, description: str, config_cls: type, epochs: int, batch_size: int, lr: float = 1e-3
) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator that registers a builder `config -> nn.Module` under `name`."""

    def decorate(builder: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, description, config_cls, builder, epochs, batch_size, lr)
        return builder

    return decorate


def get_model(name: str) -> ModelSpec:
    """Returns the spec of a registered model; the error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


# --- mlp: the guide's SimpleNN -------------------------------------------------------------------


@dataclass(frozen=True)
class MLPConfig:
    hidden: int = 128
    dropout: float = 0.2


class SimpleNN(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        in_features = INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2]
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, config.hidden)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, 1, 28, 28) -> (N, 784) -> (N, 10) logits
        return self.fc2(self.dropout(self.relu(self.fc1(self.flatten(x)))))


@register_model(
    "mlp",
    description="the guide's SimpleNN: 784-128-10, ReLU, dropout 0.2",
    config_cls=MLPConfig,
    epochs=15,
    batch_size=64,
)
def build_mlp(config: MLPConfig) -> nn.Module:
    return SimpleNN(config)


# --- cnn: the guide's two-conv CNN ---------------------------------------------------------------


@dataclass(frozen=True)
class CNNConfig:
    channels1: int = 32
    channels2: int = 64
    hidden: int = 128


class CNN(nn.Module):
    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(INPUT_SHAPE[0], config.channels1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(config.channels1, config.channels2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        # two 2x2 pools take 28x28 to 7x7
        self.fc1 = nn.Linear(config.channels2 * 7 * 7, config.hidden)
        self.fc2 = nn.Linear(config.hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))  # (N, 32, 14, 14)
        x = self.pool(self.relu(self.conv2(x)))  # (N, 64, 7, 7)
        x = torch.flatten(x, 1)  # (N, 3136)
        return self.fc2(self.relu(self.fc1(x)))


@register_model(
    "cnn",
    description="the guide's CNN: conv 1-32, conv 32-64, max-pool after each, fc 3136-128-10",
    config_cls=CNNConfig,
    epochs=4,
    batch_size=64,
)
def build_cnn(config: CNNConfig) -> nn.Module:
    return CNN(config)


# --- resnet18: torchvision's ResNet-18, adapted to 1x28x28 -----------------------------------------


@dataclass(frozen=True)
class ResNetConfig:
    num_classes: int = NUM_CLASSES


def _grayscale_conv1(conv1: nn.Conv2d) -> nn.Conv2d:
    """Same 7x7 stride-2 stem conv, taking one channel instead of three."""
    return nn.Conv2d(
        INPUT_SHAPE[0],
        conv1.out_channels,
        kernel_size=conv1.kernel_size,
        stride=conv1.stride,
        padding=conv1.padding,
        bias=False,
    )


@register_model(
    "resnet18",
    description="torchvision ResNet-18 with a 1-channel stem (ImageNet-compatible)",
    config_cls=ResNetConfig,
    epochs=5,
    batch_size=128,
)
def build_resnet18(config: ResNetConfig) -> nn.Module:
    # Why this adaptation: only conv1's input channels change (3 -> 1). The 7x7 stride-2 stem and the
    # max-pool stay, so (a) ImageNet weights still fit every layer (conv1's RGB kernels are summed into
    # one grayscale kernel, exactly what feeding the digit replicated on R, G and B would compute) and
    # (b) the network works on 7x7 maps after the stem, which keeps a from-scratch epoch affordable on a
    # small CPU (`digits train resnet18` logs the time per epoch). A 3x3 stride-1 stem would keep 28x28 maps,
    # 16 times the positions for every later layer, for little more accuracy on digits this size.
    import torchvision

    model = torchvision.models.resnet18(num_classes=config.num_classes)
    model.conv1 = _grayscale_conv1(model.conv1)
    return model


def load_imagenet_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads a torchvision ImageNet ResNet-18 state_dict into the MNIST ResNet-18, except `fc`.

    conv1's (64, 3, 7, 7) kernel becomes (64, 1, 7, 7) by summing over RGB; `fc` (1000 classes) is
    dropped and keeps its fresh 10-class initialisation: the guide's "replace the head" step.
    """
    weights = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    conv1 = weights.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4 or conv1.shape[1] not in (1, 3):
        raise ValueError("weights file is not a ResNet-18 state_dict: no usable conv1.weight")
    if conv1.shape[1] == 3:
        weights["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(weights) if weights[k].shape != expected[k])
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights file is not a ResNet-18 state_dict: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {mismatched[:3]}"
        )
    model.load_state_dict(weights, strict=False)


def freeze_backbone(model: nn.Module) -> None:
    """Trains only `fc`: the guide's feature-extraction pattern."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("fc.")
