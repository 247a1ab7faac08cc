"""``softcam worker``: a process that claims queued jobs, or chunks of a cohort job, from the database
(:mod:`db.queue`) and runs them, so several processes on several hosts share the app's work.

The app enqueues instead of running a job itself when ``SOFTCAM_JOB_RUNNER=worker``
(:func:`service.jobs.job_runner`); every process must see the same database (``SOFTCAM_DB_URL``)
and the same ``SOFTCAM_HOME`` (images, checkpoints, evaluation folders: a shared file system).

* ``evaluate`` jobs come in chunks of images. A chunk writes its tables to its own folder
  (``<evaluation>/chunks/<index>-attempt<n>``); the worker that completes the job's last chunk
  merges the chunks' rows (each image x method once, in one-process order) and writes the job's
  tables.
* ``train`` jobs are one chunk.
* ``explain`` jobs (precomputed maps, :func:`service.jobs.start_explain_job`) come in chunks of
  images; each chunk writes its maps to the database map cache and its summary (counts, images
  that failed) to ``explain/job-<id>/<index>-attempt<n>.json``; the last one sums them up.
* While a chunk runs, a thread heartbeats its lease every quarter lease; Cancel on a page makes the
  next heartbeat fail and the chunk stops at its next progress step.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

WORKER_KINDS = ("evaluate", "train", "explain")


class _Lease:
    """Heartbeats a claim from a thread while the chunk runs; progress steps ask it whether to stop."""

    def __init__(self, engine, held, lease_seconds: float):
        self.engine, self.held, self.lease_seconds = engine, held, lease_seconds
        self.done, self.message, self.stopped = 0, "", None
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{held.chunk_id}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._wake.set()
        self._thread.join()

    def _beat(self) -> None:
        from db.queue import LeaseLost, heartbeat
        from db.repository.base import JobFinishedError

        try:
            heartbeat(self.engine, self.held, self.done, self.message or None, self.lease_seconds)
        except (JobFinishedError, LeaseLost) as exc:
            self.stopped = exc

    def _run(self) -> None:
        while not self._wake.wait(self.lease_seconds / 4) and self.stopped is None:
            self._beat()

    def progress(self, done: int, total: int, message: str = "") -> None:  # noqa: ARG002 - evaluate's signature
        """``evaluate_cohort``'s progress callback: records the step, stops a cancelled chunk."""
        from service.jobs import JobCancelled

        self.done, self.message = int(done), str(message)
        if self.stopped is not None:
            raise JobCancelled(str(self.stopped))


def _evaluation_source(engine, params: dict):
    from db.evaluation import DatabaseCohort, evaluation_source
    from db.session import session_scope
    from service.catalogue import checkpoint_info

    classes = checkpoint_info(params["model"]).meta.get("classes", [])
    with session_scope(engine, readonly=True) as s:
        source, _ = evaluation_source(s, params, list(classes))
    recorded = params.get("ground_truth_digest")
    if isinstance(source, DatabaseCohort) and recorded is not None:
        if source.digest(params.get("split", "test"), params.get("limit")) != recorded:
            raise ValueError(f"the labels or boxes of cohort {params.get('cohort')!r} changed since the job was "
                             "queued; start a new evaluation")
    return source


