"""Registered models and the default model per modality."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.repository.base import NotFoundError, _jsonable
from db.schema import (
    Model,
)


def register_model(session: Session, name: str, checkpoint_path: str | Path, *, modality: str | None = None,
                   metadata: dict | None = None, default: bool = False) -> Model:
    """Record a checkpoint (its sha256 computed now). Re-registering a name updates path, hash and
    metadata. ``default=True`` makes it the default for its modality."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise NotFoundError(f"{path}: checkpoint file not found")
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        model = Model(name=name, checkpoint_path=str(path), sha256="", modality=modality)
        session.add(model)
    model.checkpoint_path = str(path.resolve())
    from softcam_core.models import file_sha256

    model.sha256 = file_sha256(path)
    model.modality = modality or model.modality
    model.metadata_json = _jsonable(metadata or model.metadata_json or {})
    session.flush()
    if default:
        set_default_model(session, model)
    return model


def list_models(session: Session, modality: str | None = None) -> list[Model]:
    query = select(Model).order_by(Model.name)
    if modality:
        query = query.where(Model.modality == modality)
    return list(session.scalars(query))


def get_model(session: Session, ref: int | str) -> Model:
    model = session.get(Model, ref) if isinstance(ref, int) else session.scalar(select(Model).where(Model.name == ref))
    if model is None:
        raise NotFoundError(f"no model {ref!r}")
    return model


def set_default_model(session: Session, model: Model | int | str) -> Model:
    """Make ``model`` the one default of its modality (others of that modality lose the flag)."""
    model = model if isinstance(model, Model) else get_model(session, model)
    same_modality = Model.modality.is_(None) if model.modality is None else Model.modality == model.modality
    # ORM-enabled UPDATE: loaded Model objects in this session are updated in place as well
    session.execute(update(Model).where(same_modality, Model.id != model.id).values(is_default=False))
    model.is_default = True
    session.flush()
    return model


def get_default_model(session: Session, modality: str | None) -> Model | None:
    query = select(Model).where(Model.is_default.is_(True))
    query = query.where(Model.modality.is_(None) if modality is None else Model.modality == modality)
    return session.scalars(query.order_by(Model.id)).first()
