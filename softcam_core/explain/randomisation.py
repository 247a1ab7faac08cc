"""The model-randomisation test (Adebayo et al. 2018, "Sanity checks for saliency maps", cascading randomisation).

:func:`randomise_top_layers` re-initialises the top k units (blocks or layers) of a copy of the
model with their default init; :func:`model_randomisation_test` compares the trained model's maps
with the randomised models' maps per depth and image: Spearman rank correlation of the raw maps and
of their absolute values, and SSIM of the min-max normalised maps. A method that explains the model
has a low correlation; a model-free map scores 1 by construction.

See docs/explain.md ("Model-randomisation test").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

UNITS = ("block", "layer")


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
    from softcam_core.explain.api import explain
    from softcam_core.explain.methods import _predicted, num_classes_of, resolve_targets

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
