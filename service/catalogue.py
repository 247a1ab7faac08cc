"""The model catalogue: checkpoints on disk, their metadata, and loaded models kept in memory."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file and the metadata it records (see ``models.save_checkpoint``)."""

    path: Path
    meta: dict
    size_mb: float
    modified: float  # POSIX seconds

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def modality(self) -> str:
        return str(self.meta.get("modality", "other"))

    @property
    def head(self) -> str:
        return str(self.meta.get("head", "?"))

    def label(self) -> str:
        """One line for select boxes: ``name — arch/head, modality, N classes``."""
        meta = self.meta
        return (f"{self.name} — {meta.get('arch', '?')}/{self.head}, {self.modality}, "
                f"{len(meta.get('classes', []))} classes")


_MODEL_CACHE: OrderedDict[tuple, tuple[Any, dict]] = OrderedDict()


_MODEL_CACHE_SIZE = 4


_MODEL_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def load_model(path: str | Path) -> tuple[Any, dict]:
    """``(model in eval mode on the default device, meta)`` for a checkpoint, cached by path and mtime.

    Loaded by :func:`softcam_core.inference.load_model` (channels-last weights on CPU: faster).

    A rewritten checkpoint (new mtime or size) is loaded afresh. Raises ``CheckpointError``.
    """
    from softcam_core import inference
    from softcam_core.models import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.name}: checkpoint not found")
    key = _file_key(path)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            _MODEL_CACHE.move_to_end(key)
            return _MODEL_CACHE[key]
    model, meta = inference.load_model(path)
    with _MODEL_LOCK:
        _MODEL_CACHE[key] = (model, meta)
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    return model, meta


_META_CACHE: dict[tuple, dict] = {}


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Metadata of one checkpoint without keeping its weights in memory (cached by mtime)."""
    import torch

    from softcam_core.models import CHECKPOINT_FORMAT, CheckpointError

    path = Path(path)
    key = _file_key(path)
    meta = _META_CACHE.get(key)
    if meta is None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path.name}: not a readable checkpoint ({exc.__class__.__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path.name}: not a SoftCAM Review checkpoint")
        meta = dict(payload.get("meta") or {})
        _META_CACHE[key] = meta
    stat = path.stat()
    return CheckpointInfo(path=path, meta=meta, size_mb=stat.st_size / 1e6, modified=stat.st_mtime)


def list_checkpoints(directory: str | Path | None = None) -> tuple[list[CheckpointInfo], list[str]]:
    """All checkpoints (``*.pt``) under ``directory`` (default ``models_dir()``), newest first.

    Returns ``(checkpoints, problems)`` where each problem is a one-line message for an unreadable file.
    """
    from softcam_core.paths import models_dir

    directory = Path(directory) if directory is not None else models_dir()
    found, problems = [], []
    for path in sorted(directory.rglob("*.pt")):
        if path.name.endswith(".last.pt"):  # training's resumable state beside a checkpoint, not a model
            continue
        try:
            found.append(checkpoint_info(path))
        except Exception as exc:  # one bad file must not hide the others
            problems.append(" ".join(str(exc).split()))
    found.sort(key=lambda info: info.modified, reverse=True)
    return found, problems


def model_identity(path: str | Path) -> str:
    """Identity of a checkpoint file for cache keys: name, mtime and size (hashing 100 MB is slow)."""
    path = Path(path)
    stat = path.stat()
    return f"{path.name}:{stat.st_mtime_ns}:{stat.st_size}"
