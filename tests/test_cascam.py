"""CasCAM cascade (paper defaults, units, retrain mode) and the empirical-Bayes threshold maths."""

from __future__ import annotations

import importlib
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from softcam_core.explain import cascam, explain
from softcam_core.explain import ebayes, retrain
from softcam_core.explain.cascam import ebayes_mask, normalise_positive, stage_weights, topk_mask
from tests.plugins.explain import IMAGE_SIZE, POOL, hand_built_baseline, hand_built_softcam, square_image

# the module (softcam_core.explain re-exports the function under the module's name)
C = importlib.import_module("softcam_core.explain.cascam")

A = 0.5


# ------------------------------------------------------------------ independent numerical references
def _g_quad(x: float, a: float = A) -> float:
    """Marginal density of x given mu != 0 by quadrature of Laplace(a) * N(0, 1)."""
    f = lambda u: 0.5 * a * math.exp(-a * abs(u)) * stats.norm.pdf(x - u)  # noqa: E731
    return integrate.quad(f, -np.inf, 0.0)[0] + integrate.quad(f, 0.0, np.inf)[0]


def _posterior_median_quad(x: float, w: float, a: float = A) -> float:
    """Posterior median by quadrature of the posterior (atom at 0 + continuous part)."""
    g = _g_quad(x, a)
    w_post = w * g / (w * g + (1 - w) * stats.norm.pdf(x))
    f = lambda u: 0.5 * a * math.exp(-a * abs(u)) * stats.norm.pdf(x - u) / g  # noqa: E731
    below_zero = w_post * integrate.quad(f, -np.inf, 0.0)[0]

    def cdf(m: float) -> float:
        if m < 0:
            return w_post * integrate.quad(f, -np.inf, m)[0]
        return below_zero + (1 - w_post) + w_post * integrate.quad(f, 0.0, m)[0]

    if below_zero <= 0.5 <= below_zero + (1 - w_post):
        return 0.0
    if below_zero > 0.5:
        return optimize.brentq(lambda m: cdf(m) - 0.5, -60.0, -1e-12)
    return optimize.brentq(lambda m: cdf(m) - 0.5, 1e-12, 60.0)


# ------------------------------------------------------------------------------------- ebayes maths
@pytest.mark.parametrize("x", [0.0, 0.7, 2.0, 4.5, 9.0])
def test_marginal_density_matches_quadrature(x):
    assert ebayes.laplace_marginal_density(x, A) == pytest.approx(_g_quad(x), rel=1e-9)
    assert ebayes.beta_laplace(-x, A) == pytest.approx(ebayes.beta_laplace(x, A))


@pytest.mark.parametrize("w", [0.02, 0.3, 0.9])
@pytest.mark.parametrize("x", [0.5, 1.8, 3.0, 6.5, -3.6])
def test_posterior_median_matches_quadrature(x, w):
    assert float(ebayes.posterior_median(x, w, A)) == pytest.approx(_posterior_median_quad(x, w), abs=1e-6)


@pytest.mark.parametrize("w", [0.01, 0.1, 0.5, 0.95])
def test_threshold_is_where_the_quadrature_median_leaves_zero(w):
    t = ebayes.threshold_from_weight(w, A)
    assert _posterior_median_quad(t - 1e-3, w) == 0.0
    assert _posterior_median_quad(t + 1e-3, w) > 0.0
    assert ebayes.weight_from_threshold(t, A) == pytest.approx(w, rel=1e-6)


def test_threshold_facts():
    # w = 1: no atom at zero, the posterior median is 0 only at x = 0
    assert ebayes.threshold_from_weight(1.0, A) == pytest.approx(0.0, abs=1e-9)
    ts = [ebayes.threshold_from_weight(w, A) for w in (1e-4, 1e-3, 1e-2, 0.1, 0.5)]
    assert all(a > b for a, b in zip(ts, ts[1:]))  # decreasing in w
    # far from zero the Laplace prior shrinks by a: median -> x - a
    assert float(ebayes.posterior_median(40.0, 0.3, A)) == pytest.approx(40.0 - A, abs=1e-6)


