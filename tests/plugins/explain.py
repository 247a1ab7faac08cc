"""Hand-built networks whose evidence is known, for explanation tests (area: explain).

The features are one 3x3 convolution (centre tap only) + ReLU + 4x4 average pooling, set by hand:

* channel 0 "bright": ``relu(mean_rgb(x) - bright_threshold)``, responds only to bright pixels;
* channel 1 "dark": ``relu(0.5 - mean_rgb(x))``, responds to the background.

Class 0 ("lesion") evidence is ``4 * bright - 0.1``; class 1 ("healthy") is ``0.5 * dark - 0.3``.
So a bright square makes class 0 win, and the evidence for class 0 lies exactly on the square.
Images are in the normalised input space (0 = dataset mean).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softcam_core.models import BaselineNet, SoftCAMNet

IMAGE_SIZE = 32
POOL = 4


def hand_built_features(bright_threshold: float = 1.0) -> nn.Sequential:
    """(B, 3, H, W) -> (B, 2, H/4, W/4): channel 0 bright detector, channel 1 dark detector."""
    conv = nn.Conv2d(3, 2, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 1, 1] = 1.0 / 3.0
        conv.weight[1, :, 1, 1] = -1.0 / 3.0
        conv.bias.copy_(torch.tensor([-bright_threshold, 0.5]))
    return nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(POOL))


def hand_built_softcam(bright_threshold: float = 1.0) -> SoftCAMNet:
    """SoftCAMNet with the hand-set evidence head ``class0 = 4 bright - 0.1``, ``class1 = 0.5 dark - 0.3``."""
    head = nn.Conv2d(2, 2, kernel_size=1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 0.5]]).view(2, 2, 1, 1))
        head.bias.copy_(torch.tensor([-0.1, -0.3]))
    return SoftCAMNet(hand_built_features(bright_threshold), head, arch="hand-built").eval()


def hand_built_baseline(bright_threshold: float = 1.0) -> BaselineNet:
    """BaselineNet (GAP + Linear) with the same features and head weights: identical logits."""
    fc = nn.Linear(2, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 0.5]]))
        fc.bias.copy_(torch.tensor([-0.1, -0.3]))
    return BaselineNet(hand_built_features(bright_threshold), fc, arch="hand-built").eval()


def square_image(
    squares: list[tuple[int, int, int, float]], size: int = IMAGE_SIZE, noise: float = 0.05, seed: int = 0
) -> torch.Tensor:
    """(3, size, size) image: small Gaussian noise plus squares ``(row, col, side, value)``."""
    generator = torch.Generator().manual_seed(seed)
    image = noise * torch.randn(3, size, size, generator=generator)
    for row, col, side, value in squares:
        image[:, row:row + side, col:col + side] = value
    return image


@pytest.fixture
def hand_built_softcam_net() -> SoftCAMNet:
    return hand_built_softcam()


@pytest.fixture
def hand_built_baseline_net() -> BaselineNet:
    return hand_built_baseline()


class Tripwire(nn.Module):
    """Identity that raises on its ``fail_on``-th call (1-based): forces a method to fail mid-way."""

    def __init__(self, fail_on: int | None = None):
        super().__init__()
        self.fail_on = fail_on
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError(f"tripwire: forced failure on call {self.calls}")
        return x


def hand_built_softcam_with_tripwire(fail_on: int | None = None) -> SoftCAMNet:
    """The hand-built SoftCAM net with a :class:`Tripwire` in front of its evidence head."""
    net = hand_built_softcam()
    net.evidence = nn.Sequential(Tripwire(fail_on), net.evidence)
    return net


def sanity_features() -> nn.Sequential:
    """Two hand-set conv layers (3x3) + ReLU + 4x4 average pooling, 8 channels.

    Channel 0 carries the bright-square detector through both layers (``relu(mean_rgb - 1)``);
    channels 1-7 are fixed random filters (seeded), i.e. texture features the class-0 evidence
    ignores but class 1 uses. Used for the model-randomisation sanity check (Adebayo et al. 2018).
    """
    generator = torch.Generator().manual_seed(7)
    first, second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    with torch.no_grad():
        first.weight.copy_(0.3 * torch.randn(first.weight.shape, generator=generator))
        first.bias.zero_()
        first.weight[0] = 0.0
        first.weight[0, :, 1, 1] = 1.0 / 3.0
        first.bias[0] = -1.0
        second.weight.copy_(0.2 * torch.randn(second.weight.shape, generator=generator))
        second.bias.zero_()
        second.weight[0] = 0.0
        second.weight[0, 0, 1, 1] = 1.0
        second.weight[1:, 0] = 0.0  # the texture channels do not read the detector
    return nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.AvgPool2d(POOL))


def _sanity_head_weights() -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(2, 8)
    weight[0, 0] = 4.0
    weight[1, 1:] = 0.1
    return weight, torch.tensor([-0.1, -0.3])


def sanity_softcam() -> SoftCAMNet:
    head = nn.Conv2d(8, 2, kernel_size=1)
    weight, bias = _sanity_head_weights()
    with torch.no_grad():
        head.weight.copy_(weight.view(2, 8, 1, 1))
        head.bias.copy_(bias)
    return SoftCAMNet(sanity_features(), head, arch="hand-built").eval()


def sanity_baseline() -> BaselineNet:
    fc = nn.Linear(8, 2)
    weight, bias = _sanity_head_weights()
    with torch.no_grad():
        fc.weight.copy_(weight)
        fc.bias.copy_(bias)
    return BaselineNet(sanity_features(), fc, arch="hand-built").eval()
