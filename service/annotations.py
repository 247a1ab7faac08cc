"""Annotation writes of the app: a canvas save and an annotation-file import, each checked against
the signed-in user's role (:mod:`service.access`) and done in the caller's one transaction."""

from __future__ import annotations

from pathlib import Path

from service.access import require
from service.boxes import BoxEdits


def apply_box_edits(session, user_id: int | None, image_id: int, edits: BoxEdits) -> None:
    """Store one canvas save of image ``image_id``: every edit or none (a version conflict raises and
    the caller's transaction rolls everything back). Boxes are ``(x0, y0, x1, y1, label)`` and
    points ``(x, y, label)`` in image pixels; saved ids are ``(annotation id, version)``."""
    from annotations.geometry import Box, Point, Polygon
    from db import repository

    def geometry(shape):
        # boxes (x0, y0, x1, y1, label), points (x, y, label), polygons (((x, y), ...), label)
        return Polygon(tuple(shape[0])) if len(shape) == 2 else Point(*shape[:2]) if len(shape) == 3 else Box(*shape[:4])

    user = require(session, user_id, "edit_annotations")
    for (annotation_id, version), shape in edits.update:
        repository.save_annotation(session, image_id, geometry(shape), shape[-1] or None, user.id,
                                   annotation_id=annotation_id, expected_version=version)
    for annotation_id, version in edits.delete:
        repository.delete_annotation(session, annotation_id, user.id, expected_version=version)
    for shape in edits.create:
        repository.save_annotation(session, image_id, geometry(shape), shape[-1] or None, user.id)


def import_annotation_file(session, user_id: int | None, path: str | Path, fmt: str, cohort: str, *,
                           label: str | None = None):
    """``db.repository.import_annotations`` (atomic: every row or none) as ``user_id``."""
    from db import repository

    user = require(session, user_id, "import_annotations")
    return repository.import_annotations(session, path, fmt, cohort, user.id, label=label)


def save_consensus(session, user_id: int | None, image_id: int, accepted: list, rejected: list) -> int:
    """Store an adjudication of image ``image_id`` (``db.repository.save_consensus``) as ``user_id``,
    who must be allowed to adjudicate; returns the number of consensus shapes."""
    from db import repository

    user = require(session, user_id, "adjudicate")
    return len(repository.save_consensus(session, image_id, accepted, rejected, user.id))