def _g_trapezoid(x: np.ndarray, a: float = A) -> np.ndarray:
    """Marginal density by the trapezoid rule on a fine grid (vectorised; independent of the closed form)."""
    u = np.linspace(-40.0, 40.0, 16001)
    prior = 0.5 * a * np.exp(-a * np.abs(u))
    return np.trapezoid(prior[None, :] * stats.norm.pdf(x[:, None] - u[None, :]), u, axis=1)


def test_mml_weight_maximises_the_numerical_likelihood():
    rng = np.random.default_rng(0)
    n = 300
    mu = np.where(rng.random(n) < 0.15, rng.laplace(scale=1 / A, size=n), 0.0)
    x = mu + rng.standard_normal(n)
    g = _g_trapezoid(x)
    np.testing.assert_allclose(g, ebayes.laplace_marginal_density(x, A), rtol=1e-4)
    phi = stats.norm.pdf(x)
    grid = np.linspace(0.001, 1.0, 2000)
    loglik = [np.sum(np.log((1 - w) * phi + w * g)) for w in grid]
    w_grid = grid[int(np.argmax(loglik))]
    w_hat = ebayes.weight_mml(x, A, universal_floor=False)
    assert w_hat == pytest.approx(w_grid, abs=1e-3)
    assert 0.05 < w_hat < 0.35  # near the true 0.15


def test_mml_weight_floor_is_the_universal_threshold():
    x = np.random.default_rng(1).standard_normal(1000)  # pure noise: the MLE wants w -> 0
    w_hat = ebayes.weight_mml(x, A)
    assert ebayes.threshold_from_weight(w_hat, A) == pytest.approx(math.sqrt(2 * math.log(1000)), rel=1e-6)


def test_ebayes_threshold_recovers_sparse_signal():
    rng = np.random.default_rng(2)
    signal = np.zeros(2000)
    signal[:40] = 8.0
    noisy = 0.5 * (signal + rng.standard_normal(2000))  # sigma = 0.5
    result = ebayes.ebayes_threshold(noisy, A)
    assert result.sigma == pytest.approx(0.5, rel=0.1)  # MAD about zero
    assert np.count_nonzero(result.estimate[40:]) < 10
    assert np.all(result.estimate[:40] > 2.0)
    assert result.threshold == pytest.approx(ebayes.threshold_from_weight(result.weight, A) * result.sigma)
    with pytest.raises(ValueError, match="noise level is zero"):
        ebayes.ebayes_threshold(np.zeros(10))


