"""``softcam jobs``: the database jobs table from a terminal, as the Cohort and Review pages show it.

``list`` and ``show`` read jobs (and the chunks workers claim); ``cancel`` stops one as the app's
Cancel button does; ``precompute`` starts the Review page's "Precompute maps for the cohort" job
(:func:`service.jobs.start_explain_job`). Each goes through the same service functions, and the
same role checks, as the pages.

With the embedded thread runner the job runs inside this process, so ``precompute`` waits for it
(Ctrl-C cancels it). With ``SOFTCAM_JOB_RUNNER=worker`` it only enqueues; ``precompute`` then shows
the workers' progress, and ``--detach`` returns at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

FINISHED = ("done", "failed", "cancelled")


def _engine():
    from db.session import get_engine, upgrade

    engine = get_engine()
    upgrade(engine)
    return engine


def _user_id(engine, username: str) -> int:
    """The id of the existing account ``username``. Not created when missing: a mistyped name must
    not become a new account that may run jobs. The role check is the service function's."""
    from db.repository import get_user
    from db.session import session_scope

    with session_scope(engine, readonly=True) as s:
        user = get_user(s, username)
        if user is None:
            raise ValueError(f"no account {username!r}: create it with `softcam users add {username} --role researcher`")
        return user.id


def _progress(job) -> str:
    total = job.progress_total
    return f"{job.progress_done}/{total}" if total else f"{job.progress_done}"


