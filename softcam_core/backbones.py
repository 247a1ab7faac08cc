"""The backbone adapter table: for each torchvision family, where its last feature map is, which
classifier follows the global pooling, and which layer post-hoc CAMs hook.

One table, read by :func:`softcam_core.models.to_softcam` / ``to_baseline`` (the features to keep,
the Linear whose weights convert exactly), by :func:`softcam_core.explain.layers.resolve_target_layer`
(the layer CAM-style methods weight) and by classic CAM (``cam_head``: the GAP + Linear it needs).
Adding a family is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn


@dataclass(frozen=True)
class Backbone:
    """How to take one torchvision classifier family apart.

    family: short name (``"resnet"``); model_type: the torchvision class.
    features: the module up to the last convolutional feature map (B, K, h, w), as a SoftCAM net keeps it.
    channels: K.
    classifier: the single Linear applied to the globally average-pooled features, or None when
        the head is something else (VGG's 25088-input MLP, ConvNeXt's norm before its Linear):
        then neither an exact SoftCAM conversion nor classic CAM exists.
    target_layer: the layer of the unconverted model whose output CAM-style methods weight.
    relu_before_pool: the model's forward applies a ReLU between ``target_layer`` and the pool.
    no_linear_reason: why ``classifier`` is None (for error messages).
    """

    family: str
    model_type: type
    features: Callable[[nn.Module], nn.Module]
    channels: Callable[[nn.Module], int]
    classifier: Callable[[nn.Module], nn.Linear | None]
    target_layer: Callable[[nn.Module], nn.Module]
    relu_before_pool: bool = False
    no_linear_reason: str = ""


_tv = torchvision.models

BACKBONES: tuple[Backbone, ...] = (
    Backbone(
        "resnet", _tv.ResNet,
        features=lambda m: nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4),
        channels=lambda m: m.fc.in_features, classifier=lambda m: m.fc, target_layer=lambda m: m.layer4,
    ),
    Backbone(
        "vgg", _tv.VGG, features=lambda m: m.features, channels=lambda m: 512, classifier=lambda m: None,
        target_layer=lambda m: m.features,
        no_linear_reason="VGG pools to 7x7 and has a 25088-input MLP, not GAP + one Linear",
    ),
    Backbone(
        # torchvision applies ReLU after the final norm inside DenseNet.forward, not in .features
        "densenet", _tv.DenseNet, features=lambda m: nn.Sequential(m.features, nn.ReLU(inplace=False)),
        channels=lambda m: m.classifier.in_features, classifier=lambda m: m.classifier,
        target_layer=lambda m: m.features, relu_before_pool=True,
    ),
    Backbone(
        # classifier = Dropout + Linear after GAP: in eval mode the Linear alone maps pooled features
        "efficientnet", _tv.EfficientNet, features=lambda m: m.features,
        channels=lambda m: m.classifier[-1].in_features, classifier=lambda m: m.classifier[-1],
        target_layer=lambda m: m.features,
    ),
    Backbone(
        # ConvNeXt normalises the pooled vector; SoftCAM moves that LayerNorm2d before the head so it
        # acts on each feature-map position (a norm does not commute with the mean, so the Linear's
        # weights do not convert exactly)
        "convnext", _tv.ConvNeXt, features=lambda m: nn.Sequential(m.features, m.classifier[0]),
        channels=lambda m: m.classifier[-1].in_features, classifier=lambda m: None,
        target_layer=lambda m: m.features,
        no_linear_reason="ConvNeXt normalises the pooled vector before its Linear",
    ),
)


def backbone_of(model: nn.Module) -> Backbone | None:
    """The table row of a torchvision classifier, or None for any other module."""
    return next((row for row in BACKBONES if isinstance(model, row.model_type)), None)
