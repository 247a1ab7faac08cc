"""Training of SoftCAM nets and their black-box baselines (``softcam train``), as the paper does.

Recipe (paper defaults, all overridable): SGD with Nesterov momentum 0.9, lr 1e-3, weight decay
5e-4; a cosine schedule stepped every batch and clipped from below at ``min_lr`` (1e-4); loss =
cross-entropy + ElasticNet penalty on the evidence maps (:mod:`softcam_core.losses`); modality-aware
augmentation on batch tensors (:data:`AUGMENTATION`); optional class-balanced sampling; the weights
of the epoch with the best validation score are the checkpoint (:func:`selection_key`).

Files, next to the checkpoint ``OUT.pt``:
  ``OUT.pt``        best-on-validation weights + metadata (:func:`softcam_core.models.save_checkpoint`)
  ``OUT.log.csv``   one row per epoch: lr, train loss parts and accuracy, validation loss,
                    accuracy and AUC (two classes) or quadratic kappa (more), seconds
  ``OUT.last.pt``   full state after the last finished epoch (weights, optimiser, schedule, RNG
                    states, history): ``resume=True`` / ``--resume`` continues from it

Reproducible: the same seed on the same machine gives the same weights (CPU): initial weights
come from the seeded global generator, the sample order and the augmentation from generators
seeded with ``(seed, epoch, rank)``, and a resumed run restores every generator.

Multi-process: start with ``torchrun --nproc_per_node N -m softcam_core train ...``; each process
trains on its 1/N share of every epoch (DistributedDataParallel; gloo on CPU, NCCL on CUDA) and
only rank 0 validates and writes files.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from softcam_core.device import join_process_group
import torch.nn.functional as F
from torch import nn

from softcam_core.device import default_device
from softcam_core.labels import DEFAULT_SPLIT_FRACTIONS

if TYPE_CHECKING:
    from softcam_core.data import SplitRecords
from softcam_core.losses import loss_terms
from softcam_core.models import ARCHS, SoftCAMNet, build_model, load_checkpoint, save_checkpoint

# the heads trained here; "torchvision" (an unchanged imported classifier) comes only from `softcam models import`
TRAINABLE_HEADS = ("softcam", "baseline")

# ImageNet statistics: inputs stay in the range local ImageNet weights (--init) were trained on
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
STATE_FORMAT = "softcam-review-train-state"

ProgressCallback = Callable[[int, int, dict], None]


class TrainingError(ValueError):
    """Training cannot start or resume; ``str(e)`` names the file and the problem in one line."""


# --------------------------------------------------------------------------------------------------
# augmentation


@dataclass(frozen=True)
class AugmentPolicy:
    """Random transforms of one modality. Angles in degrees, ``translate`` as a fraction of the side,
    jitter factors drawn uniformly from ``[1 - j, 1 + j]``."""

    hflip: bool
    vflip: bool
    rotate: float
    scale: float
    translate: float
    brightness: float
    contrast: float
    saturation: float


AUGMENTATION: dict[str, AugmentPolicy] = {
    # the retina has no preferred orientation on the photo: both flips, wider rotation, and colour
    # jitter for the camera / pigmentation differences between sites
    "fundus": AugmentPolicy(hflip=True, vflip=True, rotate=30.0, scale=0.1, translate=0.05,
                            brightness=0.2, contrast=0.2, saturation=0.2),
    # retinal layers are ordered top to bottom (vitreous above, choroid below): never flip vertically;
    # nasal/temporal mirror images are both anatomical
    "oct": AugmentPolicy(hflip=True, vflip=False, rotate=5.0, scale=0.1, translate=0.05,
                         brightness=0.1, contrast=0.1, saturation=0.0),
    # chest X-rays are not mirror-symmetric (heart on the left, side markers): no flips at all
    "cxr": AugmentPolicy(hflip=False, vflip=False, rotate=7.0, scale=0.1, translate=0.05,
                         brightness=0.1, contrast=0.1, saturation=0.0),
    "other": AugmentPolicy(hflip=True, vflip=False, rotate=10.0, scale=0.1, translate=0.05,
                           brightness=0.1, contrast=0.1, saturation=0.0),
}


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment_batch(
    x: torch.Tensor,
    policy: AugmentPolicy,
    generator: torch.Generator,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> torch.Tensor:
    """Randomly transform a normalised batch, each image on its own draw.

    Args:
        x: (B, 3, S, S) float inputs normalised with ``mean``/``std`` (any device).
        policy: what may change (see :data:`AUGMENTATION`).
        generator: CPU generator all random draws come from (reproducibility).
    Returns:
        (B, 3, S, S) tensor on x's device, normalised the same way. Geometry (flips, rotation,
        scale, shift) resamples bilinearly with black outside the image; colour jitter acts on
        [0, 1] intensities, which are clamped back into [0, 1].
    """
    b = x.shape[0]
    device, dtype = x.device, x.dtype
    mean_t = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1)
    img = x * std_t + mean_t  # [0, 1] intensities: "black" padding and jitter mean what they say

    angle = torch.deg2rad(_uniform(b, -policy.rotate, policy.rotate, generator))
    scale = _uniform(b, 1 - policy.scale, 1 + policy.scale, generator)
    shift = _uniform(2 * b, -policy.translate, policy.translate, generator).view(b, 2) * 2  # grid units span 2
    flip_x = torch.where(torch.rand(b, generator=generator) < (0.5 if policy.hflip else 0.0), -1.0, 1.0)
    flip_y = torch.where(torch.rand(b, generator=generator) < (0.5 if policy.vflip else 0.0), -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # output -> input sampling grid: rotate/zoom, then mirror the sampled column / row
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin * flip_x, shift[:, 0]], dim=1),
            torch.stack([sin * flip_y, cos * flip_y, shift[:, 1]], dim=1),
        ],
        dim=1,
    ).to(device=device, dtype=dtype)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def factors(j: float) -> torch.Tensor:
        return _uniform(b, 1 - j, 1 + j, generator).to(device=device, dtype=dtype).view(b, 1, 1, 1)

    img = img * factors(policy.brightness)
    grey_level = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - grey_level) * factors(policy.contrast) + grey_level
    if policy.saturation:
        grey = img.mean(dim=1, keepdim=True)
        img = (img - grey) * factors(policy.saturation) + grey
    img = img.clamp(0.0, 1.0)
    return (img - mean_t) / std_t


# --------------------------------------------------------------------------------------------------
# sampling, schedule, metrics


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices of one epoch for one process: a seeded shuffle (or, with ``balanced``, a seeded draw
    with replacement in which every class is equally likely), padded to a multiple of ``world_size``
    and dealt out rank by rank like :class:`torch.utils.data.DistributedSampler`.

    The order depends only on ``(seed, epoch)``, so every process agrees on it and a resumed run
    sees the same epochs as an uninterrupted one. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, targets: Sequence[int], *, balanced: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.balanced = balanced
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.world_size)

    def __iter__(self):
        n = len(self.targets)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.balanced:
            counts = torch.bincount(self.targets).float()
            weights = 1.0 / counts[self.targets]
            order = torch.multinomial(weights, n, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
        total = len(self) * self.world_size
        order = torch.cat([order, order[: total - n]]) if total > n else order
        return iter(order[self.rank :: self.world_size].tolist())


def clipped_cosine(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate at ``step`` of ``total_steps``: ``lr * (1 + cos(pi * step / total)) / 2``,
    never below ``min_lr`` (the paper's clipped cosine schedule)."""
    progress = min(step, total_steps) / max(total_steps, 1)
    return max(lr * 0.5 * (1.0 + math.cos(math.pi * progress)), min_lr)


