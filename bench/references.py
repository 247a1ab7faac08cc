"""Direct library calls: what a user would write without ``softcam_core.explain``.

Each function computes the same map as ``explain(model, x, method, target=targets)`` by calling
torchcam / pytorch-grad-cam / captum the way their documentation shows (parameters left trainable,
no locking or state restoring, library default options unless ``options`` says otherwise), then
resizes to the input size the same way (bilinear, ``align_corners=False``) so the maps can be
compared element by element. These are the benchmarks' references, not product code.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Reference = Callable[..., torch.Tensor]


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def softcam(model: nn.Module, x: torch.Tensor, targets: list[int], **_: Any) -> torch.Tensor:
    """The evidence maps straight from ``forward_with_maps``."""
    with torch.no_grad():
        _, maps = model.forward_with_maps(x)
    return _resize(maps[torch.arange(x.shape[0]), torch.as_tensor(targets)], x.shape[-2:])


def torchcam(class_name: str, uses_gradients: bool) -> Reference:
    def run(model: nn.Module, x: torch.Tensor, targets: list[int], **options: Any) -> torch.Tensor:
        from torchcam import methods

        kwargs = dict(options)
        if class_name == "CAM":
            kwargs.setdefault("fc_layer", model.fc)
        extractor = getattr(methods, class_name)(model, target_layer=model.features, **kwargs)
        try:
            with torch.set_grad_enabled(uses_gradients):
                scores = model(x)
                if uses_gradients:
                    cams = extractor(class_idx=targets, scores=scores, normalized=False)
                else:
                    cams = extractor(class_idx=targets, normalized=False)
        finally:
            extractor.remove_hooks()
        return _resize(cams[0].detach(), x.shape[-2:])

    run.__name__ = f"torchcam_{class_name}"
    return run


def grad_cam(class_name: str) -> Reference:
    def run(model: nn.Module, x: torch.Tensor, targets: list[int], **options: Any) -> torch.Tensor:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        layers = [] if class_name == "FullGrad" else [model.features]
        cam = getattr(pytorch_grad_cam, class_name)(model=model, target_layers=layers, **options)
        try:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
        finally:
            cam.activations_and_grads.release()
        return _resize(torch.from_numpy(np.asarray(maps, dtype=np.float32)), x.shape[-2:])

    run.__name__ = f"grad_cam_{class_name}"
    return run


def integrated_gradients(model: nn.Module, x: torch.Tensor, targets: list[int], **options: Any) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    return IntegratedGradients(model).attribute(x, target=targets, **options).sum(1).detach()


def guided_backprop(model: nn.Module, x: torch.Tensor, targets: list[int], **_: Any) -> torch.Tensor:
    from captum.attr import GuidedBackprop

    return GuidedBackprop(model).attribute(x.clone().requires_grad_(True), target=targets).sum(1).detach()


REFERENCES: dict[str, Reference] = {
    "softcam": softcam,
    "cam": torchcam("CAM", False),
    "gradcam": torchcam("GradCAM", True),
    "gradcampp": torchcam("GradCAMpp", True),
    "xgradcam": torchcam("XGradCAM", True),
    "layercam": torchcam("LayerCAM", True),
    "scorecam": torchcam("ScoreCAM", False),
    "hirescam": grad_cam("HiResCAM"),
    "eigencam": grad_cam("EigenCAM"),
    "ablationcam": grad_cam("AblationCAM"),
    "fullgrad": grad_cam("FullGrad"),
    "integrated_gradients": integrated_gradients,
    "guided_backprop": guided_backprop,
}
