"""Image-level class labels and splits: set one, import a CSV, assign stratified splits, history.

Every change writes an :class:`db.schema.ImageLabelChange` row (who, when, before, after, source),
so a label is versioned like a box. Imports are atomic: unless ``partial=True``, nothing changes
when any row names an unknown image or carries a bad value.

CSV layouts: plain ``image,label``, Kaggle DR ``image,level`` (grade 0 -> negative class, 1-4 ->
positive) and RSNA ``patientId,Target``; the table and the rules are in :mod:`softcam_core.labels`
(one reader for database cohorts and training folders). A ``split`` column, when present, sets the
images' splits too.

The negative and positive class names of the numeric layouts are ``classes`` (default: the
cohort's first two classes, else ``healthy,diseased``). An image is named by its original file
name, stem, DICOM PatientID / SOP UID or pseudonym (:class:`CohortResolver`: keyed hashes, the
names themselves are not stored), or, in an ``image_id`` / ``id`` column, by its database id.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.repository.base import RepositoryError
from db.repository.cohorts import ensure_label, get_cohort, set_class_labels
from db.repository.users import _user_id
from db.schema import Cohort, Image, ImageLabelChange, User
from softcam_core.labels import DEFAULT_BINARY_CLASSES, DEFAULT_SPLIT_FRACTIONS, SPLITS, LabelFileError, LabelRow, check_fractions
from softcam_core.labels import read_label_rows as _read_label_rows
from softcam_core.labels import stratified_splits

ID_COLUMNS = ("image_id", "id")


class LabelImportError(RepositoryError):
    """A label file was refused as a whole; ``problems`` lists ``(line, message)`` and nothing changed."""

    def __init__(self, source: str, problems: list[tuple[int, str]], resolved: int):
        self.source, self.problems, self.resolved = source, problems, resolved
        shown = "; ".join(f"line {line}: {text}" for line, text in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{source}: {len(problems)} row(s) not usable, nothing changed ({shown}{more}); "
                         "fix them or pass --partial to label the rows that are")


@dataclass
class LabelImportResult:
    """What :func:`import_labels` did: ``changed`` images, ``unchanged`` (same label already),
    ``problems`` ``(line, message)`` left out (only with ``partial``), the ``layout`` read, and the
    label counts of the cohort afterwards."""

    layout: str
    changed: int = 0
    unchanged: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def read_label_rows(data: bytes | str | Path, **options) -> tuple[str, str, list[LabelRow]]:
    """:func:`softcam_core.labels.read_label_rows`, raising :class:`RepositoryError` for a file that
    is not a label CSV."""
    try:
        return _read_label_rows(data, **options)
    except LabelFileError as exc:
        raise RepositoryError(str(exc)) from None


def _class_names(session: Session, cohort: Cohort, classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes:
        return tuple(classes)
    existing = [label.name for label in sorted(cohort.labels, key=lambda c: c.position)]
    return tuple(existing[:2]) if len(existing) >= 2 else DEFAULT_BINARY_CLASSES


def _record(session: Session, image: Image, field_name: str, before: str | None, after: str | None,
            user_id: int | None, source: str) -> None:
    session.add(ImageLabelChange(image_id=image.id, field=field_name, before=before, after=after,
                                 user_id=user_id, source=source))


def set_image_label(session: Session, image: Image, label: str | None = None, split: str | None = None, *,
                    user: User | str | int | None = None, source: str = "edit") -> Image:
    """Set one image's class label (None clears it) and, when given, its split; each change is
    recorded in the label history as ``user``."""
    if split is not None and split not in SPLITS:
        raise RepositoryError(f"split must be train, val or test, got {split!r}")
    user_id = _user_id(session, user) if user is not None else None
    label = (label or "").strip() or None
    if label != image.label:
        _record(session, image, "label", image.label, label, user_id, source)
        image.label = label
    if split is not None and split != image.split:
        _record(session, image, "split", image.split, split, user_id, source)
        image.split = split
    if label:
        ensure_label(session, image.cohort, label)
    session.flush()
    return image


def import_labels(session: Session, cohort: Cohort | str, data: bytes | str | Path, *, image_col: str | None = None,
                  label_col: str | None = None, classes: Sequence[str] | None = None, partial: bool = False,
                  user: User | str | int | None = None, source: str = "labels.csv") -> LabelImportResult:
    """Label the cohort's images from a CSV (see the module docstring); one transaction.

    Raises:
        LabelImportError: some row names no image of the cohort (or an ambiguous one) or has a bad
            value, and ``partial`` is False: nothing is changed.
        RepositoryError: not a label CSV (no image / label column).
    """
    from db.repository.annotation_files import CohortResolver

    cohort = get_cohort(session, cohort) if not isinstance(cohort, Cohort) else cohort
    names = _class_names(session, cohort, classes)
    layout, image_key, rows = read_label_rows(data, image_col=image_col, label_col=label_col, classes=names,
                                              source=source)
    by_id = image_key.lower() in ID_COLUMNS
    resolver = None if by_id else CohortResolver(session, cohort)
    images = {i.id: i for i in session.scalars(select(Image).where(Image.cohort_id == cohort.id))}
    problems: list[tuple[int, str]] = []
    targets: dict[int, tuple[LabelRow, Image]] = {}
    for row in rows:
        if row.problem:
            problems.append((row.line, row.problem))
            continue
        image = None
        if by_id:
            image = images.get(int(row.ref)) if row.ref.isdigit() else None
        else:
            try:
                found = resolver(row.ref)
            except LookupError as exc:
                problems.append((row.line, str(exc)))
                continue
            image = images.get(found.key) if found else None
        if image is None:
            problems.append((row.line, f"no image {row.ref!r} in cohort {cohort.name!r}"))
            continue
        earlier = targets.get(image.id)
        if earlier and earlier[0].label != row.label:
            problems.append((row.line, f"{row.ref!r} and line {earlier[0].line}'s {earlier[0].ref!r} are the same image "
                                       "with different labels"))
            continue
        targets[image.id] = (row, image)
    problems.sort()
    if problems and not partial:
        raise LabelImportError(source, problems, len(targets))
    if layout != "plain" and len(cohort.labels) < 2:
        set_class_labels(session, cohort, [*names, *[c.name for c in cohort.labels if c.name not in names]])
    user_id = _user_id(session, user) if user is not None else None
    result = LabelImportResult(layout=layout, problems=problems)
    for row, image in targets.values():
        if image.label == row.label and (not row.split or image.split == row.split):
            result.unchanged += 1
            continue
        set_image_label(session, image, row.label, row.split or None, user=user_id, source=f"csv {layout}")
        result.changed += 1
    result.counts = label_counts(session, cohort)
    return result


def label_counts(session: Session, cohort: Cohort) -> dict[str, int]:
    """``{label: images}`` of a cohort; unlabeled images under ``""``."""
    counts: dict[str, int] = defaultdict(int)
    for label in session.scalars(select(Image.label).where(Image.cohort_id == cohort.id)):
        counts[label or ""] += 1
    return dict(counts)


def label_history(session: Session, image: Image | int) -> list[ImageLabelChange]:
    """Every label and split change of an image, oldest first."""
    image_id = image.id if isinstance(image, Image) else int(image)
    return list(session.scalars(select(ImageLabelChange).where(ImageLabelChange.image_id == image_id)
                                .order_by(ImageLabelChange.at, ImageLabelChange.id)))


def label_change_counts(session: Session, cohort: Cohort | str) -> dict[int, tuple[int, object]]:
    """``{image id: (number of label/split changes, time of the last)}`` for a cohort's images that
    have any, in one query (the label editor lists every image)."""
    cohort = get_cohort(session, cohort) if not isinstance(cohort, Cohort) else cohort
    rows = session.execute(select(ImageLabelChange.image_id, func.count(), func.max(ImageLabelChange.at))
                           .join(Image, Image.id == ImageLabelChange.image_id)
                           .where(Image.cohort_id == cohort.id).group_by(ImageLabelChange.image_id))
    return {int(image_id): (int(n), last) for image_id, n, last in rows}


def assign_splits(session: Session, cohort: Cohort | str, fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
                  *, seed: int = 0, overwrite: bool = False, user: User | str | int | None = None) -> dict[str, dict[str, int]]:
    """Give the cohort's labelled images a train / val / test split, stratified by label, and save it.

    Within each label the images (in id order, shuffled with ``seed``) are cut at the cumulative
    ``fractions`` (rounded: each class with >= 3 images gets at least one of each split). Images
    that already have a split keep it unless ``overwrite``. Returns ``{label: {split: count}}``
    of the whole cohort afterwards. Deterministic: the same images and seed give the same split.
    """
    cohort = get_cohort(session, cohort) if not isinstance(cohort, Cohort) else cohort
    try:
        fractions = check_fractions(fractions)
    except ValueError as exc:
        raise RepositoryError(str(exc)) from None
    user_id = _user_id(session, user) if user is not None else None
    images = list(session.scalars(select(Image).where(Image.cohort_id == cohort.id, Image.label.is_not(None))
                                  .order_by(Image.id)))
    todo = [image for image in images if overwrite or not image.split]
    for image, split in zip(todo, stratified_splits([image.label for image in todo], fractions, seed)):
        if image.split != split:
            _record(session, image, "split", image.split, split, user_id, "split")
            image.split = split
    session.flush()
    table: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLITS})
    for image in images:
        if image.split in SPLITS:
            table[image.label][image.split] += 1
    return {k: dict(v) for k, v in sorted(table.items())}
