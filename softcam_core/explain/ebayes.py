"""Empirical-Bayes thresholding (Johnstone & Silverman 2004, 2005) with a Laplace prior.

Model, for standardised observations ``x_i = mu_i + eps_i`` with ``eps_i ~ N(0, 1)``::

    mu ~ (1 - w) * delta_0 + w * gamma_a,      gamma_a(u) = (a / 2) * exp(-a |u|)

The marginal density of ``x`` is ``(1 - w) phi(x) + w g(x)`` with ``g = gamma_a * phi`` and::

    beta(x) = g(x) / phi(x) - 1 = (a / 2) [Phi(x - a) / phi(x - a) + Phi~(x + a) / phi(x + a)] - 1

(``Phi~ = 1 - Phi``). The mixing weight ``w`` is the marginal maximum-likelihood estimate, i.e. the
root in ``w`` of the score ``S(w) = sum_i beta(x_i) / (1 + w beta(x_i))`` (decreasing in ``w``),
restricted to ``[w_lo, 1]`` where ``w_lo`` is the weight whose threshold is the universal threshold
``sqrt(2 log n)`` (Johnstone & Silverman 2004, section 2.3). The estimate of each ``mu_i`` is its
posterior median, which is exactly zero for ``|x| <= t(w)``: a thresholding rule with a data-driven
threshold. For ``x >= 0`` (odd symmetry for ``x < 0``)::

    z(x)     = phi(x - a) (1 / w + beta(x)) / a
    median   = max(0, x - a - Phi^{-1}(min(z, 1)))

(the R package EbayesThresh, ``postmed.laplace``, uses the same expression). ``z`` is evaluated in a
form that never multiplies an overflowing ``beta`` by an underflowing ``phi``:
``z = phi(x - a)(1/w - 1)/a + Phi(x - a)/2 + sqrt(pi/2) phi(x - a) erfcx((x + a)/sqrt 2) / 2``.

Raw (non-standardised) data are divided by a noise level ``sigma`` estimated by the median
absolute deviation about zero, ``1.4826 * median(|x|)`` (EbayesThresh's default
``mad(x, center = 0)``).

All functions are pure numpy/scipy; they are pinned by tests against numerical integration.

The maths is exact for its model (sparse signal + i.i.d. N(0, sigma^2) noise). CasCAM's
``threshold="ebayes"`` (:func:`softcam_core.explain.cascam.ebayes_mask`) applies it to ReLU'd,
bilinearly upsampled maps scaled to [0, 1], which break that model (no symmetric noise, many exact
zeros, correlated pixels): there it is a heuristic, see docs/explain.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

MAD_TO_SIGMA = 1.4826  # 1 / Phi^{-1}(3/4): MAD of a standard normal -> its standard deviation
_SQRT_HALF_PI = float(np.sqrt(np.pi / 2.0))
_X_CLIP = 35.0  # beyond |x| = 35 the prior's tail dominates completely; keeps erfcx finite


def beta_laplace(x: np.ndarray | float, a: float = 0.5) -> np.ndarray:
    """``g(x) / phi(x) - 1`` for the Laplace(a) prior; symmetric in ``x``; float64 array like ``x``.

    Uses ``Phi(z) / phi(z) = sqrt(pi/2) erfcx(-z / sqrt 2)`` and
    ``Phi~(z) / phi(z) = sqrt(pi/2) erfcx(z / sqrt 2)``, stable for ``|x| <= 35``.
    """
    x = np.clip(np.abs(np.asarray(x, dtype=np.float64)), 0.0, _X_CLIP)
    ratio_left = _SQRT_HALF_PI * special.erfcx(-(x - a) / np.sqrt(2.0))
    ratio_right = _SQRT_HALF_PI * special.erfcx((x + a) / np.sqrt(2.0))
    return 0.5 * a * (ratio_left + ratio_right) - 1.0


def laplace_marginal_density(x: np.ndarray | float, a: float = 0.5) -> np.ndarray:
    """``g(x) = (gamma_a * phi)(x)``, the density of ``x`` given ``mu != 0``; float64."""
    x = np.asarray(x, dtype=np.float64)
    return stats.norm.pdf(x) * (1.0 + beta_laplace(x, a))


def posterior_median(x: np.ndarray | float, w: float, a: float = 0.5) -> np.ndarray:
    """Posterior median of ``mu`` given standardised ``x`` under the ``(1-w) delta_0 + w Laplace(a)`` prior.

    Args:
        x: standardised observations (any shape).
        w: prior mixing weight in (0, 1].
        a: Laplace scale parameter (inverse scale: density ``(a/2) exp(-a|u|)``).
    Returns:
        float64 array like ``x``; exactly 0 where ``|x| <= threshold_from_weight(w, a)``.
    """
    if not 0.0 < w <= 1.0:
        raise ValueError(f"mixing weight w must be in (0, 1], got {w}")
    x = np.asarray(x, dtype=np.float64)
    sign = np.sign(x)
    mag = np.abs(x)
    xm = np.minimum(mag, _X_CLIP)
    dens = stats.norm.pdf(xm - a)
    z = (
        dens * (1.0 / w - 1.0) / a
        + 0.5 * stats.norm.cdf(xm - a)
        + 0.5 * _SQRT_HALF_PI * dens * special.erfcx((xm + a) / np.sqrt(2.0))
    )
    correction = stats.norm.ppf(np.minimum(z, 1.0))
    # far in the tail the posterior is N(x - a, 1) truncated at 0 with negligible mass near 0
    correction = np.where(mag > _X_CLIP, 0.0, correction)
    return sign * np.maximum(0.0, mag - a - correction)


def threshold_from_weight(w: float, a: float = 0.5) -> float:
    """The threshold ``t(w)``: the posterior median is 0 exactly for ``|x| <= t(w)``. Decreasing in ``w``."""
    if not 0.0 < w <= 1.0:
        raise ValueError(f"mixing weight w must be in (0, 1], got {w}")

    def excess(x: float) -> float:
        dens = stats.norm.pdf(x - a)
        z = (
            dens * (1.0 / w - 1.0) / a
            + 0.5 * stats.norm.cdf(x - a)
            + 0.5 * _SQRT_HALF_PI * dens * special.erfcx((x + a) / np.sqrt(2.0))
        )
        return x - a - stats.norm.ppf(min(z, 1.0 - 1e-16))

    if excess(0.0) >= 0.0:
        return 0.0
    return float(optimize.brentq(excess, 0.0, 2.0 * _X_CLIP, xtol=1e-12))


def weight_from_threshold(t: float, a: float = 0.5) -> float:
    """Inverse of :func:`threshold_from_weight`: the weight ``w`` whose threshold is ``t`` (>= 0)."""
    if t <= 0.0:
        return 1.0
    lo, hi = 1e-12, 1.0
    if threshold_from_weight(lo, a) <= t:
        return lo
    return float(optimize.brentq(lambda w: threshold_from_weight(w, a) - t, lo, hi, xtol=1e-14, rtol=1e-12))


def weight_mml(x: np.ndarray, a: float = 0.5, universal_floor: bool = True) -> float:
    """Marginal maximum-likelihood mixing weight for standardised data ``x`` (Johnstone & Silverman).

    Maximises ``sum_i log(1 + w beta(x_i))`` over ``w in [w_lo, 1]``; ``w_lo`` gives the universal
    threshold ``sqrt(2 log n)`` when ``universal_floor`` (else a tiny positive number).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("empirical-Bayes weight needs at least one observation")
    beta = beta_laplace(x, a)
    w_lo = weight_from_threshold(float(np.sqrt(2.0 * np.log(x.size))), a) if universal_floor and x.size > 1 else 1e-12

    def score(w: float) -> float:
        return float(np.sum(beta / (1.0 + w * beta)))

    if score(1.0) >= 0.0:
        return 1.0
    if score(w_lo) <= 0.0:
        return float(w_lo)
    return float(optimize.brentq(score, w_lo, 1.0, xtol=1e-12))


