"""The model catalogue: checkpoints on disk, their metadata, and loaded models kept in memory."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
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
    def checkpoint_meta(self):
        """The metadata typed and validated (:class:`softcam_core.models.CheckpointMeta`)."""
        from softcam_core.models import CheckpointMeta

        return CheckpointMeta.from_dict(self.meta, source=self.path.name)

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
    from softcam_core.models import CheckpointMeta, read_checkpoint

    path = Path(path)
    key = _file_key(path)
    meta = _META_CACHE.get(key)
    if meta is None:
        payload = read_checkpoint(path, label=path.name)
        meta = dict(payload.get("meta") or {})
        CheckpointMeta.from_dict(meta, source=path.name)  # a checkpoint the app cannot use is a listed problem
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


MODALITY_ORDER = ("fundus", "oct", "cxr", "other")


def preferred_model(found: Sequence[CheckpointInfo], defaults: dict[str, str],
                    modality: str | None = None) -> CheckpointInfo | None:
    """The model a page opens on when the user chose none.

    ``found``: checkpoints (:func:`list_checkpoints`, newest first); ``defaults``: ``{modality: path}``
    chosen on the Models page (or set by the demo). Order: the default of ``modality`` (when given),
    the defaults in :data:`MODALITY_ORDER`, the newest SoftCAM net (of ``modality`` first), the newest
    checkpoint. A black-box baseline is never preferred over a SoftCAM net: Review exists to show
    the evidence maps.
    """
    by_path = {str(info.path): info for info in found}
    order = ([modality] if modality else []) + [m for m in MODALITY_ORDER if m != modality]
    for wanted in order:
        if defaults.get(wanted) in by_path:
            return by_path[defaults[wanted]]
    softcam = [info for info in found if info.head == "softcam"]
    for candidates in ([i for i in softcam if i.modality == modality], softcam, list(found)):
        if candidates:
            return candidates[0]
    return None


def registered_model(session, path: str | Path):
    """The database row (``db.schema.Model``) of a checkpoint, registered on first use (found by its path)."""
    from db import repository

    path = Path(path)
    info = checkpoint_info(path)
    resolved = str(path.resolve())
    rows = repository.list_models(session)
    for row in rows:
        if row.checkpoint_path == resolved:
            return row
    name = info.name if not any(r.name == info.name for r in rows) else f"{info.name}-{path.stat().st_mtime_ns}"
    return repository.register_model(session, name, path, modality=info.modality, metadata=info.meta)


def apply_demo_defaults(session, report_path: str | Path | None = None) -> dict[str, str]:
    """Make the demo's SoftCAM model (``demo_report.json`` ``default_models``) the default of every
    modality that has no default yet; a default chosen on the Models page is never replaced.

    Returns ``{modality: checkpoint path}`` of the defaults set now (empty without a demo report).
    """
    import json

    from db import repository
    from softcam_core.demo import REPORT_NAME
    from softcam_core.paths import softcam_home

    report_path = Path(report_path) if report_path is not None else softcam_home() / REPORT_NAME
    try:
        wanted = json.loads(report_path.read_text(encoding="utf-8")).get("default_models") or {}
    except (OSError, ValueError):
        return {}
    applied = {}
    for modality, checkpoint in wanted.items():
        if repository.get_default_model(session, modality) is not None or not Path(checkpoint).is_file():
            continue
        row = registered_model(session, checkpoint)
        repository.set_default_model(session, row)
        applied[modality] = str(checkpoint)
    return applied


def set_default_model(session, user_id: int | None, model_id: int) -> None:
    """Make a registered model the default of its modality, as ``user_id`` (a researcher or admin)."""
    from db import repository
    from service.access import require

    require(session, user_id, "manage_models")
    repository.set_default_model(session, int(model_id))
