"""Reader studies in the database: create one, serve a reader the next blinded item, record the
answer, export the answers (pure ordering and summary: :mod:`softcam_core.reader_study`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.repository.base import NotFoundError, RepositoryError
from db.repository.cohorts import get_cohort
from db.repository.users import _user_id
from db.schema import Image, ReaderAnswer, ReaderStudy, User, utcnow
from softcam_core.reader_study import RATINGS, study_order


def create_study(session: Session, name: str, cohort, model_path: str | Path, methods: Sequence[str], *,
                 seed: int = 0, images: int | None = None, user=None) -> ReaderStudy:
    """A new study of ``methods`` on the cohort's visible images (``images``: a seeded sample of that
    many). Method names are checked against :data:`softcam_core.explain.METHODS` rules."""
    from softcam_core.explain import method_problem

    from .images import _visible

    name = (name or "").strip()
    if not name:
        raise RepositoryError("a reader study needs a name")
    if session.scalar(select(ReaderStudy.id).where(ReaderStudy.name == name)) is not None:
        raise RepositoryError(f"a reader study named {name!r} exists; choose another name")
    methods = [m.strip() for m in methods if m.strip()]
    if not methods:
        raise RepositoryError("a reader study needs at least one method")
    problems = [p for p in (method_problem(m) for m in methods) if p]
    if problems:
        raise RepositoryError(problems[0])
    if len(set(methods)) != len(methods):
        raise RepositoryError("each method may appear once")
    if not Path(model_path).is_file():
        raise RepositoryError(f"{model_path}: model checkpoint not found")
    cohort = get_cohort(session, cohort) if isinstance(cohort, str) else cohort
    ids = list(session.scalars(select(Image.id).where(Image.cohort_id == cohort.id, _visible()).order_by(Image.id)))
    if not ids:
        raise RepositoryError(f"cohort {cohort.name!r} has no image to read")
    if images is not None:
        if images < 1:
            raise RepositoryError("--images must be at least 1")
        chosen = np.random.default_rng(int(seed)).permutation(len(ids))[:images]
        ids = sorted(ids[int(i)] for i in chosen)
    study = ReaderStudy(name=name, cohort_id=cohort.id, model_path=str(model_path), methods=methods, image_ids=ids,
                        seed=int(seed), created_by_id=_user_id(session, user) if user is not None else None)
    session.add(study)
    session.flush()
    return study


def get_study(session: Session, study) -> ReaderStudy:
    if isinstance(study, ReaderStudy):
        return study
    found = session.scalar(select(ReaderStudy).where(ReaderStudy.name == study) if isinstance(study, str)
                           else select(ReaderStudy).where(ReaderStudy.id == int(study)))
    if found is None:
        raise NotFoundError(f"no reader study {study!r}")
    return found


def list_studies(session: Session) -> list[ReaderStudy]:
    return list(session.scalars(select(ReaderStudy).order_by(ReaderStudy.created_at, ReaderStudy.id)))


def reader_items(session: Session, study, reader) -> tuple[list[tuple[int, str]], set[tuple[int, str]]]:
    """``(items in this reader's order, the items they answered)``."""
    study = get_study(session, study)
    reader_id = _user_id(session, reader)
    answered = {(int(image_id), str(method)) for image_id, method in session.execute(
        select(ReaderAnswer.image_id, ReaderAnswer.method)
        .where(ReaderAnswer.study_id == study.id, ReaderAnswer.reader_id == reader_id))}
    return study_order(study.image_ids, study.methods, study.seed, reader_id), answered


def record_answer(session: Session, study, reader, image_id: int, method: str, rating: int, *,
                  point: tuple[float, float] | None = None, seconds: float | None = None) -> ReaderAnswer:
    """Store (or replace) one reader's rating of one map of the study."""
    study = get_study(session, study)
    reader_id = _user_id(session, reader)
    if reader_id is None:
        raise RepositoryError("an answer needs the reader's user")
    if int(image_id) not in study.image_ids or method not in study.methods:
        raise RepositoryError(f"image {image_id} / method {method!r} is not an item of study {study.name!r}")
    if int(rating) not in RATINGS:
        raise RepositoryError(f"rating must be one of {', '.join(map(str, RATINGS))}, got {rating!r}")
    if point is not None:
        image = session.get(Image, int(image_id))
        x, y = (float(v) for v in point)
        if image.width and image.height and not (0 <= x <= image.width and 0 <= y <= image.height):
            raise RepositoryError(f"point ({x:g}, {y:g}) lies outside the {image.width}x{image.height} image")
    answer = session.scalar(select(ReaderAnswer).where(
        ReaderAnswer.study_id == study.id, ReaderAnswer.reader_id == reader_id, ReaderAnswer.image_id == int(image_id),
        ReaderAnswer.method == method))
    if answer is None:
        answer = ReaderAnswer(study_id=study.id, reader_id=reader_id, image_id=int(image_id), method=method)
        session.add(answer)
    answer.rating = int(rating)
    answer.point_x, answer.point_y = (float(point[0]), float(point[1])) if point is not None else (None, None)
    answer.seconds = float(seconds) if seconds is not None else None
    answer.answered_at = utcnow()
    session.flush()
    return answer


def answers_table(session: Session, study) -> pd.DataFrame:
    """Every answer of a study: ``reader``, ``image`` (pseudonym), ``method``, ``rating``,
    ``point_x``, ``point_y`` (image pixels, empty when not marked), ``seconds``, ``answered_at``."""
    study = get_study(session, study)
    rows = session.execute(
        select(User.username, Image.pseudonym, ReaderAnswer.method, ReaderAnswer.rating, ReaderAnswer.point_x,
               ReaderAnswer.point_y, ReaderAnswer.seconds, ReaderAnswer.answered_at)
        .join(User, User.id == ReaderAnswer.reader_id).join(Image, Image.id == ReaderAnswer.image_id)
        .where(ReaderAnswer.study_id == study.id).order_by(ReaderAnswer.answered_at, ReaderAnswer.id)).all()
    return pd.DataFrame(rows, columns=["reader", "image", "method", "rating", "point_x", "point_y", "seconds",
                                       "answered_at"])
