"""explain(): every method on a hand-built net whose evidence is known, targets, layers, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from softcam_core.explain import (
    BASE_METHODS,
    METHODS,
    SANITY_METHODS,
    ExplainError,
    explain,
    file_safe_name,
    is_method,
    resolve_targets,
)
from softcam_core.models import BaselineNet, SoftCAMNet, to_softcam
from tests.plugins.explain import IMAGE_SIZE, hand_built_baseline, hand_built_softcam, square_image

DESIGN = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"
CONTRACT_NAMES = (
    "softcam", "cam", "gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "hirescam", "eigencam",
    "ablationcam", "fullgrad", "integrated_gradients", "guided_backprop",
    "sanity:edge", "sanity:random", "sanity:centre",
)
# names beyond DESIGN.md's contract list
EXTRA_NAMES = {"softcam_contrast"}
# two images, bright squares (row, col, side) at different places
SQUARES = [(8, 16, 8), (20, 4, 8)]


def _two_squares() -> torch.Tensor:
    return torch.stack([square_image([(r, c, s, 2.0)], seed=i) for i, (r, c, s) in enumerate(SQUARES)])


def _model_for(method: str, head: str):
    if method == "cam" or head == "baseline":
        return hand_built_baseline()
    return hand_built_softcam()


def test_method_names_are_the_contract():
    assert [m for m in METHODS if m in CONTRACT_NAMES] == list(CONTRACT_NAMES)
    assert set(METHODS) - set(CONTRACT_NAMES) == EXTRA_NAMES
    assert METHODS == BASE_METHODS + SANITY_METHODS and not set(BASE_METHODS) & set(SANITY_METHODS)
    if DESIGN.is_file():
        text = DESIGN.read_text()
        for name in CONTRACT_NAMES:
            assert f"`{name}`" in text
    assert is_method("cascam:gradcam") and is_method("softcam") and is_method("cascam:softcam_contrast")
    assert not is_method("cascam:cascam:gradcam") and not is_method("gradcam++")
    for name in SANITY_METHODS:  # model-free maps are methods, but no CasCAM base
        assert is_method(name) and not is_method(f"cascam:{name}")
    assert file_safe_name("sanity:edge") == "sanity-edge"
    assert file_safe_name("cascam:gradcam") == "cascam-gradcam"


# every method on the SoftCAM net (cam: on the baseline), and a spread of post-hoc methods on the baseline
PEAK_CASES = [(m, "baseline" if m == "cam" else "softcam") for m in BASE_METHODS] + [
    (m, "baseline") for m in ("gradcam", "scorecam", "eigencam", "ablationcam", "fullgrad", "integrated_gradients",
                              "guided_backprop")
]


@pytest.mark.parametrize("method, head", PEAK_CASES)
def test_every_method_peaks_on_the_bright_square(method, head):
    """The hand-built net's class-0 evidence is exactly the bright square: every map must peak there."""
    model = _model_for(method, head)
    x = _two_squares()
    assert model(x).argmax(1).tolist() == [0, 0]
    maps = explain(model, x, method)
    assert maps.shape == (2, IMAGE_SIZE, IMAGE_SIZE) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    for b, (row, col, side) in enumerate(SQUARES):
        peak_row, peak_col = divmod(int(maps[b].argmax()), IMAGE_SIZE)
        assert row <= peak_row < row + side and col <= peak_col < col + side, (method, b, peak_row, peak_col)
        inside = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
        inside[row:row + side, col:col + side] = True
        assert maps[b][inside].mean() > maps[b][~inside].mean()


