"""SoftCAM conversion of torchvision families, the one-pass contract, baselines and checkpoints."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from softcam_core.models import (
    BaselineNet,
    CheckpointError,
    SoftCAMNet,
    build_model,
    load_checkpoint,
    save_checkpoint,
    to_baseline,
    to_softcam,
)


def _conv_layers(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _assert_unit_stride_1x1(head: nn.Module) -> None:
    for conv in _conv_layers(head):
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)


def _check_forward(net: SoftCAMNet, size: int, num_classes: int, feat_hw: int) -> None:
    net.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, maps = net.forward_with_maps(x)
        plain = net(x)
    assert maps.shape == (2, num_classes, feat_hw, feat_hw)
    assert logits.shape == (2, num_classes)
    torch.testing.assert_close(logits, maps.mean((2, 3)))
    torch.testing.assert_close(plain, logits)


@pytest.mark.parametrize(
    "arch, channels, size",
    [("resnet18", 512, 64), ("resnet34", 512, 64), ("resnet50", 2048, 32), ("resnet101", 2048, 32)],
)
def test_resnet_to_softcam(arch, channels, size):
    torch.manual_seed(0)
    net = to_softcam(torchvision.models.get_model(arch, weights=None), 3)
    assert isinstance(net, SoftCAMNet) and net.num_classes == 3
    # ResNet head: exactly one 1x1 conv, C_feat -> classes
    assert isinstance(net.evidence, nn.Conv2d)
    assert (net.evidence.in_channels, net.evidence.out_channels) == (channels, 3)
    _assert_unit_stride_1x1(net.evidence)
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.Linear)) for m in net.modules())
    _check_forward(net, size, 3, size // 32)  # output stride 32


@pytest.mark.parametrize("arch", [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")])
def test_vgg_to_softcam_head(arch):
    torch.manual_seed(0)
    net = build_model(arch, 4, "softcam")
    convs = _conv_layers(net.evidence)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(512, 4096), (4096, 4096), (4096, 4)]
    _assert_unit_stride_1x1(net.evidence)
    kinds = [type(m) for m in net.evidence]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Dropout] * 2 + [nn.Conv2d]
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.features) == arch.endswith("_bn")
    _check_forward(net, 64, 4, 2)


def test_torchvision_vgg_to_softcam_matches_build_model():
    tv_vgg = torchvision.models.vgg11_bn(weights=None)
    converted = to_softcam(tv_vgg, 3)
    built = build_model("vgg11_bn", 3, "softcam")
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(converted) == shapes(built)
    assert converted.features is tv_vgg.features
    _check_forward(converted, 64, 3, 2)


@pytest.mark.parametrize(
    "arch, size, feat_hw", [("densenet121", 64, 2), ("efficientnet_b0", 64, 2), ("convnext_tiny", 32, 1)]
)
def test_other_families_to_softcam(arch, size, feat_hw):
    torch.manual_seed(0)
    net = build_model(arch, 2, "softcam")
    assert isinstance(net.evidence, nn.Conv2d)
    _assert_unit_stride_1x1(net.evidence)
    _check_forward(net, size, 2, feat_hw)
    if arch.startswith("efficientnet"):  # the baseline builder, once for a non-ResNet family
        baseline = build_model(arch, 2, "baseline")
        assert isinstance(baseline, BaselineNet) and baseline.num_classes == 2
        assert baseline.eval()(torch.randn(1, 3, size, size)).shape == (1, 2)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
def test_forward_with_maps_runs_the_backbone_once(arch):
    net = build_model(arch, 2, "softcam").eval()
    calls = []
    net.features.register_forward_hook(lambda *_: calls.append(1))
    net.evidence.register_forward_hook(lambda *_: calls.append(2))
    with torch.no_grad():
        net.forward_with_maps(torch.randn(1, 3, 64, 64))
    assert calls == [1, 2]


def _trained_like(model: nn.Module) -> nn.Module:
    """Give BN running statistics and the FC head non-trivial values, as training would."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_converting_a_trained_gap_fc_net_keeps_logits(arch):
    original = _trained_like(torchvision.models.get_model(arch, weights=None, num_classes=3))
    converted = to_softcam(original, 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = original(x)
        logits, maps = converted.forward_with_maps(x)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, maps.mean((2, 3)))


def test_baseline_to_softcam_keeps_logits_and_shares_the_backbone_design():
    baseline = _trained_like(build_model("resnet18", 2, "baseline"))
    assert isinstance(baseline.fc, nn.Linear) and baseline.fc.in_features == 512
    converted = to_softcam(baseline, 2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), baseline(x), atol=1e-4, rtol=1e-4)
    # the same builder makes both heads: identical backbone parameter names and shapes
    soft = build_model("resnet18", 2, "softcam")
    shapes = lambda m: {k: v.shape for k, v in m.features.state_dict().items()}  # noqa: E731
    assert shapes(soft) == shapes(baseline)
    vgg = build_model("vgg11", 2, "baseline")
    assert [l.out_features for l in vgg.fc if isinstance(l, nn.Linear)] == [4096, 4096, 2]


