"""Adjudication: merge several annotators' shapes on an image into one consensus set, recording
who decided what.

:func:`consensus_proposals` groups the annotators' points and boxes: two shapes of the same label
by different annotators belong together when the one-to-one matching of
:mod:`annotations.agreement` pairs them (points within ``tolerance`` px, boxes with IoU >= ``iou``);
groups are the connected components of those pairs. A proposal's geometry is the mean of its
shapes (point coordinates, box corners), its ``votes`` the number of distinct annotators in it, and
it is suggested for acceptance when more than half of the image's annotators marked it.

:func:`save_consensus` stores the accepted proposals as the image's consensus set: annotations by
the user ``consensus`` (provenance ``consensus``, ``derived_from`` one of its sources), each with an
audit row ``adjudicate`` by the adjudicator naming the source annotations and their annotators;
every rejected proposal gets an audit row ``reject`` on its source annotations. A new adjudication
of the image replaces the previous consensus set (deleted, audited). ``softcam evaluate --cohort C
--annotator consensus`` and the Cohort page then score against it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from annotations.agreement import match_boxes, match_points
from annotations.geometry import Box, Point, geometry_from_json
from db.repository.annotation_edits import _audit, _state
from db.repository.base import RepositoryError
from db.repository.users import _user_id, get_or_create_user
from db.schema import Annotation, AnnotationAudit, Image, User, utcnow

CONSENSUS_USER = "consensus"


@dataclass(frozen=True)
class Proposal:
    """One consensus candidate: ``kind`` point|box, ``geometry`` (the mean), ``label``, the source
    ``annotation_ids`` and their ``annotators`` (sorted, distinct), ``votes`` = len(annotators),
    ``suggested``: more than half of the image's annotators marked it."""

    kind: str
    geometry: Point | Box
    label: str | None
    annotation_ids: tuple[int, ...]
    annotators: tuple[str, ...]
    suggested: bool

    @property
    def votes(self) -> int:
        return len(self.annotators)


