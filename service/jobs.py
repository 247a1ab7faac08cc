"""Background work (cohort metrics, training, precomputed maps) whose progress lives in the database jobs table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


# ----------------------------------------------------------------------------------- jobs in the database
# Each function takes the SQLAlchemy engine of the database the jobs live in (the pages pass theirs,
# the CLI and tests theirs) and opens its own short transactions.


def job_label(job, *, status: bool = True) -> str:
    """One line naming a job: ``#id · cohort · model · methods · ground truth · status · created``.

    ``status=False`` for a select box: Streamlit keeps showing the label a select box's chosen
    option had when it was picked, so a status in it would go stale while the job runs."""
    params = job.params or {}
    when = job.created_at.strftime("%Y-%m-%d %H:%M") if job.created_at else ""
    what = params.get("cohort") or params.get("name") or ""
    model = Path(params["model"]).stem if params.get("model") else ""
    truth = ""
    if job.kind == "evaluate":
        from db.evaluation import ground_truth_text

        truth = ground_truth_text(params)
    resumed = f"resumes #{params['resumed_from']}" if params.get("resumed_from") else ""
    parts = [f"#{job.id}", what, model, ", ".join(params.get("methods", [])), truth, resumed,
             job.status if status else "", when]
    return " · ".join(p for p in parts if p)


def job_callbacks(engine, job_id: int):
    """``(report, finish_with, fail)`` writing to the job row; each raises :class:`JobCancelled`
    once the row is finished elsewhere (cancelled on a page), which stops the worker."""
    from db import repository
    from db.session import session_scope

    def update(**fields) -> None:
        try:
            with session_scope(engine) as s:
                repository.update_job(s, job_id, **fields)
        except repository.JobFinishedError as exc:
            raise JobCancelled(str(exc)) from None

    def report(done: int, total: int, message: str) -> None:
        update(done=done, total=total, message=message, status="running")

    def finish_with(fields_of):
        """The ``finish`` callback: marks the job done with ``fields_of(result)`` (a dict)."""
        return lambda result: update(status="done", **fields_of(result))

    def fail(message: str) -> None:
        update(status="failed", error=message)

    return report, finish_with, fail


def evaluation_folder(job) -> Path:
    """Where an ``evaluate`` job writes its tables: its own folder, or the one of the job it resumes."""
    from softcam_core.paths import softcam_home

    return Path((job.params or {}).get("out_dir") or softcam_home() / "evaluations" / f"job-{job.id}")


def resumable(job, jobs: list) -> bool:
    """Whether ``job`` (one of ``jobs``) is a cancelled or failed evaluation that no queued, running
    or finished job has continued yet."""
    if job.kind != "evaluate" or job.status not in ("cancelled", "failed"):
        return False
    folder = evaluation_folder(job)
    return not any(other.id != job.id and other.status in ("queued", "running", "done")
                   and evaluation_folder(other) == folder for other in jobs)


def start_evaluation_job(engine, params: dict | None, user_id: int | None, *, resume: int | None = None) -> int:
    """Create an ``evaluate`` job row and run ``evaluate_cohort`` in a background thread; returns its id.

    ``params["ground_truth"]``: ``"database"`` scores against the cohort's boxes in the database
    (read once, now: :func:`db.evaluation.evaluation_source`), ``"folder"`` against the cohort
    folder's ``masks/``. The job row records the choice and a summary (images, how many with boxes).

    ``resume``: the id of a cancelled or failed evaluation to continue instead (``params`` unused):
    same parameters, same folder, and the image × method pairs it finished are kept
    (``evaluate_cohort(resume=True)``). Refused with ValueError when another job already continues
    it, or when the cohort's labels or boxes changed since it started (the rows would mix two
    ground truths). ``user_id`` must be a researcher or admin (:mod:`service.access`)."""
    from db import repository
    from db.evaluation import DatabaseCohort, evaluation_source
    from db.session import session_scope
    from service.catalogue import checkpoint_info

    from service.access import require

    with session_scope(engine, readonly=True) as s:
        require(s, user_id, "run_jobs")
    previous = None
    if resume is not None:
        with session_scope(engine, readonly=True) as s:
            jobs = repository.list_jobs(s, "evaluate")
        previous = next((job for job in jobs if job.id == resume), None)
        if previous is None or not resumable(previous, jobs):
            raise ValueError(f"evaluation #{resume} cannot be resumed: only a cancelled or failed evaluation "
                             "that no other job has continued can be")
        params = dict(previous.params, resumed_from=resume, out_dir=str(evaluation_folder(previous)))
    classes = checkpoint_info(params["model"]).meta.get("classes", [])
    with session_scope(engine, readonly=True) as s:
        source, summary = evaluation_source(s, params, list(classes))
    # folder masks are files the app never edits; database boxes can change between a job and its resume
    digest = (source.digest(params.get("split", "test"), params.get("limit"))
              if isinstance(source, DatabaseCohort) else None)
    if previous is not None and digest is not None:
        recorded = previous.params.get("ground_truth_digest")
        if recorded is None:
            raise ValueError(f"evaluation #{resume} did not record the boxes it was scored against; "
                             "start a new evaluation")
        if digest != recorded:
            raise ValueError(f"the labels or boxes of cohort {params.get('cohort')!r} changed since evaluation "
                             f"#{resume} started; start a new evaluation")
    params = dict(params, ground_truth=params.get("ground_truth") or "folder", ground_truth_summary=summary,
                  ground_truth_digest=digest)
    if job_runner() == "worker":  # workers run it: the job row and its chunks are all the app writes
        from softcam_core.evaluate import image_stems

        stems = image_stems(source, params.get("split", "test"), params.get("limit"))
        if not stems:
            raise ValueError(f"cohort {params.get('cohort')!r}: no image in split {params.get('split')!r}")
        return enqueue_for_workers(engine, "evaluate", dict(params, images=stems), user_id, stems,
                                   len(params["methods"]))
    with session_scope(engine) as s:
        job = repository.create_job(s, "evaluate", params=params, user=user_id,
                                    message="queued", worker=repository.this_worker())
        out_dir = evaluation_folder(job)
        job_id = job.id
    report, finish_with, fail = job_callbacks(engine, job_id)

    def work(progress):
        return run_evaluation(params, source, out_dir, progress, resume=previous is not None)

    finish = finish_with(lambda result: {"result_path": str(out_dir),
                                         "message": f"{len(result.per_image)} image × method rows"})
    run_in_background(work, report=report, finish=finish, fail=fail, name=f"evaluate-{job_id}")
    return job_id


# Jobs run in a thread of the app process (the embedded default), or by `softcam worker` processes
# that claim them from the database (SOFTCAM_JOB_RUNNER=worker: the app then only enqueues)
JOB_RUNNERS = ("thread", "worker")
WORKER_CHUNK_IMAGES = 8  # images per chunk of an evaluation run by workers


def enqueue_for_workers(engine, kind: str, params: dict, user_id: int | None, images: Sequence,
                        units_per_image: int) -> int:
    """A ``kind`` job row for ``softcam worker`` processes, cut into chunks of :data:`WORKER_CHUNK_IMAGES`
    of ``images`` (each chunk's ``params["images"]``); returns the job id."""
    from db import repository
    from db.queue import enqueue
    from db.session import session_scope

    images = list(images)
    parts = [({"images": images[k:k + WORKER_CHUNK_IMAGES]}, len(images[k:k + WORKER_CHUNK_IMAGES]) * units_per_image)
             for k in range(0, len(images), WORKER_CHUNK_IMAGES)]
    with session_scope(engine) as s:
        job = repository.create_job(s, kind, params=params, user=user_id,
                                    message=f"queued for workers ({len(parts)} chunk(s))")
        enqueue(s, job, parts)
        return job.id


def job_runner() -> str:
    """``"thread"`` (default) or ``"worker"``, from ``SOFTCAM_JOB_RUNNER``."""
    import os

    runner = os.environ.get("SOFTCAM_JOB_RUNNER", "thread").strip().lower() or "thread"
    if runner not in JOB_RUNNERS:
        raise ValueError(f"SOFTCAM_JOB_RUNNER={runner!r}: choose one of {', '.join(JOB_RUNNERS)}")
    return runner


def run_evaluation(params: dict, source, out_dir: Path, progress, *, resume: bool = False,
                   images: Sequence[str] | None = None, figures: bool = True):
    """``evaluate_cohort`` of an ``evaluate`` job's ``params`` on ``source`` into ``out_dir``
    (``images``: only those stems, one worker chunk)."""
    from service.catalogue import load_model
    from softcam_core.evaluate import EvalSettings, evaluate_cohort

    model, meta = load_model(params["model"])
    settings = EvalSettings(split=params["split"], limit=params.get("limit"), target=params["target"], png=False,
                            figures=figures, images=tuple(images) if images is not None else None)
    return evaluate_cohort(model, meta, source, params["methods"], params["metrics"], out_dir,
                           progress=progress, resume=resume, settings=settings)


def load_evaluation(result_path: str | Path):
    """The tables of a finished evaluation folder (per_image, cohort, paired, deletion curves), or None."""
    import pandas as pd

    from annotations.cells import restore_frame
    from softcam_core.evaluate import EvaluationResult

    folder = Path(result_path)
    if not (folder / "per_image.csv").is_file():
        return None

    def read(name: str) -> pd.DataFrame:
        path = folder / name
        return restore_frame(pd.read_csv(path, dtype={"image": str})) if path.is_file() else pd.DataFrame()

    files = {p.stem + ("" if p.suffix == ".csv" else p.suffix): p for p in sorted(folder.rglob("*"))
             if p.is_file() and p.suffix in (".csv", ".parquet", ".html", ".png")}
    return EvaluationResult(folder, read("per_image.csv"), read("cohort.csv"), read("paired.csv"),
                            read("deletion_curves.csv"), files)


def start_training_job(engine, params: dict, user_id: int | None) -> int:
    """Create a ``train`` job row and run ``softcam_core.training.train`` in a background thread; the
    step callback stores ``epoch/step`` progress in the job row, so the Models page shows it live.
    ``params``: ``data`` (a cohort folder) or ``cohort`` (a labelled database cohort), ``arch``,
    ``head``, ``l1``, ``l2``, ``epochs``, ``img_size``, ``name``."""
    import re

    from db import repository
    from db.session import session_scope
    from softcam_core.paths import models_dir

    from service.access import require

    with session_scope(engine, readonly=True) as s:
        require(s, user_id, "run_jobs")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", params["name"]).strip("._") or "model"
    out = models_dir() / f"{name}.pt"
    if out.exists():
        raise ValueError(f"{out.name}: a checkpoint with this name exists; choose another name")
    if job_runner() == "worker":
        from db.queue import enqueue

        with session_scope(engine) as s:
            job = repository.create_job(s, "train", params=dict(params, out=str(out)), user=user_id,
                                        message="queued for a worker")
            enqueue(s, job, [({}, 1)])
            return job.id
    with session_scope(engine) as s:
        job = repository.create_job(s, "train", params=dict(params, out=str(out)), user=user_id,
                                    total=params["epochs"], message="starting", worker=repository.this_worker())
        job_id = job.id
    report, finish_with, fail = job_callbacks(engine, job_id)

    def work(progress):
        return run_training(engine, dict(params, out=str(out)), user_id, progress)

    finish = finish_with(lambda result: {"result_path": str(out), "message": f"saved {out.name}"})
    run_in_background(work, report=report, finish=finish, fail=fail, name=f"train-{job_id}")
    return job_id


def run_training(engine, params: dict, user_id: int | None, progress):
    """``softcam_core.training.train`` of a ``train`` job's ``params`` (``out``: the checkpoint),
    reporting ``progress(done, total, message)`` in steps."""
    from softcam_core.training import train

    out = Path(params["out"])

    def on_step(epoch: int, step: int, metrics: dict) -> None:
        steps = int(metrics.get("steps") or 1)
        epochs = int(metrics.get("epochs") or params["epochs"])
        # epoch and step count from 0; an epoch row arrives after the epoch's last step
        done = epoch * steps + step + 1 if metrics.get("phase") == "train" else (epoch + 1) * steps
        summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                            if isinstance(v, float) and k not in ("lr", "epoch"))
        progress(min(done, epochs * steps), epochs * steps, f"epoch {epoch + 1}/{epochs} · {summary}")

    data = params.get("data")
    if params.get("cohort"):  # a labelled database cohort: its saved split (assigned and saved when it has none)
        from db.evaluation import open_training_cohort

        data = open_training_cohort(params["cohort"], engine=engine, user=user_id)
    return train(data, out, arch=params["arch"], head=params["head"], l1=params["l1"],
                 l2=params["l2"], epochs=params["epochs"], img_size=params["img_size"], progress=on_step,
                 show_progress=False)


