"""`softcam models import`: a classifier trained elsewhere reproduces its own probabilities here.

The networks are real torchvision classifiers with non-trivial BatchNorm statistics (an identity
BatchNorm would hide a mis-mapped running mean); probabilities are compared on real fundus photos
through the same preprocessing ``softcam predict`` uses.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from softcam_core.cli import main
from softcam_core.inference import model_input
from softcam_core.model_import import (
    ModelImportError,
    authors_to_ours,
    check_input,
    import_model,
    import_uploaded_model,
)
from softcam_core.models import load_checkpoint

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CLASSES = ["healthy", "diseased"]


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity, as after real training."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) or type(module).__name__ == "LayerNorm2d":
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=generator))
            if module.weight is not None:
                module.weight.data.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.data.copy_(0.4 * torch.rand(module.bias.shape, generator=generator) - 0.2)
    return model.eval()


def trained_elsewhere(arch: str, num_classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_batchnorm(torchvision.models.get_model(arch, weights=None, num_classes=num_classes), seed)


def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=1)


@pytest.fixture(scope="module")
def fundus_images():
    from tests.conftest import REAL_DATA

    folder = REAL_DATA / "fundus_kaggle_dr" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared real data not found at {folder}")
    return sorted(folder.glob("*.png"))[:4]


def read_predictions(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as handle:
        return {Path(row["image"]).name: [float(row[f"prob_{c}"]) for c in CLASSES] for row in csv.DictReader(handle)}


def test_resnet18_imported_both_ways_reproduces_its_probabilities_on_real_images(tmp_path, fundus_images, capsys):
    original = trained_elsewhere("resnet18")
    weights = tmp_path / "resnet18_dr.pth"
    torch.save(original.state_dict(), weights)
    meta = {"img_size": 224, **IMAGENET}
    expected = {}
    for path in fundus_images:
        x, _, _ = model_input(path, {**meta, "modality": "fundus"})
        expected[path.name] = probabilities(original, x[None])[0].tolist()

    for extra, head in (([], "torchvision"), (["--to-softcam"], "softcam")):
        out = tmp_path / f"imported_{head}.pt"
        assert main(["models", "import", "--arch", "resnet18", "--weights", str(weights), "--classes", ",".join(CLASSES),
                     "--img-size", "224", "--modality", "fundus", "--mean", "0.485,0.456,0.406",
                     "--std", "0.229,0.224,0.225", "--name", f"dr_{head}", "--out", str(out), *extra]) == 0
        model, saved = load_checkpoint(out)
        assert saved["head"] == head and saved["classes"] == CLASSES and saved["img_size"] == 224
        assert saved["name"] == f"dr_{head}" and saved["imported"]["converted_to_softcam"] == (head == "softcam")
        assert saved["imported"]["max_probability_difference"] <= 1e-4
        predictions = tmp_path / f"pred_{head}.csv"
        assert main(["predict", "--model", str(out), "--images", *map(str, fundus_images), "--out", str(predictions)]) == 0
        got = read_predictions(predictions)
        assert set(got) == set(expected)
        for name, probs in expected.items():
            assert got[name] == pytest.approx(probs, abs=1e-4), name
    converted, _ = load_checkpoint(tmp_path / "imported_softcam.pt")
    x = check_input(96)
    logits, maps = converted.forward_with_maps(x)
    assert maps.shape[1] == 2 and torch.allclose(logits, maps.mean((2, 3)))
    assert torch.allclose(logits, original(x), atol=1e-4)


# the unconverted families (ConvNeXt, VGG: kept as black boxes) are the slow ones: `make test-slow`
@pytest.mark.parametrize("arch,to_softcam", [("densenet121", True), ("efficientnet_b0", True),
                                             pytest.param("convnext_tiny", False, marks=pytest.mark.slow),
                                             pytest.param("vgg11", False, marks=pytest.mark.slow)])
def test_every_backbone_family_imports_exactly(tmp_path, arch, to_softcam):
    original = trained_elsewhere(arch, num_classes=3)
    weights = tmp_path / f"{arch}.pth"
    torch.save(original.state_dict(), weights)
    result = import_model(weights, arch=arch, classes=["a", "b", "c"], img_size=64, modality="other",
                          out=tmp_path / f"{arch}.pt", to_softcam=to_softcam, **IMAGENET)
    assert result.max_probability_difference <= 1e-4
    model, meta = load_checkpoint(result.path)
    assert meta["head"] == ("softcam" if to_softcam else "torchvision")
    x = check_input(64, seed=3)
    assert probabilities(model, x) == pytest.approx(probabilities(original, x), abs=1e-4)


def test_architectures_without_a_single_linear_are_not_converted(tmp_path):
    weights = tmp_path / "convnext.pth"
    torch.save(trained_elsewhere("convnext_tiny").state_dict(), weights)
    out = tmp_path / "convnext.pt"
    with pytest.raises(ModelImportError, match="cannot be converted to SoftCAM exactly.*normalises"):
        import_model(weights, arch="convnext_tiny", classes=CLASSES, img_size=64, modality="oct", out=out,
                     to_softcam=True, **IMAGENET)
    assert not out.exists() and list(tmp_path.iterdir()) == [weights]


class AuthorsFullyConvModel(nn.Module):
    """The SoftCAM authors' ``FullyConvModel`` structure (kdjoumessi/SoftCAM, modules/models.py):
    the torchvision model's children without pooling and head, then a 1x1 convolution; VGG gets the
    two 4096 1x1 convolutions inside ``backbone``. Rebuilt here to write a file in their layout."""

    def __init__(self, model: nn.Module, arch: str, num_classes: int):
        super().__init__()
        if arch.startswith("vgg"):
            backbone = list(model.children())[:-2]
            backbone.append(nn.Sequential(nn.Conv2d(512, 4096, 1), nn.ReLU(True), nn.Dropout(),
                                          nn.Conv2d(4096, 4096, 1), nn.ReLU(True), nn.Dropout()))
            classifier = nn.Conv2d(4096, num_classes, 1)
        elif arch.startswith("efficientnet"):
            backbone = list(model.children())[:-2] + [nn.Dropout(0.3)]
            classifier = nn.Conv2d(model.classifier[-1].in_features, num_classes, 1)
        else:
            backbone = list(model.children())[:-2]
            classifier = nn.Conv2d(model.fc.in_features, num_classes, 1)
        self.backbone = nn.Sequential(*backbone)
        self.classifier = classifier

    def forward(self, x):
        activation = self.classifier(self.backbone(x))
        return activation.mean((2, 3)), activation


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "efficientnet_b0"])
def test_the_softcam_authors_layout_maps_onto_ours(tmp_path, arch):
    theirs = randomise_batchnorm(AuthorsFullyConvModel(trained_elsewhere(arch), arch, 2))
    weights = tmp_path / "best_validation_weights_acc.pt"
    # their save_weights under DataParallel: keys carry "module."
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, weights)
    result = import_model(weights, arch=arch, classes=CLASSES, img_size=64, modality="fundus",
                          out=tmp_path / "authors.pt", **IMAGENET)
    assert result.layout == "softcam-authors" and result.meta["head"] == "softcam"
    ours, _ = load_checkpoint(result.path)
    x = check_input(64, seed=1)
    with torch.no_grad():
        their_logits, their_maps = theirs(x)
        our_logits, our_maps = ours.forward_with_maps(x)
    assert torch.allclose(our_maps, their_maps, atol=1e-5) and torch.allclose(our_logits, their_logits, atol=1e-5)


def test_the_authors_densenet_is_refused_with_the_reason():
    with pytest.raises(ModelImportError, match="before torchvision's final ReLU"):
        authors_to_ours({"backbone.0.conv0.weight": torch.zeros(1), "classifier.weight": torch.zeros(2, 1, 1, 1)},
                        "densenet121")


def test_a_whole_saved_model_needs_trust(tmp_path):
    original = trained_elsewhere("resnet18")
    weights = tmp_path / "whole.pth"
    torch.save(original, weights)
    out = tmp_path / "whole.pt"
    with pytest.raises(ModelImportError, match="pickled Python object.*--trust"):
        import_model(weights, arch="resnet18", classes=CLASSES, img_size=64, modality="fundus", out=out, **IMAGENET)
    assert not out.exists()
    result = import_model(weights, arch="resnet18", classes=CLASSES, img_size=64, modality="fundus", out=out,
                          trust=True, **IMAGENET)
    assert result.layout == "whole model" and result.max_probability_difference <= 1e-4
    with pytest.raises(ModelImportError, match="only on the command line"):
        import_uploaded_model(weights.read_bytes(), tmp_path / "models", name="up", arch="resnet18", classes=CLASSES,
                              img_size=64, modality="fundus", trust=True, **IMAGENET)


@pytest.mark.parametrize("arch,classes,match", [
    ("resnet34", CLASSES, r"do not fit resnet34 .*missing keys: layer1\.2\.conv1\.weight"),
    ("resnet18", ["a", "b", "c"], r"the weights have 2 output classes \(fc\.weight\); --classes names 3"),
    ("densenet121", CLASSES, r"do not fit densenet121 .*missing keys: features\.conv0\.weight.*unexpected keys: conv1\.weight"),
])
def test_weights_that_do_not_fit_name_the_keys_and_write_nothing(tmp_path, capsys, arch, classes, match):
    weights = tmp_path / "resnet18.pth"
    torch.save(trained_elsewhere("resnet18").state_dict(), weights)
    out = tmp_path / "models" / "bad.pt"
    with pytest.raises(ModelImportError, match=match):
        import_model(weights, arch=arch, classes=classes, img_size=64, modality="fundus", out=out, **IMAGENET)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    # the CLI: one line, exit 2, nothing written
    code = main(["models", "import", "--arch", arch, "--weights", str(weights), "--classes", ",".join(classes),
                 "--img-size", "64", "--modality", "fundus", "--mean", "0.5", "--std", "0.5", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "resnet18.pth" in err
    assert not out.exists()


def test_unreadable_files_and_bad_arguments_get_one_clear_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a torch file" * 50)
    kwargs = dict(arch="resnet18", classes=CLASSES, img_size=64, modality="fundus", out=tmp_path / "m.pt", **IMAGENET)
    with pytest.raises(ModelImportError, match="junk.pth: not a readable PyTorch file"):
        import_model(junk, **kwargs)
    with pytest.raises(ModelImportError, match="not found"):
        import_model(tmp_path / "absent.pth", **kwargs)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(ModelImportError, match="holds no state_dict"):
        import_model(empty, **kwargs)
    with pytest.raises(ModelImportError, match="two or more distinct names"):
        import_model(junk, **{**kwargs, "classes": ["only"]})
    assert not (tmp_path / "m.pt").exists()


def test_the_models_page_import_writes_into_the_models_folder(tmp_path):
    weights = tmp_path / "r18.pth"
    torch.save(trained_elsewhere("resnet18").state_dict(), weights)
    folder = tmp_path / "models"
    kwargs = dict(arch="resnet18", classes=CLASSES, img_size=64, modality="cxr", to_softcam=True, **IMAGENET)
    result = import_uploaded_model(weights.read_bytes(), folder, name="lab_cxr", **kwargs)
    assert result.path == folder / "lab_cxr.pt" and result.meta["modality"] == "cxr"
    with pytest.raises(ModelImportError, match="exists already"):
        import_uploaded_model(weights.read_bytes(), folder, name="lab_cxr", **kwargs)
    with pytest.raises(ModelImportError, match="model name"):
        import_uploaded_model(weights.read_bytes(), folder, name="../escape", **kwargs)
    assert sorted(p.name for p in folder.iterdir()) == ["lab_cxr.pt"]


# --- whole pickled models: checked against the object itself ------------------------------------

class ClassSwappingResNet(torchvision.models.ResNet):
    """A torchvision ResNet subclass whose own forward scales the logits and swaps the classes: its
    weights are resnet18's, what it computes is not. Module level so that it unpickles."""

    def forward(self, x):
        return super().forward(x).flip(1) * 5


