"""SoftCAM training loss: cross-entropy + ElasticNet penalty on the class-evidence maps (paper Eq. 4).

Normalisation (the one choice the paper leaves open): the penalty is a *mean* over every element of
the evidence tensor, i.e. over all B images of the batch, all C class maps and all h x w positions::

    penalty(A) = l1 * mean(|A|) + l2 * mean(A ** 2)          A: (B, C, h, w)

Why means rather than sums: with sums the effective strength of ``l1``/``l2`` would grow with the
batch size, the number of classes and the square of the input resolution (h x w scales with it),
so a weight tuned at 224 px and batch 32 would mean something else at 512 px or batch 8. With
means, ``l1`` is directly comparable with the cross-entropy (itself a batch mean), and the same
setting carries across resolutions, batch sizes and class counts.

The reference implementation summed the norm of the *first* image's maps only
(``l1 * ||A[0]||_1``); its weights convert to ours as ``l1_ours ~= l1_ref * C * h * w`` (and the
same for ``l2``), and unlike it every image of the batch is penalised here.

Settings: dense SoftCAM ``l1 = l2 = 0``; sparse (lasso) ``l1 > 0, l2 = 0``; ridge ``l1 = 0, l2 > 0``;
ElasticNet both > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def elasticnet_penalty(maps: torch.Tensor, l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """ElasticNet penalty on class-evidence maps, averaged over every image, class and position.

    Args:
        maps: evidence maps (B, C, h, w), any float dtype (computed in float32).
        l1: weight of the mean absolute evidence (lasso term, promotes sparse maps); >= 0.
        l2: weight of the mean squared evidence (ridge term, keeps evidence values small); >= 0.
    Returns:
        0-dim float32 tensor ``l1 * mean(|maps|) + l2 * mean(maps ** 2)`` (differentiable).
    """
    if maps.dim() != 4:
        raise ValueError(f"evidence maps must be (B, C, h, w), got shape {tuple(maps.shape)}")
    if l1 < 0 or l2 < 0:
        raise ValueError(f"penalty weights must be non-negative, got l1={l1}, l2={l2}")
    maps = maps.float()
    penalty = maps.new_zeros(())
    if l1:
        penalty = penalty + l1 * maps.abs().mean()
    if l2:
        penalty = penalty + l2 * maps.pow(2).mean()
    return penalty


def loss_terms(
    logits: torch.Tensor,
    maps: torch.Tensor | None,
    targets: torch.Tensor,
    l1: float = 0.0,
    l2: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of :func:`softcam_loss`, kept apart for logging.

    Args:
        logits: (B, C) class scores (for SoftCAM the spatial means of ``maps``).
        maps: (B, C, h, w) evidence maps, or ``None`` for a black-box baseline (no penalty).
        targets: (B,) integer class indices.
        l1, l2: penalty weights (see the module docstring for the normalisation).
        class_weights: optional (C,) cross-entropy class weights.
    Returns:
        ``(cross_entropy, penalty)``: 0-dim float32 tensors; the cross-entropy is a batch mean.
    """
    ce = F.cross_entropy(logits.float(), targets, weight=class_weights)
    if maps is None or (not l1 and not l2):
        return ce, ce.new_zeros(())
    return ce, elasticnet_penalty(maps, l1, l2)


def softcam_loss(
    logits: torch.Tensor,
    maps: torch.Tensor | None,
    targets: torch.Tensor,
    l1: float = 0.0,
    l2: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paper Eq. 4: ``cross_entropy(logits, targets) + elasticnet_penalty(maps, l1, l2)``.

    Shapes as in :func:`loss_terms`; returns the 0-dim float32 total to back-propagate.
    """
    ce, penalty = loss_terms(logits, maps, targets, l1, l2, class_weights)
    return ce + penalty