def classification_metrics(targets: Sequence[int], probs: np.ndarray, num_classes: int) -> dict:
    """Accuracy and AUC (two classes; class 1 = positive) or quadratically weighted Cohen's kappa
    (more classes, graded labels).

    Args:
        targets: (N,) class indices.
        probs: (N, C) softmax probabilities.
    Returns:
        ``{"n", "accuracy", "auc"}`` or ``{"n", "accuracy", "kappa"}``; a score that is undefined
        for the data (one class only) is ``None``.
    """
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    targets = np.asarray(targets, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    out: dict = {"n": int(len(targets)), "accuracy": float((pred == targets).mean()) if len(targets) else None}
    present = np.unique(targets)
    if num_classes == 2:
        out["auc"] = float(roc_auc_score(targets, probs[:, 1])) if len(present) == 2 else None
    else:
        if len(present) < 2 and len(np.unique(pred)) < 2:
            out["kappa"] = None
        else:
            kappa = cohen_kappa_score(targets, pred, weights="quadratic", labels=list(range(num_classes)))
            out["kappa"] = None if math.isnan(kappa) else float(kappa)
    return out


def selection_key(metrics: dict) -> tuple:
    """Order of validation results (larger is better): accuracy, then AUC / kappa, then lower loss.
    Accuracy first because AUC saturates at 1.0 early on easy cohorts while the decision threshold
    is still wrong; the loss breaks the remaining ties."""
    score = metrics.get("auc", metrics.get("kappa"))
    return (metrics.get("accuracy") or 0.0, -1.0 if score is None else score, -(metrics.get("loss") or 0.0))


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader, device: torch.device, num_classes: int, amp: bool = False) -> dict:
    """Cross-entropy ``loss`` (mean) and :func:`classification_metrics` of ``model`` (eval mode) on a loader
    of ``(x (B, 3, S, S), y (B,))`` batches."""
    model.eval()
    probs, targets, loss_sum = [], [], 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        targets.append(y.cpu())
    if not probs:
        return {"n": 0, "loss": None, "accuracy": None}
    probs_np = torch.cat(probs).numpy()
    targets_np = torch.cat(targets).numpy()
    out = classification_metrics(targets_np, probs_np, num_classes)
    out["loss"] = loss_sum / len(targets_np)
    return out


