"""Cohorts and their class labels."""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.repository.base import NotFoundError, RepositoryError
from db.schema import (
    ClassLabel,
    Cohort,
    Image,
)


def add_cohort(session: Session, name: str, description: str | None = None, modality: str | None = None) -> Cohort:
    """The cohort called ``name``, created if new (idempotent). ``modality`` must agree with an
    existing cohort's (one cohort, one modality: a fundus model's metrics on a cohort that is half
    chest X-rays mean nothing); a cohort made without one takes it, unless it already holds images of
    another modality. Raises :class:`RepositoryError` on a disagreement."""
    name = (name or "").strip()
    if not name:
        raise RepositoryError("cohort name must not be empty")
    cohort = session.scalar(select(Cohort).where(Cohort.name == name))
    if cohort is None:
        cohort = Cohort(name=name, description=description, modality=modality)
        session.add(cohort)
        session.flush()
    elif modality and cohort.modality != modality:
        held = ([cohort.modality] if cohort.modality else
                sorted(set(session.scalars(select(Image.modality).where(Image.cohort_id == cohort.id))) - {modality}))
        if held:
            raise RepositoryError(f"cohort {name!r} holds {', '.join(held)} images, not {modality}: "
                                  f"import {modality} images into a cohort of their own")
        cohort.modality = modality
        session.flush()
    return cohort


def get_cohort(session: Session, name_or_id: str | int) -> Cohort:
    cohort = (session.get(Cohort, name_or_id) if isinstance(name_or_id, int)
              else session.scalar(select(Cohort).where(Cohort.name == name_or_id)))
    if cohort is None:
        known = ", ".join(c.name for c in list_cohorts(session)[:10]) or "none yet"
        raise NotFoundError(f"no cohort {name_or_id!r} (known: {known})")
    return cohort


def list_cohorts(session: Session) -> list[Cohort]:
    return list(session.scalars(select(Cohort).order_by(Cohort.name)))


def set_class_labels(session: Session, cohort: Cohort, names: Sequence[str]) -> list[ClassLabel]:
    """Make the cohort's class list exactly ``names`` in that order (model output order)."""
    existing = {label.name: label for label in cohort.labels}
    result = []
    for position, name in enumerate(names):
        label = existing.pop(name, None) or ClassLabel(cohort=cohort, name=name, position=position)
        label.position = position
        session.add(label)
        result.append(label)
    for stale in existing.values():
        session.delete(stale)
    session.flush()
    return result


def ensure_label(session: Session, cohort: Cohort, name: str) -> ClassLabel:
    """The label ``name`` of ``cohort``, appended to its class list if new."""
    label = session.scalar(select(ClassLabel).where(ClassLabel.cohort_id == cohort.id, ClassLabel.name == name))
    if label is None:
        position = session.scalar(select(func.count()).where(ClassLabel.cohort_id == cohort.id)) or 0
        label = ClassLabel(cohort_id=cohort.id, name=name, position=position)
        session.add(label)
        session.flush()
    return label