def swap_the_classes(module, inputs, output):
    """A forward hook pickled with the model: the same swap on an exact torchvision ResNet."""
    return output.flip(1) * 5


def whole_model_kwargs(tmp_path, **extra):
    return dict(arch="resnet18", classes=CLASSES, img_size=64, modality="fundus", out=tmp_path / "whole.pt",
                trust=True, **IMAGENET, **extra)


def import_cli(weights: Path, out: Path, *extra: str, mean: str = "0.5", std: str = "0.5") -> int:
    return main(["models", "import", "--arch", "resnet18", "--weights", str(weights), "--classes", ",".join(CLASSES),
                 "--img-size", "64", "--modality", "fundus", "--mean", mean, "--std", std, "--out", str(out), *extra])


def test_a_pickled_subclass_with_its_own_forward_is_refused(tmp_path, capsys):
    original = trained_elsewhere("resnet18")
    swapped = ClassSwappingResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=2)
    swapped.load_state_dict(original.state_dict())
    swapped.eval()
    x = check_input(64)
    # what the review found: the rebuilt resnet18 and the object the user gave predict different classes
    assert not torch.equal(probabilities(swapped, x).argmax(1), probabilities(original, x).argmax(1))
    weights = tmp_path / "subclass.pth"
    torch.save(swapped, weights)
    kwargs = whole_model_kwargs(tmp_path)
    with pytest.raises(ModelImportError, match=r"subclass\.pth: the pickled model is a .*ClassSwappingResNet, not "
                                               r"exactly torchvision's torchvision\.models\.resnet\.ResNet .*state_dict"):
        import_model(weights, **kwargs)
    assert not kwargs["out"].exists()
    assert import_cli(weights, kwargs["out"], "--trust", "--to-softcam") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ClassSwappingResNet" in err and "state_dict" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subclass.pth"]


@pytest.mark.parametrize("change", ["forward hook", "max pooling"])
@pytest.mark.parametrize("to_softcam", [False, True])
def test_a_pickled_model_is_checked_against_its_own_outputs(tmp_path, capsys, change, to_softcam):
    # exactly torchvision's ResNet with resnet18's keys, but computing something else
    changed = trained_elsewhere("resnet18")
    if change == "forward hook":
        changed.register_forward_hook(swap_the_classes)
    else:
        changed.avgpool = nn.AdaptiveMaxPool2d(1)  # no weights: the state_dict is unchanged
    weights = tmp_path / "changed.pth"
    torch.save(changed, weights)
    assert type(torch.load(weights, weights_only=False)) is torchvision.models.ResNet
    kwargs = whole_model_kwargs(tmp_path, to_softcam=to_softcam)
    with pytest.raises(ModelImportError, match=r"changed\.pth: the pickled model's own outputs differ from resnet18 "
                                               r"with its weights by .* nothing written"):
        import_model(weights, **kwargs)
    assert not kwargs["out"].exists()
    assert import_cli(weights, kwargs["out"], "--trust", *(["--to-softcam"] if to_softcam else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "own outputs differ" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.pth"]


@pytest.mark.parametrize("wrap", [False, True])
def test_a_plain_pickled_model_imports_and_reproduces_its_own_outputs(tmp_path, capsys, wrap):
    original = trained_elsewhere("resnet18", seed=2)
    weights = tmp_path / "whole.pth"
    torch.save(nn.DataParallel(original) if wrap else original, weights)
    out = tmp_path / "imported.pt"
    assert import_cli(weights, out, "--trust", "--to-softcam", mean="0.485,0.456,0.406",
                      std="0.229,0.224,0.225") == 0
    assert "probabilities match the pickled model's own outputs" in capsys.readouterr().out
    model, meta = load_checkpoint(out)
    assert meta["imported"]["layout"] == "whole model" and meta["imported"]["max_probability_difference"] <= 1e-4
    x = check_input(64, seed=5)
    assert probabilities(model, x) == pytest.approx(probabilities(original, x), abs=1e-4)


def test_a_pickled_model_of_another_architecture_names_it(tmp_path):
    weights = tmp_path / "densenet.pth"
    torch.save(torchvision.models.densenet121(num_classes=2).eval(), weights)
    with pytest.raises(ModelImportError, match=r"torchvision's torchvision\.models\.densenet\.DenseNet, not the "
                                               r"ResNet of resnet18; give its architecture with --arch"):
        import_model(weights, **whole_model_kwargs(tmp_path))
    assert not (tmp_path / "whole.pt").exists()


# --- normalisation: finite, std positive ---------------------------------------------------------

@pytest.mark.parametrize("mean,std,match", [
    ((float("nan"), 0.456, 0.406), IMAGENET["std"], r"--mean must be finite numbers, got nan,0\.456,0\.406"),
    ((float("inf"),), IMAGENET["std"], r"--mean must be finite numbers, got inf"),
    (IMAGENET["mean"], (0.229, float("nan"), 0.225), r"--std must be finite numbers"),
    (IMAGENET["mean"], (float("inf"),) * 3, r"--std must be finite numbers"),
    (IMAGENET["mean"], (0.229, 0.0, 0.225), r"--std must be positive"),
    (IMAGENET["mean"], (-0.5,), r"--std must be positive"),
    ((0.5, 0.5), IMAGENET["std"], r"--mean needs 1 or 3 numbers \(one per channel\), got 2"),
], ids=["nan-mean", "inf-mean", "nan-std", "inf-std", "zero-std", "negative-std", "two-means"])
def test_mean_and_std_must_be_finite_with_a_positive_std(tmp_path, mean, std, match):
    weights = tmp_path / "r18.pth"
    torch.save(trained_elsewhere("resnet18").state_dict(), weights)
    out = tmp_path / "m.pt"
    with pytest.raises(ModelImportError, match=match):
        import_model(weights, arch="resnet18", classes=CLASSES, img_size=64, modality="fundus", out=out,
                     mean=mean, std=std)
    with pytest.raises(ModelImportError, match=match):  # the Models page's path
        import_uploaded_model(weights.read_bytes(), tmp_path / "models", name="up", arch="resnet18", classes=CLASSES,
                              img_size=64, modality="fundus", mean=mean, std=std)
    assert not out.exists() and not (tmp_path / "models" / "up.pt").exists()


@pytest.mark.parametrize("flag,value,match", [
    ("mean", "nan,0.5,0.5", "argument --mean: expected finite numbers"),
    ("mean", "0.5,inf,0.5", "argument --mean: expected finite numbers"),
    ("std", "nan", "argument --std: expected finite numbers"),
    ("std", "0.2,0,0.2", "argument --std: expected positive numbers"),
], ids=["nan-mean", "inf-mean", "nan-std", "zero-std"])
def test_the_cli_refuses_a_non_finite_mean_or_std_as_a_usage_error(tmp_path, capsys, flag, value, match):
    weights = tmp_path / "r18.pth"
    torch.save(trained_elsewhere("resnet18").state_dict(), weights)
    out = tmp_path / "m.pt"
    values = {"mean": "0.5", "std": "0.5", flag: value}
    with pytest.raises(SystemExit) as exited:
        import_cli(weights, out, **values)
    assert exited.value.code == 2 and match in capsys.readouterr().err
    assert not out.exists()
