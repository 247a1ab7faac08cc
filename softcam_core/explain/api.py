"""``explain(model, x, method, target=None, **options)``: one verb for every saliency method (contract).

It dispatches by kind (:mod:`softcam_core.explain.specs`): model methods to
:func:`softcam_core.explain.methods.explain_model`, ``cascam:<base>`` to
:func:`softcam_core.explain.cascam.cascam`, and the model-free ``sanity:*`` maps to
:mod:`softcam_core.explain.sanity`. See docs/explain.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from softcam_core.explain.cascam import cascam
from softcam_core.explain.guard import model_lock
from softcam_core.explain.methods import explain_model, num_classes_of, resolve_targets
from softcam_core.explain.sanity import SANITY_MAPS
from softcam_core.explain.specs import CASCAM_PREFIX, SANITY_PREFIX, method_problem


def explain(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    target: int | Sequence[int] | None = None,
    **options: Any,
) -> torch.Tensor:
    """Saliency maps of ``method`` for a batch (contract).

    Args:
        model: SoftCAMNet, BaselineNet, or a torchvision ResNet / VGG / DenseNet / EfficientNet /
            ConvNeXt classifier returning logits (B, C). Left exactly as found (mode, hooks,
            parameters, ``requires_grad``, ``.grad``, layers); see :mod:`softcam_core.explain.guard`.
        x: normalised images (B, 3, H, W); moved to the model's device for the computation.
        method: one of :data:`~softcam_core.explain.specs.METHODS` or ``"cascam:<base>"`` (``base``
            a model method). The ``sanity:*`` maps ignore ``model`` and ``target`` (which is still
            checked; ``model`` may then be None) and are computed on ``x``'s device.
        target: None (each image's predicted class), one class index for all images, or one index
            per image (length B exactly).
        **options: method options: ``target_layer`` (module or name) for the CAM-style methods;
            ``batch_size`` (scorecam, ablationcam); ``n_steps``, ``baseline``,
            ``internal_batch_size``, ``integration``, ``fold_batchnorm`` (integrated_gradients); CasCAM's ``stages``, ``theta``,
            ``lam``, ``threshold``, ``topk_percent``, ``ebayes_a``, ``units``, ``combine``,
            ``stage_models`` (defaults: the CasCAM paper's) plus its base method's options;
            ``sigma`` (sanity:edge, px), ``seed`` and ``stride`` (sanity:random), ``sigma_fraction``
            (sanity:centre).
    Returns:
        float32 tensor (B, H, W) on ``x``'s device: higher = more evidence for the target class;
        signed where the method's spec says so (``method_spec(method).signed``: softcam,
        softcam_contrast, cam, integrated_gradients, guided_backprop, sanity:random).
    Raises:
        ValueError: unknown method or option, bad input shape, bad target.
        ExplainError (a ValueError): the method does not apply to this model.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    problem = method_problem(method)
    if problem is not None:
        raise ValueError(problem)
    if method.startswith(SANITY_PREFIX):
        return _sanity(model, x, method, target, options)
    if method.startswith(CASCAM_PREFIX):
        with model_lock(model):
            return cascam(model, x, method[len(CASCAM_PREFIX):], target=target, **options).combined
    return explain_model(model, x, method, target=target, **options)


def _sanity(model: nn.Module | None, x: torch.Tensor, method: str, target: Any, options: dict) -> torch.Tensor:
    """A model-free ``sanity:*`` map (B, H, W) float32 on ``x``'s device; ``target`` is only validated."""
    resolve_targets(target, x.shape[0], None if model is None else num_classes_of(model))
    with torch.inference_mode(False), torch.no_grad():
        inputs = x.detach().float()
        if inputs.is_inference():
            inputs = inputs.clone()
        try:
            maps = SANITY_MAPS[method](inputs, **options)
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):
                raise ValueError(f"{method}: {exc}") from None
            raise
    return maps.to(x.device, torch.float32)