# --------------------------------------------------------------------------------------------------
# training


class _EvidenceAndLogits(nn.Module):
    """``forward`` -> (logits, maps or None), so DistributedDataParallel (which hooks ``forward``
    only) synchronises gradients of the one-pass SoftCAM forward too."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if isinstance(self.net, SoftCAMNet):
            return self.net.forward_with_maps(x)
        return self.net(x), None


@dataclass
class TrainResult:
    """What :func:`train` produced: the checkpoint, its metadata and the per-epoch history."""

    checkpoint: Path
    meta: dict
    history: list[dict] = field(default_factory=list)
    log: Path | None = None
    state: Path | None = None


def library_versions() -> dict[str, str]:
    """Versions recorded in checkpoints (to tell why two runs differ)."""
    import sklearn
    import torchvision

    try:
        from importlib.metadata import version

        own = version("softcam-review")
    except Exception:  # not installed (e.g. run from a source tree)
        own = "unknown"
    return {"python": platform.python_version(), "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "scikit-learn": sklearn.__version__, "numpy": np.__version__, "softcam-review": own}


def log_path(out: str | Path) -> Path:
    """``OUT.log.csv`` of checkpoint ``OUT.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".log.csv")


def splits_path(out: str | Path) -> Path:
    """The ``image,label,split`` CSV a run writes beside checkpoint ``out``: ``OUT.splits.csv``."""
    out = Path(out)
    return out.with_name(out.stem + ".splits.csv")