def _components(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def consensus_proposals(session: Session, image: Image | int, *, tolerance: float = 10.0,
                        iou: float = 0.5) -> list[Proposal]:
    """The consensus candidates of an image from its annotators' live points and boxes (module doc),
    most-voted first. Shapes of the consensus user are not inputs."""
    image_id = image if isinstance(image, int) else image.id
    rows = session.execute(
        select(Annotation.id, Annotation.kind, Annotation.geometry, Annotation.label, User.username)
        .outerjoin(User, User.id == Annotation.author_id)
        .where(Annotation.image_id == image_id, Annotation.deleted_at.is_(None), Annotation.kind.in_(("point", "box")))
        .order_by(Annotation.id)).all()
    shapes = [(ann_id, kind, geometry_from_json(kind, geometry), label, author or "(no author)")
              for ann_id, kind, geometry, label, author in rows if author != CONSENSUS_USER]
    annotators = sorted({s[4] for s in shapes})
    proposals: list[Proposal] = []
    for kind in ("point", "box"):
        items = [s for s in shapes if s[1] == kind]
        edges: list[tuple[int, int]] = []
        for a, b in itertools.combinations(annotators, 2):
            ia = [i for i, s in enumerate(items) if s[4] == a]
            ib = [i for i, s in enumerate(items) if s[4] == b]
            if not ia or not ib:
                continue
            if kind == "point":
                m = match_points([(items[i][2].x, items[i][2].y) for i in ia], [(items[j][2].x, items[j][2].y) for j in ib],
                                 tolerance, [items[i][3] for i in ia], [items[j][3] for j in ib])
            else:
                as_row = lambda g: (g.x0, g.y0, g.x1, g.y1)  # noqa: E731
                m = match_boxes([as_row(items[i][2]) for i in ia], [as_row(items[j][2]) for j in ib], iou,
                                [items[i][3] for i in ia], [items[j][3] for j in ib])
            edges += [(ia[p], ib[q]) for p, q in m.pairs]
        for group in _components(len(items), edges):
            members = [items[i] for i in group]
            if kind == "point":
                mean = np.mean([(g.x, g.y) for _, _, g, _, _ in members], axis=0)
                geometry: Point | Box = Point(float(mean[0]), float(mean[1]))
            else:
                mean = np.mean([(g.x0, g.y0, g.x1, g.y1) for _, _, g, _, _ in members], axis=0)
                geometry = Box(*(float(v) for v in mean))
            voters = tuple(sorted({m[4] for m in members}))
            proposals.append(Proposal(kind, geometry, members[0][3], tuple(m[0] for m in members), voters,
                                      2 * len(voters) > len(annotators)))
    return sorted(proposals, key=lambda p: (-p.votes, p.kind, p.annotation_ids))


def save_consensus(session: Session, image: Image | int, accepted: list[Proposal], rejected: list[Proposal],
                   adjudicator: User | str | int) -> list[Annotation]:
    """Replace the image's consensus set by ``accepted`` (module doc), as ``adjudicator``; returns
    the new consensus annotations. ``rejected`` proposals are recorded (audit ``reject``)."""
    image = session.get(Image, image) if isinstance(image, int) else image
    if image is None:
        raise RepositoryError("no such image")
    judge = _user_id(session, adjudicator)
    if judge is None:
        raise RepositoryError("an adjudication needs the adjudicator's user")
    consensus = get_or_create_user(session, CONSENSUS_USER, role="annotator")
    now = utcnow()
    for old in session.scalars(select(Annotation).where(Annotation.image_id == image.id,
                                                        Annotation.author_id == consensus.id,
                                                        Annotation.deleted_at.is_(None))):
        before = _state(old)
        old.deleted_at, old.updated_at, old.updated_by_id = now, now, judge
        session.flush()
        _audit(session, old, judge, "delete", before, _state(old))
    created = []
    for proposal in accepted:
        annotation = Annotation(image_id=image.id, kind=proposal.kind, geometry=proposal.geometry.to_json(),
                                label=proposal.label, author_id=consensus.id, updated_by_id=judge, created_at=now,
                                updated_at=now, provenance="consensus", derived_from_id=proposal.annotation_ids[0])
        session.add(annotation)
        session.flush()
        _audit(session, annotation, judge, "adjudicate", None,
               dict(_state(annotation), sources=list(proposal.annotation_ids), annotators=list(proposal.annotators)))
        created.append(annotation)
    for proposal in rejected:
        for source_id in proposal.annotation_ids:
            session.add(AnnotationAudit(annotation_id=source_id, user_id=judge, at=now, action="reject",
                                        before=None, after={"decision": "reject", "sources": list(proposal.annotation_ids),
                                                            "annotators": list(proposal.annotators)}))
    session.flush()
    return created


def adjudication_record(session: Session, image: Image | int) -> list[dict]:
    """Who decided what on an image, oldest first: ``at``, ``decision`` (accept|reject), ``by`` (the
    adjudicator), ``label``, ``kind``, ``annotators`` (whose shapes), ``sources`` (annotation ids)."""
    image_id = image if isinstance(image, int) else image.id
    rows = session.execute(
        select(AnnotationAudit.at, AnnotationAudit.action, AnnotationAudit.after, User.username,
               Annotation.label, Annotation.kind)
        .join(Annotation, Annotation.id == AnnotationAudit.annotation_id)
        .outerjoin(User, User.id == AnnotationAudit.user_id)
        .where(Annotation.image_id == image_id, AnnotationAudit.action.in_(("adjudicate", "reject")))
        .order_by(AnnotationAudit.at, AnnotationAudit.id)).all()
    record, seen = [], set()
    for at, action, after, who, label, kind in rows:
        key = (at, action, tuple(after.get("sources", [])))
        if key in seen:  # a rejection is written on each of its sources: list it once
            continue
        seen.add(key)
        record.append({"at": at, "decision": "accept" if action == "adjudicate" else "reject", "by": who or "",
                       "label": label, "kind": kind, "annotators": ", ".join(after.get("annotators", [])),
                       "sources": ", ".join(str(s) for s in after.get("sources", []))})
    return record


def images_to_adjudicate(session: Session, cohort) -> list[Image]:
    """Visible images of ``cohort`` with points or boxes by at least two annotators (the consensus
    user not counted), id order: the adjudication queue."""
    from sqlalchemy import func

    from db.repository.cohorts import get_cohort
    from db.repository.images import _visible

    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    consensus = session.scalar(select(User.id).where(User.username == CONSENSUS_USER))
    authors = (select(Annotation.image_id).join(Image, Image.id == Annotation.image_id)
               .where(Image.cohort_id == cohort.id, Annotation.deleted_at.is_(None),
                      Annotation.kind.in_(("point", "box")), Annotation.author_id.is_not(None))
               .group_by(Annotation.image_id))
    if consensus is not None:
        authors = authors.where(Annotation.author_id != consensus)
    authors = authors.having(func.count(func.distinct(Annotation.author_id)) >= 2)
    return list(session.scalars(select(Image).where(Image.id.in_(authors), _visible()).order_by(Image.id)))
