"""``softcam worker`` processes drain an evaluation job from the database (SQLite and the PostgreSQL
service): each chunk is claimed and done once, a chunk whose worker died (its lease ran out) is
recovered by another worker and counted once, Cancel stops the work, and the merged tables are the
ones a single in-process evaluation writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.plugins.app import prepare_home
from tests.plugins.blocking import fifo_in_place_of, wait_until, writer_once_read

METHODS = ["softcam", "gradcam"]
METRICS = ["topk", "activation_precision", "deletion"]
N_IMAGES = 10
CHUNK_IMAGES = 3  # 10 images -> chunks of 3, 3, 3, 1


@pytest.fixture(autouse=True)
def _one_thread_like_the_workers():
    """This process computes at the worker processes' one thread (OMP_NUM_THREADS=1 below), so that
    tables computed here and there are comparable: another thread count sums the maps in another
    order (~1e-7), which reorders the near-tied grid cells of the barely trained 64 px model's
    upsampled maps and with them the deletion order (AUDC ~1e-3 apart, seen on some CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def queued(db_env, tmp_path, monkeypatch):
    """A home with a synthetic cohort and a tiny model in the test database, and one evaluation job
    enqueued for workers (the app's own code with SOFTCAM_JOB_RUNNER=worker)."""
    from db import repository
    from db.session import session_scope
    from service import jobs

    home = tmp_path / "home"
    monkeypatch.setenv("SOFTCAM_HOME", str(home))
    prepared = prepare_home(home, n_images=N_IMAGES)
    with session_scope(db_env) as s:
        researcher = repository.create_user(s, "ada", "researcher", password="ada-password-123").id
    monkeypatch.setenv("SOFTCAM_JOB_RUNNER", "worker")
    monkeypatch.setattr(jobs, "WORKER_CHUNK_IMAGES", CHUNK_IMAGES)
    params = {"model": str(prepared["model"]), "cohort": prepared["cohort"], "ground_truth": "database",
              "folder": None, "box_label": None, "annotator": None, "methods": METHODS, "metrics": METRICS,
              "split": "all", "limit": None, "target": "disease"}
    job_id = jobs.start_evaluation_job(db_env, params, researcher)
    env = dict(os.environ, SOFTCAM_HOME=str(home), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return {"engine": db_env, "job": job_id, "params": params, "home": home, "env": env}


def _state(engine, job_id):
    from db import repository
    from db.queue import chunks_of
    from db.session import session_scope

    with session_scope(engine, readonly=True) as s:
        job = repository.get_job(s, job_id)
        chunks = [(c.index, c.status, c.attempt, c.worker) for c in chunks_of(s, job_id)]
        return job.status, job.progress_done, job.progress_total, job.result_path, chunks


def _one_process_tables(queued, tmp_path) -> pd.DataFrame:
    """The same evaluation run in this process, in one go (the in-process runner's path)."""
    from db.evaluation import evaluation_source
    from db.session import session_scope
    from service.jobs import run_evaluation

    with session_scope(queued["engine"], readonly=True) as s:
        source, _ = evaluation_source(s, queued["params"], ["healthy", "disease"])
    run_evaluation(queued["params"], source, tmp_path / "one", None, figures=False)
    return pd.read_csv(tmp_path / "one" / "per_image.csv")


def _without_timings(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in table.columns if c != "seconds"]].reset_index(drop=True)


def test_two_worker_processes_drain_one_job_each_chunk_once(queued, tmp_path):
    command = [sys.executable, "-m", "softcam_core", "worker", "--once", "--poll", "0.2", "--jobs", "evaluate"]
    workers = [subprocess.Popen(command, env=queued["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    status, done, total, result_path, chunks = _state(queued["engine"], queued["job"])
    assert status == "done" and done == total == N_IMAGES * len(METHODS)
    assert [(index, state, attempt) for index, state, attempt, _ in chunks] == [(k, "done", 1) for k in range(4)]
    # every chunk was run by exactly one of the two processes, once
    runs = [line for out, _ in outputs for line in out.splitlines() if line.endswith((": done", ": done; job merged"))]
    assert sorted(int(line.split(" chunk ")[1].split(":")[0]) for line in runs) == [0, 1, 2, 3]
    per_image = pd.read_csv(Path(result_path) / "per_image.csv")
    assert len(per_image) == N_IMAGES * len(METHODS) and not per_image.duplicated(["image", "method"]).any()
    assert (Path(result_path) / "cohort.csv").is_file() and (Path(result_path) / "paired.csv").is_file()
    pd.testing.assert_frame_equal(_without_timings(per_image), _without_timings(_one_process_tables(queued, tmp_path)),
                                  check_exact=False, rtol=1e-5, atol=1e-6)


def test_a_worker_killed_mid_chunk_is_recovered_by_another_and_nothing_is_counted_twice(queued, tmp_path):
    import signal

    from db import repository
    from db.queue import chunks_of
    from db.schema import utcnow
    from db.session import session_scope

    engine = queued["engine"]
    with session_scope(engine, readonly=True) as s:
        stems = repository.get_job(s, queued["job"]).params["images"]
        records = repository.list_images(s, None)
        paths = {r.pseudonym: repository.image_path(r) for r in records} | {
            repository.image_path(r).stem: repository.image_path(r) for r in records}
    # chunk 0 is stems[0:3]; its second image becomes a FIFO, so the first worker reads stems[0] and then
    # blocks reading stems[1]: it is killed there, mid-chunk, at a point the test controls
    command = [sys.executable, "-m", "softcam_core", "worker", "--once", "--poll", "0.2", "--jobs", "evaluate"]
    with fifo_in_place_of(paths[stems[1]]):
        log = open(tmp_path / "first-worker.log", "w")  # a file: a full pipe nobody reads would block it
        first = subprocess.Popen(command + ["--lease", "5"], env=queued["env"], stdout=log, stderr=subprocess.STDOUT)
        try:
            writer = writer_once_read(paths[stems[1]], lambda: first.poll() is None, "the first worker")
            # blocked inside its claim: chunk 0 is running under its lease, its first image read
            with session_scope(engine, readonly=True) as s:
                held = chunks_of(s, queued["job"])[0]
            assert (held.status, held.attempt) == ("running", 1) and held.worker.split(":")[1] == str(first.pid)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=60)
            os.close(writer)
        finally:
            if first.poll() is None:
                first.kill()
            log.close()
    assert first.returncode == -signal.SIGKILL
    with session_scope(engine, readonly=True) as s:
        dead = chunks_of(s, queued["job"])
        assert [c.status for c in dead] == ["running", "queued", "queued", "queued"]
        expires = dead[0].lease_expires_at
    wait_until(lambda: utcnow() > expires, "the killed worker's lease to run out", timeout=60)

    second = subprocess.run(command, env=queued["env"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    status, done, total, result_path, chunks = _state(engine, queued["job"])
    assert status == "done", second.stdout
    # progress counts every unit once, the killed attempt's included nowhere
    assert done == total == N_IMAGES * len(METHODS)
    assert [(index, state, attempt) for index, state, attempt, _ in chunks] == [
        (0, "done", 2), (1, "done", 1), (2, "done", 1), (3, "done", 1)]
    assert {worker.split(":")[1] for _, _, _, worker in chunks} == {str(_logged_pid(second))}
    per_image = pd.read_csv(Path(result_path) / "per_image.csv")
    assert len(per_image) == N_IMAGES * len(METHODS) and not per_image.duplicated(["image", "method"]).any()
    pd.testing.assert_frame_equal(_without_timings(per_image), _without_timings(_one_process_tables(queued, tmp_path)),
                                  check_exact=False, rtol=1e-5, atol=1e-6)


def _logged_pid(finished: subprocess.CompletedProcess) -> int:
    """The pid a finished worker logged (``worker host:pid:start: ...``)."""
    line = next(line for line in finished.stdout.splitlines() if line.startswith("worker "))
    return int(line.split()[1].split(":")[1])


def test_a_dead_workers_expired_claim_is_recovered_and_its_late_completion_refused(queued, tmp_path):
    from db.queue import LeaseLost, claim, complete
    from service.worker import run_worker

    engine = queued["engine"]
    # a worker claims chunk 0 and dies: its row stays "running" under a lease nobody renews
    dead = claim(engine, "dead-host:4242:1", ["evaluate"], lease_seconds=0.05)
    assert dead.index == 0 and dead.attempt == 1
    time.sleep(0.2)
    lines: list[str] = []
    assert run_worker(engine, ["evaluate"], once=True, worker="live-host:1:1", log=lines.append) == 4
    status, _, _, result_path, chunks = _state(engine, queued["job"])
    assert status == "done"
    assert [(index, state, attempt, worker) for index, state, attempt, worker in chunks] == [
        (0, "done", 2, "live-host:1:1"), (1, "done", 1, "live-host:1:1"), (2, "done", 1, "live-host:1:1"),
        (3, "done", 1, "live-host:1:1")]
    # the dead worker, back from the dead, cannot complete what it no longer holds
    with pytest.raises(Exception) as excinfo:
        complete(engine, dead, "/nowhere")
    assert isinstance(excinfo.value, LeaseLost) or "is done" in str(excinfo.value)
    per_image = pd.read_csv(Path(result_path) / "per_image.csv")
    assert len(per_image) == N_IMAGES * len(METHODS) and not per_image.duplicated(["image", "method"]).any()
    pd.testing.assert_frame_equal(_without_timings(per_image), _without_timings(_one_process_tables(queued, tmp_path)),
                                  check_exact=False, rtol=1e-5, atol=1e-6)


def test_cancel_stops_the_worker_and_nothing_more_is_claimed(queued):
    from db import repository
    from db.queue import claim, heartbeat
    from db.repository.base import JobFinishedError
    from db.session import session_scope
    from service.worker import run_worker

    engine = queued["engine"]
    held = claim(engine, "w1:1:1", ["evaluate"])
    with session_scope(engine) as s:
        repository.cancel_job(s, queued["job"], None)
    with pytest.raises(JobFinishedError, match="cancelled"):
        heartbeat(engine, held, done=1)
    assert run_worker(engine, ["evaluate"], once=True, worker="w2:1:1", log=lambda _: None) == 0
    status, _, _, _, chunks = _state(engine, queued["job"])
    assert status == "cancelled" and [state for _, state, _, _ in chunks] == ["running", "queued", "queued", "queued"]


def test_the_app_only_enqueues_when_workers_are_configured(queued):
    status, done, total, result_path, chunks = _state(queued["engine"], queued["job"])
    assert status == "queued" and (done, total) == (0, N_IMAGES * len(METHODS)) and result_path is None
    assert [(index, state, attempt) for index, state, attempt, _ in chunks] == [(k, "queued", 0) for k in range(4)]


def test_the_worker_units_in_docs_deploy_claim_every_kind_of_job_the_app_enqueues():
    """The compose and systemd units a lab copies from docs/deploy.md: with SOFTCAM_JOB_RUNNER=worker
    the app enqueues every kind of job, so a unit that leaves one out leaves those jobs queued forever."""
    import re

    from service.worker import WORKER_KINDS
    from softcam_core.cli import build_parser

    text = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```(?:yaml|ini)\n(.*?)```", text, flags=re.S)
    commands = [line.split("softcam worker", 1)[1].split("#")[0].split()
                for block in blocks for line in block.splitlines() if "softcam worker" in line]
    assert len(commands) >= 3  # compose worker, compose GPU worker, systemd template
    for argv in commands:
        args = build_parser().parse_args(["worker", *argv])
        assert sorted(args.jobs.split(",")) == sorted(WORKER_KINDS), argv
