"""CasCAM: a cascade that suppresses what a saliency method found and asks it again.

Stage k (k = 0 .. K-1) explains the current input ``x_k`` with the base method, normalises the
map to [0, 1], thresholds it, and suppresses the found evidence in the input::

    m_k      = N(base(x_k))                       N: min-max of the positive part, per image
    x_{k+1}  = x_k * exp(-theta * T(m_k))          T: none | topk | ebayes
    combined = sum_k w_k m_k,   w_k = exp(-lam k) / sum_j exp(-lam j)

Masking works in the normalised input space, so it pulls pixels towards 0 = the dataset mean
(the same baseline as integrated gradients). The target class is fixed at stage 0 (the
prediction on the original image when ``target`` is None) so every stage explains the same
class. When a shortcut (e.g. a marker) dominates stage 0, later stages reveal weaker evidence
(e.g. a lesion) the base method hides.

Thresholds ``T`` (maps in [0, 1]):

* ``none``: ``T(m) = m``;
* ``topk``: keep the values in the top ``topk_percent`` percent of pixels, zero the rest;
* ``ebayes``: Johnstone & Silverman empirical-Bayes posterior-median thresholding
  (:mod:`softcam_core.explain.ebayes`) of each map, noise level by MAD about zero (with a
  fallback, see :func:`ebayes_mask`), clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from softcam_core.explain import ebayes
from softcam_core.explain.layers import model_device
from softcam_core.explain.methods import BASE_METHODS, _predicted, explain, num_classes_of, resolve_targets

THRESHOLDS = ("none", "topk", "ebayes")
DEFAULT_STAGES = 3
DEFAULT_THETA = 3.0
DEFAULT_LAMBDA = 0.5
DEFAULT_TOPK_PERCENT = 10.0
DEFAULT_EBAYES_A = 0.5
EBAYES_SIGMA_FLOOR = 1e-3  # in [0, 1] map units: below this a map is treated as noise-free


@dataclass
class CascadeResult:
    """CasCAM output; all tensors on the input's device, float32.

    Attributes:
        combined: (B, H, W) weighted sum of the normalised stage maps (in [0, 1]).
        stage_maps: K maps (B, H, W), each normalised to [0, 1].
        stage_inputs: K inputs (B, 3, H, W); ``stage_inputs[0]`` is the original image.
        weights: K stage weights (sum 1).
        targets: the class explained for each image.
        thresholds: per stage, per image, the ebayes details (sigma, weight, threshold) or None.
    """

    combined: torch.Tensor
    stage_maps: list[torch.Tensor]
    stage_inputs: list[torch.Tensor]
    weights: list[float]
    targets: list[int]
    thresholds: list[list[dict[str, float] | None]] = field(default_factory=list)


def normalise_positive(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image min-max normalisation of the positive part: (B, H, W) -> (B, H, W) in [0, 1].

    ``p = max(m, 0)``, ``(p - min p) / (max p - min p)``; an all-equal map becomes 0.
    """
    positive = maps.clamp_min(0)
    flat = positive.flatten(1)
    low = flat.min(1).values[:, None, None]
    span = (flat.max(1).values[:, None, None] - low)
    return torch.where(span > eps, (positive - low) / span.clamp_min(eps), torch.zeros_like(positive))


def topk_mask(maps: torch.Tensor, percent: float) -> torch.Tensor:
    """Keep each map's values in its top ``percent`` percent of pixels (ties included), zero the rest."""
    if not 0 < percent <= 100:
        raise ValueError(f"topk_percent must be in (0, 100], got {percent}")
    flat = maps.flatten(1)
    keep = max(1, int(round(flat.shape[1] * percent / 100.0)))
    cutoff = flat.topk(keep, dim=1).values[:, -1][:, None, None]
    return torch.where(maps >= cutoff, maps, torch.zeros_like(maps))