def state_path(out: str | Path) -> Path:
    """``OUT.last.pt`` (resumable state) of checkpoint ``OUT.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".last.pt")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Every global generator's state as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# keys that must agree between a saved state and the run resuming from it
_RESUME_KEYS = ("arch", "head", "classes", "img_size", "l1", "l2", "data_hash", "seed", "batch_size", "balanced",
                "lr", "min_lr", "momentum", "weight_decay", "world_size", "modality")


def train(
    data: str | Path | SplitRecords,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    image_col: str | None = None,
    label_col: str | None = None,
    label_classes: Sequence[str] | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    split_seed: int = 0,
    arch: str = "resnet18",
    head: str = "softcam",
    l1: float = 0.0,
    l2: float = 0.0,
    epochs: int = 10,
    img_size: int = 224,
    init: str | Path | None = None,
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    min_lr: float = 1e-4,
    batch_size: int = 16,
    balanced: bool = False,
    seed: int = 0,
    resume: bool = False,
    workers: int = 0,
    device: str | torch.device | None = None,
    modality: str | None = None,
    augment: bool = True,
    amp: bool = True,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    progress: ProgressCallback | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train a SoftCAM net (``head="softcam"``) or its black-box baseline on a labelled cohort.

    Args:
        data: a cohort folder (``softcam synth`` layout: labels.csv, images/), a folder of images
            with a label CSV (``labels``), an ImageFolder tree (``class/xxx.png`` or
            ``split/class/xxx.png``), all read by :func:`softcam_core.data.open_cohort`; or a source
            object made elsewhere (a database cohort, ``db.evaluation.open_training_cohort``).
        labels, image_col, label_col, label_classes: the label CSV of a folder of images, its
            column names and the negative,positive class names of its numeric layouts
            (:func:`softcam_core.labels.read_label_rows`).
        split_fractions, split_seed: when no image has a split, a stratified split with these
            train/val/test fractions and seed is assigned (:func:`softcam_core.labels.stratified_splits`).
            The split used is always written to ``OUT.splits.csv`` (``image,label,split``), which
            ``softcam evaluate --data DIR --labels OUT.splits.csv --split test`` reads back.
        out: checkpoint path (``.pt``); the CSV log and resumable state go beside it.
        arch, head: see :func:`softcam_core.models.build_model`.
        l1, l2: ElasticNet weights on the evidence maps (SoftCAM only; see :mod:`softcam_core.losses`).
        epochs: passes over the training split. img_size: model input side (pixels).
        init: local weights file to start from (never downloads); random weights without it.
        lr, momentum, weight_decay, min_lr: SGD-Nesterov and clipped cosine schedule settings.
        batch_size: images per step and process. balanced: class-balanced sampling with replacement.
        seed: seeds weights, sample order and augmentation (it re-seeds Python's, NumPy's and
            torch's global generators). resume: continue from ``OUT.last.pt``.
        workers: DataLoader worker processes (0 = load in this process). Decoded inputs are cached
            in memory (each worker keeps its own cache).
        device: default :func:`softcam_core.device.default_device`. AMP (float16) is used on CUDA
            only, when ``amp``.
        modality: fundus / oct / cxr / other, for loading and augmentation (default: the folder's).
        augment: apply :data:`AUGMENTATION` to training batches.
        mean, std: input normalisation (recorded in the checkpoint).
        progress: ``progress(epoch, step, metrics)`` called on rank 0 after every step (metrics
            ``phase="train"``, ``loss``, ``lr``, ``steps``, ``epochs``) and after every epoch
            (``phase="epoch"`` and the log row), e.g. for a live progress bar in the app.
        show_progress: tqdm bars on stderr.
    Returns:
        :class:`TrainResult` (rank 0 holds the final metadata; other ranks get the same paths).
    Raises:
        TrainingError / CohortError / CheckpointError with one-line messages naming the file.
    """
    from tqdm.auto import tqdm

    from softcam_core.data import CohortDataset, SplitRecords, open_cohort, write_splits

    if arch not in ARCHS:
        raise TrainingError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if head not in TRAINABLE_HEADS:
        raise TrainingError(f"unknown head {head!r}; choose softcam or baseline")
    if epochs < 1 or img_size < 16 or batch_size < 1:
        raise TrainingError(f"need epochs >= 1, img_size >= 16 and batch_size >= 1 (got {epochs}, {img_size}, {batch_size})")
    if l1 < 0 or l2 < 0 or lr <= 0 or min_lr < 0:
        raise TrainingError(f"penalties and learning rates must be non-negative (l1={l1}, l2={l2}, lr={lr}, min_lr={min_lr})")
    out = Path(out)
    device = torch.device(device) if device is not None else default_device()
    rank, world, device, started_group = join_process_group(device)
    is_main = rank == 0
    use_amp = bool(amp) and device.type == "cuda"

    if isinstance(data, SplitRecords):
        folder = data
        folder.assign_splits(split_fractions, split_seed)
    else:
        folder = open_cohort(data, labels, image_col=image_col, label_col=label_col, classes=label_classes,
                             assign_splits=(split_fractions, split_seed))
    where = folder.labels_path or folder.root
    classes = list(folder.classes)
    modality = modality or getattr(folder, "modality", None) or "other"
    if modality not in AUGMENTATION:
        raise TrainingError(f"{folder.root}: unknown modality {modality!r}; choose fundus, oct, cxr or other")
    if len(classes) < 2:
        raise TrainingError(f"{where}: needs at least two classes, found {classes}")
    train_set = CohortDataset(folder, "train", img_size, mean, std, modality=modality)
    val_set = CohortDataset(folder, "val", img_size, mean, std, modality=modality)
    test_set = CohortDataset(folder, "test", img_size, mean, std, modality=modality)
    if len(train_set) == 0 or len(val_set) == 0:
        raise TrainingError(f"{where}: needs images in the 'train' and 'val' splits (split column), "
                            f"found {len(train_set)} train and {len(val_set)} val")
    data_hash = folder.data_hash()

    _seed_everything(seed)
    net = build_model(arch, len(classes), head, init=init).to(device)
    config = {
        "arch": arch, "head": head, "classes": classes, "img_size": int(img_size), "mean": [float(m) for m in mean],
        "std": [float(s) for s in std], "modality": modality, "l1": float(l1) if head == "softcam" else 0.0,
        "l2": float(l2) if head == "softcam" else 0.0, "data_hash": data_hash, "seed": int(seed),
        "batch_size": int(batch_size), "balanced": bool(balanced), "lr": float(lr), "min_lr": float(min_lr),
        "momentum": float(momentum), "weight_decay": float(weight_decay), "world_size": world,
    }

    sampler = EpochSampler(train_set.targets, balanced=balanced, seed=seed, rank=rank, world_size=world)
    # a last batch of one image breaks BatchNorm's batch statistics: drop it then
    drop_last = len(sampler) % batch_size == 1 and len(sampler) > 1
    loader_options = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                               **loader_options)
    eval_options = dict(loader_options, batch_size=max(batch_size, 32), shuffle=False)
    val_loader = torch.utils.data.DataLoader(val_set, **eval_options)
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch

    trainer: nn.Module = _EvidenceAndLogits(net)
    if world > 1:
        trainer = nn.parallel.DistributedDataParallel(trainer, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: clipped_cosine(step, total_steps, lr, min_lr) / lr
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    policy = AUGMENTATION[modality]

    start_epoch, history = 0, []
    best_key: tuple | None = None
    best_metrics: dict | None = None
    best_epoch = 0
    last = state_path(out)
    if resume:
        if not last.is_file():
            raise TrainingError(f"{last}: no saved training state to resume from (train without --resume first)")
        try:
            state = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainingError(f"{last}: unreadable training state ({exc.__class__.__name__})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TrainingError(f"{last}: not a SoftCAM Review training state")
        changed = [k for k in _RESUME_KEYS if state["config"].get(k) != config.get(k)]
        if changed:
            raise TrainingError(f"{last}: saved state was trained with different {', '.join(changed)}; "
                                "start a new run (another --out) or use the same settings")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        scheduler.last_epoch = start_epoch * steps_per_epoch
        for group in optimizer.param_groups:
            group["lr"] = clipped_cosine(scheduler.last_epoch, total_steps, lr, min_lr)
        history = list(state["history"])
        best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        best_metrics, best_epoch = state["best_metrics"], state["best_epoch"]
        _set_rng_state(state["rng"])

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    base_meta = dict(config, epochs=int(epochs), init=str(init) if init else None, created=created,
                     versions=library_versions(), data=folder.source,
                     splits={"counts": {split: len(subset) for split, subset in
                                        (("train", train_set), ("val", val_set), ("test", test_set))},
                             "assigned": folder.splits_assigned, "file": splits_path(out).name},
                     training={"optimizer": "SGD-nesterov", "schedule": "clipped-cosine-per-step", "amp": use_amp,
                               "augment": bool(augment), "device": device.type, "world_size": world})
    csv_path = log_path(out)
    score_name = "auc" if len(classes) == 2 else "kappa"
    columns = ["epoch", "lr", "train_loss", "train_ce", "train_penalty", "train_accuracy",
               "val_loss", "val_accuracy", f"val_{score_name}", "best", "seconds"]
    if is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not resume or not csv_path.is_file():
            with open(csv_path, "w", newline="") as handle:
                csv.writer(handle).writerow(columns)
        write_splits(folder, splits_path(out))

    if is_main and show_progress:
        print(f"training {head} {arch} on {len(train_set)} {modality} images ({', '.join(classes)}), "
              f"{epochs} epochs, {img_size} px, device {device}{f' x{world}' if world > 1 else ''}"
              f"{', from ' + str(init) if init else ', from random weights'}", file=sys.stderr)

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        augment_rng = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
        trainer.train()
        sums = {"loss": 0.0, "ce": 0.0, "penalty": 0.0, "correct": 0, "n": 0}
        bar = tqdm(train_loader, desc=f"{head} {arch} epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=not (is_main and show_progress), file=sys.stderr)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if augment:
                x = augment_batch(x, policy, augment_rng, mean, std)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits, maps = trainer(x)
            ce, penalty = loss_terms(logits, maps, y, config["l1"], config["l2"])
            loss = ce + penalty
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            n = y.numel()
            sums["loss"] += loss.item() * n
            sums["ce"] += ce.item() * n
            sums["penalty"] += penalty.item() * n
            sums["correct"] += int((logits.argmax(1) == y).sum())
            sums["n"] += n
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}")
            if is_main and progress is not None:
                progress(epoch, step, {"phase": "train", "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                                       "steps": steps_per_epoch, "epochs": epochs})
        bar.close()
        if world > 1:
            import torch.distributed as dist

            totals = torch.tensor([sums["loss"], sums["ce"], sums["penalty"], sums["correct"], sums["n"]],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            sums = dict(zip(["loss", "ce", "penalty", "correct", "n"], totals.tolist()))

        if is_main:
            val = evaluate_loader(net, val_loader, device, len(classes), use_amp)
            key = selection_key(val)
            improved = best_key is None or key > best_key
            row = {
                "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": sums["loss"] / sums["n"], "train_ce": sums["ce"] / sums["n"],
                "train_penalty": sums["penalty"] / sums["n"], "train_accuracy": sums["correct"] / sums["n"],
                "val_loss": val["loss"], "val_accuracy": val["accuracy"], f"val_{score_name}": val.get(score_name),
                "best": int(improved), "seconds": round(time.perf_counter() - started, 2),
            }
            history.append(row)
            if improved:
                best_key, best_metrics, best_epoch = key, val, epoch + 1
                save_checkpoint(out, net, dict(base_meta, metrics={"val": val, "best_epoch": best_epoch}))
            with open(csv_path, "a", newline="") as handle:
                csv.writer(handle).writerow(["" if row[c] is None else row[c] for c in columns])
            _save_state(last, net, optimizer, scaler, epoch + 1, config, history, best_key, best_metrics, best_epoch)
            if show_progress:
                score = val.get(score_name)
                print(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} | "
                      f"val loss {val['loss']:.4f} acc {val['accuracy']:.3f} {score_name} "
                      f"{'n/a' if score is None else f'{score:.3f}'}{' *' if improved else ''} ({row['seconds']:.0f} s)",
                      file=sys.stderr)
            if progress is not None:
                progress(epoch, steps_per_epoch, dict(row, phase="epoch", epochs=epochs))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    meta: dict = {}
    if is_main:
        # the checkpoint holds the best epoch's weights: score those on the test split
        best_net, meta = load_checkpoint(out, map_location="cpu")
        best_net.to(device)
        test_metrics = None
        if len(test_set):
            test_loader = torch.utils.data.DataLoader(test_set, **eval_options)
            test_metrics = evaluate_loader(best_net, test_loader, device, len(classes), use_amp)
        meta["metrics"] = {"val": best_metrics, "test": test_metrics, "best_epoch": best_epoch}
        meta.pop("num_classes", None)
        save_checkpoint(out, best_net, meta)
        meta["num_classes"] = len(classes)
        if show_progress and test_metrics is not None:
            score = test_metrics.get(score_name)
            print(f"best epoch {best_epoch}: test accuracy {test_metrics['accuracy']:.3f} {score_name} "
                  f"{'n/a' if score is None else f'{score:.3f}'} on {test_metrics['n']} images -> {out}", file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if started_group:
            dist.destroy_process_group()
    return TrainResult(checkpoint=out, meta=meta, history=history, log=csv_path, state=last)


def _save_state(path: Path, net, optimizer, scaler, epoch, config, history, best_key, best_metrics, best_epoch) -> None:
    """Write the resumable state atomically (a crash mid-write keeps the previous one)."""
    payload = {
        "format": STATE_FORMAT, "epoch": epoch, "config": config, "history": history,
        "best_key": list(best_key) if best_key is not None else None, "best_metrics": best_metrics,
        "best_epoch": best_epoch,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# command line


def register_cli(subparsers) -> None:
    """Add ``softcam train`` to the CLI."""
    parser = subparsers.add_parser(
        "train",
        help="train a SoftCAM (self-explainable) or black-box baseline classifier on a labelled cohort",
        description="Train on a cohort folder (`softcam synth` layout: labels.csv, images/), a folder of images "
        "with a label CSV (--labels), an ImageFolder tree (class/xxx.png or split/class/xxx.png) or a labelled "
        "database cohort (--cohort). Images without a split get a stratified, seeded one (saved with a database "
        "cohort). Writes the best-on-validation checkpoint OUT.pt, a per-epoch log OUT.log.csv, the split used "
        "OUT.splits.csv and a resumable state OUT.last.pt. Multi-process: torchrun --nproc_per_node N -m "
        "softcam_core train ...",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="cohort folder (labels.csv, images/), a folder of images with "
                        "--labels, or an ImageFolder tree")
    source.add_argument("--cohort", help="a labelled database cohort (softcam images import / label)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="label CSV of the --data folder: image,label[,split], Kaggle DR image,level "
                        "(grade 0 -> first class, 1-4 -> second) or RSNA patientId,Target")
    parser.add_argument("--image-col", default=None, help="image column of --labels (default: image, filename, ...)")
    parser.add_argument("--label-col", default=None, help="label column of --labels (default: label, level, target, ...)")
    parser.add_argument("--classes", default=None,
                        help="negative,positive class names of a numeric --labels layout (default healthy,diseased)")
    parser.add_argument("--split-fractions", default=",".join(str(f) for f in DEFAULT_SPLIT_FRACTIONS),
                        help="train,val,test fractions of a split assigned where the data has none "
                        "(stratified by label; default %(default)s)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of an assigned split (default 0)")
    parser.add_argument("--arch", default="resnet18", choices=ARCHS, metavar="ARCH",
                        help="torchvision architecture: resnet18/34/50/101/152, vgg11..vgg19[_bn], densenet*, "
                        "efficientnet_b*, convnext_* (default resnet18)")
    parser.add_argument("--head", default="softcam", choices=TRAINABLE_HEADS,
                        help="softcam: class-evidence maps; baseline: GAP + FC black box (default softcam)")
    parser.add_argument("--l1", type=float, default=0.0, help="lasso weight on the evidence maps (mean |a|) (default 0)")
    parser.add_argument("--l2", type=float, default=0.0, help="ridge weight on the evidence maps (mean a^2) (default 0)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    parser.add_argument("--img-size", type=int, default=224, help="model input side in pixels (default 224)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    parser.add_argument("--init", type=Path, default=None,
                        help="local weights to start from (torchvision .pth or a SoftCAM checkpoint); never downloads")
    parser.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default 1e-3)")
    parser.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default 5e-4)")
    parser.add_argument("--min-lr", type=float, default=1e-4, help="floor of the cosine schedule (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step and process (default 16)")
    parser.add_argument("--balanced", action="store_true", help="class-balanced sampling (with replacement)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.last.pt")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: SOFTCAM_DEVICE or cuda when available)")
    parser.add_argument("--modality", default=None, choices=sorted(AUGMENTATION),
                        help="modality for loading and augmentation (default: the cohort's)")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="train without augmentation")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    parser.set_defaults(func=_cli_train)


def _cli_train(args) -> int:
    try:
        fractions = tuple(float(v) for v in args.split_fractions.split(","))
    except ValueError:
        raise TrainingError(f"--split-fractions: expected three numbers train,val,test, got {args.split_fractions!r}") from None
    if args.cohort:
        if args.labels or args.image_col or args.label_col or args.classes:
            raise TrainingError("--labels / --image-col / --label-col / --classes read a folder's label file; "
                                "a database cohort is labelled with softcam images label")
        opener = getattr(args, "open_training_cohort", None)  # set by db/cli.py: softcam_core never imports db
        if opener is None:
            raise TrainingError("--cohort needs the database package (db)")
        data = opener(args.cohort, fractions=fractions, seed=args.split_seed)
        left_out = sum(data.unlabeled_left_out.values())
        print(f"cohort {args.cohort}: {len(data)} labelled images" + (f", {left_out} unlabeled left out" if left_out else ""))
        if data.splits_assigned:
            print(f"assigned a stratified split to {data.splits_assigned['images']} image(s) "
                  f"(fractions {args.split_fractions}, seed {args.split_seed}), saved with the cohort")
    else:
        data = args.data
    result = train(
        data, args.out, labels=args.labels, image_col=args.image_col, label_col=args.label_col,
        label_classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        split_fractions=fractions, split_seed=args.split_seed, arch=args.arch, head=args.head, l1=args.l1, l2=args.l2, epochs=args.epochs,
        img_size=args.img_size, init=args.init, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        min_lr=args.min_lr, batch_size=args.batch_size, balanced=args.balanced, seed=args.seed, resume=args.resume,
        workers=args.workers, device=args.device, modality=args.modality, augment=args.augment, amp=args.amp,
    )
    if result.meta:
        metrics = result.meta.get("metrics", {})
        for split in ("val", "test"):
            values = metrics.get(split)
            if values:
                shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
                print(f"{split}: {shown}")
        assigned = result.meta.get("splits", {}).get("assigned")
        if assigned and not args.cohort:
            print(f"assigned a stratified split (fractions {args.split_fractions}, seed {args.split_seed}); "
                  "evaluate the held-out images with --labels " + str(splits_path(result.checkpoint)) + " --split test")
        print(f"checkpoint: {result.checkpoint}\nlog: {result.log}\nsplits: {splits_path(result.checkpoint)}")
    return 0
