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
