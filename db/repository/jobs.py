"""Background jobs: queued, running, done, failed, cancelled; progress and cancellation."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.repository.base import JobFinishedError, NotFoundError, RepositoryError, _jsonable
from db.repository.users import _user_id
from db.schema import (
    FINISHED_JOB_STATUSES,
    JOB_STATUSES,
    Job,
    User,
    utcnow,
)


def create_job(session: Session, kind: str, *, total: int | None = None, params: dict | None = None,
               user: User | str | int | None = None, message: str | None = None,
               worker: str | None = None) -> Job:
    """A ``queued`` job row. ``worker``: :func:`this_worker` of the process that will run it, which
    lets :func:`close_interrupted_jobs` tell a job whose process died from one still running."""
    now = utcnow()
    job = Job(kind=kind, status="queued", progress_done=0, progress_total=total, params=_jsonable(params or {}),
              user_id=_user_id(session, user), message=message, created_at=now, updated_at=now, worker=worker)
    session.add(job)
    session.flush()
    return job


def update_job(session: Session, job_id: int, *, done: int | None = None, total: int | None = None,
               message: str | None = None, status: str | None = None, result_path: str | Path | None = None,
               error: str | None = None) -> Job:
    """Record progress; status ``running`` stamps ``started_at`` once, ``done``/``failed``/``cancelled``
    stamp ``finished_at``. Commit after each call so other sessions (a reloaded page) see it.

    A finished job (done, failed, cancelled) never changes again: :class:`JobFinishedError`. That is
    how a worker learns that its job was cancelled (its next progress report raises)."""
    job = session.get(Job, job_id, populate_existing=True, with_for_update=True)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    if status is not None and status not in JOB_STATUSES:
        raise RepositoryError(f"job status {status!r} is not one of {', '.join(JOB_STATUSES)}")
    if job.status in FINISHED_JOB_STATUSES:
        raise JobFinishedError(f"job {job_id} is {job.status}" + (f": {job.message}" if job.message else ""))
    now = utcnow()
    if status is not None:
        job.status = status
        if status == "running" and job.started_at is None:
            job.started_at = now
        if status in ("done", "failed", "cancelled"):
            job.finished_at = now
    if done is not None:
        job.progress_done = int(done)
    if total is not None:
        job.progress_total = int(total)
    if message is not None:
        job.message = message
    if result_path is not None:
        job.result_path = str(result_path)
    if error is not None:
        job.error = error
    job.updated_at = now
    session.flush()
    return job


def cancel_job(session: Session, job_id: int, user: User | str | int | None = None) -> Job:
    """Mark a queued or running job ``cancelled``; its worker stops at its next progress report.

    Raises :class:`JobFinishedError` when the job has already finished (nothing to cancel)."""
    who = session.get(User, _user_id(session, user)) if user is not None else None
    by = f"cancelled by {who.username}" if who is not None else "cancelled"
    return update_job(session, job_id, status="cancelled", message=by)


def this_worker() -> str:
    """``host:pid:start`` of this process (start: its start time in clock ticks since boot, where
    ``/proc`` tells it), recorded in the jobs it runs so a later process can tell if it still lives."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _process_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def worker_alive(worker: str) -> bool:
    """Whether the process named by :func:`this_worker`'s string still runs. Another host's process
    cannot be checked from here and counts as alive; a reused pid is told apart by its start time."""
    host, _, rest = worker.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return not start or _process_start(pid) in ("", start)


def close_interrupted_jobs(session: Session, alive: Callable[[str], bool] = worker_alive) -> list[Job]:
    """Mark ``failed`` the queued or running jobs whose worker process has stopped (an app restart or
    crash) so they do not show progress forever; jobs without a recorded worker are left alone.

    Returns the jobs it closed."""
    query = select(Job).where(Job.status.in_(("queued", "running")), Job.worker.is_not(None))
    closed = []
    for job in session.scalars(query):
        if not alive(job.worker):
            closed.append(update_job(
                session, job.id, status="failed",
                error=f"interrupted: the app process that ran it ({job.worker}) stopped before it finished "
                      f"({job.progress_done}/{job.progress_total or '?'} done); start it again"))
    return closed


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return job


def list_jobs(session: Session, kind: str | None = None, status: str | Sequence[str] | None = None,
              limit: int = 50) -> list[Job]:
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status.in_([status] if isinstance(status, str) else list(status)))
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))