def run_chunk(engine, held, lease_seconds: float) -> str:
    """Run one claimed chunk to its end; returns what happened (for the worker's log line)."""
    from db import repository
    from db.queue import LeaseLost, chunks_of, complete, holds
    from db.repository.base import JobFinishedError
    from db.session import session_scope
    from service.jobs import (JobCancelled, evaluation_folder, explain_folder, run_evaluation, run_explain,
                              run_training)

    with session_scope(engine, readonly=True) as s:
        job = repository.get_job(s, held.job_id)
        folder = evaluation_folder(job) if held.kind == "evaluate" else None
        user_id = job.user_id
    try:
        with _Lease(engine, held, lease_seconds) as lease:
            if held.kind == "evaluate":
                out = folder / "chunks" / f"{held.index:04d}-attempt{held.attempt}"
                run_evaluation(held.job_params, _evaluation_source(engine, held.job_params), out, lease.progress,
                               images=held.params["images"], figures=False)
                result_path = str(out)
            elif held.kind == "train":
                run_training(engine, held.job_params, user_id, lease.progress)
                result_path = held.job_params["out"]
            elif held.kind == "explain":  # the maps go to the database map cache; the summary to a file
                summary = run_explain(engine, held.job_params, lease.progress, images=held.params["images"])
                out = explain_folder(held.job_id) / f"{held.index:04d}-attempt{held.attempt}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(summary.to_json())
                result_path = str(out)
            else:
                raise ValueError(f"no worker runs {held.kind!r} jobs")
        last = complete(engine, held, result_path)
    except (JobCancelled, JobFinishedError):
        return "stopped: the job was cancelled"
    except LeaseLost as exc:
        return f"dropped: {exc}"
    except Exception as exc:  # the job fails with the chunk's error, as in the app's own runner
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        if not holds(engine, held):  # its lease ran out meanwhile: the chunk is another worker's now
            return f"dropped: {message}"
        try:
            with session_scope(engine) as s:
                repository.update_job(s, held.job_id, status="failed", error=f"chunk {held.index}: {message}")
        except JobFinishedError:
            pass
        return f"failed: {message}"
    if not last:
        return "done"
    if held.kind == "train":
        with session_scope(engine) as s:
            repository.update_job(s, held.job_id, status="done", result_path=result_path,
                                  message=f"saved {Path(result_path).name}")
        return "done; job finished"
    if held.kind == "explain":
        from service.jobs import ExplainSummary

        with session_scope(engine, readonly=True) as s:
            summary = ExplainSummary.combined([ExplainSummary.read(c.result_path) for c in chunks_of(s, held.job_id)])
        with session_scope(engine) as s:
            if summary.failure():
                repository.update_job(s, held.job_id, status="failed", error=summary.failure())
            else:
                repository.update_job(s, held.job_id, status="done", message=summary.text())
        return "done; job finished"
    from softcam_core.evaluate import EvalSettings, finalise, merge_rows

    with session_scope(engine, readonly=True) as s:
        parts = [Path(c.result_path) for c in chunks_of(s, held.job_id)]
    params = held.job_params
    stems = list(params["images"])
    merge_rows(folder, {kind: [part / f"{kind}.csv" for part in parts] for kind in ("per_image", "deletion_curves")},
               None, stems, list(params["methods"]))
    result = finalise(folder, EvalSettings(split=params["split"], png=False), methods=list(params["methods"]),
                      items=set(stems))
    with session_scope(engine) as s:
        repository.update_job(s, held.job_id, status="done", result_path=str(folder),
                              message=f"{len(result.per_image)} image × method rows")
    return "done; job merged"


def run_worker(engine, kinds: Sequence[str] = WORKER_KINDS, *, once: bool = False, poll_seconds: float = 2.0,
               lease_seconds: float | None = None, worker: str | None = None, log=print) -> int:
    """Claim and run chunks until stopped; with ``once``, until the queue holds nothing to claim.
    Returns the number of chunks run."""
    from db.queue import LEASE_SECONDS, claim
    from db.repository.jobs import this_worker

    worker = worker or this_worker()
    lease_seconds = lease_seconds or LEASE_SECONDS
    runs = 0
    while True:
        held = claim(engine, worker, kinds, lease_seconds)
        if held is None:
            if once:
                return runs
            time.sleep(poll_seconds)
            continue
        log(f"worker {worker}: job {held.job_id} ({held.kind}) chunk {held.index} attempt {held.attempt}")
        outcome = run_chunk(engine, held, lease_seconds)
        runs += 1
        log(f"worker {worker}: job {held.job_id} chunk {held.index}: {outcome}")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "worker", help="claim and run queued jobs (or chunks of a cohort job) from the database",
        description="Claim queued jobs, or chunks of a cohort evaluation, from the database (SOFTCAM_DB_URL) "
                    "and run them; PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED, SQLite: BEGIN IMMEDIATE. "
                    "Start the app with SOFTCAM_JOB_RUNNER=worker so that it only enqueues.")
    parser.add_argument("--once", action="store_true", help="exit once there is nothing left to claim")
    parser.add_argument("--jobs", default=",".join(WORKER_KINDS),
                        help=f"job kinds to claim, comma-separated (default {','.join(WORKER_KINDS)})")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between looks at an empty queue")
    parser.add_argument("--lease", type=float, default=None,
                        help="seconds a claim lasts without a heartbeat (default 60)")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from db.session import get_engine, upgrade

    kinds = [k.strip() for k in args.jobs.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in WORKER_KINDS]
    if unknown or not kinds:
        raise ValueError(f"--jobs {args.jobs!r}: choose from {', '.join(WORKER_KINDS)}")
    engine = get_engine()
    upgrade(engine)
    runs = run_worker(engine, kinds, once=args.once, poll_seconds=args.poll, lease_seconds=args.lease,
                      log=lambda line: print(line, flush=True))
    print(f"worker: {runs} chunk(s) run", file=sys.stderr)
    return 0
