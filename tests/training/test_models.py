from __future__ import annotations

import pytest
import torch
import torchvision
from digits.training.constants import INPUT_SHAPE, NUM_CLASSES
from digits.training.models import freeze_backbone, get_model, list_models, load_imagenet_weights

# Every registered model must appear here (the guard below fails otherwise): parameter counts pin
# the architectures the guide describes.
EXPECTED_PARAMETERS = {
    "mlp": 784 * 128 + 128 + 128 * 10 + 10,
    "cnn": (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (3136 * 128 + 128) + (128 * 10 + 10),
    "resnet18": 11_181_642 - 2 * 64 * 49,  # torchvision's 10-class ResNet-18, 1-channel conv1
}


def test_every_registered_model_has_tests():
    assert sorted(EXPECTED_PARAMETERS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_matches_the_guide(name):
    model = get_model(name).build()
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMETERS[name]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(name, batch):
    model = get_model(name).build().eval()
    with torch.no_grad():
        logits = model(torch.randn(batch, *INPUT_SHAPE))
    assert logits.shape == (batch, NUM_CLASSES)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'lenet'; known: cnn, mlp, resnet18"):
        get_model("lenet")


def test_unknown_constructor_argument_is_named():
    with pytest.raises(ValueError, match="does not take width"):
        get_model("mlp").build(width=3)


def test_imagenet_weights_load_with_conv1_summed_over_rgb():
    imagenet = torchvision.models.resnet18()  # 3-channel, 1000 classes: an ImageNet-shaped state_dict
    state = imagenet.state_dict()
    model = get_model("resnet18").build()
    load_imagenet_weights(model, state)
    assert torch.equal(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert model.fc.out_features == NUM_CLASSES  # the head was replaced, not loaded


def test_weights_of_another_architecture_are_refused():
    model = get_model("resnet18").build()
    with pytest.raises(ValueError, match="not a ResNet-18"):
        load_imagenet_weights(model, get_model("cnn").build().state_dict())


def test_freeze_backbone_leaves_only_fc_trainable():
    model = get_model("resnet18").build()
    freeze_backbone(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
