"""The job queue that ``softcam worker`` processes claim work from.

A job meant for workers is a ``jobs`` row (status ``queued``, no recorded worker) with one or more
``job_chunks`` rows. A worker claims one queued chunk at a time in one short transaction:

* PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent workers never wait for, or take,
  the same chunk;
* SQLite: the write transaction starts with ``BEGIN IMMEDIATE`` (:mod:`db.session`), so claims are
  serialised by the database's write lock.

A claim is a lease of :data:`LEASE_SECONDS`, renewed by :func:`heartbeat`. A lease that runs out
(the worker was killed, its host lost power) puts the chunk back in the queue at the next claim by
anyone, with ``attempt`` one higher; only the current attempt's holder can complete it, so the
work of a worker that comes back from the dead is never counted. Nothing else retries: a chunk
that fails fails its job, with the error, as the in-process runner does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.repository.base import JobFinishedError
from db.repository.jobs import update_job
from db.schema import FINISHED_JOB_STATUSES, Job, JobChunk, utcnow
from db.session import session_scope

LEASE_SECONDS = 60.0  # a worker heartbeats every LEASE_SECONDS / 4


class LeaseLost(RuntimeError):
    """The chunk's lease expired and it was given to another worker (or the job was removed)."""


@dataclass(frozen=True)
class Claim:
    """A chunk a worker holds: run it, heartbeat it, complete it."""

    chunk_id: int
    job_id: int
    kind: str
    index: int
    attempt: int
    units: int
    params: dict[str, Any]  # the chunk's own (e.g. its images)
    job_params: dict[str, Any]


def enqueue(session: Session, job: Job, parts: Sequence[tuple[dict[str, Any], int]]) -> list[JobChunk]:
    """Split ``job`` into chunks: ``parts`` = ``[(chunk params, progress units)]`` in order."""
    chunks = [JobChunk(job_id=job.id, index=k, params=dict(params), units=int(units), done=0, status="queued",
                       attempt=0) for k, (params, units) in enumerate(parts)]
    session.add_all(chunks)
    job.progress_total = sum(int(units) for _, units in parts)
    job.progress_done = 0
    session.flush()
    return chunks


def requeue_expired(session: Session, now=None) -> int:
    """Put every running chunk whose lease has run out back in the queue; returns how many."""
    now = now or utcnow()
    result = session.execute(
        update(JobChunk).where(JobChunk.status == "running", JobChunk.lease_expires_at < now)
        .values(status="queued", worker=None, lease_expires_at=None, done=0)
        .execution_options(synchronize_session=False))
    return int(result.rowcount or 0)


def claim(engine, worker: str, kinds: Sequence[str], lease_seconds: float = LEASE_SECONDS) -> Claim | None:
    """Claim the oldest queued chunk of a queued or running job of one of ``kinds``, or None."""
    with session_scope(engine) as s:
        now = utcnow()
        requeue_expired(s, now)
        query = (select(JobChunk).join(Job, Job.id == JobChunk.job_id)
                 .where(JobChunk.status == "queued", Job.status.in_(("queued", "running")), Job.kind.in_(list(kinds)))
                 .order_by(JobChunk.job_id, JobChunk.index).limit(1))
        if s.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=JobChunk)
        chunk = s.scalars(query).first()
        if chunk is None:
            return None
        chunk.status, chunk.attempt, chunk.worker, chunk.done = "running", chunk.attempt + 1, worker, 0
        chunk.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job = s.get(Job, chunk.job_id)
        if job.status == "queued":
            update_job(s, job.id, status="running", message="running on workers")
        s.flush()
        return Claim(chunk.id, job.id, job.kind, chunk.index, chunk.attempt, chunk.units, dict(chunk.params or {}),
                     dict(job.params or {}))


def _held(s: Session, held: Claim) -> JobChunk:
    chunk = s.get(JobChunk, held.chunk_id, with_for_update=True, populate_existing=True)
    if chunk is None or chunk.status != "running" or chunk.attempt != held.attempt:
        raise LeaseLost(f"job {held.job_id} chunk {held.index}: the lease of attempt {held.attempt} was lost")
    return chunk


def holds(engine, held: Claim) -> bool:
    """Whether ``held`` is still the chunk's current claim (not requeued for another worker, not gone)."""
    with session_scope(engine, readonly=True) as s:
        chunk = s.get(JobChunk, held.chunk_id)
        return chunk is not None and chunk.status == "running" and chunk.attempt == held.attempt


def heartbeat(engine, held: Claim, done: int | None = None, message: str | None = None,
              lease_seconds: float = LEASE_SECONDS) -> None:
    """Renew the lease and record progress. Raises :class:`JobFinishedError` when the job was
    cancelled (or finished) meanwhile, :class:`LeaseLost` when the chunk is no longer ours."""
    with session_scope(engine) as s:
        # the job row first, then the chunk: the order complete() locks them in, so two workers of one
        # job never wait for each other in a cycle
        job = s.get(Job, held.job_id, with_for_update=True, populate_existing=True)
        if job is None or job.status in FINISHED_JOB_STATUSES:
            raise JobFinishedError(f"job {held.job_id} is {job.status if job else 'gone'}"
                                   + (f": {job.message}" if job and job.message else ""))
        chunk = _held(s, held)
        chunk.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
        if done is not None:
            chunk.done = min(int(done), chunk.units)
        s.flush()
        total_done = s.scalar(select(func.coalesce(func.sum(JobChunk.done), 0)).where(JobChunk.job_id == held.job_id))
        update_job(s, held.job_id, done=int(total_done), message=message)


def complete(engine, held: Claim, result_path: str) -> bool:
    """Mark the chunk done (only the current attempt's holder can: :class:`LeaseLost` otherwise).
    Returns True for the worker whose chunk was the job's last: it merges the job's results. The
    job row is locked first, so two workers finishing together cannot both see themselves last."""
    with session_scope(engine) as s:
        job = s.get(Job, held.job_id, with_for_update=True, populate_existing=True)
        if job is None or job.status in FINISHED_JOB_STATUSES:
            raise JobFinishedError(f"job {held.job_id} is {job.status if job else 'gone'}")
        chunk = _held(s, held)
        chunk.status, chunk.done, chunk.result_path, chunk.finished_at = "done", chunk.units, result_path, utcnow()
        chunk.lease_expires_at = None
        s.flush()
        left = s.scalar(select(func.count()).where(JobChunk.job_id == held.job_id, JobChunk.status != "done"))
        total_done = s.scalar(select(func.coalesce(func.sum(JobChunk.done), 0)).where(JobChunk.job_id == held.job_id))
        update_job(s, held.job_id, done=int(total_done))
        return left == 0


def chunks_of(session: Session, job_id: int) -> list[JobChunk]:
    return list(session.scalars(select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.index)))