def test_to_baseline_copies_a_matching_head():
    original = _trained_like(torchvision.models.get_model("resnet18", weights=None, num_classes=2))
    baseline = to_baseline(original, 2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(baseline(x), original(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'"):
        build_model("alexnet", 2)
    with pytest.raises(ValueError, match="unknown head"):
        build_model("resnet18", 2, "linear")
    with pytest.raises(TypeError, match="unsupported model type Linear"):
        to_softcam(nn.Linear(3, 2), 2)


META = {
    "arch": "resnet18", "head": "softcam", "classes": ["healthy", "diseased"], "img_size": 64,
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "modality": "fundus",
    "l1": 0.01, "l2": 0.0, "data_hash": "abc", "metrics": {"val": {"accuracy": 1.0}},
}


def test_checkpoint_roundtrip(tmp_path):
    net = _trained_like(build_model("resnet18", 2, "softcam"))
    path = save_checkpoint(tmp_path / "m.pt", net, META)
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == ["healthy", "diseased"] and meta["num_classes"] == 2
    assert meta["metrics"]["val"]["accuracy"] == 1.0 and meta["l1"] == 0.01
    assert not loaded.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "bad.pt", net, {"arch": "resnet18"})


def test_bad_checkpoints_fail_naming_the_file(tmp_path):
    # small weights under a resnet18 / resnet34 / unknown header: the recorded arch does not fit them
    small = SoftCAMNet(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    good = save_checkpoint(tmp_path / "good.pt", small, META)

    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    plain = tmp_path / "plain.pt"
    torch.save(small.state_dict(), plain)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    mismatched = save_checkpoint(tmp_path / "mismatched.pt", small, dict(META, arch="resnet34"))
    wrong_head = save_checkpoint(tmp_path / "wronghead.pt", small, dict(META, head="baseline"))
    unknown_arch = save_checkpoint(tmp_path / "unknown.pt", small, dict(META, arch="lenet"))

    cases = {
        random_bytes: "not a readable checkpoint",
        plain: "not a SoftCAM Review checkpoint",
        truncated: "not a readable checkpoint",
        mismatched: "do not fit resnet34/softcam",
        wrong_head: "do not fit resnet18/baseline",
        unknown_arch: "do not fit lenet",
        tmp_path / "absent.pt": "not found",
    }
    for path, problem in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and problem in message and "\n" not in message


def test_init_from_local_weights_never_downloads(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)  # stands in for a local ImageNet .pth
    torch.save(reference.state_dict(), tmp_path / "resnet18-imagenet.pth")
    net = build_model("resnet18", 2, "softcam", init=tmp_path / "resnet18-imagenet.pth")
    torch.testing.assert_close(net.features[0].weight, reference.conv1.weight)
    torch.testing.assert_close(net.features[7][1].conv2.weight, reference.layer4[1].conv2.weight)
    assert net.evidence.out_channels == 2  # the 1000-class head is not forced in

    # a SoftCAM checkpoint (e.g. the demo model) initialises the whole net, head included
    trained = _trained_like(build_model("resnet18", 2, "softcam"))
    save_checkpoint(tmp_path / "soft.pt", trained, META)
    warm = build_model("resnet18", 2, "softcam", init=tmp_path / "soft.pt")
    torch.testing.assert_close(warm.evidence.weight, trained.evidence.weight)
    torch.testing.assert_close(warm.features[1].running_mean, trained.features[1].running_mean)

    with pytest.raises(CheckpointError, match="no tensor matches"):
        build_model("densenet121", 2, init=tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(CheckpointError, match="absent.pth: initial weights file not found"):
        build_model("resnet18", 2, init=tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read initial weights"):
        build_model("resnet18", 2, init=tmp_path / "junk.pth")


def test_checkpoint_meta_types_validates_and_round_trips_by_hand():
    from softcam_core.models import CheckpointError, CheckpointMeta

    meta = {"arch": "resnet18", "head": "softcam", "classes": ["healthy", "diseased"], "img_size": "224",
            "mean": [0.5, 0.5, 0.5], "std": [0.25], "modality": "oct", "l1": 0.01, "epochs": 9}
    typed = CheckpointMeta.from_dict(meta)
    assert typed.img_size == 224 and typed.classes == ("healthy", "diseased") and typed.num_classes == 2
    assert typed.l2 == 0.0 and typed.data_hash is None and typed.extra == {"epochs": 9}
    stored = typed.to_dict()
    assert stored["num_classes"] == 2 and stored["epochs"] == 9 and stored["classes"] == ["healthy", "diseased"]
    assert CheckpointMeta.from_dict(stored) == typed  # what save_checkpoint writes reads back the same
    for broken, reason in ((dict(meta, head="gap"), "head 'gap'"), (dict(meta, classes=["one"]), "two classes"),
                           (dict(meta, std=[0.2, 0.0, 0.2]), "std must be positive"),
                           (dict(meta, std=[float("nan")]), "must be finite"),  # NaN <= 0 is False: it passed
                           (dict(meta, mean=[0.5, float("inf"), 0.5]), "must be finite"),
                           (dict(meta, mean=[0.5, 0.5]), "1 or 3 values"), (dict(meta, img_size="big"), "malformed"),
                           ({k: v for k, v in meta.items() if k != "modality"}, "lacks modality")):
        with pytest.raises(CheckpointError, match=reason):
            CheckpointMeta.from_dict(broken, source="m.pt")
