"""Annotation files: atomic import (COCO, VOC, RSNA, YOLO, CSV, masks) and export with pseudonymous ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from annotations.formats import (
    ExportAnnotation,
    ExportImage,
    ImportReport,
    leading_token,
    not_carried,
    read_annotations,
    write_annotations,
)
from annotations.geometry import Mask, Polygon
from db.repository.annotation_edits import annotation_geometry, list_annotations
from db.repository.base import AnnotationImportError, Progress
from db.repository.cohorts import get_cohort
from db.repository.images import LEGACY_PSEUDONYM_KIND, _digest, _hmac_key, image_path, list_images
from db.repository.users import _user_id
from db.schema import (
    Annotation,
    AnnotationAudit,
    Cohort,
    Image,
    ImageKey,
    User,
    utcnow,
)


@dataclass
class _Resolved:
    key: int
    width: int | None
    height: int | None


class CohortResolver:
    """Finds the image an annotation file names, within one cohort: pseudonym (or one from before
    pseudonyms were keyed, which older exports carry), content hash (of the stored file), file name, stem, DICOM PatientID / SOP / Study UID (RSNA ``patientId``), or,
    for masks, a unique leading token of the stem."""

    def __init__(self, session: Session, cohort: Cohort):
        self.key = _hmac_key(session)
        images = list(session.scalars(select(Image).where(Image.cohort_id == cohort.id)))
        self.images = {i.id: i for i in images}
        self.by_text: dict[str, set[int]] = {}
        for i in images:
            for text in (i.pseudonym, i.sha256):
                self.by_text.setdefault(text.lower(), set()).add(i.id)
        self.by_digest: dict[str, set[int]] = {}
        if images:
            rows = session.execute(select(ImageKey.digest, ImageKey.image_id).join(Image)
                                   .where(Image.cohort_id == cohort.id))
            for digest, image_id in rows:
                self.by_digest.setdefault(digest, set()).add(image_id)
        self.cohort = cohort

    def _lookup(self, kind: str, value: str) -> set[int]:
        return self.by_digest.get(_digest(self.key, kind, value), set()) if value else set()

    def __call__(self, ref: str, fuzzy: bool = False) -> _Resolved | None:
        base = PurePosixPath(ref.strip().replace("\\", "/")).name
        stem = PurePosixPath(base).stem
        steps = [
            lambda: self.by_text.get(ref.strip().lower(), set()) | self.by_text.get(stem.lower(), set()),
            lambda: self._lookup(LEGACY_PSEUDONYM_KIND, ref.strip()) | self._lookup(LEGACY_PSEUDONYM_KIND, stem),
            lambda: self._lookup("name", base),
            lambda: self._lookup("stem", stem) or self._lookup("stem", base),
            lambda: self._lookup("patient", ref) | self._lookup("sop", ref) | self._lookup("study", ref),
        ]
        if fuzzy:
            steps.append(lambda: self._lookup("token", leading_token(stem)))
        for step in steps:
            found = step()
            if len(found) > 1:
                names = ", ".join(sorted(self.images[i].pseudonym for i in found)[:5])
                raise LookupError(f"{ref!r} matches {len(found)} images in cohort {self.cohort.name!r} ({names})")
            if found:
                image = self.images[next(iter(found))]
                return _Resolved(image.id, image.width, image.height)
        return None


def _dedupe_key(image_id: int, kind: str, label: str | None, geometry: dict) -> tuple:
    return (image_id, kind, label or "", json.dumps(geometry, sort_keys=True))


@dataclass
class AnnotationImportResult:
    report: ImportReport
    added: int = 0
    duplicates: int = 0
    images: int = 0


def import_annotations(session: Session, path: str | Path, fmt: str, cohort: Cohort | str,
                       user: User | str | int | None = None, *, label: str | None = None,
                       progress: Progress | None = None, skip_unknown_images: bool = False) -> AnnotationImportResult:
    """Import an annotation file into ``cohort``: all rows or none.

    Every row is validated first (:func:`annotations.formats.read_annotations`); any bad row raises
    :class:`AnnotationImportError` carrying the per-row report and nothing is written. Rows equal
    to a live annotation of the same image (kind, label, exact coordinates) are skipped, so a
    re-import adds nothing. Boxes derived from a mask point at the mask (``derived_from_id``).
    A row that names its annotator (the points format's ``participant``) is authored by that user
    (created as an annotator if new); the others by ``user``. ``skip_unknown_images``: rows of
    images not in the cohort are counted in ``result.report.unknown`` instead of refusing the file.

    When ``session`` has not begun a transaction yet, reading and validating the file happens in a
    separate read-only transaction, so a slow file (thousands of masks) does not hold the SQLite
    write lock; only the final bulk write does.
    """
    path = Path(path)
    if session.in_transaction():
        cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
        report = read_annotations(path, fmt, CohortResolver(session, cohort), label=label,
                                    skip_unknown_images=skip_unknown_images)
    else:
        reader = Session(bind=session.get_bind().execution_options(sqlite_begin="DEFERRED"))
        try:
            cohort_id = get_cohort(reader, cohort if isinstance(cohort, str) else cohort.id).id
            report = read_annotations(path, fmt, CohortResolver(reader, get_cohort(reader, cohort_id)), label=label,
                                    skip_unknown_images=skip_unknown_images)
        finally:
            reader.close()
        cohort = get_cohort(session, cohort_id)
    if report.errors:
        raise AnnotationImportError(report)
    user_id = _user_id(session, user)
    from db.repository.users import get_or_create_user

    authors = {name: get_or_create_user(session, name).id
               for name in sorted({a.author for a in report.annotations if a.author})}
    result = AnnotationImportResult(report, images=len(report.images_seen))
    image_ids = {a.image for a in report.annotations}
    existing: dict[tuple, int] = {}
    if image_ids:
        for a in session.scalars(select(Annotation).where(Annotation.image_id.in_(image_ids),
                                                          Annotation.deleted_at.is_(None))):
            existing.setdefault(_dedupe_key(a.image_id, a.kind, a.label, a.geometry), a.id)
            # the same point placed by two annotators is two annotations: rows naming their
            # annotator are duplicates only of that annotator's own
            existing.setdefault(_dedupe_key(a.image_id, a.kind, a.label, a.geometry) + (a.author_id,), a.id)
    now = utcnow()
    # Plan first: which rows are new, and which mask each derived box came from (by plan index).
    plan: list[dict[str, Any]] = []
    derived_from: list[int | None] = []     # plan index of the source mask, for derived rows
    mask_ref: int | str | None = None        # plan index (new mask) or "id:<n>" (mask already stored)
    for parsed in report.annotations:
        geometry_json = parsed.geometry.to_json()
        key = _dedupe_key(parsed.image, parsed.geometry.kind, parsed.label, geometry_json)
        if parsed.author:
            key += (authors[parsed.author],)
        known = existing.get(key)
        if known is not None:
            result.duplicates += 1
            if parsed.geometry.kind == "mask":
                mask_ref = f"id:{known}"
            continue
        existing[key] = -1
        if parsed.geometry.kind == "mask":
            mask_ref = len(plan)
        author_id = authors[parsed.author] if parsed.author else user_id
        plan.append(dict(image_id=parsed.image, kind=parsed.geometry.kind, geometry=geometry_json, label=parsed.label,
                         author_id=author_id, updated_by_id=author_id, created_at=now, updated_at=now, version=1,
                         provenance="derived" if parsed.derived else "imported", source_file=path.name,
                         derived_from_id=None))
        derived_from.append(mask_ref if parsed.derived else None)
    # Bulk INSERT ... RETURNING in chunks (one round trip per chunk on SQLite and PostgreSQL); a mask
    # always precedes its derived boxes in the plan, so its id is known by the time they are written.
    ids: dict[int, int] = {}  # plan index -> new annotation id
    sources = [i for i, ref in enumerate(derived_from) if ref is None]
    derived = [i for i, ref in enumerate(derived_from) if ref is not None]
    chunk = 250
    batches = [sources[k:k + chunk] for k in range(0, len(sources), chunk)]
    batches += [derived[k:k + chunk] for k in range(0, len(derived), chunk)]  # after every mask has its id
    written = 0
    for indices in batches:
        rows = [plan[i] for i in indices]
        for i, row in zip(indices, rows):
            ref = derived_from[i]
            if ref is not None:
                row["derived_from_id"] = int(ref[3:]) if isinstance(ref, str) else ids[ref]
        new_ids = session.scalars(insert(Annotation).returning(Annotation.id, sort_by_parameter_order=True), rows).all()
        ids.update(zip(indices, new_ids))
        session.execute(insert(AnnotationAudit), [
            dict(annotation_id=new_id, user_id=user_id, at=now, action="create", before=None,
                 after={"kind": r["kind"], "geometry": r["geometry"], "label": r["label"], "version": 1,
                        "deleted": False, "provenance": r["provenance"], "source_file": r["source_file"],
                        "image_id": r["image_id"]})
            for new_id, r in zip(new_ids, rows)])
        written += len(rows)
        if progress:
            progress(written, len(plan))
    result.added = len(plan)
    session.flush()
    return result


def export_images(session: Session, cohort: Cohort | str) -> list[ExportImage]:
    """Every image of the cohort with its live annotations, keyed by pseudonym only."""
    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    images = list_images(session, cohort, quarantined=None)
    by_image: dict[int, list[ExportAnnotation]] = {i.id: [] for i in images}
    if images:
        from sqlalchemy.orm import selectinload

        query = (select(Annotation).join(Image).where(Image.cohort_id == cohort.id, Annotation.deleted_at.is_(None))
                 .options(selectinload(Annotation.author)).order_by(Annotation.id))
        for a in session.scalars(query):
            by_image[a.image_id].append(ExportAnnotation(annotation_geometry(a), a.label,
                                                         a.author.username if a.author else None))
    return [ExportImage(i.pseudonym, i.extension, i.width, i.height, by_image[i.id]) for i in images]


def export_annotations(session: Session, fmt: str, cohort: Cohort | str, out: str | Path,
                       left_out: dict[str, int] | None = None) -> Path:
    """Write the cohort's live annotations as ``fmt`` to ``out`` (pseudonymous image ids only): COCO
    carries boxes, polygons and points, VOC boxes and polygons, ``points`` the points, the others
    boxes. ``left_out``, when given, is filled with ``{kind: count}`` of the annotations the format
    cannot carry (:data:`annotations.formats.CARRIED_KINDS`)."""
    images = export_images(session, cohort)
    if left_out is not None:
        left_out.update(not_carried(fmt, images))
    return write_annotations(Path(out), fmt, images)


def export_dicom_sr(session: Session, cohort: Cohort | str, out_dir: str | Path) -> list[Path]:
    """One DICOM SR measurement report (TID 1500, ``softcam_core.dicom_export.measurement_report``)
    per DICOM image of the cohort and annotator with live boxes, points or polygons:
    ``<out_dir>/<pseudonym>-<annotator>-sr.dcm``, built on the stored de-identified file (pseudonyms
    only), the annotator as the observer. Non-DICOM images are skipped. Returns the written paths."""
    import re

    import pydicom

    from softcam_core.dicom_export import measurement_report, shapes_for_report

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    written = []
    for image in list_images(session, cohort, quarantined=None):
        if image.extension != ".dcm":
            continue
        by_author: dict[str, list] = {}
        for annotation in list_annotations(session, image):
            if annotation.kind in ("box", "point", "polygon"):
                name = annotation.author.username if annotation.author else "unknown"
                by_author.setdefault(name, []).append(annotation)
        if not by_author:
            continue
        source = pydicom.dcmread(image_path(image))
        for author, drawn in sorted(by_author.items()):
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", author).strip("._") or "annotator"
            written.append(measurement_report(Path(out_dir) / f"{image.pseudonym}-{safe}-sr.dcm", source,
                                              shapes_for_report(drawn), observer=author))
    return written


def export_dicom_seg(session: Session, cohort: Cohort | str, out_dir: str | Path) -> list[Path]:
    """One DICOM SEG (``<out_dir>/<pseudonym>-seg.dcm``) per DICOM image of the cohort that has live
    mask or polygon annotations, built on the stored de-identified file (so it carries pseudonyms
    only). Non-DICOM images are skipped. Returns the written paths."""
    import pydicom

    from annotations.formats import write_dicom_seg

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    written = []
    for image in list_images(session, cohort, quarantined=None):
        if image.extension != ".dcm":
            continue
        masks = []
        for annotation in list_annotations(session, image):
            geometry = annotation_geometry(annotation)
            if isinstance(geometry, Mask):
                masks.append((annotation.label, geometry.array))
            elif isinstance(geometry, Polygon):
                masks.append((annotation.label, geometry.to_mask(image.height, image.width)))
        if masks:
            source = pydicom.dcmread(image_path(image))
            written.append(write_dicom_seg(Path(out_dir) / f"{image.pseudonym}-seg.dcm", source, masks))
    return written