# ------------------------------------------------------------------------------------------ CasCAM
MARKER = (2, 2, 6)  # row, col, side: strong shortcut marker
LESION = (18, 16, 8)  # weaker true lesion
Z = (IMAGE_SIZE // POOL) ** 2  # positions of the hand-built nets' feature map (8 x 8)


def _inside(map_2d: torch.Tensor, region) -> bool:
    row, col, side = region
    peak_row, peak_col = divmod(int(map_2d.argmax()), map_2d.shape[-1])
    return row <= peak_row < row + side and col <= peak_col < col + side


def _shortcut_case(net=None):
    """Bright detector threshold 0.5: marker (value 4) responds 3.5, lesion (value 1.5) responds 1.0."""
    net = hand_built_softcam(bright_threshold=0.5) if net is None else net
    x = square_image([(*MARKER, 4.0), (*LESION, 1.5)], seed=2)[None]
    return net, x


def _lesion_mean(map_2d: torch.Tensor) -> float:
    row, col, side = LESION
    return float(map_2d[row:row + side, col:col + side].mean())


def test_paper_defaults():
    """K = 10, theta = 0.3 on raw CAM units, top-10 %, lambda = 0.1, combined from the thresholded maps."""
    assert (C.DEFAULT_STAGES, C.DEFAULT_THETA, C.DEFAULT_LAMBDA) == (10, 0.3, 0.1)
    assert (C.DEFAULT_THRESHOLD, C.DEFAULT_TOPK_PERCENT) == ("topk", 10.0)
    assert (C.DEFAULT_UNITS, C.DEFAULT_COMBINE) == ("cam", "thresholded")
    defaults = {k: v.default for k, v in inspect.signature(cascam).parameters.items()}
    assert defaults["stages"] == 10 and defaults["theta"] == 0.3 and defaults["lam"] == 0.1
    assert defaults["threshold"] == "topk" and defaults["units"] == "cam" and defaults["combine"] == "thresholded"
    weights = stage_weights(10, 0.1)
    assert weights[0] / weights[-1] == pytest.approx(math.exp(0.9))  # later stages still count (0.15 vs 0.06)
    retrain_defaults = {k: v.default for k, v in inspect.signature(retrain.retrain_stage_models).parameters.items()}
    assert retrain_defaults["stages"] == 10 and retrain_defaults["theta"] == 0.3
    assert retrain_defaults["threshold"] == "topk" and retrain_defaults["units"] == "cam"
    assert retrain_defaults["epochs"] == 10 and retrain_defaults["patience"] == 1


def test_cam_units():
    """Z x Grad-CAM / XGrad-CAM / LayerCAM equal the raw CAM of a GAP + linear head (CAM >= 0 here);
    the SoftCAM evidence map is the same CAM plus the bias: theta means the same for all of them."""
    baseline = hand_built_baseline(bright_threshold=0.5)
    _, x = _shortcut_case()
    assert C.feature_positions(baseline, x) == Z
    raw_cam = explain(baseline, x, "cam", target=0)
    assert raw_cam.min() >= 0 and raw_cam.max() > 10  # class 0 = 4 * bright: about 12 logit units at the marker
    for base in ("gradcam", "xgradcam", "layercam"):
        units = C.to_units(baseline, x, explain(baseline, x, base, target=0), base, "cam", [0], Z)
        torch.testing.assert_close(units, raw_cam, rtol=1e-4, atol=1e-4)
    softcam_net = hand_built_softcam(bright_threshold=0.5)
    torch.testing.assert_close(explain(softcam_net, x, "softcam", target=0), raw_cam - 0.1, rtol=1e-5, atol=1e-5)
    # a base without CAM units is scaled to the peak of Z x Grad-CAM of the same input
    ablation = C.to_units(baseline, x, explain(baseline, x, "ablationcam", target=0), "ablationcam", "cam", [0], Z)
    assert float(ablation.max()) == pytest.approx(float(raw_cam.max()), rel=1e-4)
    # normalised units: the [0, 1] map
    torch.testing.assert_close(C.to_units(baseline, x, raw_cam, "cam", "normalised", [0], None), normalise_positive(raw_cam))


@pytest.mark.parametrize(
    "base, options, combined_gains",
    [("gradcam", {}, True), ("cam", {}, True), ("softcam", {}, True), ("gradcampp", {}, True), ("layercam", {}, True),
     ("integrated_gradients", {}, True), ("ablationcam", {}, False),
     ("gradcam", {"threshold": "none"}, True), ("gradcam", {"threshold": "ebayes", "combine": "maps"}, True),
     ("softcam", {"threshold": "ebayes", "combine": "maps"}, True),
     ("gradcam", {"stages": 3, "theta": 3.0, "lam": 0.5, "threshold": "none", "units": "normalised", "combine": "maps"},
      True),
     pytest.param("scorecam", {}, True, marks=pytest.mark.xfail(strict=True, reason=(
         "Score-CAM's softmax channel weights keep the dark-background channel in the map: after the marker "
         "is masked its stage-2 map is broad and misses the lesion")))],
)
def test_cascam_finds_the_lesion_behind_the_shortcut(base, options, combined_gains):
    """Paper defaults unless given: stage 0 shows the marker only, stage 1 the lesion behind it."""
    net, x = _shortcut_case(hand_built_baseline(0.5) if base == "cam" else None)
    base_map = explain(net, x, base)[0]
    assert _inside(base_map, MARKER)
    normalised = normalise_positive(base_map[None])[0]
    row, col, side = LESION
    assert normalised[row:row + side, col:col + side].max() < 0.35  # the base method shows the marker only
    result = cascam(net, x, base, **options)
    assert _inside(result.stage_maps[0], MARKER)
    assert _inside(result.stage_maps[1], LESION)
    if combined_gains:
        assert _lesion_mean(result.combined[0]) > _lesion_mean(normalised) + 0.1


def test_combined_map_differs_from_the_base_map_with_paper_defaults():
    """Two separate cues: with K = 10 the combined map is not the base map; with one cue it peaks there."""
    net, x = _shortcut_case()
    result = explain(net, x, "cascam:gradcam")[0]
    base = normalise_positive(explain(net, x, "gradcam"))[0]
    assert float((result - base).abs().max()) > 0.5
    assert _lesion_mean(result) > 2 * _lesion_mean(base)
    # with lambda = 0.1 the nine stages on the lesion outweigh stage 0: the hidden cue becomes the peak
    assert _inside(result, LESION)
    # one cue only: every stage stays on it (or its bilinear fringe, one feature cell = 4 px around it)
    single = explain(net, square_image([(*MARKER, 4.0)], seed=2)[None], "cascam:gradcam")[0]
    row, col, side = MARKER
    assert _inside(single, (max(row - POOL, 0), max(col - POOL, 0), side + 2 * POOL))
    near = single[:row + side + POOL, :col + side + POOL].sum()
    assert float(near / single.sum()) > 0.95


def test_cascam_maths_paper_defaults():
    """Each stage: p = Z * Grad-CAM, top-10 %, x <- x exp(-0.3 T(p)); combined = sum w N(T(p))."""
    net, x = _shortcut_case()
    result = cascam(net, x, "gradcam", stages=4)
    assert result.settings["feature_positions"] == Z and result.settings["units"] == "cam"
    torch.testing.assert_close(result.stage_inputs[0], x)
    for k in range(4):
        raw = explain(net, result.stage_inputs[k], "gradcam", target=result.targets)
        torch.testing.assert_close(result.stage_maps[k], normalise_positive(raw))
        suppressed = topk_mask(raw.clamp_min(0) * Z, 10.0)
        torch.testing.assert_close(result.stage_thresholded[k], normalise_positive(suppressed))
        assert round(0.1 * 32 * 32) <= int((suppressed > 0).sum()) < 0.15 * 32 * 32  # ties are kept
        if k < 3:
            torch.testing.assert_close(result.stage_inputs[k + 1],
                                       result.stage_inputs[k] * torch.exp(-0.3 * suppressed)[:, None])
    combined = sum(w * m for w, m in zip(stage_weights(4, 0.1), result.stage_thresholded))
    torch.testing.assert_close(result.combined, combined)
    torch.testing.assert_close(explain(net, x, "cascam:gradcam", stages=4), result.combined)


def test_cascam_maths_threshold_none_normalised_units():
    """The former default (K = 3, theta = 3 on [0, 1] maps, lambda = 0.5, no threshold), still reachable."""
    net, x = _shortcut_case()
    theta, lam = 2.0, 0.7
    options = dict(stages=3, theta=theta, lam=lam, threshold="none", units="normalised", combine="maps")
    result = cascam(net, x, "gradcam", **options)
    assert len(result.stage_maps) == len(result.stage_inputs) == 3
    torch.testing.assert_close(result.stage_inputs[0], x)
    for k in range(2):
        expected = result.stage_inputs[k] * torch.exp(-theta * result.stage_maps[k])[:, None]
        torch.testing.assert_close(result.stage_inputs[k + 1], expected)
        raw = explain(net, result.stage_inputs[k], "gradcam", target=result.targets)
        torch.testing.assert_close(result.stage_maps[k], normalise_positive(raw))
    weights = np.exp(-lam * np.arange(3))
    assert result.weights == pytest.approx((weights / weights.sum()).tolist())
    combined = sum(w * m for w, m in zip(result.weights, result.stage_maps))
    torch.testing.assert_close(result.combined, combined)
    torch.testing.assert_close(explain(net, x, "cascam:gradcam", **options), result.combined)
    # with no threshold, "thresholded" and "maps" combine the same normalised maps
    torch.testing.assert_close(cascam(net, x, "gradcam", **(options | {"combine": "thresholded"})).combined,
                               result.combined)
    assert result.targets == [0]


def test_retrain_mode_explains_the_original_image_with_each_stage_model():
    net, x = _shortcut_case()
    other = hand_built_softcam(bright_threshold=1.2)  # a "stage-1 model" that sees only the marker
    result = cascam(net, x, "gradcam", stages=2, stage_models=[net, other])
    assert result.settings["retrain"] is True
    for stage_input in result.stage_inputs:
        torch.testing.assert_close(stage_input, x)  # no test-time masking: the masks were in the training data
    torch.testing.assert_close(result.stage_maps[1], normalise_positive(explain(other, x, "gradcam", target=0)))
    with pytest.raises(ValueError, match="stage models"):
        cascam(net, x, "gradcam", stages=3, stage_models=[net, other])


def test_cascam_keeps_the_target_class_fixed_and_checks_arguments():
    net, x = _shortcut_case()
    result = cascam(net, x, "gradcam", target=1, stages=2)
    assert result.targets == [1]
    for kwargs, message in [
        ({"base": "cascam:gradcam"}, "unknown base"),
        ({"base": "gradcam", "threshold": "otsu"}, "threshold"),
        ({"base": "gradcam", "stages": 0}, "stages"),
        ({"base": "gradcam", "theta": -1.0}, "theta"),
        ({"base": "gradcam", "units": "raw"}, "units"),
        ({"base": "gradcam", "combine": "max"}, "combine"),
        ({"base": "gradcam", "topk_percent": 0.0}, "topk_percent"),
    ]:
        with pytest.raises(ValueError, match=message):
            cascam(net, x, **kwargs)
    with pytest.raises(ValueError):
        explain(net, x, "cascam:nosuchmethod")


def test_threshold_helpers():
    maps = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]])
    torch.testing.assert_close(normalise_positive(maps), torch.tensor([[[0.0, 0.0], [1 / 3, 1.0]]]))
    torch.testing.assert_close(normalise_positive(torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))
    ramp = torch.arange(100, dtype=torch.float32).view(1, 10, 10) / 99
    kept = topk_mask(ramp, 10.0)
    assert int((kept > 0).sum()) == 10 and torch.equal(kept[kept > 0], ramp[ramp >= ramp.flatten()[-10]])
    assert stage_weights(3, 0.0) == pytest.approx([1 / 3] * 3)
    # a sparse bright spot on a noisy map: ebayes keeps the spot and zeros the noise
    rng = np.random.default_rng(3)
    noisy = np.abs(0.02 * rng.standard_normal((1, 16, 16)))
    noisy[0, 4:6, 4:6] = 1.0
    masks, details = ebayes_mask(torch.tensor(noisy, dtype=torch.float32))
    assert (masks[0, 4:6, 4:6] > 0.9).all()
    outside = masks.clone()
    outside[0, 4:6, 4:6] = 0
    assert int((outside > 0).sum()) <= 2 and outside.max() < 0.1  # at most a stray noise peak, shrunk
    assert 0 < details[0]["threshold"] < 0.5
    # threshold_maps: any positive scale, same units back; ebayes is scale-equivariant
    scaled, _ = C.threshold_maps(torch.tensor(noisy, dtype=torch.float32) * 12.0, "ebayes")
    torch.testing.assert_close(scaled, masks * 12.0)
    torch.testing.assert_close(C.threshold_maps(ramp * 5, "topk", 10.0)[0], kept * 5)
    torch.testing.assert_close(C.threshold_maps(ramp, "none")[0], ramp)