def _list(args: argparse.Namespace) -> int:
    from db import repository
    from db.session import session_scope
    from service.jobs import job_label

    engine = _engine()
    with session_scope(engine, readonly=True) as s:
        jobs = repository.list_jobs(s, args.kind, args.status, limit=args.limit)
        for job in jobs:
            print(f"{job_label(job)}\t{job.kind}\t{_progress(job)}\t{job.error or job.message or ''}")
    if not jobs:
        print("no job", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from db import repository
    from db.queue import chunks_of
    from db.session import session_scope
    from service.jobs import job_label

    engine = _engine()
    with session_scope(engine, readonly=True) as s:
        job = repository.get_job(s, args.job)
        chunks = chunks_of(s, job.id)
        print(job_label(job))
        print(f"kind: {job.kind}\nstatus: {job.status}\nprogress: {_progress(job)}")
        for name in ("message", "error", "result_path", "worker"):
            if getattr(job, name):
                print(f"{name.replace('_', ' ')}: {getattr(job, name)}")
        for chunk in chunks:
            print(f"chunk {chunk.index}: {chunk.status}, {chunk.done}/{chunk.units}, attempt {chunk.attempt}"
                  + (f", {chunk.worker}" if chunk.worker else ""))
    return 0 if job.status != "failed" else 1


def _cancel(args: argparse.Namespace) -> int:
    from service.jobs import cancel_job

    engine = _engine()
    cancel_job(engine, args.job, _user_id(engine, args.user))
    print(f"job #{args.job} cancelled; its runner stops at its next step")
    return 0


def wait_for_job(engine, job_id: int, *, poll_seconds: float = 0.5, stop: threading.Event | None = None,
                 out=sys.stderr):
    """Poll job ``job_id`` until it is done, failed or cancelled, with a tqdm bar of its progress on
    ``out``; returns the finished job row, or None once ``stop`` is set (Ctrl-C: :func:`interrupt_event`)."""
    from tqdm import tqdm

    from db import repository
    from db.session import session_scope

    stop = stop or threading.Event()
    with tqdm(desc=f"job #{job_id}", unit="map", file=out, leave=False) as bar:
        while not stop.is_set():
            with session_scope(engine, readonly=True) as s:
                job = repository.get_job(s, job_id)
            if job.progress_total and bar.total != job.progress_total:
                bar.total = job.progress_total
            bar.n = job.progress_done
            bar.set_postfix_str(job.message or job.status, refresh=False)
            bar.refresh()
            if job.status in FINISHED:
                return job
            stop.wait(poll_seconds)
    return None


@contextmanager
def interrupt_event():
    """An Event that SIGINT (Ctrl-C) sets instead of raising KeyboardInterrupt, for the block.

    A KeyboardInterrupt can land anywhere, e.g. between creating a job and the ``try`` that would
    cancel it, or inside a database transaction; a flag is read only where the caller looks."""
    stop = threading.Event()
    # signal handlers live in the main thread; an ignored SIGINT (nohup, a background job) stays ignored
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _precompute(args: argparse.Namespace) -> int:
    from service.jobs import cancel_job, job_runner, start_explain_job

    runner = job_runner()
    if args.detach and runner != "worker":
        raise ValueError("--detach needs SOFTCAM_JOB_RUNNER=worker and `softcam worker` processes; with the "
                         "embedded runner the job runs in this process, which must stay until it ends")
    model = Path(args.model).expanduser()
    if not model.is_file():
        raise ValueError(f"{args.model}: no such checkpoint")
    engine = _engine()
    user_id = _user_id(engine, args.user)
    params = {"model": str(model.resolve()), "cohort": args.cohort,
              "methods": [m.strip() for m in args.methods.split(",") if m.strip()],
              "target": args.target, "split": args.split, "limit": args.limit}
    with interrupt_event() as stop:
        job_id = start_explain_job(engine, params, user_id)
        where = "queued for `softcam worker`" if runner == "worker" else "running in this process"
        print(f"precompute job #{job_id} {where}", flush=True)
        if args.detach:
            print(f"follow it with `softcam jobs show {job_id}`")
            return 0
        job = wait_for_job(engine, job_id, poll_seconds=args.poll, stop=stop)
    if job is None:  # Ctrl-C
        if runner == "worker":  # the workers go on without this terminal
            print(f"\njob #{job_id} goes on in the workers: `softcam jobs show {job_id}`; "
                  f"`softcam jobs cancel {job_id} --user {args.user}` stops it", file=sys.stderr)
        else:  # the job's thread dies with this process: record why it stopped
            cancel_job(engine, job_id, user_id)
            print(f"\njob #{job_id} cancelled; the maps computed so far stay cached", file=sys.stderr)
        return 130
    if job.status == "done":
        print(f"job #{job_id} done: {job.message}")
        return 0
    print(f"job #{job_id} {job.status}: {job.error or job.message or ''}", file=sys.stderr)
    return 1


def register_cli(subparsers) -> None:
    """Add the ``jobs`` command group."""
    from service.jobs import EXPLAIN_TARGETS
    from service.worker import WORKER_KINDS
    from softcam_core.data import STANDARD_SPLITS

    jobs = subparsers.add_parser("jobs", help="list, follow, cancel or start database jobs (cohort metrics, "
                                 "training, precomputed maps)")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    lst = sub.add_parser("list", help="the newest jobs: label, kind, progress, message or error")
    lst.add_argument("--kind", choices=WORKER_KINDS)
    lst.add_argument("--status", choices=("queued", "running", *FINISHED))
    lst.add_argument("--limit", type=int, default=20, help="at most this many (default %(default)s)")
    lst.set_defaults(func=_list)
    show = sub.add_parser("show", help="one job and its worker chunks (exit 1 if it failed)")
    show.add_argument("job", type=int, metavar="ID")
    show.set_defaults(func=_show)
    cancel = sub.add_parser("cancel", help="cancel a queued or running job (researchers and admins)")
    cancel.add_argument("job", type=int, metavar="ID")
    cancel.add_argument("--user", required=True, help="account that cancels: a researcher or admin")
    cancel.set_defaults(func=_cancel)
    pre = sub.add_parser(
        "precompute", help="compute a cohort's maps into the database cache Review reads (the Review page's "
                           "Precompute); waits for the job unless --detach")
    pre.add_argument("--cohort", required=True)
    pre.add_argument("--model", required=True, metavar="CKPT", help="checkpoint whose maps are computed")
    pre.add_argument("--methods", required=True,
                     help="comma-separated: softcam (the evidence maps), post-hoc methods, cascam:<base>")
    pre.add_argument("--target", choices=tuple(EXPLAIN_TARGETS), default="pred",
                     help="pred: the predicted class, which Review opens on (default); all: every class")
    pre.add_argument("--split", choices=("all", *STANDARD_SPLITS), default="all")
    pre.add_argument("--limit", type=int, default=None, help="the first N images only")
    pre.add_argument("--user", required=True,
                     help="account the job runs as: a researcher or admin (`softcam users add`)")
    pre.add_argument("--detach", action="store_true",
                     help="return once enqueued (needs SOFTCAM_JOB_RUNNER=worker)")
    pre.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the job's progress")
    pre.set_defaults(func=_precompute)
