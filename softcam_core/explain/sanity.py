"""Sanity baselines: model-free maps a real explanation must beat.

**Model-free maps** (method names ``sanity:edge``, ``sanity:random``, ``sanity:centre``, run through
:func:`softcam_core.explain.explain` like every other method; they ignore the model and the target):

* :func:`edge_map` -- ``sum_c |x_c - G_sigma * x_c|`` on the model input (sigma = 3 px): a
  model-free edge detector. Non-negative.
* :func:`random_map` -- zero-mean Gaussian noise drawn on a grid of ``stride``-pixel cells (the
  last feature map of a stride-32 backbone; at least 4 cells per side) and bilinearly upsampled as
  a CAM is: a chance baseline with the spatial smoothness of a CAM. Seeded by ``seed`` and the
  image's bytes. Signed.
* :func:`centre_map` -- an isotropic Gaussian centred on the image, sigma = 0.25 x the shorter
  side: the "centre bias" prior. Non-negative, peak 1.

Each image's map depends on that image (and the options) only, so a batch gives the maps of its
images one by one.

The model-randomisation test (Adebayo et al. 2018) is :mod:`softcam_core.explain.randomisation`.

See docs/explain.md ("Sanity baselines", "Model-randomisation test").
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from softcam_core.explain.specs import SANITY_METHODS, SANITY_PREFIX  # noqa: F401  (re-exported)

EDGE_SIGMA = 3.0  # px: Gaussian blur of the edge map
RANDOM_STRIDE = 32  # px per noise cell: the output stride of ResNet / VGG / DenseNet / EfficientNet / ConvNeXt
RANDOM_MIN_CELLS = 4  # noise cells per side at least (a 1 x 1 grid would be a constant map)
CENTRE_SIGMA_FRACTION = 0.25  # sigma of the centre prior as a fraction of the shorter side


# ------------------------------------------------------------------------------------ model-free maps
def _check_batch(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of images (B, C, H, W) with ``sigma`` px (torchvision's ``gaussian_blur``).

    Kernel side ``2 ceil(3 sigma) + 1`` (cut to what reflect padding allows: < 2 min(H, W)), reflect
    padding at the border, so a constant image stays constant. Same rule as the ``"blur"`` deletion
    baseline in :mod:`softcam_core.metrics`.
    """
    from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 px, got {sigma!r}")
    kernel = 2 * math.ceil(3 * sigma) + 1
    limit = 2 * min(x.shape[-2:]) - 1  # reflect padding must stay inside the image
    kernel = min(kernel, limit if limit % 2 else limit - 1)
    if kernel < 3:
        return x.clone()
    return tv_gaussian_blur(x, [kernel, kernel], [float(sigma), float(sigma)])


def edge_map(x: torch.Tensor, sigma: float = EDGE_SIGMA) -> torch.Tensor:
    """Model-free edge map ``sum_c |x_c - G_sigma * x_c|``: (B, C, H, W) -> (B, H, W), float32, >= 0.

    Computed on the (normalised) model input, in its units, with ``sigma`` in px (default 3).
    High along intensity edges and on small bright or dark structures (lesions, vessels, text),
    0 on flat regions.
    """
    _check_batch(x)
    x = x.float()
    return (x - gaussian_blur(x, sigma)).abs().sum(1)


def _image_seed(image: torch.Tensor, seed: int) -> int:
    """63-bit generator seed from an image's float32 bytes and ``seed`` (SHA-256)."""
    digest = hashlib.sha256(image.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(int(seed).to_bytes(16, "little", signed=True))
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


def random_map(x: torch.Tensor, seed: int = 0, stride: int = RANDOM_STRIDE) -> torch.Tensor:
    """Random signed map per image: (B, C, H, W) -> (B, H, W), float32, spatial mean exactly 0.

    i.i.d. N(0, 1) values on a grid of ``max(ceil(side / stride), 4)`` cells per side (at most
    ``side``), bilinearly upsampled to H x W (``align_corners=False``, as :func:`explain` resizes a
    CAM), minus the map's mean. The default stride 32 px gives the last-feature-map grid of the
    supported backbones (7 x 7 at 224 px, 4 x 4 at 112 px), so the noise is as smooth as a CAM;
    the floor of 4 cells keeps small inputs from a constant map; ``stride=1`` gives i.i.d. pixels.

    Deterministic: the generator (CPU, so CPU and CUDA inputs give the same map) is seeded from
    SHA-256 of the image's float32 bytes and ``seed``: the same image gives the same map, another
    image (or seed) another map.
    """
    _check_batch(x)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive int (px), got {stride!r}")
    height, width = x.shape[-2:]
    grid = tuple(min(side, max(math.ceil(side / stride), RANDOM_MIN_CELLS)) for side in (height, width))
    cells = torch.stack([
        torch.randn(grid, generator=torch.Generator().manual_seed(_image_seed(image, int(seed))))
        for image in x
    ])
    if grid != (height, width):
        cells = F.interpolate(cells[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    cells = cells - cells.mean(dim=(1, 2), keepdim=True)
    return cells.to(x.device, torch.float32)


def centre_map(x: torch.Tensor, sigma_fraction: float = CENTRE_SIGMA_FRACTION) -> torch.Tensor:
    """Centre-bias prior: (B, C, H, W) -> (B, H, W) float32, ``exp(-r^2 / (2 sigma^2))`` in (0, 1].

    ``r`` = distance (px) of each pixel centre from the image centre ``((H-1)/2, (W-1)/2)``;
    isotropic, ``sigma = sigma_fraction * min(H, W)`` px (default 0.25). The same map for every
    image; peak 1 at the centre (at the 4 central pixels of an even side), symmetric under flips.
    """
    _check_batch(x)
    if not sigma_fraction > 0:
        raise ValueError(f"sigma_fraction must be > 0, got {sigma_fraction!r}")
    height, width = x.shape[-2:]
    sigma = float(sigma_fraction) * min(height, width)
    rows = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    cols = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    prior = torch.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / (2 * sigma**2)).float()
    return prior.expand(x.shape[0], height, width).to(x.device).clone()


SANITY_MAPS = {"sanity:edge": edge_map, "sanity:random": random_map, "sanity:centre": centre_map}
assert tuple(SANITY_MAPS) == SANITY_METHODS, "the registry (specs.py) and the maps list the same sanity methods"