def test_softcam_is_the_signed_evidence_map_of_the_forward_pass():
    net = hand_built_softcam()
    x = _two_squares()
    logits, evidence = net.forward_with_maps(x)
    for target in (0, 1):
        maps = explain(net, x, "softcam", target=target)
        expected = nn.functional.interpolate(evidence[:, target:target + 1], size=(IMAGE_SIZE, IMAGE_SIZE),
                                             mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(maps, expected)
    # class 0 evidence: 4 * bright - 0.1 -> signed, -0.1 on the background, 3.9 on the square
    maps = explain(net, x, "softcam", target=0)
    assert maps.min().item() == pytest.approx(-0.1, abs=1e-6)
    assert maps.max().item() == pytest.approx(3.9, abs=1e-5)
    # logits are the spatial mean of the feature-resolution maps
    torch.testing.assert_close(evidence.mean((2, 3)), logits)


def test_cam_equals_softcam_of_the_converted_net_minus_bias():
    """CAM of a GAP+Linear net == SoftCAM map of its to_softcam conversion minus the class bias."""
    baseline = hand_built_baseline()
    converted = to_softcam(baseline, 2).eval()
    x = _two_squares()
    for target in (0, 1):
        cam = explain(baseline, x, "cam", target=target)
        softcam = explain(converted, x, "softcam", target=target)
        torch.testing.assert_close(cam, softcam - baseline.fc.bias[target].item(), atol=1e-5, rtol=1e-5)


def test_native_methods_reject_the_wrong_architecture():
    x = _two_squares()
    with pytest.raises(ExplainError, match="softcam"):
        explain(hand_built_baseline(), x, "softcam")
    with pytest.raises(ExplainError, match="use 'softcam'"):
        explain(hand_built_softcam(), x, "cam")
    mlp = BaselineNet(hand_built_softcam().features, nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ExplainError, match="single Linear"):
        explain(mlp, x, "cam")


def test_targets_default_int_and_per_image():
    net = hand_built_softcam()
    x = torch.stack([square_image([(8, 16, 8, 2.0)]), square_image([])])  # lesion, healthy
    assert net(x).argmax(1).tolist() == [0, 1]
    predicted = explain(net, x, "gradcam")
    per_image = explain(net, x, "gradcam", target=[0, 1])
    torch.testing.assert_close(predicted, per_image)
    as_tensor = explain(net, x, "gradcam", target=torch.tensor([0, 1]))
    torch.testing.assert_close(as_tensor, per_image)
    all_zero = explain(net, x, "gradcam", target=0)
    torch.testing.assert_close(all_zero[0], per_image[0])
    assert not torch.allclose(all_zero[1], per_image[1])
    # class-1 evidence (dark background) is not on the square
    healthy_map = explain(net, x, "softcam", target=1)[0]
    assert healthy_map[8:16, 16:24].mean() < healthy_map.mean()


@pytest.mark.parametrize("method", ["softcam", "gradcam", "integrated_gradients", "hirescam", "cascam:gradcam"])
@pytest.mark.parametrize("target", [[0], [0, 1, 0], [0, 5], 2, -1, "0", [0.5, 1]])
def test_bad_targets_are_errors_never_truncated(method, target):
    with pytest.raises(ValueError):
        explain(hand_built_softcam(), _two_squares(), method, target=target)


def test_resolve_targets():
    assert resolve_targets(None, 3) is None
    assert resolve_targets(1, 3, 2) == [1, 1, 1]
    with pytest.raises(ValueError, match="2 entries for a batch of 3"):
        resolve_targets([0, 1], 3)


def test_unknown_method_option_and_bad_input_are_clear_errors():
    net = hand_built_softcam()
    x = _two_squares()
    with pytest.raises(ValueError, match="unknown method 'gradcam\\+\\+'"):
        explain(net, x, "gradcam++")
    with pytest.raises(ValueError, match="n_step"):
        explain(net, x, "integrated_gradients", n_step=10)
    with pytest.raises(ValueError, match=re.escape("(B, 3, H, W)")):
        explain(net, x[0], "gradcam")
    with pytest.raises(ExplainError, match="not found"):
        explain(net, x, "gradcam", target_layer="features.9")


def test_target_layer_override_by_name_and_module():
    net = hand_built_softcam()
    x = _two_squares()
    # the ReLU before pooling: full-resolution feature map, still peaks on the square
    by_name = explain(net, x, "gradcam", target_layer="features.1")
    by_module = explain(net, x, "gradcam", target_layer=net.features[1])
    torch.testing.assert_close(by_name, by_module)
    assert not torch.allclose(by_name, explain(net, x, "gradcam"))
    peak_row, peak_col = divmod(int(by_name[0].argmax()), IMAGE_SIZE)
    assert 8 <= peak_row < 16 and 16 <= peak_col < 24


def test_integrated_gradients_options_and_completeness():
    """IG with the zero (dataset-mean) baseline satisfies completeness: sum of attributions = f(x) - f(0)."""
    net = hand_built_softcam()
    x = _two_squares()
    maps = explain(net, x, "integrated_gradients", target=0, n_steps=64)
    with torch.no_grad():
        delta = net(x)[:, 0] - net(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(maps.sum((1, 2)), delta, atol=2e-3, rtol=2e-2)
    shifted = explain(net, x, "integrated_gradients", target=0, n_steps=16, baseline=0.5)
    assert not torch.allclose(shifted, maps)


def test_output_stays_on_the_input_device_and_model_is_untouched_on_cpu():
    net = hand_built_softcam()
    maps = explain(net, _two_squares(), "gradcam")
    assert maps.device == torch.device("cpu")


@pytest.mark.parametrize(
    "arch",
    ["resnet18"] + [pytest.param(a, marks=pytest.mark.slow) for a in ("densenet121", "efficientnet_b0", "convnext_tiny", "vgg11")],
)
def test_automatic_target_layer_on_plain_torchvision_and_built_models(arch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.get_model(arch, weights=None, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    for method in ("gradcam", "hirescam"):
        maps = explain(plain, x, method, target=1)
        assert maps.shape == (1, 32, 32) and torch.isfinite(maps).all()
    if arch in ("resnet18", "densenet121", "efficientnet_b0"):
        assert explain(plain, x, "cam", target=1).shape == (1, 32, 32)
    else:
        with pytest.raises(ExplainError):
            explain(plain, x, "cam")


@pytest.mark.slow
def test_built_softcam_resnet_all_fast_methods():
    from softcam_core.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet18", 2, "softcam").eval()
    x = torch.randn(2, 3, 32, 32)
    for method in ("softcam", "gradcam", "layercam", "eigencam", "fullgrad", "guided_backprop"):
        maps = explain(net, x, method, target=[0, 1])
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all(), method
    assert isinstance(net, SoftCAMNet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    model = _model_for(method, "softcam")
    x = _two_squares()
    cpu = explain(model, x, method, target=0)
    gpu_model = _model_for(method, "softcam").cuda()
    gpu = explain(gpu_model, x.cuda(), method, target=0)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-3)
    # CPU input to a CUDA model comes back on the CPU
    assert explain(gpu_model, x, method, target=0).device.type == "cpu"


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "integrated_gradients", "softcam"])
def test_works_under_no_grad_and_inference_mode(method):
    net = hand_built_softcam()
    x = _two_squares()
    expected = explain(net, x, method, target=0)
    with torch.no_grad():
        torch.testing.assert_close(explain(net, x, method, target=0), expected)
    with torch.inference_mode():
        inference_x = _two_squares()
        torch.testing.assert_close(explain(net, inference_x, method, target=0).clone(), expected)


@pytest.mark.parametrize(
    "arch",
    ["resnet18"] + [pytest.param(a, marks=pytest.mark.slow) for a in ("densenet121", "efficientnet_b0", "vgg11_bn")],
)
def test_folded_batchnorm_gives_the_unfolded_maps_on_built_backbones(arch):
    """IG folds every eval-mode batch norm that alone reads a convolution (CPU default): same maps, weights intact."""
    from softcam_core.explain.guard import _state
    from softcam_core.models import build_model

    torch.manual_seed(0)
    net = build_model(arch, 3, "softcam").eval()
    with torch.no_grad():  # trained-like statistics, so the fold is not the identity
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    folded = explain(net, x, "integrated_gradients", target=1, n_steps=4)
    assert len(_state(net).conv_bn) > 0
    unfolded = explain(net, x, "integrated_gradients", target=1, n_steps=4, fold_batchnorm=False)
    scale = float(unfolded.abs().max())
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5 * scale)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_weights_made_under_inference_mode():
    """Gradient methods cannot run on inference-tensor weights: a one-line error; gradient-free ones still run."""
    x = _two_squares()
    expected = explain(hand_built_softcam(), x, "scorecam", target=0)
    with torch.inference_mode():
        net = hand_built_softcam()
    assert next(net.parameters()).is_inference()
    with pytest.raises(ExplainError, match="inference_mode"):
        explain(net, x, "gradcam", target=0)
    torch.testing.assert_close(explain(net, x, "scorecam", target=0), expected)


@pytest.mark.parametrize("method", METHODS)
def test_the_registry_says_which_maps_carry_a_sign(method):
    """``method_spec(m).signed`` is what the maps do: unsigned methods never go below 0; signed ones do,
    on a random ResNet-18 where evidence for and against the class both occur."""
    from softcam_core.explain import method_spec
    from softcam_core.models import build_model

    spec = method_spec(method)
    torch.manual_seed(0)
    head = "softcam" if spec.needs_softcam else "baseline"
    model = build_model("resnet18", num_classes=2, head=head).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    options = {"n_steps": 8} if method == "integrated_gradients" else {}
    maps = explain(model, x, method, target=1, **options)
    scale = float(maps.abs().max())
    assert scale > 0, method
    if spec.signed:
        assert float(maps.min()) < -1e-3 * scale and float(maps.max()) > 1e-3 * scale, method
    else:
        assert float(maps.min()) >= -1e-6 * scale, method


def test_the_registry_covers_every_method_and_cascam():
    from softcam_core.explain import SPECS, cascam_methods, method_spec, method_title

    assert tuple(SPECS) == METHODS
    assert all(method_spec(m).name == m and method_spec(m).title and method_spec(m).implementation for m in METHODS)
    assert method_title("gradcampp") == "Grad-CAM++" and method_title("no-such-method") == "no-such-method"
    for name in cascam_methods():
        spec = method_spec(name)
        base = method_spec(name.split(":", 1)[1])
        assert spec.kind == "cascam" and spec.slow and not spec.signed
        assert spec.title == f"CasCAM ({base.title})" and spec.needs_gradients == base.needs_gradients
    assert {m for m in METHODS if method_spec(m).slow} == {"scorecam", "ablationcam", "fullgrad",
                                                           "integrated_gradients"}
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("gradcam++")