# ------------------------------------------------------------------------------------ explain (precompute maps)
EXPLAIN_TARGETS = {"pred": "the predicted class", "all": "every class"}


@dataclass
class ExplainSummary:
    """What an ``explain`` job (or one worker chunk of it) did: images covered, maps now in the cache,
    how many it computed (the rest were cached before), and the images it could not explain
    (``pseudonym: reason``)."""

    images: int = 0
    maps: int = 0
    computed: int = 0
    failed: list[str] = field(default_factory=list)

    def text(self) -> str:
        return (f"{self.maps} maps of {self.images} images ready ({self.computed} computed, "
                f"{self.maps - self.computed} were cached)")

    def failure(self) -> str | None:
        """The job's error when some images failed (their maps are missing, the others' are cached)."""
        if not self.failed:
            return None
        return f"{self.text()}; {len(self.failed)} image(s) failed: {'; '.join(self.failed)}"

    def to_json(self) -> str:
        import json

        return json.dumps({"images": self.images, "maps": self.maps, "computed": self.computed,
                           "failed": self.failed})

    @classmethod
    def read(cls, path: str | Path) -> "ExplainSummary":
        import json

        return cls(**json.loads(Path(path).read_text()))

    @classmethod
    def combined(cls, parts: Sequence["ExplainSummary"]) -> "ExplainSummary":
        """One summary of a job's chunks."""
        return cls(sum(p.images for p in parts), sum(p.maps for p in parts), sum(p.computed for p in parts),
                   [f for p in parts for f in p.failed])


