"""SoftCAM self-explainable networks and their black-box baselines.

SoftCAM (Djoumessi & Berens, MIDL 2026) removes global average pooling and the fully connected
head of a CNN and puts a class-evidence head of 1x1 convolutions (unit stride) on the last feature
map. Each class logit is the spatial mean of its evidence map, so the maps the prediction is
computed from *are* the explanation, from the same forward pass.

Both network types expose ``.features`` (the backbone up to the last convolutional feature map)
so explanation methods hook the same layer on either.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
import torchvision

from softcam_core.backbones import BACKBONES, backbone_of

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))
DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201")
EFFICIENTNETS = tuple(f"efficientnet_b{i}" for i in range(8))
CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
ARCHS = RESNETS + VGGS + DENSENETS + EFFICIENTNETS + CONVNEXTS
# "torchvision": a classifier imported unchanged (`softcam models import` without --to-softcam), a black box
HEADS = ("softcam", "baseline", "torchvision")

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "softcam-review-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not a SoftCAM Review checkpoint."""


class SoftCAMNet(nn.Module):
    """Backbone + class-evidence head; ``logits == maps.mean((2, 3))``.

    Args:
        features: module mapping images (B, 3, H, W) to feature maps (B, F, h, w).
        evidence: module mapping (B, F, h, w) to class-evidence maps (B, C, h, w); built only from
            1x1 convolutions with unit stride (and point-wise non-linearities / dropout), so each
            evidence value depends on one feature-map position only.
        arch: torchvision architecture name the backbone came from (metadata only).
    """

    def __init__(self, features: nn.Module, evidence: nn.Module, arch: str = "custom"):
        super().__init__()
        self.features = features
        self.evidence = evidence
        self.arch = arch

    @property
    def num_classes(self) -> int:
        return _last_conv(self.evidence).out_channels

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: ``(logits (B, C), maps (B, C, h, w))`` with logits the spatial mean of maps."""
        maps = self.evidence(self.features(x))
        return maps.mean(dim=(2, 3)), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C): a drop-in classifier for captum, torchcam and grad-cam."""
        return self.forward_with_maps(x)[0]


