"""SoftCAM training loss: cross-entropy + ElasticNet penalty on the class-evidence maps (paper Eq. 4).

What is computed (the normalisation is the one choice the paper leaves open): both terms are
*means* over every element of the evidence tensor, i.e. over all B images of the batch, all C
class maps and all h x w positions, and the ridge term is the **squared** L2 norm::

    penalty(A) = l1 * mean(|A|) + l2 * mean(A ** 2)          A: (B, C, h, w)
               = l1 * ||A||_1 / (B C h w) + l2 * ||A||_2^2 / (B C h w)

Why means rather than sums: with sums the effective strength of ``l1``/``l2`` would grow with the
batch size, the number of classes and the square of the input resolution (h x w scales with it),
so a weight tuned at 224 px and batch 32 would mean something else at 512 px or batch 8. With
means, ``l1`` is directly comparable with the cross-entropy (itself a batch mean), and the same
setting carries across resolutions, batch sizes and class counts.

Squared, as in the paper's text: Eq. 4 calls the term the ridge penalty and cites Zou & Hastie's
ElasticNet, whose ridge term is the squared L2 norm (the equation itself is not legible in our
plain-text copy of the paper). The authors' code (``kdjoumessi/SoftCAM``, ``train.py``) departs
from that: it adds ``l1_ref * torch.norm(A[0], 1) + l2_ref * torch.norm(A[0], 2)``, the L1 norm and
the **unsquared** L2 (Frobenius) norm of the *first* image's maps only.

Converting the reference code's weights (N = C h w, the elements of one image's maps):

* ``l1``: ``l1_ours = l1_ref * N`` gives the same penalty value when every image's maps have the
  first image's mean ``|A|`` (and the same gradient summed over the batch; the reference puts all of
  it on image 0, ours spreads it over the B images). Pinned in ``tests/test_losses.py``.
* ``l2``: **no constant conversion exists.** The reference term ``l2_ref ||A[0]||_2 = l2_ref sqrt(N)
  rms(A[0])`` grows linearly with the scale of the maps (a group-lasso-like shrinkage of the whole
  map towards zero, gradient ``l2_ref A / ||A||`` of constant size), ours ``l2 rms(A)^2``
  quadratically (a ridge, gradient ``2 l2 A / (B N)`` shrinking with A). The two agree only at one
  map scale: equal values at rms r for ``l2_ours = l2_ref sqrt(N) / r``, equal slope in the map
  scale for ``l2_ref sqrt(N) / (2 r)``; at twice that scale the values differ by 2x. Choose ``l2`` by validation
  (as the paper chooses its lambdas), not by converting a reference value.

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
        l2: weight of the mean squared evidence (ridge term: squared L2, keeps evidence values small;
            not the reference code's unsquared norm, see the module docstring); >= 0.
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