def explain_folder(job_id: int) -> Path:
    """Where the worker chunks of ``explain`` job ``job_id`` leave their summaries (the maps are in the
    database map cache)."""
    from softcam_core.paths import softcam_home

    return softcam_home() / "explain" / f"job-{job_id}"


def cancel_job(engine, job_id: int, user_id: int | None) -> None:
    """Cancel a queued or running job as ``user_id`` (researchers and admins: the ones who run jobs);
    its runner stops at its next step. Raises ``JobFinishedError`` when it has already finished."""
    from db import repository
    from db.session import session_scope
    from service.access import require

    with session_scope(engine) as s:
        require(s, user_id, "run_jobs")
        repository.cancel_job(s, job_id, user_id)


def explain_image_ids(engine, params: dict) -> list[int]:
    """Database ids of the images an ``explain`` job covers: the cohort's images a reviewer may see
    (quarantined ones are left out), in import order, of ``params["split"]`` (``"all"``: every
    split), at most ``params["limit"]``."""
    from db import repository
    from db.session import session_scope

    split = params.get("split") or "all"
    with session_scope(engine, readonly=True) as s:
        records = repository.list_images(s, params["cohort"], split=None if split == "all" else split,
                                         limit=params.get("limit") or None)
        return [record.id for record in records]


