"""Annotations: save, delete, restore with optimistic locking (``version_id_col``) and an audit row per change."""

from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotations.geometry import Geometry, geometry_from_json
from db.repository.base import ConflictError, NotFoundError, RepositoryError
from db.repository.cohorts import get_cohort
from db.repository.images import _visible
from db.repository.users import _user_id
from db.schema import (
    ANNOTATION_KINDS,
    PROVENANCES,
    Annotation,
    AnnotationAudit,
    Cohort,
    Image,
    User,
    utcnow,
)


def annotation_geometry(annotation: Annotation) -> Geometry:
    """The stored geometry as a Box / Point / Polygon / Mask in image pixels."""
    return geometry_from_json(annotation.kind, annotation.geometry)


def _state(annotation: Annotation) -> dict[str, Any]:
    return {
        "kind": annotation.kind, "geometry": annotation.geometry, "label": annotation.label,
        "version": annotation.version, "deleted": annotation.deleted_at is not None,
        "provenance": annotation.provenance, "source_file": annotation.source_file,
        "image_id": annotation.image_id,
    }


def _audit(session: Session, annotation: Annotation, user_id: int | None, action: str,
           before: dict | None, after: dict | None) -> None:
    session.add(AnnotationAudit(annotation_id=annotation.id, user_id=user_id, at=utcnow(), action=action,
                                before=before, after=after))


def _check_geometry(geometry: Geometry, image: Image) -> None:
    kind = getattr(geometry, "kind", None)
    if kind not in ANNOTATION_KINDS:
        raise RepositoryError(f"unsupported geometry {type(geometry).__name__}; expected Box, Point, Polygon or Mask")
    if kind == "mask" and image.width and geometry.shape != (image.height, image.width):
        raise RepositoryError(f"mask is {geometry.shape[1]}x{geometry.shape[0]} but image {image.pseudonym} is "
                              f"{image.width}x{image.height}")


def _who(session: Session, user_id: int | None) -> str:
    user = session.get(User, user_id) if user_id is not None else None
    return user.username if user is not None else "an unknown user"


def save_annotation(session: Session, image: Image | int, geometry: Geometry, label: str | None = None,
                    user: User | str | int | None = None, *, annotation_id: int | None = None,
                    expected_version: int | None = None, provenance: str = "drawn",
                    source_file: str | None = None) -> Annotation:
    """Create (``annotation_id`` None) or update an annotation; writes an audit row.

    An update must pass ``expected_version``: the version the user loaded. If the stored version
    differs (someone saved or deleted in between) nothing is written and :class:`ConflictError`
    names who changed it and when. The check and the write are one conditional UPDATE, so two
    processes cannot both win.
    """
    image = session.get(Image, image) if isinstance(image, int) else image
    if image is None:
        raise NotFoundError("no such image")
    if provenance not in PROVENANCES:
        raise RepositoryError(f"provenance {provenance!r} is not one of {', '.join(PROVENANCES)}")
    _check_geometry(geometry, image)
    user_id = _user_id(session, user)
    now = utcnow()
    if annotation_id is None:
        annotation = Annotation(image_id=image.id, kind=geometry.kind, geometry=geometry.to_json(), label=label,
                                author_id=user_id, updated_by_id=user_id, created_at=now, updated_at=now,
                                provenance=provenance, source_file=source_file)
        session.add(annotation)
        session.flush()
        _audit(session, annotation, user_id, "create", None, _state(annotation))
        session.flush()
        return annotation

    if expected_version is None:
        raise RepositoryError("updating an annotation needs expected_version (the version you loaded)")
    return _change(session, annotation_id, expected_version, user_id, "update", deleted=False,
                   kind=geometry.kind, geometry=geometry.to_json(), label=label)