# ----------------------------------------------------------------------------------- retrain mode
def test_early_stopping_callback():
    progress = retrain.early_stopping(patience=1)
    progress(0, 3, {"phase": "train", "loss": 9.0})  # steps are ignored
    progress(0, 3, {"phase": "epoch", "val_loss": 1.0})
    progress(1, 3, {"phase": "epoch", "val_loss": 0.8})
    with pytest.raises(retrain._EarlyStop):
        progress(2, 3, {"phase": "epoch", "val_loss": 0.8})  # not lower: stop (the paper's patience 1)
    assert progress.state["epochs"] == 3
    two = retrain.early_stopping(patience=2)
    two(0, 1, {"phase": "epoch", "val_loss": 1.0})
    two(1, 1, {"phase": "epoch", "val_loss": 1.1})
    with pytest.raises(retrain._EarlyStop):
        two(2, 1, {"phase": "epoch", "val_loss": 1.05})
    with pytest.raises(ValueError):
        retrain.early_stopping(0)


def test_retrain_trains_each_stage_afresh_from_stage_zeros_initialisation(tiny_checkpoint, synth_cohort, tmp_path,
                                                                       monkeypatch):
    """Stage k: trained from stage 0's init and seed (not the previous stage's weights), with early
    stopping, on images whose masks accumulate over the stages."""
    import shutil

    from PIL import Image

    import softcam_core.training as training
    from softcam_core.models import load_checkpoint

    checkpoint = tiny_checkpoint("fundus", head="baseline")
    cohort = synth_cohort("fundus")
    _, meta = load_checkpoint(checkpoint)
    calls = []

    def fake_train(data, out, **kwargs):
        calls.append(dict(kwargs, data=Path(data)))
        shutil.copy(checkpoint, out)  # a valid checkpoint at `out`, as train() writes at its best epoch
        for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.5]):  # the third epoch does not improve: stop there
            kwargs["progress"](epoch, 1, {"phase": "epoch", "val_loss": loss})
        raise AssertionError("early stopping did not stop training")

    monkeypatch.setattr(training, "train", fake_train)
    models = retrain.retrain_stage_models(checkpoint, cohort, tmp_path, ["gradcam", "cascam:gradcam"], stages=3,
                                          show_progress=False)
    assert list(models) == ["cascam:gradcam"] and len(models["cascam:gradcam"]) == 3
    assert len(calls) == 2
    for call in calls:
        assert call["init"] == meta["init"] and call["seed"] == meta["seed"]  # stage 0's, never a stage checkpoint
        assert call["arch"] == meta["arch"] and call["head"] == meta["head"] and call["img_size"] == meta["img_size"]
        assert call["epochs"] == 10 and call["lr"] == meta["lr"] and call["batch_size"] == meta["batch_size"]
    log = json.loads((tmp_path / "cascam-gradcam-stages.json").read_text())
    assert [entry["epochs_run"] for entry in log] == [3, 3] and all(entry["stopped_early"] for entry in log)
    stage1, stage2 = (np.asarray(Image.open(next((tmp_path / f"cascam-gradcam-stage{k}" / "images").iterdir())),
                                 dtype=float) for k in (1, 2))
    assert np.abs(stage1 - stage2).max() > 0  # stage 2 masks the stage-1 images again
    with pytest.raises(ValueError, match="missing"):
        retrain.stage_initialisation(checkpoint, dict(meta, init=str(tmp_path / "gone.pth")), retrain.RECORDED)
    assert retrain.stage_initialisation(checkpoint, meta, None) is None


