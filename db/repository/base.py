"""What every part of the repository shares: its errors, the progress callback type, JSON-safe metadata and
atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from annotations.formats import ImportReport
from db.schema import Annotation

Progress = Callable[[int, int], None]  # (done, total)


class RepositoryError(ValueError):
    """A request the database cannot satisfy; the message is one line meant for the user."""


class NotFoundError(RepositoryError):
    pass


class JobFinishedError(RepositoryError):
    """A job already done, failed or cancelled was asked to change (its worker learns it was cancelled)."""


class ConflictError(RepositoryError):
    """Someone else changed the annotation since the caller loaded it (optimistic concurrency)."""

    def __init__(self, message: str, current: Annotation | None = None):
        super().__init__(message)
        self.current = current


class AnnotationImportError(RepositoryError):
    """An annotation file with bad rows; nothing was imported. ``report`` lists every problem."""

    def __init__(self, report: ImportReport):
        self.report = report
        super().__init__(
            f"{report.source}: {len(report.errors)} bad row(s) of {report.rows}; nothing imported "
            f"(first: {report.errors[0] if report.errors else '-'})"
        )


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON types (numpy scalars, tuples, bytes made safe)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _write_atomically(target: Path, data: bytes) -> None:
    if target.exists() and target.stat().st_size == len(data):
        return  # content-addressed: same name, same bytes
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