def _change(session: Session, annotation_id: int, expected_version: int, user_id: int | None, action: str, *,
            deleted: bool, **values) -> Annotation:
    """The one optimistic-locking path of every annotation change (update, delete, restore).

    The annotation must be at ``expected_version`` (the version the user loaded) and live
    (``deleted=False``) or deleted (``deleted=True``); the change is then an ORM UPDATE guarded by
    ``version_id_col`` (``WHERE version = expected_version``), so two sessions cannot both win: the
    loser gets :class:`ConflictError` naming who changed it and when. Writes the audit row.
    """
    from sqlalchemy.orm.exc import StaleDataError

    current = _reload_or_missing(session, annotation_id)
    if current.version != expected_version or (current.deleted_at is not None) != deleted:
        _raise_conflict(session, annotation_id, expected_version)
    before = _state(current)
    for name, value in dict(values, updated_at=utcnow(), updated_by_id=user_id).items():
        setattr(current, name, value)
    try:
        session.flush()
    except StaleDataError:
        # another transaction committed a change between our read and our UPDATE (PostgreSQL: read
        # committed). The failed flush voids this transaction: roll it back (the caller's scope is
        # all-or-nothing anyway) and read who won for the message
        session.rollback()
        _raise_conflict(session, annotation_id, expected_version)
    _audit(session, current, user_id, action, before, _state(current))
    session.flush()
    return current


def _reload(session: Session, annotation_id: int) -> Annotation:
    return session.scalars(select(Annotation).where(Annotation.id == annotation_id)
                           .execution_options(populate_existing=True)).one()


def _reload_or_missing(session: Session, annotation_id: int) -> Annotation:
    current = session.scalars(select(Annotation).where(Annotation.id == annotation_id)
                              .execution_options(populate_existing=True)).first()
    if current is None:
        raise NotFoundError(f"no annotation {annotation_id}")
    return current


def _raise_conflict(session: Session, annotation_id: int, expected_version: int) -> None:
    current = _reload(session, annotation_id)
    who = _who(session, current.updated_by_id)
    when = current.updated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    what = "deleted" if current.deleted_at is not None else "changed"
    raise ConflictError(
        f"annotation {annotation_id} was {what} by {who} at {when} (now version {current.version}, you edited "
        f"version {expected_version}); reload it and apply your edit again", current)


def delete_annotation(session: Session, annotation_id: int, user: User | str | int | None = None, *,
                      expected_version: int) -> Annotation:
    """Soft delete: the row stays (``deleted_at`` set, version + 1) with an audit entry."""
    return _change(session, annotation_id, expected_version, _user_id(session, user), "delete", deleted=False,
                   deleted_at=utcnow())


def restore_annotation(session: Session, annotation_id: int, user: User | str | int | None = None, *,
                       expected_version: int) -> Annotation:
    """Undo a soft delete (audited)."""
    return _change(session, annotation_id, expected_version, _user_id(session, user), "restore", deleted=True,
                   deleted_at=None)


def list_annotations(session: Session, image: Image | int, *, include_deleted: bool = False,
                     author: User | str | int | None = None) -> list[Annotation]:
    """Annotations of one image, oldest first."""
    image_id = image if isinstance(image, int) else image.id
    query = select(Annotation).where(Annotation.image_id == image_id)
    if not include_deleted:
        query = query.where(Annotation.deleted_at.is_(None))
    if author is not None:
        query = query.where(Annotation.author_id == _user_id(session, author))
    return list(session.scalars(query.order_by(Annotation.id)))


def annotation_history(session: Session, annotation_id: int) -> list[AnnotationAudit]:
    """Every change of one annotation, oldest first."""
    return list(session.scalars(select(AnnotationAudit).where(AnnotationAudit.annotation_id == annotation_id)
                                .order_by(AnnotationAudit.at, AnnotationAudit.id)))


def next_unannotated_image(session: Session, cohort: Cohort | str, user: User | str | int | None = None, *,
                           after_id: int | None = None, skip: Iterable[int] = ()) -> Image | None:
    """Annotator queue: the first image (import order, after ``after_id``) with no live annotation by
    ``user`` (by anyone when ``user`` is None); ``skip`` lists image ids the annotator passed over."""
    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    live = select(Annotation.id).where(Annotation.image_id == Image.id, Annotation.deleted_at.is_(None))
    if user is not None:
        live = live.where(Annotation.author_id == _user_id(session, user))
    query = select(Image).where(Image.cohort_id == cohort.id, ~live.exists(), _visible())  # held images wait for an admin
    if after_id is not None:
        query = query.where(Image.id > after_id)
    skip = list(skip)
    if skip:
        query = query.where(Image.id.not_in(skip))
    return session.scalars(query.order_by(Image.id).limit(1)).first()
