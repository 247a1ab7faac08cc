"""ElasticNet penalty and SoftCAM loss, pinned on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from softcam_core.losses import elasticnet_penalty, loss_terms, softcam_loss


def _maps() -> torch.Tensor:
    # B=2 images, C=2 classes, 1x2 maps: 8 values
    return torch.tensor(
        [
            [[[1.0, -2.0]], [[0.0, 3.0]]],
            [[[-1.0, 0.0]], [[2.0, -1.0]]],
        ]
    )


def test_penalty_hand_computed():
    maps = _maps()
    # |a| sums to 1+2+0+3+1+0+2+1 = 10 over 8 values; a^2 sums to 1+4+0+9+1+0+4+1 = 20
    assert elasticnet_penalty(maps, l1=1.0, l2=0.0).item() == pytest.approx(10 / 8)
    assert elasticnet_penalty(maps, l1=0.0, l2=1.0).item() == pytest.approx(20 / 8)
    assert elasticnet_penalty(maps, l1=0.1, l2=0.01).item() == pytest.approx(0.1 * 10 / 8 + 0.01 * 20 / 8)
    assert elasticnet_penalty(maps, 0.0, 0.0).item() == 0.0


def test_penalty_covers_every_image_and_class():
    maps = _maps()
    base = elasticnet_penalty(maps, 1.0, 1.0).item()
    second_image = maps.clone()
    second_image[1, 0, 0, 1] = 5.0  # was 0: |a| +5, a^2 +25, over 8 values
    assert elasticnet_penalty(second_image, 1.0, 1.0).item() == pytest.approx(base + 5 / 8 + 25 / 8)
    last_class = maps.clone()
    last_class[1, 1, 0, 0] = 0.0  # was 2: |a| -2, a^2 -4
    assert elasticnet_penalty(last_class, 1.0, 1.0).item() == pytest.approx(base - 2 / 8 - 4 / 8)


def test_penalty_gradient_reaches_every_image():
    maps = torch.randn(3, 2, 4, 4, requires_grad=True)
    elasticnet_penalty(maps, 1.0, 1.0).backward()
    grad = maps.grad
    assert all(grad[i].abs().sum() > 0 for i in range(3))
    expected = (torch.sign(maps) + 2 * maps).detach() / maps.numel()
    torch.testing.assert_close(grad, expected)


def test_penalty_independent_of_resolution_and_batch():
    """A constant map has the same penalty at any map size and batch size (the point of means)."""
    small = torch.full((1, 2, 4, 4), 0.5)
    large = torch.full((8, 2, 16, 16), 0.5)
    assert elasticnet_penalty(small, 1.0, 1.0).item() == pytest.approx(elasticnet_penalty(large, 1.0, 1.0).item())


def test_softcam_loss_is_cross_entropy_plus_penalty():
    maps = _maps()
    logits = maps.mean((2, 3))  # [[-0.5, 1.5], [-0.5, 0.5]]
    targets = torch.tensor([1, 0])
    # CE image 0: -log softmax([-0.5, 1.5])[1] = log(1 + e^-2); image 1: log(1 + e^1)
    ce = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    total = softcam_loss(logits, maps, targets, l1=0.2, l2=0.05)
    assert total.item() == pytest.approx(ce + 0.2 * 10 / 8 + 0.05 * 20 / 8, rel=1e-6)
    ce_part, penalty = loss_terms(logits, maps, targets, 0.2, 0.05)
    assert ce_part.item() == pytest.approx(ce, rel=1e-6)
    assert penalty.item() == pytest.approx(0.2 * 10 / 8 + 0.05 * 20 / 8, rel=1e-6)
    # baseline nets have no maps: plain cross-entropy
    assert softcam_loss(logits, None, targets, 0.2, 0.05).item() == pytest.approx(ce, rel=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="B, C, h, w"):
        elasticnet_penalty(torch.zeros(2, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        elasticnet_penalty(torch.zeros(1, 1, 2, 2), -1.0, 0.0)


def _reference_penalty(maps: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """The authors' code (kdjoumessi/SoftCAM train.py): norms of the first image's maps, L2 unsquared."""
    return l1 * torch.norm(maps[0], 1) + l2 * torch.norm(maps[0], 2)


def test_reference_l1_weight_converts_by_the_map_size():
    """l1_ours = l1_ref * C * h * w gives the reference penalty when the images' maps are alike."""
    first = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(0))  # C=3, 7x7: N = 147
    maps = first.expand(4, -1, -1, -1).clone()  # B = 4 alike images
    l1_ref = 0.003
    ours = elasticnet_penalty(maps, l1=l1_ref * first.numel())
    assert ours.item() == pytest.approx(_reference_penalty(maps, l1_ref, 0.0).item(), rel=1e-5)
    # same gradient summed over the batch; the reference puts all of it on image 0
    maps.requires_grad_(True)
    elasticnet_penalty(maps, l1=l1_ref * first.numel()).backward()
    torch.testing.assert_close(maps.grad.sum(0), l1_ref * torch.sign(first))


def test_reference_l2_weight_has_no_constant_conversion():
    """The reference L2 term is the unsquared norm (linear in the map scale), ours the mean square
    (quadratic): a weight that matches at one scale is off by the scale factor at any other."""
    first = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(1))
    maps = first.expand(3, -1, -1, -1).clone()
    n, l2_ref = first.numel(), 4e-5  # the authors' configs/default.yaml lambda_l2
    rms = first.pow(2).mean().sqrt().item()
    matched = l2_ref * math.sqrt(n) / rms  # equal values at this scale only
    assert elasticnet_penalty(maps, l2=matched).item() == pytest.approx(_reference_penalty(maps, 0.0, l2_ref).item(), rel=1e-5)
    for scale in (0.5, 2.0, 10.0):
        ratio = elasticnet_penalty(scale * maps, l2=matched).item() / _reference_penalty(scale * maps, 0.0, l2_ref).item()
        assert ratio == pytest.approx(scale, rel=1e-5)
    # and ours is the squared norm: l2 * ||A||_2^2 / (B C h w)
    assert elasticnet_penalty(maps, l2=1.0).item() == pytest.approx(torch.norm(maps, 2).item() ** 2 / maps.numel(), rel=1e-6)