def start_explain_job(engine, params: dict, user_id: int | None) -> int:
    """Create an ``explain`` job that computes ``params["methods"]``' maps of a cohort's images with one
    model into the database map cache, so Review opens them without computing; returns its id.

    ``params``: ``model`` (checkpoint path), ``cohort``, ``methods`` (names of
    ``softcam_core.explain``, CasCAM ``cascam:<base>`` included; ``softcam`` = the evidence maps of the
    forward pass), ``target`` (``"pred"``: the predicted class, which Review opens on; ``"all"``: every
    class), ``split`` (default ``"all"``), ``limit``. Runs in a background thread, or is enqueued for
    ``softcam worker`` processes in chunks of :data:`WORKER_CHUNK_IMAGES` images. Refused with
    ValueError for an unknown method or target, an evidence map of a black-box model, or no image."""
    from db import repository
    from db.session import session_scope
    from service.access import require
    from service.catalogue import checkpoint_info
    from softcam_core.explain.specs import is_method

    with session_scope(engine, readonly=True) as s:
        require(s, user_id, "run_jobs")
    methods = list(dict.fromkeys(params.get("methods") or []))
    unknown = [m for m in methods if not is_method(m)]
    if not methods or unknown:
        raise ValueError(f"choose methods to precompute{': unknown ' + ', '.join(unknown) if unknown else ''}")
    target = params.get("target") or "pred"
    if target not in EXPLAIN_TARGETS:
        raise ValueError(f"target {target!r}: choose one of {', '.join(EXPLAIN_TARGETS)}")
    info = checkpoint_info(params["model"])
    if "softcam" in methods and info.head != "softcam":
        raise ValueError(f"{info.name} is a black-box baseline: it has no SoftCAM evidence maps")
    with session_scope(engine, readonly=True) as s:
        running = [job.id for job in repository.list_jobs(s, "explain") if job.status in ("queued", "running")
                   and (job.params or {}).get("cohort") == params.get("cohort")
                   and (job.params or {}).get("model") == params["model"]]
    if running:
        raise ValueError(f"precompute job #{running[0]} for this cohort and model has not finished yet; wait for "
                         "it or cancel it")
    ids = explain_image_ids(engine, params)
    if not ids:
        raise ValueError(f"cohort {params.get('cohort')!r}: no image in split {params.get('split') or 'all'!r}")
    per_image = len(methods) * (1 if target == "pred" else len(info.meta.get("classes", [])))
    params = dict(params, methods=methods, target=target, split=params.get("split") or "all")
    if job_runner() == "worker":
        return enqueue_for_workers(engine, "explain", dict(params, images=ids), user_id, ids, per_image)
    with session_scope(engine) as s:
        job = repository.create_job(s, "explain", params=dict(params, images=ids), user=user_id,
                                    total=len(ids) * per_image, message="queued", worker=repository.this_worker())
        job_id = job.id
    report, finish_with, fail = job_callbacks(engine, job_id)

    def work(progress):
        summary = run_explain(engine, params, progress, images=ids)
        if summary.failure():  # the maps of the other images stay cached; the job names the failed ones
            raise ValueError(summary.failure())
        return summary

    run_in_background(work, report=report, finish=finish_with(lambda summary: {"message": summary.text()}),
                      fail=fail, name=f"explain-{job_id}")
    return job_id


