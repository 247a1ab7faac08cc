"""Model-randomisation sanity check in the spirit of Adebayo et al. (2018), against docs/explain.md.

A map that does not change when the weights it claims to explain are randomised explains the
image, not the model. For every method we compare the map of the hand-built sanity net with the
map of the same net after re-initialising (PyTorch default init, fixed seeds) (a) the class head
only and (b) every layer, by the mean absolute Spearman rank correlation over images and seeds
(three seeds; a constant randomised map counts as 0: it changed completely). A method FAILS a randomisation
when |rho| >= 0.8 (its map is essentially unchanged). The outcome table is documented in
docs/explain.md and this test asserts the documentation matches what the methods do.

Below that: the model-free sanity maps (``sanity:edge``, ``sanity:random``, ``sanity:centre``), the
library's randomisation test (:mod:`softcam_core.explain.sanity`) and the two-class contrast map.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from softcam_core.explain import (
    METHODS,
    SANITY_METHODS,
    SIGNED_METHODS,
    ExplainError,
    contrast_evidence,
    explain,
    is_method,
    model_randomisation_test,
    randomisation_units,
    randomise_top_layers,
)
from softcam_core.explain import randomisation as R
from softcam_core.explain import sanity as S
from softcam_core.models import build_model
from tests.plugins.explain import hand_built_baseline, hand_built_softcam, sanity_baseline, sanity_softcam, square_image

FAIL_AT = 0.8
DOC = Path(__file__).resolve().parents[1] / "docs" / "explain.md"


def randomised(model: torch.nn.Module, seed: int, head_only: bool) -> torch.nn.Module:
    """Copy of ``model`` with the class head (or every layer) re-initialised from ``seed``."""
    copied = copy.deepcopy(model)
    torch.manual_seed(seed)
    head = copied.evidence if hasattr(copied, "evidence") else copied.fc
    for module in (head.modules() if head_only else copied.modules()):
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return copied


def rank_correlation(method: str, head_only: bool, seeds=(0, 1, 2)) -> float:
    """Mean |Spearman rho| between the maps of the sanity net and of its randomised copies."""
    model = sanity_baseline() if method == "cam" else sanity_softcam()
    x = torch.stack([square_image([(8, 16, 8, 2.0)], noise=0.3, seed=s) for s in range(2)])
    reference = explain(model, x, method, target=0).flatten(1).numpy()
    values = []
    for seed in seeds:
        maps = explain(randomised(model, seed, head_only), x, method, target=0).flatten(1).numpy()
        for ref, new in zip(reference, maps):
            if np.ptp(new) == 0 or np.ptp(ref) == 0:
                values.append(0.0)
            else:
                values.append(abs(float(stats.spearmanr(ref, new).statistic)))
    return float(np.mean(values))


def documented_outcomes() -> dict[str, tuple[str, str]]:
    """``{method: (head outcome, full outcome)}`` from the table in docs/explain.md."""
    text = DOC.read_text()
    section = text.split("## Sanity check", 1)[1]
    rows = re.findall(r"^\|\s*`([a-z_:]+)`\s*\|[^|]*\|\s*(pass|FAIL)\s*\|[^|]*\|\s*(pass|FAIL)\s*\|", section, re.M)
    return {name: (head, full) for name, head, full in rows}


def test_every_method_is_in_the_documented_table():
    assert set(documented_outcomes()) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_randomisation_outcome_matches_the_documentation(method):
    head, full = documented_outcomes()[method]
    rho_head = rank_correlation(method, head_only=True)
    rho_full = rank_correlation(method, head_only=False)
    measured = ("FAIL" if rho_head >= FAIL_AT else "pass", "FAIL" if rho_full >= FAIL_AT else "pass")
    assert measured == (head, full), f"{method}: |rho| head {rho_head:.3f}, full {rho_full:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_randomisation_outcome_holds_for_other_seeds(method):
    head, full = documented_outcomes()[method]
    rho_head = rank_correlation(method, head_only=True, seeds=(10, 11, 12, 13, 14))
    rho_full = rank_correlation(method, head_only=False, seeds=(10, 11, 12, 13, 14))
    measured = ("FAIL" if rho_head >= FAIL_AT else "pass", "FAIL" if rho_full >= FAIL_AT else "pass")
    assert measured == (head, full), f"{method}: |rho| head {rho_head:.3f}, full {rho_full:.3f}"


if __name__ == "__main__":  # regenerate the numbers for docs/explain.md
    for name in METHODS:
        h, f = rank_correlation(name, True), rank_correlation(name, False)
        print(f"| `{name}` | {h:.2f} | {'FAIL' if h >= FAIL_AT else 'pass'} | {f:.2f} | {'FAIL' if f >= FAIL_AT else 'pass'} |")


# ------------------------------------------------------------------------------ model-free sanity maps
def _step_edge(size: int = 16) -> torch.Tensor:
    """(1, 3, size, size): 0 left of column size/2, 1 from it on, in every channel."""
    x = torch.zeros(1, 3, size, size)
    x[..., size // 2:] = 1.0
    return x


def test_edge_map_of_a_step_edge_is_hand_checked():
    x = _step_edge(16)
    edge = explain(None, x, "sanity:edge")
    assert edge.shape == (1, 16, 16) and edge.dtype == torch.float32
    # sigma 3 px -> kernel 2 * ceil(9) + 1 = 19 taps, g_k ~ exp(-k^2 / 18), reflect padding
    taps = np.exp(-np.arange(-9, 10) ** 2 / 18.0)
    taps /= taps.sum()
    row = np.r_[np.zeros(8), np.ones(8)]
    blurred = np.convolve(np.pad(row, 9, mode="reflect"), taps, mode="valid")
    expected = 3 * np.abs(row - blurred)  # summed over the 3 channels
    for r in range(16):  # every row alike: the image is constant along columns
        np.testing.assert_allclose(edge[0, r].numpy(), expected, atol=1e-6)
    # by hand at the edge: column 8 sees ones for k >= 0 (reflection keeps the right side 1) and
    # zeros for k < 0, so blur = 1/2 + g_0/2 and the map is 3 (1/2 - g_0/2); column 7 mirrors it
    g0 = 1.0 / np.exp(-np.arange(-9, 10) ** 2 / 18.0).sum()
    assert float(edge[0, 0, 8]) == pytest.approx(3 * (0.5 - g0 / 2), abs=1e-6)
    assert float(edge[0, 0, 7]) == pytest.approx(float(edge[0, 0, 8]), abs=1e-6)
    assert int(edge[0, 0].argmax()) in (7, 8) and (edge >= 0).all()
    # the step is antisymmetric about the edge, so the map is symmetric, decaying away from it
    torch.testing.assert_close(edge[0, 0], edge[0, 0].flip(0), atol=1e-6, rtol=0)
    assert float(edge[0, 0, 8]) > float(edge[0, 0, 10]) > float(edge[0, 0, 12])
    # a flat image has no edges; the option sigma changes the map; it equals the library function
    assert float(explain(None, torch.full((1, 3, 16, 16), 0.7), "sanity:edge").abs().max()) < 1e-5
    assert not torch.allclose(explain(None, x, "sanity:edge", sigma=1.0), edge)
    torch.testing.assert_close(edge, S.edge_map(x))


def test_edge_map_peaks_on_a_bright_square_and_ignores_the_model():
    x = square_image([(8, 16, 8, 2.0)], noise=0.0)[None]
    a = explain(hand_built_softcam(), x, "sanity:edge")
    b = explain(hand_built_baseline(), x, "sanity:edge", target=1)
    torch.testing.assert_close(a, b)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 16:24] = True
    assert a[0][inside].mean() > 5 * a[0][~inside].mean()


def test_random_map_is_deterministic_per_image_and_seed():
    a = square_image([(8, 16, 8, 2.0)], seed=0)
    b = square_image([(20, 4, 8, 2.0)], seed=1)
    both = explain(None, torch.stack([a, b]), "sanity:random")
    assert both.shape == (2, 32, 32) and both.dtype == torch.float32
    torch.testing.assert_close(explain(None, torch.stack([a, b]), "sanity:random"), both)  # same call, same maps
    torch.testing.assert_close(explain(None, a[None], "sanity:random")[0], both[0])  # batch = image by image
    torch.testing.assert_close(explain(None, torch.stack([b, a]), "sanity:random")[1], both[0])
    assert not torch.allclose(both[0], both[1])  # another image, another map
    assert not torch.allclose(explain(None, a[None], "sanity:random", seed=1)[0], both[0])
    # signed and zero-mean: a chance baseline for activation consistency
    assert "sanity:random" in SIGNED_METHODS
    assert torch.allclose(both.mean((1, 2)), torch.zeros(2), atol=1e-6)
    assert (both > 0).any() and (both < 0).any()
    # smooth at the default stride (4 x 4 cells at 32 px: neighbours alike), i.i.d. pixels at stride 1
    def neighbour_correlation(m):
        return float(np.corrcoef(m[:, :-1].ravel(), m[:, 1:].ravel())[0, 1])
    assert neighbour_correlation(both[0].numpy()) > 0.9
    pixels = explain(None, a[None], "sanity:random", stride=1)[0].numpy()
    assert abs(neighbour_correlation(pixels)) < 0.2
    with pytest.raises(ValueError, match="seed"):
        explain(None, a[None], "sanity:random", seed=0.5)


def test_centre_map_peaks_at_the_centre_and_is_symmetric():
    x = torch.randn(2, 3, 33, 33)
    centre = explain(None, x, "sanity:centre")
    assert centre.shape == (2, 33, 33) and (centre > 0).all() and float(centre.max()) == pytest.approx(1.0)
    assert divmod(int(centre[0].argmax()), 33) == (16, 16)
    torch.testing.assert_close(centre[0], centre[1])  # the same prior for every image
    for flipped in (centre.flip(1), centre.flip(2), centre.transpose(1, 2)):
        torch.testing.assert_close(flipped, centre)
    # sigma = 0.25 x the side: one sigma from the centre the prior is exp(-1/2)
    assert float(centre[0, 16, 16 + 8]) == pytest.approx(float(np.exp(-0.5 * (8 / 8.25) ** 2)), rel=1e-5)
    even = explain(None, torch.zeros(1, 3, 32, 48), "sanity:centre")[0]
    torch.testing.assert_close(even, even.flip(0))
    torch.testing.assert_close(even, even.flip(1))
    assert even[15:17, 23:25].min() == even.max()  # the 4 central pixels of even sides
    assert not torch.allclose(explain(None, x, "sanity:centre", sigma_fraction=0.1), centre)


def test_sanity_maps_check_target_and_options_and_keep_the_device():
    net = hand_built_softcam()
    x = torch.randn(2, 3, 32, 32)
    for method in SANITY_METHODS:
        assert is_method(method) and method in METHODS
        maps = explain(net, x, method, target=[0, 1])
        assert maps.shape == (2, 32, 32) and maps.device == x.device and torch.isfinite(maps).all()
        with pytest.raises(ValueError, match="outside"):
            explain(net, x, method, target=5)
        with pytest.raises(ValueError, match="unexpected keyword"):
            explain(net, x, method, target_layer="features")
    with torch.inference_mode():  # an inference-mode caller gets maps it can edit in place outside
        inference_maps = explain(net, x, "sanity:edge")
    inference_maps += 1


@pytest.mark.parametrize("method", SANITY_METHODS)
def test_cascam_of_a_sanity_map_is_refused(method):
    with pytest.raises(ValueError, match="cannot be cascaded"):
        explain(hand_built_softcam(), torch.randn(1, 3, 32, 32), f"cascam:{method}")
    assert not is_method(f"cascam:{method}")


# ---------------------------------------------------------------------------------- randomisation
def _images() -> torch.Tensor:
    return torch.stack([square_image([(8, 16, 8, 2.0)], noise=0.3, seed=s) for s in range(3)])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_randomisation_units_run_from_the_head_down():
    assert [n for n, _ in randomisation_units(sanity_softcam())] == ["evidence", "features.2", "features.0"]
    assert [n for n, _ in randomisation_units(sanity_baseline(), "layer")] == ["fc", "features.2", "features.0"]
    soft, base = build_model("resnet18", 2, "softcam"), build_model("resnet18", 2, "baseline")
    blocks = [n for n, _ in randomisation_units(soft)]
    # the evidence head, the 8 residual blocks from layer4.1 down, then the stem's batch norm and conv
    assert blocks == ["evidence", "features.7.1", "features.7.0", "features.6.1", "features.6.0", "features.5.1",
                      "features.5.0", "features.4.1", "features.4.0", "features.1", "features.0"]
    assert [n for n, _ in randomisation_units(base)] == ["fc"] + blocks[1:]
    layers = [n for n, _ in randomisation_units(soft, "layer")]
    assert layers[0] == "evidence" and layers[-1] == "features.0" and len(layers) == 1 + 20 + 20
    with pytest.raises(ValueError, match="unit"):
        randomisation_units(soft, "neuron")


@pytest.mark.parametrize("head", ["softcam", "baseline"])
def test_randomise_top_layers_copies_and_never_mutates(head):
    torch.manual_seed(0)
    net = build_model("resnet18", 2, head).eval()
    with torch.no_grad():  # trained-like batch-norm statistics, so resetting them shows
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    before = _state(net)
    rng = torch.get_rng_state()
    top = "evidence" if head == "softcam" else "fc"
    one = randomise_top_layers(net, 1, seed=0)
    assert one is not net and not one.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the original untouched
    assert torch.equal(torch.get_rng_state(), rng)  # and the global RNG as well
    changed = {k for k, v in one.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(f"{top}.") for k in changed)
    # the same seed gives the same weights; cascading keeps the upper units' values
    torch.testing.assert_close(randomise_top_layers(net, 1, seed=0).state_dict(), one.state_dict())
    assert not torch.equal(randomise_top_layers(net, 1, seed=1).state_dict()[f"{top}.weight"],
                           one.state_dict()[f"{top}.weight"])
    two = randomise_top_layers(net, 2, seed=0)
    assert torch.equal(two.state_dict()[f"{top}.weight"], one.state_dict()[f"{top}.weight"])
    changed_two = {k for k, v in two.state_dict().items() if not torch.equal(before[k], v)}
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in changed_two - changed} == {"features.7"}
    assert torch.equal(two.state_dict()["features.7.1.bn2.running_var"], torch.ones(512))  # default init
    # independent randomisation: only the second unit
    alone = randomise_top_layers(net, 2, seed=0, cascade=False)
    assert torch.equal(alone.state_dict()[f"{top}.weight"], before[f"{top}.weight"])
    assert torch.equal(alone.state_dict()["features.7.1.conv2.weight"], two.state_dict()["features.7.1.conv2.weight"])
    every = randomise_top_layers(net, len(randomisation_units(net)), seed=0)
    assert all(not torch.equal(before[k], v) for k, v in every.state_dict().items()
               if k.endswith("conv1.weight") or k.endswith("conv2.weight"))
    assert torch.equal(randomise_top_layers(net, 0).state_dict()[f"{top}.weight"], before[f"{top}.weight"])
    with pytest.raises(ValueError, match="0..11"):
        randomise_top_layers(net, 12)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_model_free_maps_score_one_by_construction():
    net, x = sanity_softcam(), _images()
    for method in SANITY_METHODS:
        result = model_randomisation_test(net, x, method, target=0)
        assert result.depths == [1, 2, 3] and result.layers == ["evidence", "features.2", "features.0"]
        for values in (result.spearman, result.spearman_abs, result.ssim):
            assert values.shape == (3, 3)
            np.testing.assert_allclose(values, 1.0, atol=1e-9)


@pytest.mark.parametrize("method", ["softcam", "softcam_contrast", "gradcam"])
def test_model_maps_change_when_the_model_is_randomised(method):
    net, x = sanity_softcam(), _images()
    before = _state(net)
    result = model_randomisation_test(net, x, method, target=0, keep_maps=True)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    head, full = result.summary()[0], result.summary()[-1]
    assert head["layer"] == "evidence" and full["layer"] == "features.0"
    assert abs(head["spearman"]) < 0.8 and abs(full["spearman"]) < 0.5, result.summary()
    assert result.targets == [0, 0, 0] and result.maps.shape == (3, 3, 32, 32) and result.reference.shape == (3, 32, 32)
    torch.testing.assert_close(torch.from_numpy(result.reference), explain(net, x, method, target=0))
    rows = result.rows()
    assert len(rows) == 9 and set(rows[0]) == {"method", "depth", "layer", "image", "target", "spearman",
                                               "spearman_abs", "ssim"}


def test_randomisation_test_on_a_baseline_and_a_built_softcam_resnet():
    x = _images()
    result = model_randomisation_test(sanity_baseline(), x, "cam", depths=[1], unit="layer")
    assert result.layers == ["fc"] and result.targets == [0, 0, 0]  # the trained model's prediction
    assert abs(result.spearman.mean()) < 0.8
    torch.manual_seed(0)
    net = build_model("resnet18", 2, "softcam").eval()
    result = model_randomisation_test(net, x, "softcam", target=[0, 1, 0], depths=[3, 1])
    assert result.layers == ["features.7.0", "evidence"] and result.spearman.shape == (2, 3)
    assert np.isfinite(result.ssim).all() and (np.abs(result.spearman) <= 1 + 1e-9).all()
    # the same numbers as fresh copies per depth (the cascade reuses one copy)
    again = model_randomisation_test(net, x, "softcam", target=[0, 1, 0], depths=[1])
    np.testing.assert_allclose(again.spearman[0], result.spearman[1])
    with pytest.raises(ValueError, match="depths"):
        model_randomisation_test(net, x, "softcam", depths=[0])


def test_similarity_measures():
    a = np.arange(16.0).reshape(4, 4)
    assert R.spearman(a, a) == pytest.approx(1.0) and R.spearman(a, -a) == pytest.approx(-1.0)
    assert R.spearman(a, a ** 3) == pytest.approx(1.0)  # ranks only
    assert R.spearman(np.ones((4, 4)), np.ones((4, 4)) * 2) == 1.0 and R.spearman(a, np.ones((4, 4))) == 0.0
    b = np.random.default_rng(0).normal(size=(32, 32))
    assert R.ssim(b, b) == pytest.approx(1.0) and R.ssim(b, 3 * b + 1) == pytest.approx(1.0)  # min-max scaled
    assert R.ssim(b, np.random.default_rng(1).normal(size=(32, 32))) < 0.3
    assert R.ssim(b, -b) < 0


# ---------------------------------------------------------------------------------- contrast map
def test_contrast_map_mean_is_the_logit_difference():
    """At the feature-map resolution: mean(A_c - A_other) == logit_c - logit_other (two classes)."""
    net = sanity_softcam()
    x = _images()
    logits, maps = net.forward_with_maps(x)
    for c in (0, 1):
        contrast = contrast_evidence(maps, [c] * 3)
        torch.testing.assert_close(contrast, maps[:, c] - maps[:, 1 - c])
        torch.testing.assert_close(contrast.mean((1, 2)), logits[:, c] - logits[:, 1 - c], atol=1e-5, rtol=0)
        # explain: the same map, bilinearly resized to the input (its mean then only about the same)
        resized = explain(net, x, "softcam_contrast", target=c)
        expected = torch.nn.functional.interpolate(contrast[:, None], size=(32, 32), mode="bilinear",
                                                   align_corners=False)[:, 0]
        torch.testing.assert_close(resized, expected)
        # an integer upsampling factor (8 -> 32 px) keeps the mean: bilinear weights sum to the factor
        torch.testing.assert_close(resized.mean((1, 2)), logits[:, c] - logits[:, 1 - c], atol=1e-5, rtol=0)
    # another factor (30 px input -> 7 x 7 maps -> 30 px): the mean is only about the logit difference
    odd = torch.nn.functional.interpolate(x, size=(30, 30), mode="bilinear", align_corners=False)
    logits, maps = net.forward_with_maps(odd)
    resized = explain(net, odd, "softcam_contrast", target=0)
    difference = logits[:, 0] - logits[:, 1]
    torch.testing.assert_close(resized.mean((1, 2)), difference, atol=0.02 * float(difference.abs().max()), rtol=0)
    # target None = the predicted class; signed
    assert "softcam_contrast" in SIGNED_METHODS
    predicted = logits.argmax(1).tolist()
    torch.testing.assert_close(explain(net, x, "softcam_contrast"), explain(net, x, "softcam_contrast", target=predicted))


def test_contrast_map_is_invariant_to_a_map_added_to_every_class():
    """Softmax over classes ignores a map added to all of them; so does the contrast, not the per-class map."""
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 4, 4)
    shift = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(torch.softmax((maps + shift).mean((2, 3)), 1), torch.softmax(maps.mean((2, 3)), 1))
    torch.testing.assert_close(contrast_evidence(maps + shift, [2, 0]), contrast_evidence(maps, [2, 0]))
    # C > 2: A_c minus the mean of the other classes
    torch.testing.assert_close(contrast_evidence(maps, [2, 0])[0], maps[0, 2] - (maps[0, 0] + maps[0, 1]) / 2)
    with pytest.raises(ExplainError, match="two classes"):
        contrast_evidence(maps[:, :1], [0, 0])
    with pytest.raises(ExplainError, match="SoftCAM net"):
        explain(hand_built_baseline(), torch.randn(1, 3, 32, 32), "softcam_contrast")
