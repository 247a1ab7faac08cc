"""Image-level class labels and splits: set one, import a CSV, assign stratified splits, history.

Every change writes an :class:`db.schema.ImageLabelChange` row (who, when, before, after, source),
so a label is versioned like a box. Imports are atomic: unless ``partial=True``, nothing changes
when any row names an unknown image or carries a bad value.

CSV layouts (``read_label_rows``; the header decides, or ``image_col`` / ``label_col``):

==================  ========================  =================================================
layout              columns                   label
==================  ========================  =================================================
``plain``           ``image,label``           the text as given (a class name)
``kaggle_dr``       ``image,level``           DR grade 0-4 -> onset: 0 -> negative class,
                                              1-4 -> positive class (SoftCAM's binary task
                                              "{0} vs {1-4}", the ``onset1`` column)
``rsna``            ``patientId,Target``      0 -> negative class, 1 -> positive class (one row
                                              per box: rows of one patient must agree)
==================  ========================  =================================================

The negative and positive class names of the numeric layouts are ``classes`` (default: the
cohort's first two classes, else ``healthy,diseased``). An image is named by its original file
name, stem, DICOM PatientID / SOP UID or pseudonym (:class:`CohortResolver`: keyed hashes, the
names themselves are not stored), or, in an ``image_id`` / ``id`` column, by its database id.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.repository.base import RepositoryError
from db.repository.cohorts import ensure_label, get_cohort, set_class_labels
from db.repository.users import _user_id
from db.schema import Cohort, Image, ImageLabelChange, User

SPLITS = ("train", "val", "test")
DEFAULT_BINARY_CLASSES = ("healthy", "diseased")
IMAGE_COLUMNS = ("image", "filename", "file", "patientid", "image_id", "id", "name")
LABEL_COLUMNS = ("label", "level", "gt_level", "target", "class")
ID_COLUMNS = ("image_id", "id")
MAX_LABEL_ROWS = 1_000_000


class LabelImportError(RepositoryError):
    """A label file was refused as a whole; ``problems`` lists ``(line, message)`` and nothing changed."""

    def __init__(self, source: str, problems: list[tuple[int, str]], resolved: int):
        self.source, self.problems, self.resolved = source, problems, resolved
        shown = "; ".join(f"line {line}: {text}" for line, text in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{source}: {len(problems)} row(s) not usable, nothing changed ({shown}{more}); "
                         "fix them or pass --partial to label the rows that are")


@dataclass(frozen=True)
class LabelRow:
    line: int          # 1-based line number in the file (header = 1)
    ref: str           # the image as the file names it
    value: str         # the label cell as written
    label: str | None  # the class name it maps to (None: a bad value, see problem)
    problem: str = ""


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


def _layout(image_col: str, label_col: str) -> str:
    if label_col.lower().endswith("level"):  # Kaggle's "level", the clinician study's "gt_level"
        return "kaggle_dr"
    if label_col.lower() == "target":
        return "rsna"
    return "plain"


def read_label_rows(data: bytes | str | Path, *, image_col: str | None = None, label_col: str | None = None,
                    classes: Sequence[str] = DEFAULT_BINARY_CLASSES, source: str = "labels") -> tuple[str, str, list[LabelRow]]:
    """``(layout, image column, rows)`` of a label CSV (see the module table); one row per image
    (RSNA's repeated rows folded, disagreeing ones reported). Raises RepositoryError for a file that
    is not a CSV with the needed columns."""
    if isinstance(data, Path):
        data = data.read_bytes()
    text = data.decode("utf-8-sig", errors="strict") if isinstance(data, bytes) else data
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    by_lower = {h.lower(): h for h in header}

    def pick(given: str | None, candidates: Sequence[str], what: str) -> str:
        if given:
            if given not in header and given.lower() not in by_lower:
                raise RepositoryError(f"{source}: no column {given!r} (columns: {', '.join(header) or 'none'})")
            return by_lower.get(given.lower(), given)
        for name in candidates:
            if name in by_lower:
                return by_lower[name]
        raise RepositoryError(f"{source}: no {what} column (looked for {', '.join(candidates)}; "
                              f"columns: {', '.join(header) or 'none'}); name it with --{what}-col")

    image_key, label_key = pick(image_col, IMAGE_COLUMNS, "image"), pick(label_col, LABEL_COLUMNS, "label")
    layout = _layout(image_key, label_key)
    negative, positive = classes[0], classes[1] if len(classes) > 1 else None
    rows: dict[str, LabelRow] = {}
    order: list[str] = []
    conflicts: list[LabelRow] = []
    for number, record in enumerate(reader, start=2):
        if number > MAX_LABEL_ROWS:
            raise RepositoryError(f"{source}: more than {MAX_LABEL_ROWS} rows")
        record = {(k or "").strip(): (v or "").strip() for k, v in record.items() if k is not None}
        ref, value = record.get(image_key, ""), record.get(label_key, "")
        if not ref:
            conflicts.append(LabelRow(number, ref, value, None, "no image name"))
            continue
        label, problem = value or None, "" if value else "empty label"
        if value and layout in ("kaggle_dr", "rsna"):
            grades = range(5) if layout == "kaggle_dr" else range(2)
            try:
                grade = int(float(value))
                if float(value) != grade or grade not in grades:
                    raise ValueError
            except ValueError:
                label, problem = None, f"{label_key} {value!r} is not one of {', '.join(map(str, grades))}"
            else:
                label = negative if grade == 0 else positive
        row = LabelRow(number, ref, value, label, problem)
        previous = rows.get(ref)
        if previous is None:
            rows[ref] = row
            order.append(ref)
        elif previous.label != row.label:
            conflicts.append(LabelRow(number, ref, value, None,
                                      f"{ref!r} is labelled {previous.value!r} on line {previous.line} and {value!r} here"))
    return layout, image_key, [rows[r] for r in order] + conflicts


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
        if image.label == row.label:
            result.unchanged += 1
            continue
        set_image_label(session, image, row.label, user=user_id, source=f"csv {layout}")
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


def assign_splits(session: Session, cohort: Cohort | str, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  *, seed: int = 0, overwrite: bool = False, user: User | str | int | None = None) -> dict[str, dict[str, int]]:
    """Give the cohort's labelled images a train / val / test split, stratified by label, and save it.

    Within each label the images (in id order, shuffled with ``seed``) are cut at the cumulative
    ``fractions`` (rounded: each class with >= 3 images gets at least one of each split). Images
    that already have a split keep it unless ``overwrite``. Returns ``{label: {split: count}}``
    of the whole cohort afterwards. Deterministic: the same images and seed give the same split.
    """
    cohort = get_cohort(session, cohort) if not isinstance(cohort, Cohort) else cohort
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise RepositoryError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    user_id = _user_id(session, user) if user is not None else None
    images = list(session.scalars(select(Image).where(Image.cohort_id == cohort.id, Image.label.is_not(None))
                                  .order_by(Image.id)))
    by_label: dict[str, list[Image]] = defaultdict(list)
    for image in images:
        if overwrite or not image.split:
            by_label[image.label].append(image)
    rng = np.random.default_rng(seed)
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n = len(group)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        if n >= 3:
            n_val = max(n_val, 1) if fractions[1] > 0 else 0
            n_test = max(n_test, 1) if fractions[2] > 0 else 0
        n_train = max(n - n_val - n_test, 0)
        names = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
        for position, index in enumerate(order):
            image = group[int(index)]
            if image.split != names[position]:
                _record(session, image, "split", image.split, names[position], user_id, "split")
                image.split = names[position]
    session.flush()
    table: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLITS})
    for image in images:
        if image.split in SPLITS:
            table[image.label][image.split] += 1
    return {k: dict(v) for k, v in sorted(table.items())}
