"""CasCAM (Choi, Kim & Choi): a cascade that suppresses what a saliency method found and asks again.

Stage k (k = 0 .. K-1) explains an input with the base method, thresholds the map and suppresses
the found evidence in the input of the next stage::

    m_k      = base(model_k, x_k)                  raw base map (B, H, W) at input resolution
    p_k      = U(m_k)                              the map in masking units, >= 0 (``units``)
    x_{k+1}  = x_k * exp(-theta * T(p_k))          T: none | topk | ebayes (``threshold``)
    combined = sum_k w_k N(T(p_k)),  w_k = exp(-lam k) / sum_j exp(-lam j)

Paper defaults (the CasCAM paper's best Oxford-Pet setting; its public code ``guebin/CasCAM``):
K = 10 stages, theta = 0.3 on **raw CAM values**, top-10 % threshold, lam = 0.1, and the combined map
sums the normalised *thresholded* stage maps (the code's per-stage "CasCAM" is the thresholded CAM).

Units ``U`` (what theta multiplies):

* ``"cam"`` (paper): raw CAM units, i.e. logit evidence per feature-map position
  (``sum_k W_ck A_k``; its spatial mean is the logit up to the bias). ``cam`` and ``softcam`` maps
  are in these units already; ``gradcam``, ``xgradcam`` and ``layercam`` average (or, LayerCAM,
  read) gradients that are ``W / Z`` for a linear head, so they are multiplied by ``Z`` = h x w of
  the target layer (Selvaraju et al.'s "CAM up to 1/Z"; exact for GAP + linear and SoftCAM heads,
  a linearisation for MLP heads; tested). Bases without CAM units (library-normalised maps,
  Score-CAM, input-space attributions) are rescaled per stage so that their peak equals the peak of
  ``Z * Grad-CAM`` of the same stage input (one extra Grad-CAM pass per stage; our extension: the
  paper defines theta on CAM units only). Only positive evidence is suppressed (``max(., 0)``).
* ``"normalised"``: ``N(m)``, the per-image min-max of the positive part in [0, 1] (this module's
  earlier default, then with theta = 3, lam = 0.5, K = 3, no threshold).

Two modes:

* inference only (default): one model; stage k explains the masked input ``x_k``;
* retrain (``stage_models=``, the paper's): model k was trained afresh, from stage 0's
  initialisation, on training images masked by stages 0 .. k-1
  (:mod:`softcam_core.explain.retrain`); stage k's map is model k's map of the **original**
  image (``x_k = x`` for the test image: the masking happened in the training data).

Masking works in the normalised input space, so it pulls pixels towards 0 = the dataset mean (the
same baseline as integrated gradients); the paper multiplies [0, 1] pixels (towards black) and
re-stretches the image to [0, 1]. The target class is fixed at stage 0 (the prediction on the
original image when ``target`` is None) so every stage explains the same class.

Thresholds ``T`` on ``p`` (any positive scale; results in the same units):

* ``none``: ``T(p) = p``;
* ``topk``: keep the values in the top ``topk_percent`` percent of pixels, zero the rest;
* ``ebayes``: Johnstone & Silverman empirical-Bayes posterior-median thresholding
  (:mod:`softcam_core.explain.ebayes`) of ``p / max p`` (noise level by MAD about zero, with a
  fallback, see :func:`ebayes_mask`), clipped to [0, 1], times ``max p``. A **heuristic** here: the
  model behind it (sparse signal + i.i.d. Gaussian noise) does not hold for a ReLU'd, bilinearly
  upsampled map (no symmetric noise, correlated pixels, often exact zeros); see docs/explain.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from softcam_core.explain import ebayes
from softcam_core.explain.layers import model_device, resolve_target_layer
from softcam_core.explain.methods import _predicted, explain_model, num_classes_of, resolve_targets
from softcam_core.explain.specs import BASE_METHODS

THRESHOLDS = ("none", "topk", "ebayes")
UNITS = ("cam", "normalised")
COMBINES = ("thresholded", "maps")
# paper defaults (CasCAM paper, Table 6-8 best setting; guebin/cascam-results "parameter effects")
DEFAULT_STAGES = 10
DEFAULT_THETA = 0.3
DEFAULT_LAMBDA = 0.1
DEFAULT_THRESHOLD = "topk"
DEFAULT_TOPK_PERCENT = 10.0
DEFAULT_UNITS = "cam"
DEFAULT_COMBINE = "thresholded"
DEFAULT_EBAYES_A = 0.5
EBAYES_SIGMA_FLOOR = 1e-3  # in units of the map's peak: below this a map is treated as noise-free
# bases whose maps are CAM units times a known factor: False = as returned, True = times Z (h x w)
CAM_UNIT_BASES = {"cam": False, "softcam": False, "gradcam": True, "xgradcam": True, "layercam": True}


@dataclass
class CascadeResult:
    """CasCAM output; all tensors on the input's device, float32.

    Attributes:
        combined: (B, H, W) weighted sum of the normalised stage maps (in [0, 1]): the thresholded
            ones (``combine="thresholded"``) or the full ones (``combine="maps"``).
        stage_maps: K maps (B, H, W), each base map normalised to [0, 1] (``N(m_k)``, for display).
        stage_inputs: K inputs (B, 3, H, W); ``stage_inputs[0]`` is the original image (in retrain
            mode every entry is the original image).
        weights: K stage weights (sum 1).
        targets: the class explained for each image.
        thresholds: per stage, per image, the ebayes details (sigma, weight, threshold, in units of
            the map's peak) or None.
        stage_thresholded: K maps (B, H, W) in [0, 1]: ``N(T(p_k))``, what was suppressed.
        stage_peaks: per stage, per image, ``max p_k`` in masking units: the most suppressed pixel
            keeps ``exp(-theta * peak)`` of its value (theta = 0.3 on a model whose CAM peaks at
            0.2 logit units keeps 94 %: such a cascade hardly masks anything).
        settings: the options used (stages, theta, lam, threshold, topk_percent, ebayes_a, units,
            combine, retrain, feature_positions).
    """

    combined: torch.Tensor
    stage_maps: list[torch.Tensor]
    stage_inputs: list[torch.Tensor]
    weights: list[float]
    targets: list[int]
    thresholds: list[list[dict[str, float] | None]] = field(default_factory=list)
    stage_thresholded: list[torch.Tensor] = field(default_factory=list)
    stage_peaks: list[list[float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


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


def threshold_maps(
    positive: torch.Tensor, threshold: str, topk_percent: float = DEFAULT_TOPK_PERCENT,
    ebayes_a: float = DEFAULT_EBAYES_A,
) -> tuple[torch.Tensor, list[dict[str, float] | None]]:
    """``T(p)`` for non-negative maps (B, H, W) of any scale; same shape and units as ``p``.

    ``ebayes`` runs on ``p / max p`` (so its noise floor is scale-free) and scales back.
    Returns ``(T(p), per-image ebayes details or None)``.
    """
    if threshold == "none":
        return positive, [None] * positive.shape[0]
    if threshold == "topk":
        return topk_mask(positive, topk_percent), [None] * positive.shape[0]
    peak = positive.flatten(1).amax(1)[:, None, None]
    unit = torch.where(peak > 0, positive / peak.clamp_min(1e-30), torch.zeros_like(positive))
    masks, details = ebayes_mask(unit, ebayes_a)
    return masks * peak, details


def stage_weights(stages: int, lam: float) -> list[float]:
    """``w_k = exp(-lam k) / sum_j exp(-lam j)`` for k = 0 .. stages-1."""
    raw = np.exp(-lam * np.arange(stages))
    return (raw / raw.sum()).tolist()


def feature_positions(model: torch.nn.Module, x: torch.Tensor, target_layer: Any = None) -> int:
    """``Z`` = h x w of the target layer's output for input ``x`` (B, 3, H, W): one no-grad forward.

    Uses the layer the CAM-style methods weight (:func:`resolve_target_layer`).
    """
    from softcam_core.explain.guard import eval_locked

    layer = resolve_target_layer(model, target_layer)
    shapes: list[torch.Size] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    try:
        with eval_locked(model), torch.no_grad():
            model(x[:1].to(model_device(model)))
    finally:
        handle.remove()
    if not shapes or len(shapes[0]) != 4:
        raise ValueError(f"cascam: the target layer's output is not (B, K, h, w): {shapes[:1]}")
    return int(shapes[0][-2] * shapes[0][-1])


def to_units(
    model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor, base: str, units: str, targets: list[int],
    positions: int | None, target_layer: Any = None,
) -> torch.Tensor:
    """The base maps (B, H, W) of input ``x`` in masking units (see the module docstring), >= 0.

    Args:
        positions: ``Z`` for the "cam" units of gradient bases (:func:`feature_positions`); unused
            for ``cam``/``softcam`` and for ``units="normalised"``.
    """
    if units == "normalised":
        return normalise_positive(maps)
    positive = maps.clamp_min(0)
    if base in CAM_UNIT_BASES:
        return positive * positions if CAM_UNIT_BASES[base] else positive
    # no CAM units: rescale to the peak of this stage's Grad-CAM in CAM units
    options = {} if target_layer is None else {"target_layer": target_layer}
    reference = explain_model(model, x, "gradcam", target=targets, **options).clamp_min(0) * positions
    peak = positive.flatten(1).amax(1)[:, None, None]
    reference_peak = reference.flatten(1).amax(1)[:, None, None]
    return torch.where(peak > 0, positive / peak.clamp_min(1e-30) * reference_peak, torch.zeros_like(positive))


def check_options(stages: int, theta: float, threshold: str, units: str, combine: str, topk_percent: float) -> None:
    """ValueError for a bad CasCAM option (shared with the retrain mode)."""
    if threshold not in THRESHOLDS:
        raise ValueError(f"cascam: threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
    if units not in UNITS:
        raise ValueError(f"cascam: units must be one of {', '.join(UNITS)}, got {units!r}")
    if combine not in COMBINES:
        raise ValueError(f"cascam: combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if int(stages) != stages or stages < 1:
        raise ValueError(f"cascam: stages must be a positive integer, got {stages}")
    if theta < 0:
        raise ValueError(f"cascam: theta must be >= 0, got {theta}")
    if threshold == "topk" and not 0 < topk_percent <= 100:
        raise ValueError(f"cascam: topk_percent must be in (0, 100], got {topk_percent}")


def cascam(
    model: torch.nn.Module,
    x: torch.Tensor,
    base: str,
    stages: int = DEFAULT_STAGES,
    theta: float = DEFAULT_THETA,
    lam: float = DEFAULT_LAMBDA,
    threshold: str = DEFAULT_THRESHOLD,
    target: int | list[int] | None = None,
    topk_percent: float = DEFAULT_TOPK_PERCENT,
    ebayes_a: float = DEFAULT_EBAYES_A,
    stage_models: list[torch.nn.Module] | None = None,
    units: str = DEFAULT_UNITS,
    combine: str = DEFAULT_COMBINE,
    **base_options: Any,
) -> CascadeResult:
    """Run the CasCAM cascade over ``base``; defaults are the paper's (K=10, theta=0.3 on CAM units,
    top-10 %, lam=0.1, combined from the thresholded maps).

    Args:
        model: classifier (see :func:`explain`); stage 0's model.
        x: normalised images (B, 3, H, W).
        base: a base method name (not CasCAM).
        stages: K >= 1 (base-method calls: K, plus K Grad-CAM calls for bases without CAM units).
        theta: masking strength (>= 0), per unit of ``units``: a pixel keeps ``exp(-theta T(p))``.
        lam: stage-weight decay (weights proportional to exp(-lam k)).
        threshold: "none", "topk" or "ebayes".
        target: as in :func:`explain`; None = predicted class on the original image.
        topk_percent: percent of pixels kept by "topk".
        ebayes_a: Laplace prior scale for "ebayes".
        stage_models: retrain mode: K models (``stage_models[0]`` normally ``model``), model k
            explains the original ``x`` (see :mod:`softcam_core.explain.retrain`).
        units: "cam" (raw CAM units, the paper's) or "normalised" ([0, 1] per image).
        combine: "thresholded" (sum of normalised thresholded maps, the paper's) or "maps".
        **base_options: passed to the base method (e.g. ``target_layer``).
    Returns:
        :class:`CascadeResult`.
    """
    if base not in BASE_METHODS:
        raise ValueError(f"cascam: unknown base method {base!r}; choose one of {', '.join(BASE_METHODS)}")
    check_options(stages, theta, threshold, units, combine, topk_percent)
    if stage_models is not None and len(stage_models) != stages:
        raise ValueError(f"cascam: {len(stage_models)} stage models for {stages} stages")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    targets = resolve_targets(target, x.shape[0], num_classes_of(model))
    original = x.detach().float()
    if targets is None:
        from softcam_core.explain.guard import eval_locked

        with eval_locked(model):
            targets = _predicted(model, original.to(model_device(model)))
    target_layer = base_options.get("target_layer")
    needs_positions = units == "cam" and CAM_UNIT_BASES.get(base, True)
    # Z depends on the architecture and input size only: the stage models share both
    positions = feature_positions(model, original, target_layer) if needs_positions else None
    weights = stage_weights(int(stages), lam)
    stage_maps, stage_inputs, stage_thresholded, details, peaks = [], [], [], [], []
    current = original
    for k in range(int(stages)):
        stage_model = model if stage_models is None else stage_models[k]
        # retrain mode: model k explains the original image (its training data carried the masks)
        stage_input = current if stage_models is None else original
        stage_inputs.append(stage_input)
        raw = explain_model(stage_model, stage_input, base, target=targets, **base_options)
        stage_maps.append(normalise_positive(raw))
        positive = to_units(stage_model, stage_input, raw, base, units, targets, positions, target_layer)
        suppressed, info = threshold_maps(positive, threshold, topk_percent, ebayes_a)
        peaks.append(positive.flatten(1).amax(1).tolist())
        stage_thresholded.append(normalise_positive(suppressed))
        details.append(info)
        if stage_models is None and k + 1 < stages:
            current = current * torch.exp(-theta * suppressed)[:, None]
    summed = stage_thresholded if combine == "thresholded" else stage_maps
    combined = sum(w * m for w, m in zip(weights, summed))
    settings = {
        "stages": int(stages), "theta": float(theta), "lam": float(lam), "threshold": threshold,
        "topk_percent": float(topk_percent), "ebayes_a": float(ebayes_a), "units": units, "combine": combine,
        "retrain": stage_models is not None, "feature_positions": positions,
    }
    return CascadeResult(combined.float(), stage_maps, stage_inputs, weights, list(targets), details,
                         stage_thresholded, peaks, settings)
