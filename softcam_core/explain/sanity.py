"""Sanity baselines: model-free maps a real explanation must beat, and the model-randomisation test.

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

**Model-randomisation test** (Adebayo et al. 2018, "Sanity checks for saliency maps", cascading
randomisation): :func:`randomise_top_layers` re-initialises the top k units (blocks or layers) of
a copy of the model with their default init, :func:`model_randomisation_test` compares the trained
model's maps with the randomised models' maps per depth and image: Spearman rank correlation of
the raw maps and of their absolute values, and SSIM of the min-max normalised maps. A method that
explains the model has a low correlation; a model-free map scores 1 by construction.

See docs/explain.md ("Sanity baselines", "Model-randomisation test").
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SANITY_PREFIX = "sanity:"
EDGE_SIGMA = 3.0  # px: Gaussian blur of the edge map
RANDOM_STRIDE = 32  # px per noise cell: the output stride of ResNet / VGG / DenseNet / EfficientNet / ConvNeXt
RANDOM_MIN_CELLS = 4  # noise cells per side at least (a 1 x 1 grid would be a constant map)
CENTRE_SIGMA_FRACTION = 0.25  # sigma of the centre prior as a fraction of the shorter side
UNITS = ("block", "layer")


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
SANITY_METHODS = tuple(SANITY_MAPS)


# ------------------------------------------------------------------------------ model randomisation
def _resettable(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None))


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _expand_blocks(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Plain ``nn.Sequential`` containers are opened (recursively); any other module is one block."""
    if type(module) is nn.Sequential:
        out = []
        for child_name, child in module.named_children():
            out += _expand_blocks(f"{name}.{child_name}" if name else child_name, child)
        return out
    if any(_resettable(m) and _owns_parameters(m) for m in module.modules()):
        return [(name, module)]
    return []


