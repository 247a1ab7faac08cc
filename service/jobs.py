"""Background work (cohort metrics, training) whose progress lives in the database jobs table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

ProgressReport = Callable[[int, int, str], None]  # (done, total, message)


class JobCancelled(Exception):
    """Raised by a job's ``report`` callback when the job was cancelled: the worker stops there."""


def run_in_background(
    work: Callable[[ProgressReport], Any],
    *,
    report: ProgressReport,
    finish: Callable[[Any], None],
    fail: Callable[[str], None],
    min_interval: float = 0.5,
    name: str = "softcam-job",
) -> threading.Thread:
    """Run ``work(progress)`` in a daemon thread; progress, result and failure go to the callbacks.

    ``report`` (e.g. a database update of the job row) is called at most every ``min_interval``
    seconds, plus always for the last step, so a fast loop does not hammer the database.
    ``finish(result)`` runs on success; ``fail(message)`` with a one-line message on any exception
    (``finish`` raising included). A callback raising :class:`JobCancelled` ends the work quietly:
    the job was cancelled, so there is nothing to record. The page polls the job row, so the work
    survives page reloads and browser disconnects.
    """
    last = [0.0]

    def progress(done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= min_interval:
            last[0] = now
            report(int(done), int(total), str(message))

    def target() -> None:
        try:
            finish(work(progress))
        except JobCancelled:
            return
        except BaseException as exc:  # the thread must always leave the job in a final state
            try:
                fail(" ".join(str(exc).split()) or exc.__class__.__name__)
            except JobCancelled:
                return

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread
