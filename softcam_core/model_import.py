"""Bring a classifier trained elsewhere into SoftCAM Review: ``softcam models import`` (contract).

Three layouts of a weights file are read:

* ``torchvision``: the ``state_dict`` of an unchanged torchvision classifier (``conv1.weight`` ...
  ``fc.weight``), as ``torch.save(model.state_dict(), path)`` writes it; also wrapped in a dict
  under ``state_dict`` / ``model`` and with DataParallel's ``module.`` prefix.
* ``whole model``: ``torch.save(model, path)``. Unpickling it runs code from the file, so it is read
  only with ``trust=True`` (``--trust``); its ``state_dict()`` is then imported as above. The object
  must be exactly the torchvision class of ``arch`` (``torchvision.models.ResNet`` for ``resnet18``;
  a ``DataParallel`` around one is unwrapped): a subclass or another class may compute something
  its weights do not say (its own ``forward``), so it is refused with the advice to save its
  ``state_dict()``. The check below then compares against the unpickled object's own outputs
  (its forward, hooks and modules as saved), not against a rebuilt copy.
* ``softcam-authors``: the ``FullyConvModel`` of the SoftCAM authors' code (kdjoumessi/SoftCAM,
  ``modules/models.py``): ``backbone.<i>.*`` = the torchvision model's children without pooling and
  head, ``classifier.*`` = the 1x1 evidence convolution (VGG: ``backbone.1.{0,3}`` the two 4096
  1x1 convolutions before it). Already a SoftCAM net: its keys are renamed to ours (:data:`AUTHOR_KEYS`).

A torchvision classifier is kept unchanged (head ``"torchvision"``: a black box that post-hoc
methods explain) or, with ``to_softcam=True``, converted exactly: GAP + Linear becomes the 1x1
evidence convolution with the same weights (mean(W f + b) = W mean(f) + b), possible where the
backbone table has a single Linear after the pooling (ResNet, DenseNet, EfficientNet; not VGG's
25088-input MLP nor ConvNeXt's norm before its Linear).

Before anything is written the imported checkpoint is loaded back through the same path the app
and ``softcam predict`` use and compared with the original network on a fixed input: the class
probabilities must agree to :data:`PROBABILITY_TOLERANCE`. The original is the torchvision network
rebuilt from a state_dict, or the unpickled object itself for a whole model. Any mismatch (missing
or unexpected keys, a wrong class count, weights of another architecture, a pickled model that
computes something else) raises :class:`ModelImportError` naming the keys, and no file is written.
``mean`` and ``std`` must be 1 or 3 finite numbers, ``std`` positive (a NaN there would make every
prediction NaN).
"""

from __future__ import annotations

import argparse
import copy
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from softcam_core.backbones import backbone_of
from softcam_core.models import (
    ARCHS,
    CheckpointError,
    CheckpointMeta,
    build_model,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from softcam_core.models import to_softcam as convert_to_softcam

LAYOUTS = ("torchvision", "whole model", "softcam-authors")
MODALITIES = ("fundus", "oct", "cxr", "other")
PROBABILITY_TOLERANCE = 1e-4  # largest |p_imported - p_original| accepted on the check input
_SHOWN_KEYS = 8  # keys named in one error message; the rest are counted

# the authors' backbone.<i> / classifier keys -> ours, per family ("{rest}": the remainder of the key)
AUTHOR_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    # children of a ResNet without avgpool and fc = conv1, bn1, relu, maxpool, layer1..4: the same
    # order (and so the same indices) as our SoftCAMNet.features
    "resnet": ((r"backbone\.(\d+)\.(.*)", r"features.\1.\2"), (r"classifier\.(.*)", r"evidence.\1")),
    "vgg": ((r"backbone\.0\.(.*)", r"features.\1"), (r"backbone\.1\.(0|3)\.(.*)", r"evidence.\1.\2"),
            (r"classifier\.(.*)", r"evidence.6.\1")),
    "efficientnet": ((r"backbone\.0\.(.*)", r"features.\1"), (r"classifier\.(.*)", r"evidence.\1")),
}


class ModelImportError(CheckpointError):
    """The weights cannot be imported as asked; one line naming the file and the problem."""


@dataclass(frozen=True)
class ImportedModel:
    """Result of :func:`import_model`: the checkpoint written, its metadata, the layout read, and the
    largest probability difference to the original network on the check input (None where no
    original network can be built: the authors' layout is already the SoftCAM net)."""

    path: Path
    meta: dict
    layout: str
    converted: bool
    max_probability_difference: float | None


def read_weights_file(path: str | Path, trust: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """``(tensors by name, "state_dict" | "whole model")`` of a weights file; ``module.`` dropped.

    Raises:
        ModelImportError: missing or unreadable file, a pickled model without ``trust``, no tensors.
    """
    state, kind, _ = _read_weights(path, trust)
    return state, kind


def _read_weights(path: str | Path, trust: bool) -> tuple[dict[str, torch.Tensor], str, nn.Module | None]:
    """:func:`read_weights_file` plus the unpickled ``nn.Module`` of a whole saved model (else None)."""
    path = Path(path)
    if not path.is_file():
        raise ModelImportError(f"{path}: weights file not found")
    kind = "state_dict"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch.save writes a zip holding data.pkl; anything else that fails here is not a torch file
        if "weights only load failed" not in str(exc).lower() or not zipfile.is_zipfile(path):
            raise ModelImportError(f"{path}: not a readable PyTorch file ({exc.__class__.__name__})") from None
        if not trust:
            raise ModelImportError(
                f"{path}: holds a pickled Python object (a whole saved model), not only weights; reading it runs "
                "code from the file. Pass --trust if you trust where it came from, or save model.state_dict()"
            ) from None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except (ModuleNotFoundError, AttributeError) as exc:
            raise ModelImportError(
                f"{path}: the pickled model needs code that is not importable here ({exc}); "
                "save its state_dict() where it was trained and import that") from None
        except Exception as exc:  # corrupt pickle
            raise ModelImportError(f"{path}: not a readable PyTorch file ({exc.__class__.__name__})") from None
        kind = "whole model"
    except Exception as exc:  # not a zip / pickle at all, truncated
        raise ModelImportError(f"{path}: not a readable PyTorch file ({exc.__class__.__name__})") from None
    module: nn.Module | None = None
    if isinstance(payload, nn.Module):
        module, payload, kind = payload, payload.state_dict(), "whole model"
    if isinstance(payload, dict) and payload.get("format") == "softcam-review-checkpoint":
        raise ModelImportError(f"{path}: already a SoftCAM Review checkpoint; use it as it is")
    if isinstance(payload, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = payload.get(key)
            if isinstance(inner, nn.Module):
                module, payload, kind = inner, inner.state_dict(), "whole model"
                break
            if isinstance(inner, dict):
                payload = inner
                break
    if not isinstance(payload, dict) or not any(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ModelImportError(f"{path}: holds no state_dict of weights")
    state = {str(k).removeprefix("module."): v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    return state, kind, module


def check_pickled_model(module: nn.Module, arch: str, source: str = "weights") -> nn.Module:
    """The unpickled whole model to compare the import against: exactly torchvision's class for
    ``arch`` (``DataParallel`` unwrapped), in eval mode and float32.

    Raises:
        ModelImportError: any other class, a subclass included: its own ``forward`` may compute
            something that its weights loaded into torchvision's network do not.
    """
    if type(module) is nn.DataParallel:
        module = module.module
    with torch.device("meta"):  # the class only: no weights allocated or initialised
        expected = type(torchvision.models.get_model(arch, weights=None, num_classes=2))
    if type(module) is expected:
        return module.float().eval()
    found = f"{type(module).__module__}.{type(module).__qualname__}"
    if not isinstance(module, expected) and type(module).__module__.startswith("torchvision.models."):
        raise ModelImportError(f"{source}: the pickled model is torchvision's {found}, not the "
                               f"{expected.__qualname__} of {arch}; give its architecture with --arch")
    raise ModelImportError(
        f"{source}: the pickled model is a {found}, not exactly torchvision's "
        f"{expected.__module__}.{expected.__qualname__} ({arch}); its own code (a forward of its own) may "
        "compute something its weights do not say, so it is not imported. Save model.state_dict() where it was "
        f"trained, check it loads into torchvision.models.{arch}(num_classes=...) with the same outputs, and "
        "import that")


def _check_normalisation(values: Any, name: str) -> tuple[float, ...]:
    """``values`` (``mean`` or ``std``) as 1 or 3 finite floats, ``std`` positive; else ModelImportError."""
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ModelImportError(f"--{name} needs 1 or 3 numbers, got {values!r}") from None
    shown = ",".join(f"{v:g}" for v in floats)
    if len(floats) not in (1, 3):
        raise ModelImportError(f"--{name} needs 1 or 3 numbers (one per channel), got {len(floats)}: {shown}")
    if not all(math.isfinite(v) for v in floats):
        raise ModelImportError(f"--{name} must be finite numbers, got {shown}")
    if name == "std" and not all(v > 0 for v in floats):
        raise ModelImportError(f"--std must be positive (it divides the intensities), got {shown}")
    return floats


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """``"softcam-authors"`` when the keys are the authors' FullyConvModel's, else ``"torchvision"``."""
    classifier = state.get("classifier.weight")
    if any(k.startswith("backbone.") for k in state) and classifier is not None and classifier.ndim == 4:
        return "softcam-authors"
    return "torchvision"


def authors_to_ours(state: dict[str, torch.Tensor], arch: str, source: str = "weights") -> dict[str, torch.Tensor]:
    """The authors' FullyConvModel keys renamed to our SoftCAMNet's (:data:`AUTHOR_KEYS`).

    Raises:
        ModelImportError: a family the mapping does not cover, or a key no rule maps.
    """
    family = _family(arch)
    if family == "densenet":
        raise ModelImportError(
            f"{source}: the authors' DenseNet layout puts the evidence layer on the features before torchvision's "
            "final ReLU, ours after it; the two nets compute different maps, so it is not imported")
    rules = AUTHOR_KEYS.get(family)
    if rules is None:
        raise ModelImportError(f"{source}: the SoftCAM authors' layout covers ResNet, VGG and EfficientNet, not {arch}")
    out, unmapped = {}, []
    for key, value in state.items():
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ModelImportError(f"{source}: keys outside the authors' {family} layout: {_name_keys(unmapped)}")
    return out


def _family(arch: str) -> str:
    for family in ("resnet", "vgg", "densenet", "efficientnet", "convnext"):
        if arch.startswith(family):
            return family
    return arch


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" (and {len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def check_keys(module: nn.Module, state: dict[str, torch.Tensor], arch: str, num_classes: int, source: str) -> None:
    """Raise one :class:`ModelImportError` naming every missing, unexpected or mis-shaped key of
    ``state`` against ``module`` (BatchNorm's ``num_batches_tracked``, absent from old files, is optional)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return
    # the last layer's output rows disagree: the class count, said in those words
    head = [k for k in shapes if own[k].ndim >= 1 and own[k].shape[1:] == state[k].shape[1:]
            and own[k].shape[0] == num_classes]
    if head and len(shapes) == len(head) and not missing and not unexpected:
        found = int(state[head[0]].shape[0])
        raise ModelImportError(f"{source}: the weights have {found} output classes ({head[0]}); "
                               f"--classes names {num_classes}")
    parts = []
    if missing:
        parts.append(f"missing keys: {_name_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_name_keys(unexpected)}")
    if shapes:
        parts.append("shape mismatch: " + _name_keys(
            [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
    raise ModelImportError(f"{source}: the weights do not fit {arch} with {num_classes} classes ({'; '.join(parts)})")


def _probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=1)


def _pickled_probabilities(model: nn.Module, x: torch.Tensor, num_classes: int, source: str) -> torch.Tensor:
    """Class probabilities of the unpickled whole model on ``x``: its own call, whatever it returns
    checked to be one row of ``num_classes`` logits per input."""
    try:
        with torch.no_grad():
            logits = model(x.clone())
    except Exception as exc:  # code from the file: it may raise anything
        raise ModelImportError(f"{source}: the pickled model fails on a {tuple(x.shape)} input "
                               f"({exc.__class__.__name__}: {exc}); nothing written") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (x.shape[0], num_classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelImportError(f"{source}: the pickled model returns {got} for {x.shape[0]} images, not "
                               f"({x.shape[0]}, {num_classes}) class logits; nothing written")
    return torch.softmax(logits.double(), dim=1)


def check_input(img_size: int, seed: int = 0) -> torch.Tensor:
    """The fixed input (2, 3, S, S) both networks are compared on: normalised-scale Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, img_size, img_size, generator=generator)


def import_model(weights: str | Path, *, arch: str, classes: list[str] | tuple[str, ...], img_size: int,
                 modality: str, mean: tuple[float, ...], std: tuple[float, ...], out: str | Path,
                 to_softcam: bool = False, name: str | None = None, trust: bool = False) -> ImportedModel:
    """Read ``weights`` (see the module docstring), write our checkpoint to ``out``, return what was done.

    Args:
        weights: a ``.pth`` / ``.pt`` file. arch: torchvision name (:data:`softcam_core.models.ARCHS`).
        classes: class names in the network's output order (the negative class first).
        img_size: input side (px) the network was trained at. modality: fundus | oct | cxr | other.
        mean, std: per-channel normalisation of [0, 1] intensities it was trained with (1 or 3 finite
            values; std positive).
        out: checkpoint path to write. to_softcam: convert GAP + Linear exactly into a SoftCAM head.
        name: a display name kept in the metadata (default: ``out``'s stem). trust: allow unpickling
            a whole saved model (runs code from the file); it must be exactly torchvision's class for
            ``arch`` and the import is checked against its own outputs.
    Raises:
        ModelImportError: bad arguments, weights that do not fit or a pickled model whose own outputs
            the import does not reproduce; nothing is written then.
    """
    weights, out = Path(weights), Path(out)
    source = weights.name
    classes = [str(c).strip() for c in classes]
    if arch not in ARCHS:
        raise ModelImportError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if len(classes) < 2 or any(not c for c in classes) or len(set(classes)) != len(classes):
        raise ModelImportError(f"--classes needs two or more distinct names, got {','.join(classes)!r}")
    if modality not in MODALITIES:
        raise ModelImportError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    mean, std = _check_normalisation(mean, "mean"), _check_normalisation(std, "std")
    if out.suffix != ".pt":
        raise ModelImportError(f"{out}: the checkpoint name must end in .pt (the app lists *.pt)")
    state, kind, pickled = _read_weights(weights, trust)
    if pickled is not None:
        pickled = check_pickled_model(pickled, arch, source)
    layout = detect_layout(state)
    num_classes = len(classes)
    reference: nn.Module | None = None
    if layout == "softcam-authors":
        state = authors_to_ours(state, arch, source)
        model = build_model(arch, num_classes, "softcam")
        check_keys(model, state, arch, num_classes, source)
        model.load_state_dict(state, strict=False)
        head, converted = "softcam", False
    else:
        reference = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        check_keys(reference, state, arch, num_classes, source)
        reference.load_state_dict(state, strict=False)
        reference.eval()
        if to_softcam:
            row = backbone_of(reference)
            if row is None or row.classifier(reference) is None:
                why = row.no_linear_reason if row is not None else "no backbone row"
                raise ModelImportError(f"{source}: {arch} cannot be converted to SoftCAM exactly ({why}); "
                                       "import it without --to-softcam to explain it as a black box")
            model = convert_to_softcam(copy.deepcopy(reference), num_classes)
            head, converted = "softcam", True
        else:
            model, head, converted = reference, "torchvision", False
    model.arch = arch
    meta = {
        "arch": arch, "head": head, "classes": classes, "img_size": int(img_size), "mean": list(mean),
        "std": list(std), "modality": modality, "l1": 0.0, "l2": 0.0, "data_hash": None, "metrics": {},
        "name": name or out.stem,
        "imported": {"layout": "softcam-authors" if layout == "softcam-authors" else kind if kind == "whole model"
                     else "torchvision", "converted_to_softcam": converted,
                     "weights_sha256": file_sha256(weights)},
    }
    try:
        CheckpointMeta.from_dict(meta, source=out.name)
    except CheckpointError as exc:
        raise ModelImportError(str(exc)) from None
    tmp = out.with_name(f".{out.name}.importing.pt")
    try:
        save_checkpoint(tmp, model, meta)
        loaded, _ = load_checkpoint(tmp)  # the path `softcam predict` and the app take
        difference = None
        if reference is not None:
            x = check_input(int(img_size))
            if pickled is not None:
                # the object the user gave, run as saved (its forward, hooks, modules), not a rebuilt copy
                expected = _pickled_probabilities(pickled, x, num_classes, source)
            else:
                expected = _probabilities(reference, x.clone())
            difference = float((_probabilities(loaded, x.clone()) - expected).abs().max())
            if not difference <= PROBABILITY_TOLERANCE:
                if pickled is not None:
                    raise ModelImportError(
                        f"{source}: the pickled model's own outputs differ from {arch} with its weights by "
                        f"{difference:.2e} in probability (> {PROBABILITY_TOLERANCE:g}): it computes something "
                        f"else than torchvision's {arch} (a replaced layer or a hook?); nothing written")
                raise ModelImportError(f"{source}: the imported model's probabilities differ from the original's by "
                                       f"{difference:.2e} (> {PROBABILITY_TOLERANCE:g}); nothing written")
            meta["imported"]["max_probability_difference"] = difference
            save_checkpoint(tmp, model, meta)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return ImportedModel(out, meta, meta["imported"]["layout"], converted, difference)


def import_uploaded_model(data: bytes, directory: str | Path, **kwargs: Any) -> ImportedModel:
    """:func:`import_model` for an uploaded file (the Models page): ``data`` is written to a private
    temporary file, never unpickled as a whole model (``trust`` is refused: a web upload must not run
    code), and the checkpoint goes to ``directory / <name>.pt``. Refuses to overwrite a checkpoint."""
    import tempfile

    if kwargs.pop("trust", False):
        raise ModelImportError("whole pickled models are imported only on the command line with --trust")
    name = str(kwargs.pop("name", "") or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise ModelImportError("the model name must be 1-100 letters, digits, '.', '_' or '-'")
    out = Path(directory) / f"{name}.pt"
    if out.exists():
        raise ModelImportError(f"a checkpoint named {name!r} exists already; choose another name")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "uploaded.pth"
        path.write_bytes(bytes(data))
        return import_model(path, out=out, name=name, **kwargs)


# --- command line ------------------------------------------------------------------------------

def _floats(text: str, positive: bool = False) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    if positive and not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive_floats(text: str) -> tuple[float, ...]:
    return _floats(text, positive=True)


def register_cli(subparsers) -> None:
    models = subparsers.add_parser("models", help="bring in a classifier trained elsewhere")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    imp = sub.add_parser(
        "import", help="a torchvision state_dict, a whole saved model (--trust) or the SoftCAM authors' layout "
                       "-> our checkpoint; --to-softcam converts GAP+FC exactly",
        description="Checks the imported model against the original network (probabilities to "
                    f"{PROBABILITY_TOLERANCE:g}) before writing; nothing is written on any mismatch.")
    imp.add_argument("--arch", required=True, choices=ARCHS, metavar="ARCH", help="torchvision architecture, e.g. resnet18")
    imp.add_argument("--weights", required=True, help="the .pth/.pt weights file")
    imp.add_argument("--classes", required=True, help="class names in output order, negative first: healthy,diseased")
    imp.add_argument("--img-size", type=int, required=True, help="input side in pixels the model was trained at")
    imp.add_argument("--modality", required=True, choices=MODALITIES)
    imp.add_argument("--mean", type=_floats, required=True, help="normalisation mean of [0,1] intensities: m1,m2,m3")
    imp.add_argument("--std", type=_positive_floats, required=True, help="normalisation std (positive): s1,s2,s3")
    imp.add_argument("--to-softcam", action="store_true", help="convert GAP + Linear exactly into a SoftCAM evidence head")
    imp.add_argument("--name", help="display name (default: the checkpoint's file stem)")
    imp.add_argument("--trust", action="store_true", help="allow a whole pickled model (runs code from the file)")
    imp.add_argument("--out", help="checkpoint to write (default: the app's models folder / NAME.pt)")
    imp.set_defaults(func=_cli_import)


def _cli_import(args: argparse.Namespace) -> int:
    from softcam_core.paths import models_dir

    out = Path(args.out) if args.out else models_dir() / f"{args.name or Path(args.weights).stem}.pt"
    result = import_model(args.weights, arch=args.arch, classes=args.classes.split(","), img_size=args.img_size,
                          modality=args.modality, mean=args.mean, std=args.std, out=out,
                          to_softcam=args.to_softcam, name=args.name, trust=args.trust)
    how = "converted to SoftCAM (exact GAP+FC conversion)" if result.converted else (
        "SoftCAM net" if result.meta["head"] == "softcam" else "unchanged (black box for post-hoc methods)")
    original = "the pickled model's own outputs" if result.layout == "whole model" else "the original"
    check = ("" if result.max_probability_difference is None
             else f"; probabilities match {original} to {result.max_probability_difference:.1e}")
    print(f"imported {args.weights} ({result.layout} layout) as {args.arch}, {how}{check}")
    print(f"wrote {result.path}")
    return 0
