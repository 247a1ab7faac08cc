"""Stored metric values."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.repository.base import _jsonable
from db.schema import (
    Cohort,
    Job,
    MetricResult,
    Model,
)


def save_metric_results(session: Session, model: Model, rows: Iterable[dict[str, Any]], *,
                        cohort: Cohort | None = None, job: Job | None = None) -> int:
    """Store metric values; each row: ``method, metric, value`` and optional ``image_id, target, params``."""
    count = 0
    for row in rows:
        value = row.get("value")
        value = None if value is None or (isinstance(value, float) and not np.isfinite(value)) else float(value)
        session.add(MetricResult(model_id=model.id, cohort_id=cohort.id if cohort else None,
                                 image_id=row.get("image_id"), job_id=job.id if job else None, method=row["method"],
                                 metric=row["metric"], target=row.get("target"), value=value,
                                 params=_jsonable(row.get("params") or {})))
        count += 1
    session.flush()
    return count


def list_metric_results(session: Session, model: Model, *, cohort: Cohort | None = None, method: str | None = None,
                        metric: str | None = None, per_image: bool | None = None) -> list[MetricResult]:
    query = select(MetricResult).where(MetricResult.model_id == model.id)
    if cohort is not None:
        query = query.where(MetricResult.cohort_id == cohort.id)
    if method:
        query = query.where(MetricResult.method == method)
    if metric:
        query = query.where(MetricResult.metric == metric)
    if per_image is not None:
        query = query.where(MetricResult.image_id.is_not(None) if per_image else MetricResult.image_id.is_(None))
    return list(session.scalars(query.order_by(MetricResult.id)))