def randomisation_units(model: nn.Module, unit: str = "block") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the units :func:`randomise_top_layers` re-initialises, **top first**.

    Order: the model's module registration order (forward order for ``SoftCAMNet`` = features then
    evidence head, ``BaselineNet`` = features then fc, torchvision classifiers), reversed, so unit
    0 is always the head (SoftCAM: the 1x1 class-evidence conv; baseline: the fc layer).

    Args:
        unit: ``"block"``: every child of a plain ``nn.Sequential`` is opened (recursively), other
            modules with parameters are one unit each -- a ResNet gives its residual blocks
            (``features.layer4.1``), DenseNet its dense blocks and transitions, EfficientNet its
            MBConv blocks, VGG its single layers; the head is one unit per layer it has (VGG's
            SoftCAM head: three 1x1 convs). ``"layer"``: every module that owns parameters and has
            ``reset_parameters`` (Conv2d, Linear, BatchNorm, LayerNorm) is one unit. A parameter on
            a module without ``reset_parameters`` (ConvNeXt's ``layer_scale``) is never re-drawn.
    """
    if unit == "layer":
        units = [(n, m) for n, m in model.named_modules() if _owns_parameters(m) and _resettable(m)]
    elif unit == "block":
        units = []
        for name, child in model.named_children():
            units += _expand_blocks(name, child)
    else:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return units[::-1]


def _reset(module: nn.Module, seed: int) -> None:
    """Default init (``reset_parameters``, batch norms' running statistics too) of every submodule,
    drawn from a generator seeded with ``seed`` (the global RNG state is left as it was)."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for sub in module.modules():
            if _resettable(sub):
                sub.reset_parameters()


def _unit_seed(seed: int, index: int) -> int:
    """Seed of the unit ``index`` (0 = top): the same values at every randomisation depth."""
    return (int(seed) * 1_000_003 + int(index)) % (1 << 63)


def _copy(model: nn.Module) -> nn.Module:
    from softcam_core.explain.guard import model_lock

    with model_lock(model):  # not while another thread has its hooks on the model
        return copy.deepcopy(model)


def randomise_top_layers(
    model: nn.Module, n: int, seed: int = 0, unit: str = "block", cascade: bool = True
) -> nn.Module:
    """Copy of ``model`` with its top ``n`` units re-initialised (``model`` itself is never changed).

    Args:
        model: any model :func:`explain` takes (SoftCAMNet, BaselineNet, torchvision classifier).
        n: how many units from the top (:func:`randomisation_units`); 0 = an unchanged copy.
        seed: unit ``i`` (0 = top) is drawn from seed ``seed * 1000003 + i``, so depth n + 1 keeps
            depth n's random values and adds one more unit (cascading randomisation). The draw
            happens on the parameters' device (CPU and CUDA give different values).
        unit: ``"block"`` or ``"layer"`` (see :func:`randomisation_units`).
        cascade: True = units 0 .. n-1 (Adebayo et al.'s cascading randomisation); False = unit
            ``n - 1`` alone (their independent layer randomisation).
    Returns:
        the copy, in the training mode of ``model``, same device and dtype; hooks are copied too.
    """
    units = randomisation_units(model, unit)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= len(units):
        raise ValueError(f"n must be an int in 0..{len(units)} ({unit}s of {type(model).__name__}), got {n!r}")
    copied = _copy(model)
    copied_units = randomisation_units(copied, unit)
    chosen = range(n) if cascade else range(n - 1, n) if n else range(0)
    for index in chosen:
        _reset(copied_units[index][1], _unit_seed(seed, index))
    return copied


def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened; ties get average ranks).

    A constant map has no ranking: two constant maps give 1.0 (nothing changed), one constant map
    against a varying one gives 0.0.
    """
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    flat_a, flat_b = np.ptp(a) == 0, np.ptp(b) == 0
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b else 0.0
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _min_max(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    span = np.ptp(a)
    return np.zeros_like(a) if span == 0 else (a - a.min()) / span


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of two (H, W) maps after min-max scaling to [0, 1].

    Gaussian window sigma 1.5 px (truncated at 3.5 sigma: 11 x 11), K1 = 0.01, K2 = 0.03, data
    range 1, population covariances; the mean leaves out a 5 px border where the window leaves the
    map (as scikit-image's ``structural_similarity(gaussian_weights=True)``) when the map is wider
    than 11 px. A constant map scales to 0.
    """
    from scipy.ndimage import gaussian_filter

    a, b = _min_max(a), _min_max(b)
    blur = lambda v: gaussian_filter(v, sigma, truncate=3.5, mode="reflect")  # noqa: E731
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = 5
    if min(index.shape) > 2 * pad + 1:
        index = index[pad:-pad, pad:-pad]
    return float(index.mean())


@dataclass
class RandomisationResult:
    """Outcome of :func:`model_randomisation_test`: D randomisation depths x B images.

    Attributes:
        method: the explanation method.
        unit: ``"block"`` or ``"layer"``.
        cascade: cascading (top ``depth`` units) or independent (unit ``depth - 1`` alone).
        depths: (D,) units randomised (from the top) per row.
        layers: (D,) name of the lowest unit randomised at that depth (e.g. ``"evidence"``,
            ``"features.7.1"``).
        targets: (B,) classes explained -- the same for the trained and every randomised model.
        spearman: (D, B) Spearman rank correlation of the trained and the randomised map.
        spearman_abs: (D, B) the same of the absolute maps (Adebayo et al. report both).
        ssim: (D, B) SSIM of the min-max scaled maps.
        reference: (B, H, W) the trained model's maps, when ``keep_maps``.
        maps: (D, B, H, W) the randomised models' maps, when ``keep_maps``.
    """

    method: str
    unit: str
    cascade: bool
    depths: list[int]
    layers: list[str]
    targets: list[int]
    spearman: np.ndarray
    spearman_abs: np.ndarray
    ssim: np.ndarray
    reference: np.ndarray | None = None
    maps: np.ndarray | None = field(default=None, repr=False)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per depth x image: method, depth, layer, image (index), target, spearman, spearman_abs, ssim."""
        return [
            {"method": self.method, "depth": d, "layer": self.layers[i], "image": b, "target": self.targets[b],
             "spearman": float(self.spearman[i, b]), "spearman_abs": float(self.spearman_abs[i, b]),
             "ssim": float(self.ssim[i, b])}
            for i, d in enumerate(self.depths) for b in range(len(self.targets))
        ]

    def summary(self) -> list[dict[str, Any]]:
        """One dict per depth: method, depth, layer, and the image means of the three similarities."""
        return [
            {"method": self.method, "depth": d, "layer": self.layers[i],
             "spearman": float(self.spearman[i].mean()), "spearman_abs": float(self.spearman_abs[i].mean()),
             "ssim": float(self.ssim[i].mean())}
            for i, d in enumerate(self.depths)
        ]


def model_randomisation_test(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    target: int | Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    seed: int = 0,
    unit: str = "block",
    cascade: bool = True,
    keep_maps: bool = False,
    **options: Any,
) -> RandomisationResult:
    """Adebayo et al. (2018) model-randomisation test of ``method`` on images ``x``.

    The trained model's maps are compared, image by image, with the maps of
    :func:`randomise_top_layers` copies (one per depth). Low similarity = the map depends on the
    weights (pass); similarity near 1 = it does not (fail). ``model`` is never changed.

    Args:
        model: as for :func:`explain`.
        x: normalised images (B, 3, H, W).
        method: any :func:`explain` method (``cascam:<base>`` and ``sanity:*`` included).
        target: as for :func:`explain`; None = the **trained** model's prediction, kept for every
            randomised model (so each explains the same class).
        depths: numbers of units randomised from the top (each in 1 .. number of units); default
            all of them, 1, 2, ..., i.e. the full cascade.
        seed, unit, cascade: see :func:`randomise_top_layers`.
        keep_maps: also return the maps.
        **options: passed to :func:`explain` for every map.
    Returns:
        :class:`RandomisationResult`.
    """
    from softcam_core.explain.methods import _predicted, explain, num_classes_of, resolve_targets

    units = randomisation_units(model, unit)
    if depths is None:
        depths = list(range(1, len(units) + 1))
    depths = [int(d) for d in depths]
    bad = [d for d in depths if not 1 <= d <= len(units)]
    if bad or not depths:
        raise ValueError(f"depths must lie in 1..{len(units)} ({unit}s of {type(model).__name__}), got {depths!r}")
    targets = resolve_targets(target, x.shape[0], num_classes_of(model))
    if targets is None:  # the trained model's prediction, in eval mode (as explain runs it)
        from softcam_core.explain.guard import eval_locked

        weight = next(model.parameters(), None)
        with eval_locked(model):
            targets = _predicted(model, x.detach().float().to(weight.device) if weight is not None else x)
    reference = explain(model, x, method, target=targets, **options).detach().cpu().numpy()
    names = [name for name, _ in units]
    rho = np.zeros((len(depths), x.shape[0]))
    rho_abs, similarity = np.zeros_like(rho), np.zeros_like(rho)
    kept = []
    # cascading: one copy randomised one more unit at a time (unit i always drawn from the same seed)
    cascade_copy, cascade_units, done = None, None, 0
    for i, depth in enumerate(depths):
        if cascade and depth >= done:
            if cascade_copy is None:
                cascade_copy = _copy(model)
                cascade_units = randomisation_units(cascade_copy, unit)
            for index in range(done, depth):
                _reset(cascade_units[index][1], _unit_seed(seed, index))
            done, randomised = depth, cascade_copy
        else:
            randomised = randomise_top_layers(model, depth, seed=seed, unit=unit, cascade=cascade)
        maps = explain(randomised, x, method, target=targets, **options).detach().cpu().numpy()
        for b in range(x.shape[0]):
            rho[i, b] = spearman(reference[b], maps[b])
            rho_abs[i, b] = spearman(np.abs(reference[b]), np.abs(maps[b]))
            similarity[i, b] = ssim(reference[b], maps[b])
        if keep_maps:
            kept.append(maps)
    return RandomisationResult(
        method=method, unit=unit, cascade=cascade, depths=depths, layers=[names[d - 1] for d in depths],
        targets=list(targets), spearman=rho, spearman_abs=rho_abs, ssim=similarity,
        reference=reference if keep_maps else None, maps=np.stack(kept) if keep_maps else None,
    )
