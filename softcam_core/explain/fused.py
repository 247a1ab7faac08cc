"""One forward pass for the prediction, the SoftCAM evidence maps and the gradient CAMs (Review page).

Opening an image in the app needs the prediction, every class's SoftCAM evidence map and, by
default, Grad-CAM. Called one by one that is two forward passes of the backbone (``predict`` and
``explain(..., "gradcam")``) plus a backward pass through it. Here torchcam's extractors for the
requested gradient-CAM methods are hooked on the target layer while the model runs once:

* the backbone up to the target layer runs without autograd (as in a plain prediction), and the
  target layer's output re-enters autograd as a leaf, so the graph holds only the head;
* each extractor then back-propagates the target scores to that leaf (a few kernels: the head),
  which is exactly the gradient torchcam computes when called directly — the maps equal
  :func:`softcam_core.explain.explain` for the same method and target (pinned by a test).

Only methods whose map depends on the target layer's activations and their gradients alone can
share the pass: :data:`FUSABLE_METHODS`. Everything else goes through ``explain``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from softcam_core.explain.guard import autograd_from, guarded, model_lock
from softcam_core.explain.layers import model_device, resolve_target_layer
from softcam_core.explain.methods import resize_to, resolve_targets

# method name -> torchcam extractor class (the same classes explain() uses for these names)
FUSABLE_METHODS = {"gradcam": "GradCAM", "gradcampp": "GradCAMpp", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}


@dataclass
class FusedForward:
    """What one forward pass gave.

    ``logits`` (B, C); ``maps`` (B, C, h, w) SoftCAM evidence at feature resolution, None for a
    model without an evidence head; ``targets`` the class explained per image; ``cams`` method ->
    (B, H, W) float32 map at input resolution (as ``explain`` returns it).
    """

    logits: torch.Tensor
    maps: torch.Tensor | None
    targets: list[int]
    cams: dict[str, torch.Tensor] = field(default_factory=dict)


def forward_with_cams(
    model: nn.Module,
    x: torch.Tensor,
    methods: Sequence[str] = (),
    target: int | Sequence[int] | None = None,
) -> FusedForward:
    """Logits, SoftCAM evidence maps and the ``methods``' maps from one forward pass.

    Args:
        model: SoftCAMNet, BaselineNet or a torchvision classifier (as for ``explain``); left as
            found (see :mod:`softcam_core.explain.guard`).
        x: normalised images (B, 3, H, W).
        methods: names from :data:`FUSABLE_METHODS` (others raise ValueError).
        target: None (each image's predicted class), one class index, or one per image.
    Returns:
        :class:`FusedForward` (tensors on ``x``'s device, maps float32).
    """
    unknown = [m for m in methods if m not in FUSABLE_METHODS]
    if unknown:
        raise ValueError(f"cannot share the forward pass with {', '.join(unknown)}; "
                         f"use explain() (fusable: {', '.join(FUSABLE_METHODS)})")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    from torchcam import methods as torchcam_methods

    # torchcam differentiates activations only (autograd.grad): no parameter snapshot needed
    with model_lock(model), torch.inference_mode(False), guarded(model, parameters=False):
        inputs = x.detach().to(model_device(model), torch.float32)
        if inputs.is_inference():
            inputs = inputs.clone()
        layer = resolve_target_layer(model, None)
        with autograd_from(layer):
            extractors = {m: getattr(torchcam_methods, FUSABLE_METHODS[m])(model, target_layer=layer)
                          for m in dict.fromkeys(methods)}
            try:
                if hasattr(model, "forward_with_maps"):
                    logits, maps = model.forward_with_maps(inputs)
                else:
                    logits, maps = model(inputs), None
                chosen = resolve_targets(target, inputs.shape[0], logits.shape[1])
                targets = chosen if chosen is not None else logits.argmax(1).tolist()
                cams = {}
                names = list(extractors)
                for index, name in enumerate(names):
                    # every extractor differentiates the same small graph: keep it until the last one
                    found = extractors[name](class_idx=targets, scores=logits, normalized=False,
                                             retain_graph=index < len(names) - 1)
                    cams[name] = resize_to(found[0].detach().float(), tuple(x.shape[-2:])).to(x.device)
            finally:
                for extractor in extractors.values():
                    extractor.remove_hooks()
    return FusedForward(logits.detach().float().to(x.device),
                        None if maps is None else maps.detach().float().to(x.device), targets, cams)