def ebayes_mask(maps: torch.Tensor, a: float = DEFAULT_EBAYES_A) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Empirical-Bayes posterior-median thresholding of each map in [0, 1].

    Noise level: MAD about zero (EbayesThresh's default). CAM maps are often exactly zero on
    more than half the pixels (ReLU), which makes that MAD zero; then the MAD of the non-zero
    values about their median is used, and at least :data:`EBAYES_SIGMA_FLOOR`.

    Returns:
        (masks (B, H, W) in [0, 1], per image {"sigma", "weight", "threshold"}).
    """
    values = maps.detach().cpu().double().numpy()
    masks, details = [], []
    for image_map in values:
        sigma = ebayes.mad_sigma(image_map)
        if sigma == 0.0:
            nonzero = image_map[image_map != 0]
            if nonzero.size:
                sigma = float(ebayes.MAD_TO_SIGMA * np.median(np.abs(nonzero - np.median(nonzero))))
        result = ebayes.ebayes_threshold(image_map, a=a, sigma=sigma, sigma_floor=EBAYES_SIGMA_FLOOR)
        masks.append(np.clip(result.estimate, 0.0, 1.0))
        details.append({"sigma": result.sigma, "weight": result.weight, "threshold": result.threshold})
    return torch.as_tensor(np.stack(masks), dtype=maps.dtype, device=maps.device), details


def stage_weights(stages: int, lam: float) -> list[float]:
    """``w_k = exp(-lam k) / sum_j exp(-lam j)`` for k = 0 .. stages-1."""
    raw = np.exp(-lam * np.arange(stages))
    return (raw / raw.sum()).tolist()


def cascam(
    model: torch.nn.Module,
    x: torch.Tensor,
    base: str,
    stages: int = DEFAULT_STAGES,
    theta: float = DEFAULT_THETA,
    lam: float = DEFAULT_LAMBDA,
    threshold: str = "none",
    target: int | list[int] | None = None,
    topk_percent: float = DEFAULT_TOPK_PERCENT,
    ebayes_a: float = DEFAULT_EBAYES_A,
    stage_models: list[torch.nn.Module] | None = None,
    **base_options: Any,
) -> CascadeResult:
    """Run the CasCAM cascade over ``base`` (inference only unless ``stage_models`` is given).

    Args:
        model: classifier (see :func:`explain`).
        x: normalised images (B, 3, H, W).
        base: a base method name (not CasCAM).
        stages: K >= 1.
        theta: masking strength (>= 0).
        lam: stage-weight decay (weights proportional to exp(-lam k)).
        threshold: "none", "topk" or "ebayes".
        target: as in :func:`explain`; None = predicted class on the original image.
        topk_percent: percent of pixels kept by "topk".
        ebayes_a: Laplace prior scale for "ebayes".
        stage_models: optional model per stage (the retrain-per-stage mode); default ``model`` for all.
        **base_options: passed to the base method (e.g. ``target_layer``).
    Returns:
        :class:`CascadeResult`.
    """
    if base not in BASE_METHODS:
        raise ValueError(f"cascam: unknown base method {base!r}; choose one of {', '.join(BASE_METHODS)}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"cascam: threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
    if int(stages) != stages or stages < 1:
        raise ValueError(f"cascam: stages must be a positive integer, got {stages}")
    if theta < 0:
        raise ValueError(f"cascam: theta must be >= 0, got {theta}")
    if stage_models is not None and len(stage_models) != stages:
        raise ValueError(f"cascam: {len(stage_models)} stage models for {stages} stages")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    targets = resolve_targets(target, x.shape[0], num_classes_of(model))
    current = x.detach().float()
    if targets is None:
        from softcam_core.explain.guard import eval_locked

        with eval_locked(model):
            targets = _predicted(model, current.to(model_device(model)))
    weights = stage_weights(int(stages), lam)
    stage_maps, stage_inputs, details = [], [], []
    for k in range(int(stages)):
        stage_model = model if stage_models is None else stage_models[k]
        stage_inputs.append(current)
        normalised = normalise_positive(explain(stage_model, current, base, target=targets, **base_options))
        stage_maps.append(normalised)
        if threshold == "none":
            suppressed, info = normalised, [None] * x.shape[0]
        elif threshold == "topk":
            suppressed, info = topk_mask(normalised, topk_percent), [None] * x.shape[0]
        else:
            suppressed, info = ebayes_mask(normalised, ebayes_a)
        details.append(info)
        if k + 1 < stages:
            current = current * torch.exp(-theta * suppressed)[:, None]
    combined = sum(w * m for w, m in zip(weights, stage_maps))
    return CascadeResult(combined.float(), stage_maps, stage_inputs, weights, list(targets), details)