def run_explain(engine, params: dict, progress: ProgressReport | None, *, images: Sequence[int]) -> ExplainSummary:
    """Compute the maps of an ``explain`` job's ``params`` for the database images ``images`` (ids) into
    the database map cache (``DatabaseMapStore``: the cache Review reads), skipping those already
    there. An image that cannot be read (or was deleted since) is recorded in ``failed`` and the
    others go on. ``progress(done, total, message)`` counts maps (image x method x class)."""
    from db import repository
    from db.session import session_scope
    from service.catalogue import load_model, model_identity, registered_model
    from service.image_session import DatabaseMapStore, ImageSession
    from softcam_core.explain.specs import method_title
    from softcam_core.imaging import ImageLoadError, load_image

    model, meta = load_model(params["model"])
    identity = model_identity(params["model"])
    methods, every_class = list(params["methods"]), params.get("target") == "all"
    classes = list(meta["classes"])
    per_image = len(methods) * (len(classes) if every_class else 1)
    with session_scope(engine) as s:
        model_row = registered_model(s, params["model"])
    summary, done, total = ExplainSummary(), 0, len(images) * per_image
    for image_id in images:
        try:
            with session_scope(engine, readonly=True) as s:
                record = repository.get_image(s, int(image_id))
            image = load_image(repository.image_path(record), name=f"{record.pseudonym}{record.extension}",
                               modality=record.modality)
        except (ImageLoadError, repository.NotFoundError) as exc:
            who = record.pseudonym if isinstance(exc, ImageLoadError) else f"image #{image_id}"
            summary.failed.append(f"{who}: {exc}")
            done += per_image
            if progress is not None:
                progress(done, total, f"{who}: failed")
            continue
        # the database store only: a map in this process's memory is not in the cache Review reads
        session = ImageSession(model, meta, image, identity, store=DatabaseMapStore(engine, model_row, record),
                               memory=False)
        prediction = session.predict()  # caches the logits and, for a SoftCAM net, every class's evidence map
        summary.images += 1
        for method in methods:
            for target in (range(len(classes)) if every_class else [prediction.predicted]):
                if method == "softcam":
                    summary.computed += 0 if session.forward_was_cached else 1
                elif not session.is_cached(method, target):
                    session.explain(method, target)
                    summary.computed += 1
                summary.maps += 1
                done += 1
                if progress is not None:
                    progress(done, total, f"{record.pseudonym} · {method_title(method)} · {classes[target]}")
    return summary
