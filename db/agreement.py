"""``softcam annotations agreement``: inter-annotator agreement of a database cohort.

Reads every live point and box of the cohort with its author (the annotator; shapes without an
author count as ``(no author)``; the adjudicated ``consensus`` set is left out), and scores every pair of annotators on every image with the
pure functions of :mod:`annotations.agreement`: F1 of one-to-one same-label matches (points within
``tolerance`` image pixels, boxes with IoU >= ``iou``) and Cohen's κ on image-level presence.

Images: by default those on which at least one annotator marked something (an image nobody
annotated was most likely not read, and counting it as agreement on absence would inflate κ);
``all_images=True`` takes every image of the cohort, for studies in which every image was read.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from annotations.agreement import cohen_kappa, match_boxes, match_points
from annotations.geometry import geometry_from_json

from .schema import Annotation, Cohort, Image, User

NO_AUTHOR = "(no author)"
ALL_PAIRS = "(all pairs)"
DEFAULT_TOLERANCE = 10.0  # image pixels
DEFAULT_IOU = 0.5


def annotator_shapes(session: Session, cohort: Cohort, image_ids: list[int] | None = None
                     ) -> tuple[list[Image], dict[int, dict[str, dict[str, list]]]]:
    """``(images, shapes)``: the cohort's visible images (id order; only ``image_ids`` when given) and
    ``shapes[image_id][annotator] = {"points": [(x, y, label)], "boxes": [(x0, y0, x1, y1, label)]}``
    of the live point and box annotations (one query)."""
    from .repository.images import _visible

    query = select(Image).where(Image.cohort_id == cohort.id, _visible()).order_by(Image.id)
    if image_ids is not None:
        query = query.where(Image.id.in_(image_ids))
    images = list(session.scalars(query))
    ids = {image.id for image in images}
    rows = session.execute(
        select(Annotation.image_id, Annotation.kind, Annotation.geometry, Annotation.label, User.username)
        .join(Image, Image.id == Annotation.image_id).outerjoin(User, User.id == Annotation.author_id)
        .where(Image.cohort_id == cohort.id, Annotation.deleted_at.is_(None), Annotation.kind.in_(("point", "box")))
        .where(Annotation.image_id.in_(ids) if image_ids is not None else True)
        .order_by(Annotation.image_id, Annotation.id))
    shapes: dict[int, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: {"points": [], "boxes": []}))
    from .repository.adjudication import CONSENSUS_USER

    for image_id, kind, geometry, label, author in rows:
        if image_id not in ids or author == CONSENSUS_USER:  # the adjudicated set is not an annotator
            continue
        shape = geometry_from_json(kind, geometry)
        entry = shapes[image_id][author or NO_AUTHOR]
        if kind == "point":
            entry["points"].append((shape.x, shape.y, label))
        else:
            entry["boxes"].append((shape.x0, shape.y0, shape.x1, shape.y1, label))
    return images, shapes


def _pair_row(a: dict[str, list], b: dict[str, list], tolerance: float, iou: float) -> dict[str, Any]:
    points = match_points(np.array([p[:2] for p in a["points"]]), np.array([p[:2] for p in b["points"]]), tolerance,
                          [p[2] for p in a["points"]], [p[2] for p in b["points"]])
    boxes = match_boxes(np.array([q[:4] for q in a["boxes"]]), np.array([q[:4] for q in b["boxes"]]), iou,
                        [q[4] for q in a["boxes"]], [q[4] for q in b["boxes"]])
    total = points.n_a + points.n_b + boxes.n_a + boxes.n_b
    return {"points_a": points.n_a, "points_b": points.n_b, "points_matched": points.matched, "points_f1": points.f1,
            "boxes_a": boxes.n_a, "boxes_b": boxes.n_b, "boxes_matched": boxes.matched, "boxes_f1": boxes.f1,
            "f1": 2 * (points.matched + boxes.matched) / total if total else math.nan,
            "present_a": bool(points.n_a + boxes.n_a), "present_b": bool(points.n_b + boxes.n_b)}


def _pooled(frame: pd.DataFrame, prefix: str) -> float:
    """``2 Σ matched / Σ (n_a + n_b)`` of one kind (``points_`` / ``boxes_``) over the rows."""
    total = frame[f"{prefix}a"].sum() + frame[f"{prefix}b"].sum()
    return float(2 * frame[f"{prefix}matched"].sum() / total) if total else math.nan


def _pooled_f1(frame: pd.DataFrame) -> float:
    """The same over both kinds."""
    total = sum(frame[f"{kind}_{side}"].sum() for kind in ("points", "boxes") for side in "ab")
    matched = frame.points_matched.sum() + frame.boxes_matched.sum()
    return float(2 * matched / total) if total else math.nan


def cohort_agreement(session: Session, cohort: Cohort | str, *, tolerance: float = DEFAULT_TOLERANCE,
                     iou: float = DEFAULT_IOU, all_images: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(per_image, summary)`` of every annotator pair of a cohort (module doc).

    ``per_image``: one row per annotator pair per image: ``image`` (pseudonym), ``annotator_a``,
    ``annotator_b`` (alphabetical), counts and matches of points and boxes, ``points_f1``,
    ``boxes_f1``, ``f1`` (both kinds pooled; NaN when neither marked anything), ``present_a/_b``.
    ``summary``: one row per pair, then ``(all pairs)`` (the mean over pairs): ``images``,
    ``f1_mean`` (over the images where F1 is defined), ``f1_pooled`` (``2 Σ matched / Σ (n_a + n_b)``),
    ``points_f1``, ``boxes_f1`` (pooled), ``presence_agreement`` (p_o) and ``kappa_presence``.
    Raises ValueError when the cohort has fewer than two annotators.
    """
    from .repository import get_cohort

    if tolerance < 0 or not 0 <= iou <= 1:
        raise ValueError(f"need tolerance >= 0 pixels and 0 <= IoU <= 1 (got {tolerance}, {iou})")
    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    images, shapes = annotator_shapes(session, cohort)
    annotators = sorted({name for per_image in shapes.values() for name in per_image})
    if len(annotators) < 2:
        found = f"only {annotators[0]!r}" if annotators else "none"
        raise ValueError(f"cohort {cohort.name!r}: agreement needs shapes by at least two annotators (found {found})")
    scored = images if all_images else [image for image in images if image.id in shapes]
    empty = {"points": [], "boxes": []}
    rows = []
    for a, b in itertools.combinations(annotators, 2):
        for image in scored:
            per_image = shapes.get(image.id, {})
            rows.append({"image": image.pseudonym, "annotator_a": a, "annotator_b": b,
                         **_pair_row(per_image.get(a, empty), per_image.get(b, empty), tolerance, iou)})
    per_image_table = pd.DataFrame(rows)
    summary = []
    for (a, b), frame in per_image_table.groupby(["annotator_a", "annotator_b"], sort=True):
        summary.append({"annotator_a": a, "annotator_b": b, "images": len(frame),
                        "images_marked": int((frame.present_a | frame.present_b).sum()),
                        "f1_mean": float(frame.f1.mean()) if frame.f1.notna().any() else math.nan,
                        "f1_pooled": _pooled_f1(frame),
                        "points_f1": _pooled(frame, "points_"), "boxes_f1": _pooled(frame, "boxes_"),
                        "presence_agreement": float((frame.present_a == frame.present_b).mean()),
                        "kappa_presence": cohen_kappa(frame.present_a, frame.present_b)})
    summary_table = pd.DataFrame(summary)
    means = summary_table.drop(columns=["annotator_a", "annotator_b"]).mean(numeric_only=True)
    overall = {"annotator_a": ALL_PAIRS, "annotator_b": "", **means.to_dict()}
    summary_table = pd.concat([summary_table, pd.DataFrame([overall])], ignore_index=True)
    summary_table.attrs.update(tolerance=float(tolerance), iou=float(iou), all_images=bool(all_images),
                               annotators=annotators)
    return per_image_table, summary_table


def images_with_disagreement(session: Session, cohort: Cohort | str, *, tolerance: float = DEFAULT_TOLERANCE,
                             iou: float = DEFAULT_IOU) -> list[Image]:
    """Visible images of ``cohort`` on which two annotators' points or boxes do not all match
    (some pair's F1 < 1), id order: the annotation queue's "disagreements" filter."""
    from .repository import get_cohort, images_to_adjudicate

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    candidates = images_to_adjudicate(session, cohort)
    if not candidates:
        return []
    _, shapes = annotator_shapes(session, cohort, image_ids=[image.id for image in candidates])
    out = []
    for image in candidates:
        per_image = shapes.get(image.id, {})
        for a, b in itertools.combinations(sorted(per_image), 2):
            row = _pair_row(per_image[a], per_image[b], tolerance, iou)
            if not math.isnan(row["f1"]) and row["f1"] < 1:
                out.append(image)
                break
    return out
