"""A database cohort as the cohort source of :func:`softcam_core.evaluate.evaluate_cohort`.

``evaluate_cohort(model, meta, folder, ...)`` reads its ``folder`` argument through four names:
``folder.split(name)`` (records with ``path``, ``label_index`` and ``split``), ``folder.mask(stem)``
(bool (H, W) in original image pixels, or None), ``folder.classes`` (class names, index =
``label_index``) and ``folder.root`` (only in messages). :class:`DatabaseCohort` provides them for a
cohort stored in the database, so the metrics are computed against the boxes annotators **drew or
imported** instead of a folder's ``masks/``:

* images: the cohort's images in import order, read from their stored (de-identified) files;
  labels and splits from the ``images`` rows; class order from the cohort's class labels
  (``set_class_labels``: model output order).
* ground truth of an image: the union of its live (not deleted) box annotations, optionally of
  one label only, rasterised in image pixels by :func:`annotations.geometry.boxes_to_mask`. An image
  without boxes gets an all-false mask, so its localisation metrics are undefined with the reason
  "empty annotation mask" (as for a folder image without a mask file).
* unlabeled images (``images.label`` empty, e.g. imported with ``softcam images import``): the
  class only matters for the ``label`` target, for activation consistency and for the ``disease``
  target of a model with more than two classes (:func:`label_needed`). When it does, they are left
  out and counted (``unlabeled_left_out``); otherwise they are scored under an extra, last class ``(unlabeled)``.

The database is read once, when the source is made (:func:`load_database_cohort`): a long job
scores the boxes as they were when it started, and no transaction stays open while it runs.
softcam_core never imports this module; the pages and the CLI pass the object in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from annotations.geometry import Box, boxes_to_mask, geometry_from_json
from softcam_core.data import SplitRecords

from .schema import Annotation, Cohort, Image

UNLABELED = "(unlabeled)"  # the class name unlabeled images are scored under
GROUND_TRUTHS = {
    "database": "Boxes in the database (drawn or imported)",
    "folder": "Lesion masks of the cohort folder",
}


@dataclass(frozen=True)
class DatabaseRecord:
    """One image of a database cohort, shaped like :class:`softcam_core.data.Record`.

    ``path``: the stored file (``SOFTCAM_HOME/images/<sha256>.<ext>``); ``stem``: the image's
    pseudonym, which ``evaluate_cohort`` keys rows (the ``image`` column) and masks by;
    :meth:`DatabaseCohort.mask` also accepts the sha256. ``label_index`` into :attr:`DatabaseCohort.classes`;
    ``split``: ``train``/``val``/``test`` or ``""``; ``width``/``height``: pixels of the stored image.
    """

    path: Path
    stem: str
    label_index: int
    label: str
    split: str
    image_id: int
    pseudonym: str
    width: int | None
    height: int | None
    unlabeled: bool = False


@dataclass
class DatabaseCohort(SplitRecords):
    """A snapshot of a database cohort that ``evaluate_cohort`` accepts as its ``folder``.

    Attributes: ``name``, ``root`` (text naming the cohort, for messages), ``classes``,
    ``records`` (images evaluated, import order), ``box_label`` (None = boxes of every label),
    ``unlabeled_left_out`` (image rows without a label that were left out, per split).
    """

    name: str
    classes: list[str]
    records: list[DatabaseRecord]
    boxes_by_image: dict[int, list[Box]]
    box_label: str | None = None
    unlabeled_left_out: dict[str, int] = field(default_factory=dict)
    points_by_image: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    modality: str | None = None
    # polygons and masks: ground truth with an area, beside the boxes
    regions_by_image: dict[int, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = f"database cohort {self.name!r}"
        self.labels_path = None
        self._reindex()

    def _reindex(self) -> None:
        self._by_stem = {r.path.stem: r for r in self.records} | {r.pseudonym: r for r in self.records}

    @property
    def source(self) -> str:
        """What a checkpoint trained on it records as its data."""
        return self.root

    @property
    def _where(self) -> str:
        return self.root

    def __repr__(self) -> str:
        return f"DatabaseCohort({self.name!r}, {len(self.records)} images, classes={self.classes})"

    def boxes(self, stem: str) -> list[Box]:
        """Live boxes of an image (of :attr:`box_label` when set), image pixels, oldest first."""
        return list(self.boxes_by_image.get(self.record(stem).image_id, []))

    def points(self, stem: str) -> list[tuple[float, float]]:
        """Live point annotations of an image (of :attr:`box_label` when set): ``(x, y)`` image pixels."""
        return list(self.points_by_image.get(self.record(stem).image_id, []))

    def mask(self, stem: str) -> np.ndarray | None:
        """Ground truth of an image: bool (height, width) in image pixels, the union of its boxes,
        polygons and masks (all false without any); None only when the image row has no size
        (never for imports)."""
        record = self.record(stem)
        if not record.height or not record.width:
            return None
        height, width = int(record.height), int(record.width)
        mask = boxes_to_mask(self.boxes(stem), height, width)
        for region in self.regions_by_image.get(record.image_id, []):
            mask |= region.to_mask(height, width) if region.kind == "polygon" else np.asarray(region.array, dtype=bool)
        return mask

    def summary(self, split: str = "all", limit: int | None = None) -> dict[str, Any]:
        """What an evaluation of ``split`` (its first ``limit`` images) scores: ``images``,
        ``with_boxes`` (images with at least one box), ``boxes``, the same for ``points`` and for
        ``regions`` (polygons and masks), ``unlabeled`` (scored without a class) and ``unlabeled_left_out`` (images of the split left out for want of a label)."""
        records = self.split(split)
        if limit:
            records = records[:limit]
        counts = [len(self.boxes_by_image.get(r.image_id, [])) for r in records]
        points = [len(self.points_by_image.get(r.image_id, [])) for r in records]
        regions = [len(self.regions_by_image.get(r.image_id, [])) for r in records]
        left_out = sum(self.unlabeled_left_out.values()) if split == "all" else self.unlabeled_left_out.get(split, 0)
        return {"images": len(records), "with_boxes": sum(1 for c in counts if c), "boxes": sum(counts),
                "with_points": sum(1 for c in points if c), "points": sum(points),
                "with_regions": sum(1 for c in regions if c), "regions": sum(regions),
                "unlabeled": sum(1 for r in records if r.unlabeled), "unlabeled_left_out": left_out}

    def digest(self, split: str = "all", limit: int | None = None) -> str:
        """A fingerprint (16 hex) of what an evaluation of ``split`` scores against: each image's
        pseudonym, class label and boxes. Equal digests = the same ground truth; a resumed evaluation
        checks it so it never mixes rows scored against different boxes."""
        records = self.split(split)[: limit or None]
        content = [[r.pseudonym, r.label, [[b.x0, b.y0, b.x1, b.y1] for b in self.boxes_by_image.get(r.image_id, [])]]
                   + ([[list(p) for p in self.points_by_image[r.image_id]]] if r.image_id in self.points_by_image else [])
                   + ([[_region_key(g) for g in self.regions_by_image[r.image_id]]] if r.image_id in self.regions_by_image else [])
                   for r in records]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def _region_key(region: Any) -> Any:
    """What a digest records of a polygon (its vertices) or a mask (a hash of its pixels)."""
    if region.kind == "polygon":
        return [list(p) for p in region.points]
    return hashlib.sha256(np.packbits(np.asarray(region.array, dtype=bool)).tobytes()).hexdigest()[:16]


def label_needed(target: str, metrics: Sequence[str] | None, n_model_classes: int) -> bool:
    """True when scoring an image needs its true class: the ``label`` target, activation consistency
    (healthy and diseased images score different signs), or the ``disease`` target of a model with
    more than two classes (it explains the true class of a diseased image)."""
    if target == "label":
        return True
    if metrics is None or "activation_consistency" in metrics:
        return True
    return target == "disease" and n_model_classes > 2


def cohort_annotators(session: Session, cohort: Cohort | str) -> list[str]:
    """User names of the authors of the cohort's live points and boxes, sorted (``(no author)`` for
    shapes without one): the ground truths an evaluation can be restricted to."""
    from .agreement import NO_AUTHOR
    from .repository import get_cohort
    from .schema import User

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    names = session.execute(select(User.username).select_from(Annotation)
                            .join(Image, Image.id == Annotation.image_id)
                            .outerjoin(User, User.id == Annotation.author_id)
                            .where(Image.cohort_id == cohort.id, Annotation.deleted_at.is_(None),
                                   Annotation.kind.in_(("box", "point"))).distinct())
    return sorted({name or NO_AUTHOR for (name,) in names})


def load_database_cohort(session: Session, cohort: Cohort | str, *, box_label: str | None = None,
                         include_unlabeled: bool = False, model_classes: Sequence[str] | None = None,
                         annotator: str | None = None) -> DatabaseCohort:
    """Read a cohort's images and live boxes (two queries) into a :class:`DatabaseCohort`.

    ``box_label``: use only boxes with this label. ``include_unlabeled``: score images without a
    label under the extra, last class ``(unlabeled)`` (only valid when :func:`label_needed` is False);
    otherwise they are left out and counted per split. ``model_classes``: the class names of the
    model that will score it, in output order; class indices then follow the model (a label is
    matched by name), and, when the labels matter (``include_unlabeled`` False), a label that is
    not a class of the model is an error instead of a silently wrong target. ``annotator``: use only
    the shapes of this author (a user name, or ``(no author)``; :func:`cohort_annotators` lists them),
    e.g. one reader of a multi-reader study, or the consensus an adjudicator made.
    """
    from .agreement import NO_AUTHOR
    from .repository import get_cohort, image_path
    from .schema import User
    from .repository.images import _visible

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    classes = [label.name for label in sorted(cohort.labels, key=lambda c: c.position)]
    if model_classes is not None:
        classes = list(model_classes) + [c for c in classes if c not in model_classes]
    # images held for possible burned-in text are not evaluated (their maps would be shown) until released
    images = list(session.scalars(select(Image).where(Image.cohort_id == cohort.id, _visible()).order_by(Image.id)))
    for image in images:  # a label missing from the class list (set outside set_image_label) goes last
        if image.label and image.label not in classes:
            classes.append(image.label)
    if model_classes is not None and not include_unlabeled:
        foreign = sorted({image.label for image in images if image.label and image.label not in model_classes})
        if foreign:
            raise ValueError(f"cohort {cohort.name!r} has labels that are not classes of the model "
                             f"({', '.join(foreign)}; the model has {', '.join(model_classes)}): relabel the cohort "
                             "(softcam images label --classes ...) or choose a model trained on these classes")
    if include_unlabeled and any(not image.label for image in images):
        classes.append(UNLABELED)
    index = {name: i for i, name in enumerate(classes)}
    records, left_out = [], {}
    for image in images:
        if not image.label and not include_unlabeled:
            key = image.split or ""
            left_out[key] = left_out.get(key, 0) + 1
            continue
        label = image.label or UNLABELED
        path = image_path(image)
        records.append(DatabaseRecord(path=path, stem=image.pseudonym, label_index=index[label], label=label,
                                      split=image.split or "", image_id=image.id, pseudonym=image.pseudonym,
                                      width=image.width, height=image.height, unlabeled=not image.label))
    query = (select(Annotation.image_id, Annotation.kind, Annotation.geometry)
             .join(Image, Image.id == Annotation.image_id)
             .where(Image.cohort_id == cohort.id, Annotation.kind.in_(("box", "point", "polygon", "mask")),
                    Annotation.deleted_at.is_(None))
             .order_by(Annotation.image_id, Annotation.id))
    if box_label is not None:
        query = query.where(Annotation.label == box_label)
    if annotator is not None:
        known = cohort_annotators(session, cohort)
        if annotator not in known:
            raise ValueError(f"cohort {cohort.name!r} has no shapes by {annotator!r} "
                             f"(annotators: {', '.join(known) or 'none'})")
        query = (query.where(Annotation.author_id.is_(None)) if annotator == NO_AUTHOR else
                 query.join(User, User.id == Annotation.author_id).where(User.username == annotator))
    boxes: dict[int, list[Box]] = {}
    points: dict[int, list[tuple[float, float]]] = {}
    regions: dict[int, list[Any]] = {}
    for image_id, kind, geometry in session.execute(query):
        if kind == "box":
            boxes.setdefault(image_id, []).append(geometry_from_json("box", geometry))
        elif kind in ("polygon", "mask"):
            regions.setdefault(image_id, []).append(geometry_from_json(kind, geometry))
        else:
            point = geometry_from_json("point", geometry)
            points.setdefault(image_id, []).append((point.x, point.y))
    modalities = {image.modality for image in images if image.modality}
    modality = cohort.modality or (modalities.pop() if len(modalities) == 1 else None)
    return DatabaseCohort(cohort.name, classes, records, boxes, box_label, left_out, points, modality, regions)


# --- what the Cohort metrics page and the CLI need around it -----------------------------------

def box_labels(session: Session, cohort: Cohort | str) -> list[str]:
    """Distinct labels of the live boxes of a cohort, sorted (unlabelled boxes are not listed)."""
    from .repository import get_cohort

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    query = (select(Annotation.label).distinct().join(Image, Image.id == Annotation.image_id)
             .where(Image.cohort_id == cohort.id, Annotation.kind == "box", Annotation.deleted_at.is_(None),
                    Annotation.label.is_not(None)))
    return sorted(label for label in session.scalars(query) if label)


def evaluation_cohorts(session: Session, folders: dict[str, Path]) -> list[dict[str, Any]]:
    """Cohorts an evaluation can run on: every database cohort (with or without a folder) and every
    cohort folder not (yet) in the database. One dict each: ``name``, ``folder`` (Path or None),
    ``in_database``, ``images`` and ``with_boxes`` (database counts; None for a folder-only cohort)."""
    from sqlalchemy import func

    counts = dict(session.execute(select(Image.cohort_id, func.count()).group_by(Image.cohort_id)).all())
    boxed = dict(session.execute(
        select(Image.cohort_id, func.count(func.distinct(Image.id))).join(Annotation, Annotation.image_id == Image.id)
        .where(Annotation.kind == "box", Annotation.deleted_at.is_(None)).group_by(Image.cohort_id)).all())
    out = []
    for cohort in session.scalars(select(Cohort).order_by(Cohort.name)):
        out.append({"name": cohort.name, "folder": folders.get(cohort.name), "in_database": True,
                    "images": int(counts.get(cohort.id, 0)), "with_boxes": int(boxed.get(cohort.id, 0))})
    known = {row["name"] for row in out}
    for name, folder in sorted(folders.items()):
        if name not in known:
            out.append({"name": name, "folder": Path(folder), "in_database": False, "images": None, "with_boxes": None})
    return out


def evaluation_source(session: Session, params: dict[str, Any],
                      model_classes: int | Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """The cohort source of an evaluation job and a summary of what it will score.

    ``model_classes``: the model's class names in output order (or only their number, the older
    call: database labels are then indexed in the cohort's class order).

    ``params``: the job parameters of the Cohort metrics page: ``cohort``, ``ground_truth``
    (``"database"`` or ``"folder"``; missing = ``"folder"``, the jobs made before the choice existed),
    ``folder``, ``box_label``, ``split``, ``limit``, ``target``, ``metrics``. Returns
    ``(source, summary)``: a :class:`DatabaseCohort` or a :class:`softcam_core.data.CohortFolder`, and
    ``{"images", "with_boxes" | "with_masks", ...}`` for the chosen split. Raises ValueError with one
    line when there is nothing to score (e.g. no image in the split, every image unlabeled).
    """
    split, limit = params.get("split", "test"), params.get("limit")
    ground_truth = params.get("ground_truth") or "folder"
    if ground_truth == "folder":
        from annotations.formats import MASK_SUFFIXES
        from softcam_core.data import CohortFolder

        if not params.get("folder"):
            raise ValueError(f"cohort {params.get('cohort')!r} has no cohort folder; use the boxes in the database")
        folder = CohortFolder(params["folder"])
        records = folder.split(split)[: limit or None]
        if not records:
            raise ValueError(f"{folder.root}: no image in split {split!r}")
        with_masks = sum(1 for r in records if any((folder.root / "masks" / f"{r.stem}{s}").is_file() for s in MASK_SUFFIXES))
        return folder, {"images": len(records), "with_masks": with_masks}
    if ground_truth != "database":
        raise ValueError(f"unknown ground truth {ground_truth!r}; choose {' or '.join(GROUND_TRUTHS)}")
    names = None if isinstance(model_classes, int) else [str(c) for c in model_classes]
    n_model_classes = model_classes if isinstance(model_classes, int) else len(model_classes)
    include = not label_needed(params.get("target", "disease"), params.get("metrics"), n_model_classes)
    source = load_database_cohort(session, params["cohort"], box_label=params.get("box_label"),
                                  include_unlabeled=include, model_classes=names, annotator=params.get("annotator"))
    summary = source.summary(split, limit)
    if not summary["images"]:
        total = len(source.split("all")) + sum(source.unlabeled_left_out.values())
        if summary["unlabeled_left_out"]:
            why = (f"its {summary['unlabeled_left_out']} image(s) have no class label, which the chosen target or "
                   "activation consistency needs")
        elif total and not source.splits:
            why = "its images have no split; choose 'all'"
        else:
            why = f"{total} image(s) in all"
        raise ValueError(f"{source.root}: no image to score in split {split!r} ({why})")
    return source, summary


def ground_truth_text(params: dict[str, Any]) -> str:
    """One line for job lists: which ground truth an evaluation used and how much of it there was."""
    summary = params.get("ground_truth_summary") or {}
    if (params.get("ground_truth") or "folder") == "folder":
        text = "folder masks"
        if summary:
            text += f" ({summary.get('with_masks', 0)} of {summary.get('images', 0)} images with a mask)"
        return text
    text = "database boxes" + (f" labelled {params['box_label']!r}" if params.get("box_label") else "")
    text += f" by {params['annotator']}" if params.get("annotator") else ""
    if summary:
        text += f" ({summary.get('with_boxes', 0)} of {summary.get('images', 0)} images with boxes"
        if summary.get("unlabeled_left_out"):
            text += f"; {summary['unlabeled_left_out']} unlabeled left out"
        text += ")"
    return text


def open_database_cohort(name: str, meta: dict, settings: Any, box_label: str | None = None,
                         url: str | None = None, annotator: str | None = None) -> tuple[DatabaseCohort, dict[str, Any]]:
    """``softcam evaluate --cohort NAME``: the cohort of the database at ``url`` (default
    ``SOFTCAM_DB_URL``) as a source for ``evaluate_cohort``, and its summary for ``settings.split``.

    ``meta``: the checkpoint metadata (its class count decides whether unlabeled images can be
    scored, :func:`label_needed`); ``settings``: the :class:`softcam_core.evaluate.EvalSettings`
    of the run (split, limit, target, metrics); ``annotator``: only that author's shapes are ground
    truth. db/cli.py hands this function to the ``evaluate`` command as the argparse default
    ``open_database_cohort``, so softcam_core never imports db.
    """
    from .session import get_engine, session_scope, upgrade

    engine = get_engine(url)
    upgrade(engine)
    params = {"cohort": name, "ground_truth": "database", "box_label": box_label, "split": settings.split,
              "limit": settings.limit, "target": settings.target, "metrics": list(settings.metrics),
              "annotator": annotator}
    with session_scope(engine, readonly=True) as session:
        return evaluation_source(session, params, list(meta.get("classes", [])))


def open_training_cohort(name: str, *, fractions: Sequence[float] | None = None, seed: int = 0,
                         url: str | None = None, engine: Any = None, user: str | int | None = None) -> DatabaseCohort:
    """``softcam train --cohort NAME``: the labelled images of the cohort of the database at ``url``
    (default ``SOFTCAM_DB_URL``; or the open ``engine``) as a training source.

    Images without a label are left out (counted in ``unlabeled_left_out``); images held for
    burned-in text too. When labelled images have no split, a stratified split (``fractions``,
    ``seed``; :func:`db.repository.assign_splits`) is given to them and saved with the cohort first,
    as ``user``, so a later ``softcam evaluate --cohort NAME --split test`` scores exactly the
    held-out images; ``splits_assigned`` then records it. db/cli.py hands this function to
    ``train`` as the argparse default ``open_training_cohort``, so softcam_core never imports db.
    """
    from softcam_core.labels import DEFAULT_SPLIT_FRACTIONS

    from .repository import assign_splits, get_cohort
    from .session import get_engine, session_scope, upgrade

    if engine is None:
        engine = get_engine(url)
        upgrade(engine)
    fractions = tuple(fractions or DEFAULT_SPLIT_FRACTIONS)
    with session_scope(engine) as session:
        cohort = get_cohort(session, name)
        missing = session.scalar(select(func.count()).select_from(Image).where(
            Image.cohort_id == cohort.id, Image.label.is_not(None), or_(Image.split.is_(None), Image.split == "")))
        if missing:
            assign_splits(session, cohort, fractions, seed=seed, user=user)
    with session_scope(engine, readonly=True) as session:
        source = load_database_cohort(session, name)
    if missing:
        source.splits_assigned = {"fractions": list(fractions), "seed": int(seed), "saved_to": source.root,
                                  "images": int(missing)}
    return source


def trainable_cohorts(session: Session) -> dict[str, dict[str, int]]:
    """``{cohort name: {label: images}}`` of the database cohorts with at least two labels (each
    with an image): the ones ``softcam train --cohort`` and the Models page can train on."""
    rows = session.execute(select(Cohort.name, Image.label, func.count()).join(Image, Image.cohort_id == Cohort.id)
                           .where(Image.label.is_not(None)).group_by(Cohort.name, Image.label)
                           .order_by(Cohort.name, Image.label))
    counts: dict[str, dict[str, int]] = {}
    for cohort, label, n in rows:
        counts.setdefault(cohort, {})[label] = int(n)
    return {name: labels for name, labels in counts.items() if len(labels) >= 2}


def database_annotators(name: str, url: str | None = None) -> list[str]:
    """``softcam evaluate --cohort NAME --annotator each``: the cohort's annotators
    (:func:`cohort_annotators`) in the database at ``url`` (default ``SOFTCAM_DB_URL``)."""
    from .session import get_engine, session_scope, upgrade

    engine = get_engine(url)
    upgrade(engine)
    with session_scope(engine, readonly=True) as session:
        return cohort_annotators(session, name)
