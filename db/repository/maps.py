"""Cached explanation maps (files under ``SOFTCAM_HOME/maps``, rows in ``cached_maps``)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.repository.base import _write_atomically
from db.schema import (
    CachedMap,
    Image,
    Model,
    utcnow,
)


def params_hash(params: dict | None) -> str:
    """sha256 of the canonical JSON of a method's options (sorted keys)."""
    return hashlib.sha256(json.dumps(params or {}, sort_keys=True, default=str).encode()).hexdigest()


def cache_map(session: Session, model: Model, image: Image, method: str, target: int, saliency: np.ndarray,
              *, params: dict | None = None, seconds: float | None = None) -> CachedMap:
    """Store a float32 map as ``SOFTCAM_HOME/maps/<model>/<image>/<method>-<target>-<hash>.npy``."""
    from softcam_core.paths import softcam_home

    digest = params_hash(params)
    safe_method = re.sub(r"[^A-Za-z0-9_.-]", "_", method)
    relative = Path("maps") / str(model.id) / str(image.id) / f"{safe_method}-{int(target)}-{digest[:16]}.npy"
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(saliency, dtype=np.float32))
    _write_atomically_replace(softcam_home() / relative, buffer.getvalue())
    def existing():
        return session.scalar(select(CachedMap).where(
            CachedMap.model_id == model.id, CachedMap.image_id == image.id, CachedMap.method == method,
            CachedMap.target == int(target), CachedMap.params_hash == digest))

    row = existing()
    if row is None:
        # a page and a precompute job (or two workers) can store the same map at once: the loser of the
        # unique constraint takes the winner's row (the file is the same name, replaced atomically)
        try:
            with session.begin_nested():
                row = CachedMap(model_id=model.id, image_id=image.id, method=method, target=int(target),
                                params_hash=digest, path=str(relative))
                session.add(row)
        except IntegrityError:
            row = existing()
    row.path, row.seconds, row.created_at = str(relative), seconds, utcnow()
    session.flush()
    return row


def _write_atomically_replace(target: Path, data: bytes) -> None:
    target.unlink(missing_ok=True)  # a concurrent writer may have replaced it already
    _write_atomically(target, data)


def get_cached_map(session: Session, model: Model, image: Image, method: str, target: int,
                   params: dict | None = None) -> tuple[np.ndarray, float | None] | None:
    """``(map float32, seconds it took)`` if cached and the file is still there, else None."""
    from softcam_core.paths import softcam_home

    row = session.scalar(select(CachedMap).where(
        CachedMap.model_id == model.id, CachedMap.image_id == image.id, CachedMap.method == method,
        CachedMap.target == int(target), CachedMap.params_hash == params_hash(params)))
    if row is None:
        return None
    path = softcam_home() / row.path
    if not path.is_file():
        return None
    return np.load(path), row.seconds