def test_cascam_on_a_trained_model_masks_by_its_logit_scale(tiny_checkpoint, synth_cohort):
    """theta = 0.3 acts on CAM (logit) units: the barely trained tiny model (logits ~0.01, CAM peaks
    ~0.2) is hardly masked (the most suppressed pixel keeps > 90 %), the same net with 100x larger
    logits (a confident model) is masked to exp(-0.3 x 20) ~ 0.3 %. The combined map differs from the
    base map either way (it sums top-10 % maps)."""
    import copy

    from softcam_core.imaging import load_image, preprocess
    from softcam_core.models import load_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint("fundus", head="baseline"))
    images = sorted((synth_cohort("fundus") / "images").iterdir())[:2]
    x = torch.stack([preprocess(load_image(p), meta["img_size"], meta["mean"], meta["std"])[0] for p in images])
    confident = copy.deepcopy(model)
    with torch.no_grad():
        confident.fc.weight.mul_(100.0)
        confident.fc.bias.mul_(100.0)
    weak, strong = cascam(model, x, "gradcam", stages=3), cascam(confident, x, "gradcam", stages=3)
    kept = lambda result: (result.stage_inputs[1] / result.stage_inputs[0]).nan_to_num(1.0).amin()  # noqa: E731
    assert max(weak.stage_peaks[0]) < 1.0 and float(kept(weak)) > 0.9
    assert min(strong.stage_peaks[0]) > 10.0 and float(kept(strong)) < 0.01
    for result, net in ((weak, model), (strong, confident)):
        base = normalise_positive(explain(net, x, "gradcam"))
        assert float((result.combined - base).abs().amax((1, 2)).min()) > 0.2