def mad_sigma(x: np.ndarray) -> float:
    """Noise level by the median absolute deviation about zero: ``1.4826 * median(|x|)``."""
    return float(MAD_TO_SIGMA * np.median(np.abs(np.asarray(x, dtype=np.float64))))


@dataclass(frozen=True)
class EBayesResult:
    """Output of :func:`ebayes_threshold`: ``estimate`` has the input's shape (float64)."""

    estimate: np.ndarray
    sigma: float      # noise level used to standardise, in the data's units
    weight: float     # MML mixing weight w
    threshold: float  # t(w) * sigma, in the data's units: values with |x| <= threshold become 0
    a: float


def ebayes_threshold(
    values: np.ndarray, a: float = 0.5, sigma: float | None = None, sigma_floor: float = 0.0
) -> EBayesResult:
    """Empirical-Bayes posterior-median thresholding of ``values`` (any shape, any units).

    Args:
        values: noisy observations; the sparse signal sits on a zero background.
        a: Laplace prior scale (Johnstone & Silverman's default 0.5).
        sigma: noise level; default :func:`mad_sigma` of ``values``.
        sigma_floor: lower bound for the noise level (guards a zero MAD, e.g. a map that is
            exactly zero on more than half its pixels).
    Returns:
        :class:`EBayesResult` with ``estimate = sigma * posterior_median(values / sigma, w, a)``.
    Raises:
        ValueError: if the noise level is zero and no floor is given.
    """
    values = np.asarray(values, dtype=np.float64)
    sigma = mad_sigma(values) if sigma is None else float(sigma)
    sigma = max(sigma, sigma_floor)
    if not sigma > 0.0:
        raise ValueError("noise level is zero (more than half the values are 0); pass sigma or sigma_floor")
    standardised = values / sigma
    weight = weight_mml(standardised, a)
    estimate = sigma * posterior_median(standardised, weight, a)
    return EBayesResult(estimate, sigma, weight, threshold_from_weight(weight, a) * sigma, a)
