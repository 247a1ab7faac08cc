"""Which layer post-hoc methods hook, and the GAP + Linear head that classic CAM needs.

The target layer is the last feature map before pooling / the evidence head (for torchvision models:
the ``target_layer`` column of :data:`softcam_core.backbones.BACKBONES`):

=====================  =====================
model                  target layer
=====================  =====================
SoftCAMNet             ``model.features``
BaselineNet            ``model.features``
torchvision ResNet     ``model.layer4``
torchvision VGG        ``model.features``
torchvision DenseNet   ``model.features``
torchvision EfficientNet ``model.features``
torchvision ConvNeXt   ``model.features``
=====================  =====================

``target_layer=`` (a module of the model or its dotted name from ``model.named_modules()``)
overrides the choice.
"""

from __future__ import annotations

import torch
from torch import nn

from softcam_core.backbones import backbone_of
from softcam_core.models import BaselineNet, SoftCAMNet


class ExplainError(ValueError):
    """A method cannot explain this model / input / target (one-line message)."""


def resolve_target_layer(model: nn.Module, target_layer: nn.Module | str | None = None) -> nn.Module:
    """Module whose output (B, K, h, w) the CAM-style methods weight; see the module table.

    Raises:
        ExplainError: unknown layer name, a module that is not part of ``model``, or an
            architecture without an automatic choice.
    """
    if isinstance(target_layer, nn.Module):
        if not any(m is target_layer for m in model.modules()):
            raise ExplainError(f"target_layer {type(target_layer).__name__} is not a submodule of the model")
        return target_layer
    if isinstance(target_layer, str):
        modules = dict(model.named_modules())
        if target_layer not in modules:
            raise ExplainError(f"target_layer {target_layer!r} not found; see model.named_modules()")
        return modules[target_layer]
    if target_layer is not None:
        raise ExplainError(f"target_layer must be a module or its name, got {type(target_layer).__name__}")
    if isinstance(model, (SoftCAMNet, BaselineNet)):
        return model.features
    backbone = backbone_of(model)
    if backbone is not None:
        return backbone.target_layer(model)
    raise ExplainError(
        f"no automatic target layer for {type(model).__name__}; pass target_layer= (a module or its name)"
    )


def cam_head(model: nn.Module) -> tuple[nn.Module, nn.Linear, bool]:
    """``(feature layer, linear classifier, relu_after_features)`` of a GAP + single-Linear classifier.

    Classic CAM (Zhou et al. 2016) is only defined when the logits are a linear function of the
    globally average-pooled last feature map.

    Raises:
        ExplainError: the model has another head (SoftCAM evidence head, VGG MLP, ConvNeXt norm).
    """
    if isinstance(model, SoftCAMNet):
        raise ExplainError("'cam' needs a GAP + Linear classifier; a SoftCAM net explains itself: use 'softcam'")
    if isinstance(model, BaselineNet):
        if isinstance(model.fc, nn.Linear):
            return model.features, model.fc, False
        raise ExplainError(
            f"'cam' needs a GAP + single Linear head; this {model.arch} baseline has a "
            f"{type(model.fc).__name__} head (e.g. VGG's MLP)"
        )
    backbone = backbone_of(model)
    linear = backbone.classifier(model) if backbone is not None else None
    if linear is None:
        reason = backbone.no_linear_reason if backbone is not None else f"{type(model).__name__} has none"
        raise ExplainError(f"'cam' needs a GAP + single Linear head; {reason}")
    return backbone.target_layer(model), linear, backbone.relu_before_pool


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free module)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")