class BaselineNet(nn.Module):
    """The black-box baseline: backbone, global average pooling, fully connected head.

    For VGG this is GAP-VGG (see :func:`baseline_head`), not torchvision's original VGG.
    """

    def __init__(self, features: nn.Module, fc: nn.Module, arch: str = "custom"):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc
        self.arch = arch

    @property
    def num_classes(self) -> int:
        return [m for m in self.fc.modules() if isinstance(m, nn.Linear)][-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _last_conv(module: nn.Module) -> nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TypeError("evidence head has no Conv2d layer")
    return convs[-1]


def _split_backbone(model: nn.Module) -> tuple[nn.Module, int, nn.Module | None, str]:
    """Return (features, feature_channels, fc_or_None, family) of a torchvision classifier."""
    if isinstance(model, BaselineNet):
        fc = model.fc if isinstance(model.fc, nn.Linear) else None
        channels = [m for m in model.fc.modules() if isinstance(m, nn.Linear)][0].in_features
        return model.features, channels, fc, "baseline"
    backbone = backbone_of(model)
    if backbone is None:
        raise TypeError(
            f"unsupported model type {type(model).__name__}: expected a torchvision "
            f"{', '.join(row.model_type.__name__ for row in BACKBONES)}"
        )
    return backbone.features(model), backbone.channels(model), backbone.classifier(model), backbone.family


def evidence_head(family: str, in_channels: int, num_classes: int, dropout: float = 0.5) -> nn.Module:
    """Class-evidence head of 1x1 convolutions with unit stride.

    ResNet-like: one layer ``in_channels -> num_classes``. VGG: ``512 -> 4096 -> 4096 -> classes``
    with ReLU and Dropout, as in the authors' code (``kdjoumessi/SoftCAM``). It has 18.9 M
    parameters for 2 classes, not the 123.6 M of torchvision's VGG-16 classifier (25088 -> 4096 ->
    4096 -> 1000): the paper's "preserving the original parameter count" would need a 7x7 first
    layer (docs/training.md, "VGG head").
    """
    if family == "vgg":
        return nn.Sequential(
            nn.Conv2d(in_channels, 4096, kernel_size=1, stride=1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(4096, 4096, kernel_size=1, stride=1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(4096, num_classes, kernel_size=1, stride=1),
        )
    return nn.Conv2d(in_channels, num_classes, kernel_size=1, stride=1)


def baseline_head(family: str, in_channels: int, num_classes: int, dropout: float = 0.5) -> nn.Module:
    """Fully connected head after global average pooling (the same shapes as :func:`evidence_head`).

    For VGG this makes GAP-VGG (``512 -> 4096 -> 4096 -> classes`` on the pooled vector, 18.9 M
    parameters for 2 classes), not torchvision's VGG with 7x7 pooling and a 25088-input classifier
    (119.6 M) that the paper's VGG-16 baseline is.
    """
    if family == "vgg":
        return nn.Sequential(
            nn.Linear(in_channels, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
    return nn.Linear(in_channels, num_classes)


def to_softcam(model: nn.Module, num_classes: int) -> SoftCAMNet:
    """Turn a torchvision classifier (or a :class:`BaselineNet`) into a :class:`SoftCAMNet`.

    Global pooling and the fully connected head are removed and a class-evidence head of 1x1
    convolutions is put on the last feature map. When the model has a single linear head with
    ``num_classes`` outputs (ResNet, DenseNet, a trained baseline), its weights are copied into the
    1x1 convolution, so the converted net gives identical logits: mean(W f + b) == W mean(f) + b.

    Args:
        model: torchvision ResNet / VGG / DenseNet / EfficientNet / ConvNeXt, or a BaselineNet.
        num_classes: number of output classes C.
    Returns:
        SoftCAMNet whose ``forward_with_maps`` returns logits (B, C) and maps (B, C, h, w).
    """
    features, channels, fc, family = _split_backbone(model)
    if family == "baseline":
        family = "vgg" if isinstance(model.fc, nn.Sequential) else "resnet"
    head = evidence_head(family, channels, num_classes)
    if isinstance(fc, nn.Linear) and fc.out_features == num_classes and isinstance(head, nn.Conv2d):
        with torch.no_grad():
            head.weight.copy_(fc.weight.reshape(num_classes, channels, 1, 1))
            head.bias.copy_(fc.bias)
    arch = getattr(model, "arch", type(model).__name__.lower())
    return SoftCAMNet(features, head, arch=arch)


def to_baseline(model: nn.Module, num_classes: int) -> BaselineNet:
    """Wrap a torchvision classifier as the GAP + FC black-box :class:`BaselineNet`.

    A VGG's own classifier (25088 inputs) is replaced by :func:`baseline_head`'s GAP-VGG MLP.
    """
    features, channels, fc, family = _split_backbone(model)
    head = baseline_head(family, channels, num_classes)
    if isinstance(fc, nn.Linear) and fc.out_features == num_classes and isinstance(head, nn.Linear):
        head.load_state_dict(fc.state_dict())
    return BaselineNet(features, head, arch=getattr(model, "arch", type(model).__name__.lower()))


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: a plain state dict (torchvision ``.pth``), a dict holding one
    under ``state_dict``/``model``, or a SoftCAM Review checkpoint. ``module.`` prefixes (DDP) are dropped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: initial weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt pickle or zip, truncated file
        raise CheckpointError(f"{path}: cannot read initial weights ({exc.__class__.__name__})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of weights")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Load the tensors of ``state`` whose name and shape match ``module``'s; returns how many did."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if usable:
        module.load_state_dict(usable, strict=False)
    return len(usable)


def _vgg_features(arch: str) -> nn.Sequential:
    """The convolutional part of torchvision's ``arch`` (same layers and parameter names as
    ``torchvision.models.get_model(arch).features``), initialised as torchvision does."""
    from torchvision.models.vgg import cfgs, make_layers

    depth, _, bn = arch.removeprefix("vgg").partition("_")
    features = make_layers(cfgs[{"11": "A", "13": "B", "16": "D", "19": "E"}[depth]], batch_norm=bool(bn))
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return features


def build_model(arch: str, num_classes: int, head: str = "softcam", init: str | Path | None = None) -> nn.Module:
    """Build a SoftCAM net or its black-box baseline from a torchvision architecture.

    Args:
        arch: torchvision name, one of :data:`ARCHS` (e.g. ``"resnet18"``, ``"vgg16_bn"``).
        num_classes: number of classes C.
        head: ``"softcam"`` (class-evidence maps), ``"baseline"`` (GAP + FC) or ``"torchvision"`` (the
            unmodified torchvision classifier with ``num_classes`` outputs, as imported from elsewhere).
        init: optional local weights file, never downloaded: a torchvision state dict (e.g.
            ImageNet ``resnet18-*.pth``) or a SoftCAM Review checkpoint; tensors whose names and
            shapes match are loaded (a 1000-class ImageNet head is skipped). Without it the weights
            are random.
    Raises:
        CheckpointError: ``init`` is missing, unreadable, or no tensor in it fits ``arch``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    state = _read_weights(init) if init is not None else None
    loaded = 0
    if head == "torchvision":
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    elif arch in VGGS:
        # torchvision's VGG would first build (and randomly initialise) the 25088x4096 classifier
        # that SoftCAM discards: seconds of wasted work on every load, so build the features alone
        features = _vgg_features(arch)
        if head == "softcam":
            net = SoftCAMNet(features, evidence_head("vgg", 512, num_classes), arch=arch)
        else:
            net = BaselineNet(features, baseline_head("vgg", 512, num_classes), arch=arch)
    else:
        backbone = torchvision.models.get_model(arch, weights=None)
        # torchvision-named weights (ImageNet .pth) go into the backbone before conversion ...
        loaded = _load_matching(backbone, state) if state else 0
        backbone.arch = arch
        net = to_softcam(backbone, num_classes) if head == "softcam" else to_baseline(backbone, num_classes)
    net.arch = arch
    # ... our own checkpoints (features.* / evidence.* / fc.* names) into the converted net; the
    # two share modules, so a tensor matching both is loaded twice with the same value
    if state:
        loaded = max(loaded, _load_matching(net, state))
    if state is not None and not loaded:
        raise CheckpointError(f"{init}: no tensor matches the parameters of {arch}")
    if state is not None:
        log.info("initialised %s from %s: %d tensors", arch, init, loaded)
    return net


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (checkpoint and image identities)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


REQUIRED_META = ("arch", "head", "classes", "img_size", "mean", "std", "modality")


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint records about its model, typed (the ``meta`` dict, validated).

    arch: torchvision name (``"resnet18"``); head: ``"softcam"`` | ``"baseline"`` | ``"torchvision"``; classes: class
    names, the negative ("no disease") class first; img_size: model input side (px); mean, std:
    per-channel normalisation of [0, 1] intensities; modality: ``"fundus"`` | ``"oct"`` | ``"cxr"`` |
    ``"other"``; l1, l2: the ElasticNet weights it was trained with; data_hash: the cohort it was
    trained on (or None); metrics: its recorded metrics; extra: every other key, kept as is.
    """

    arch: str
    head: str
    classes: tuple[str, ...]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    modality: str
    l1: float = 0.0
    l2: float = 0.0
    data_hash: str | None = None
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_dict(cls, meta: dict[str, Any], source: str = "checkpoint") -> "CheckpointMeta":
        """Validate and type a ``meta`` dict. Raises CheckpointError naming ``source`` and the problem."""
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise CheckpointError(f"{source}: checkpoint metadata lacks {', '.join(missing)}")
        try:
            typed = cls(
                arch=str(meta["arch"]), head=str(meta["head"]), classes=tuple(str(c) for c in meta["classes"]),
                img_size=int(meta["img_size"]), mean=tuple(float(v) for v in meta["mean"]),
                std=tuple(float(v) for v in meta["std"]), modality=str(meta["modality"]),
                l1=float(meta.get("l1") or 0.0), l2=float(meta.get("l2") or 0.0),
                data_hash=None if meta.get("data_hash") is None else str(meta["data_hash"]),
                metrics=dict(meta.get("metrics") or {}),
                extra={k: v for k, v in meta.items() if k not in _META_FIELDS},
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed checkpoint metadata ({exc})") from None
        problems = [f"head {typed.head!r} is not one of {', '.join(HEADS)}" if typed.head not in HEADS else "",
                    "fewer than two classes" if typed.num_classes < 2 else "",
                    f"img_size {typed.img_size} is not positive" if typed.img_size <= 0 else "",
                    "mean and std need 1 or 3 values each" if {len(typed.mean), len(typed.std)} - {1, 3} else "",
                    "mean and std must be finite" if not all(math.isfinite(v) for v in typed.mean + typed.std) else "",
                    "std must be positive" if not all(v > 0 for v in typed.std) else ""]
        problems = [p for p in problems if p]
        if problems:
            raise CheckpointError(f"{source}: bad checkpoint metadata: {'; '.join(problems)}")
        return typed

    def to_dict(self) -> dict[str, Any]:
        """The ``meta`` dict a checkpoint stores (``num_classes`` included)."""
        out = {k: getattr(self, k) for k in _META_FIELDS if k not in ("num_classes", "extra")}
        out.update(classes=list(self.classes), mean=list(self.mean), std=list(self.std), num_classes=self.num_classes)
        return {**self.extra, **out}


_META_FIELDS = ("arch", "head", "classes", "img_size", "mean", "std", "modality", "l1", "l2", "data_hash", "metrics",
                "num_classes", "extra")


def _plain(value: Any) -> Any:
    """Metadata as plain Python types (dict, list, str, int, float, bool, None), so checkpoints load
    with ``torch.load(weights_only=True)``: numpy scalars, paths, tuples and str subclasses such as
    ``torch.__version__`` would otherwise need unpickling of arbitrary classes."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights with their metadata (validated as :class:`CheckpointMeta`) atomically.

    Raises:
        ValueError: the metadata lacks a field or has a bad value (CheckpointError is a ValueError).
    """
    CheckpointMeta.from_dict(meta, source=Path(path).name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta": _plain(dict(meta, num_classes=len(meta["classes"]))),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def inference_layout(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` in eval mode on ``device``, laid out for the fastest forward pass there (in place).

    On CPU the convolution weights go channels-last: oneDNN's channels-last kernels run a 512 px
    ResNet-50 forward in 0.53 s instead of 0.63 s on 2 cores (``python -m bench --only forward``),
    same logits to ~1e-4 (another summation order). On CUDA fp32 channels-last was slower (0.92x,
    docs/performance.md), so the layout stays.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def read_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu", label: str | None = None) -> dict:
    """The payload of a checkpoint file (``{"format", "meta", "state_dict", ...}``), its header checked;
    weights stay tensors (no model is built). ``torch.load(weights_only=True)``: no code runs.
    ``label`` names the file in error messages (default: its path; the app shows the file name).

    Raises:
        CheckpointError: the file is absent, unreadable or not a SoftCAM Review checkpoint.
    """
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise CheckpointError(f"{label}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{label}: not a readable checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{label}: not a SoftCAM Review checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    return payload


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`; returns ``(model in eval mode, meta)``.

    Raises:
        CheckpointError: the file is absent, corrupt, not ours, or its weights don't fit its arch.
    """
    path = Path(path)
    payload = read_checkpoint(path, map_location)
    meta = payload.get("meta") or {}
    CheckpointMeta.from_dict(meta, source=str(path))
    try:
        model = build_model(meta["arch"], len(meta["classes"]), meta["head"])
        model.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit {meta.get('arch')}/{meta.get('head')}: {first}") from None
    model.eval()
    return model, meta
