"""``explain`` jobs precompute a cohort's maps into the database map cache that Review reads (SQLite and
the PostgreSQL service): in the app's own thread or on ``softcam worker`` processes, maps equal to
computing them on the spot, nothing computed twice, unreadable images named while the others are
done, Cancel honoured (by those who may run jobs)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.plugins.app import prepare_home

N_IMAGES = 4
METHODS = ["softcam", "gradcam", "scorecam"]


@pytest.fixture
def home(db_env, tmp_path, monkeypatch):
    """A synthetic cohort and a tiny SoftCAM model in the test database, and a researcher to run jobs."""
    from db import repository
    from db.session import session_scope

    home = tmp_path / "home"
    monkeypatch.setenv("SOFTCAM_HOME", str(home))
    prepared = prepare_home(home, n_images=N_IMAGES)
    with session_scope(db_env) as s:
        researcher = repository.create_user(s, "ada", "researcher", password="ada-password-123").id
        annotator = repository.create_user(s, "bo", "annotator", password="bo-password-1234").id
    from service import image_session

    image_session._MAP_CACHE.clear()  # each test sees only the database cache
    return dict(prepared, engine=db_env, researcher=researcher, annotator=annotator,
                params={"model": str(prepared["model"]), "cohort": prepared["cohort"], "methods": METHODS,
                        "target": "pred", "split": "all"})


def _finished(engine, job_id: int, timeout: float = 300.0):
    from db import repository
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    while True:
        with session_scope(engine, readonly=True) as s:
            job = repository.get_job(s, job_id)
        if job.status in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} after {timeout:.0f} s"
        time.sleep(0.05)


def _sessions(home, *, skip: int | None = None):
    """A fresh ImageSession (database store, empty memory cache) per cohort image (but image ``skip``),
    and one of the same image without any cache."""
    from db import repository
    from db.session import session_scope
    from service import image_session
    from service.catalogue import load_model, model_identity, registered_model
    from service.image_session import DatabaseMapStore, ImageSession
    from softcam_core.imaging import load_image

    image_session._MAP_CACHE.clear()
    model, meta = load_model(home["model"])
    with session_scope(home["engine"]) as s:
        model_row = registered_model(s, home["model"])
        records = [r for r in repository.list_images(s, home["cohort"]) if r.id != skip]
    for record in records:
        image = load_image(repository.image_path(record), name=f"{record.pseudonym}{record.extension}",
                           modality=record.modality)
        yield (ImageSession(model, meta, image, model_identity(home["model"]),
                            store=DatabaseMapStore(home["engine"], model_row, record)),
               ImageSession(model, meta, image, "uncached-" + record.pseudonym))


def test_a_precompute_job_caches_every_map_review_opens_and_equal_to_computing_it(home):
    from service.jobs import start_explain_job

    job = _finished(home["engine"], start_explain_job(home["engine"], home["params"], home["researcher"]))
    assert job.status == "done", job.error
    maps = N_IMAGES * len(METHODS)
    assert (job.progress_done, job.progress_total) == (maps, maps)
    assert job.message == f"{maps} maps of {N_IMAGES} images ready ({maps} computed, 0 were cached)"
    for cached, fresh in _sessions(home):
        predicted = cached.predict().predicted
        assert cached.forward_was_cached  # no forward pass: the logits and evidence maps came from the job
        for method in METHODS[1:]:
            assert cached.is_cached(method, predicted)
            hit = cached.explain(method, predicted)
            assert hit.cached
            np.testing.assert_allclose(hit.input_map, fresh.explain(method, predicted).input_map, rtol=1e-5, atol=1e-6)
        for hit, computed in zip(cached.evidence_maps(), fresh.evidence_maps()):
            np.testing.assert_allclose(hit.input_map, computed.input_map, rtol=1e-5, atol=1e-6)
        assert not cached.is_cached("gradcam", 1 - predicted)  # only the predicted class was asked for

    again = _finished(home["engine"], start_explain_job(home["engine"], home["params"], home["researcher"]))
    assert again.status == "done" and again.message == f"{maps} maps of {N_IMAGES} images ready (0 computed, " \
                                                       f"{maps} were cached)"


def test_every_class_and_a_split(home):
    from db import repository
    from db.session import session_scope
    from service.jobs import start_explain_job

    with session_scope(home["engine"]) as s:  # the synthetic cohort puts 4 images in train: two go to test
        for record in repository.list_images(s, home["cohort"])[1:3]:
            record.split = "test"
    test_images = 2
    params = dict(home["params"], methods=["gradcam"], target="all", split="test")
    job = _finished(home["engine"], start_explain_job(home["engine"], params, home["researcher"]))
    assert job.status == "done", job.error
    assert job.progress_total == test_images * 2  # two classes
    with session_scope(home["engine"], readonly=True) as s:
        in_test = {r.pseudonym for r in repository.list_images(s, home["cohort"], split="test")}
        assert job.params["images"] == [r.id for r in repository.list_images(s, home["cohort"], split="test")]
    for cached, _ in _sessions(home):
        wanted = cached.image.name.split(".")[0] in in_test
        assert [cached.is_cached("gradcam", c) for c in (0, 1)] == [wanted, wanted]


def test_an_unreadable_image_is_named_and_the_other_images_stay_cached(home):
    from db import repository
    from db.session import session_scope
    from service.jobs import start_explain_job

    with session_scope(home["engine"], readonly=True) as s:
        broken = repository.list_images(s, home["cohort"])[1]
    repository.image_path(broken).write_bytes(b"not an image at all")
    job = _finished(home["engine"], start_explain_job(home["engine"], dict(home["params"], methods=["gradcam"]),
                                                      home["researcher"]))
    assert job.status == "failed"
    assert f"{broken.pseudonym}" in job.error and "1 image(s) failed" in job.error
    assert f"{N_IMAGES - 1} maps of {N_IMAGES - 1} images ready" in job.error
    readable = [cached for cached, _ in _sessions(home, skip=broken.id)]
    assert len(readable) == N_IMAGES - 1
    assert all(c.is_cached("gradcam", c.predict().predicted) for c in readable)


def test_workers_run_precompute_chunks(home, monkeypatch):
    from db.queue import chunks_of
    from db.session import session_scope
    from service import jobs
    from service.worker import run_worker

    monkeypatch.setenv("SOFTCAM_JOB_RUNNER", "worker")
    monkeypatch.setattr(jobs, "WORKER_CHUNK_IMAGES", 3)
    job_id = jobs.start_explain_job(home["engine"], home["params"], home["researcher"])
    with session_scope(home["engine"], readonly=True) as s:
        assert [(c.status, c.units) for c in chunks_of(s, job_id)] == [("queued", 3 * len(METHODS)),
                                                                       ("queued", 1 * len(METHODS))]
    assert run_worker(home["engine"], ["explain"], once=True, worker="w:1:1", log=lambda _: None) == 2
    job = _finished(home["engine"], job_id, timeout=1)
    maps = N_IMAGES * len(METHODS)
    assert job.status == "done" and job.message == f"{maps} maps of {N_IMAGES} images ready ({maps} computed, 0 were cached)"
    assert job.progress_done == job.progress_total == N_IMAGES * len(METHODS)
    for cached, fresh in _sessions(home):
        predicted = cached.predict().predicted
        assert cached.forward_was_cached and cached.is_cached("scorecam", predicted)
        np.testing.assert_allclose(cached.explain("scorecam", predicted).input_map,
                                   fresh.explain("scorecam", predicted).input_map, rtol=1e-5, atol=1e-6)


def test_workers_run_every_chunk_past_an_unreadable_image_and_the_job_names_it(home, monkeypatch):
    from db import repository
    from db.session import session_scope
    from service import jobs
    from service.worker import run_worker

    with session_scope(home["engine"], readonly=True) as s:
        broken = repository.list_images(s, home["cohort"])[0]
    repository.image_path(broken).write_bytes(b"\x89PNG broken")
    monkeypatch.setenv("SOFTCAM_JOB_RUNNER", "worker")
    monkeypatch.setattr(jobs, "WORKER_CHUNK_IMAGES", 2)
    job_id = jobs.start_explain_job(home["engine"], dict(home["params"], methods=["gradcam"]), home["researcher"])
    assert run_worker(home["engine"], ["explain"], once=True, worker="w:1:1", log=lambda _: None) == 2
    job = _finished(home["engine"], job_id, timeout=1)
    assert job.status == "failed" and broken.pseudonym in job.error and "1 image(s) failed" in job.error
    assert job.error.startswith(f"{N_IMAGES - 1} maps of {N_IMAGES - 1} images ready")
    readable = [cached for cached, _ in _sessions(home, skip=broken.id)]
    assert all(c.is_cached("gradcam", c.predict().predicted) for c in readable)


def test_cancel_on_the_page_stops_the_job_at_its_next_map_and_keeps_what_was_computed(home):
    """The first image is a FIFO: the job's thread blocks on it, the job is cancelled, then the image
    is fed: the thread computes that one map, sees the cancel at its progress report, and stops."""
    import threading

    from db import repository
    from db.session import session_scope
    from service.jobs import cancel_job, start_explain_job
    from tests.plugins.blocking import feed, fifo_in_place_of, writer_once_read

    with session_scope(home["engine"], readonly=True) as s:
        first = repository.list_images(s, home["cohort"])[0]
    path = repository.image_path(first)
    with fifo_in_place_of(path) as real:
        job_id = start_explain_job(home["engine"], dict(home["params"], methods=["gradcam"]), home["researcher"])
        thread = next(t for t in threading.enumerate() if t.name == f"explain-{job_id}")
        writer = writer_once_read(path, thread.is_alive, "the job's thread")
        with pytest.raises(Exception, match="cannot run jobs"):
            cancel_job(home["engine"], job_id, home["annotator"])  # only those who run jobs cancel them
        cancel_job(home["engine"], job_id, home["researcher"])
        feed(writer, real.read_bytes())
        thread.join(timeout=300)
    assert not thread.is_alive()
    job = _finished(home["engine"], job_id, timeout=1)
    assert job.status == "cancelled" and job.message == "cancelled by ada"
    cached = [c.is_cached("gradcam", c.predict().predicted) for c, _ in _sessions(home)]
    assert cached == [True] + [False] * (N_IMAGES - 1)


def test_a_map_in_the_apps_memory_is_still_written_to_the_database_cache(home):
    """Review's in-memory cache is keyed by pixels; the job must fill the database cache regardless."""
    from service.catalogue import load_model
    from service.image_session import ImageSession
    from service.jobs import start_explain_job

    model, meta = load_model(home["model"])
    from service.catalogue import model_identity

    cached, _ = next(_sessions(home))
    in_memory = ImageSession(model, meta, cached.image, model_identity(home["model"]))  # no store: memory only
    in_memory.explain("gradcam", in_memory.predict().predicted)
    job = _finished(home["engine"], start_explain_job(home["engine"], dict(home["params"], methods=["gradcam"]),
                                                      home["researcher"]))
    assert job.status == "done" and job.message.endswith(f"({N_IMAGES} computed, 0 were cached)")
    stored, _ = next(_sessions(home))
    stored.memory = False
    assert stored.is_cached("gradcam", stored.predict().predicted)


def test_bad_requests_are_refused_before_any_job_exists(home):
    from db import repository
    from db.session import session_scope
    from service.access import AccessDenied
    from service.jobs import start_explain_job

    engine, params = home["engine"], home["params"]
    with pytest.raises(ValueError, match="unknown nosuchcam"):
        start_explain_job(engine, dict(params, methods=["gradcam", "nosuchcam"]), home["researcher"])
    with pytest.raises(ValueError, match="target 'some'"):
        start_explain_job(engine, dict(params, target="some"), home["researcher"])
    with pytest.raises(ValueError, match="no image in split 'val'"):
        start_explain_job(engine, dict(params, split="val", cohort=_empty_cohort(engine)), home["researcher"])
    from tests.plugins.app import make_tiny_checkpoint

    baseline = make_tiny_checkpoint(home["model"].with_name("baseline.pt"), head="baseline")
    with pytest.raises(ValueError, match="black-box baseline: it has no SoftCAM evidence maps"):
        start_explain_job(engine, dict(params, model=str(baseline)), home["researcher"])
    with pytest.raises(AccessDenied):
        start_explain_job(engine, params, home["annotator"])
    with session_scope(engine, readonly=True) as s:
        assert repository.list_jobs(s, "explain") == []
    first = start_explain_job(engine, dict(params, methods=["gradcam"]), home["researcher"])
    with pytest.raises(ValueError, match=f"precompute job #{first} for this cohort and model has not finished"):
        start_explain_job(engine, params, home["researcher"])
    _finished(engine, first)


def _empty_cohort(engine) -> str:
    from db import repository
    from db.session import session_scope

    with session_scope(engine) as s:
        repository.add_cohort(s, "empty", modality="fundus")
    return "empty"


# ----------------------------------------------------------------------------- softcam jobs (the terminal)


def _cli(*argv: str) -> int:
    from softcam_core.cli import main

    return main(list(argv))


def _precompute_argv(home, *extra: str) -> list[str]:
    return ["jobs", "precompute", "--cohort", home["cohort"], "--model", str(home["model"]), *extra]


def test_softcam_jobs_precompute_waits_for_the_job_and_jobs_list_and_show_report_it(home, capsys):
    from db import repository
    from db.session import session_scope

    assert _cli(*_precompute_argv(home, "--methods", "softcam,gradcam", "--user", "ada")) == 0
    with session_scope(home["engine"], readonly=True) as s:
        (job,) = repository.list_jobs(s, "explain")
    maps = N_IMAGES * 2
    out = capsys.readouterr().out
    assert f"precompute job #{job.id} running in this process" in out
    assert f"job #{job.id} done: {maps} maps of {N_IMAGES} images ready ({maps} computed, 0 were cached)" in out
    assert job.status == "done" and job.user_id == home["researcher"]
    for cached, _ in _sessions(home):
        predicted = cached.predict().predicted
        assert cached.forward_was_cached and cached.is_cached("gradcam", predicted)

    assert _cli("jobs", "list", "--kind", "explain") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"#{job.id} · {home['cohort']}") and f"\texplain\t{maps}/{maps}\t{maps} maps" in line
    assert _cli("jobs", "show", str(job.id)) == 0
    shown = capsys.readouterr().out
    assert "status: done" in shown and f"progress: {maps}/{maps}" in shown


def test_softcam_jobs_refuses_what_the_page_refuses(home, capsys):
    from db import repository
    from db.session import session_scope

    assert _cli(*_precompute_argv(home, "--methods", "gradcam", "--user", "bo")) == 2
    assert "a annotator cannot run jobs" in capsys.readouterr().err
    assert _cli(*_precompute_argv(home, "--methods", "gradcam,nosuchcam", "--user", "ada")) == 2
    assert "unknown nosuchcam" in capsys.readouterr().err
    assert _cli(*_precompute_argv(home, "--methods", "gradcam", "--user", "ada", "--detach")) == 2
    assert "--detach needs SOFTCAM_JOB_RUNNER=worker" in capsys.readouterr().err
    assert _cli("jobs", "precompute", "--cohort", home["cohort"], "--model", "missing.pt", "--methods", "gradcam",
                "--user", "ada") == 2
    assert "missing.pt: no such checkpoint" in capsys.readouterr().err
    with session_scope(home["engine"], readonly=True) as s:
        assert repository.list_jobs(s) == []
    assert _cli(*_precompute_argv(home, "--methods", "gradcam", "--user", "adaa")) == 2
    assert "no account 'adaa': create it with `softcam users add adaa --role researcher`" in capsys.readouterr().err
    with session_scope(home["engine"], readonly=True) as s:
        assert repository.get_user(s, "adaa") is None  # a mistyped name is not made an account
    assert _cli("jobs", "show", "99") == 2
    assert "no job 99" in capsys.readouterr().err


def test_softcam_jobs_precompute_detached_is_run_by_workers_and_cancel_needs_a_runner_of_jobs(home, monkeypatch,
                                                                                              capsys):
    from db import repository
    from db.session import session_scope
    from service import jobs
    from service.worker import run_worker

    monkeypatch.setenv("SOFTCAM_JOB_RUNNER", "worker")
    monkeypatch.setattr(jobs, "WORKER_CHUNK_IMAGES", 3)
    argv = _precompute_argv(home, "--methods", "gradcam", "--user", "ada", "--detach")
    assert _cli(*argv) == 0
    with session_scope(home["engine"], readonly=True) as s:
        (job,) = repository.list_jobs(s, "explain")
    assert f"precompute job #{job.id} queued for `softcam worker`" in capsys.readouterr().out
    assert job.status == "queued"
    assert _cli("jobs", "show", str(job.id)) == 0
    shown = capsys.readouterr().out
    assert "chunk 0: queued, 0/3, attempt 0" in shown and "chunk 1: queued, 0/1, attempt 0" in shown
    assert run_worker(home["engine"], ["explain"], once=True, worker="w:1:1", log=lambda _: None) == 2
    assert _cli("jobs", "show", str(job.id)) == 0
    shown = capsys.readouterr().out
    assert "status: done" in shown and "chunk 0: done, 3/3, attempt 1, w:1:1" in shown

    assert _cli(*_precompute_argv(home, "--methods", "scorecam", "--user", "ada", "--detach")) == 0
    with session_scope(home["engine"], readonly=True) as s:
        second = repository.list_jobs(s, "explain")[0].id
    capsys.readouterr()
    assert _cli("jobs", "cancel", str(second), "--user", "bo") == 2
    assert "a annotator cannot run jobs" in capsys.readouterr().err
    assert _cli("jobs", "cancel", str(second), "--user", "ada") == 0
    assert run_worker(home["engine"], ["explain"], once=True, worker="w:1:1", log=lambda _: None) == 0
    with session_scope(home["engine"], readonly=True) as s:
        cancelled = repository.get_job(s, second)
    assert cancelled.status == "cancelled" and cancelled.message == "cancelled by ada"
    assert _cli("jobs", "cancel", str(second), "--user", "ada") == 2
    assert f"job {second} is cancelled: cancelled by ada" in capsys.readouterr().err


def test_ctrl_c_on_softcam_jobs_precompute_cancels_the_job_it_runs(home):
    """A real ``softcam jobs precompute`` process: its job thread blocks on a FIFO in place of the
    first image, the test sends SIGINT, and the job is recorded as cancelled (its thread dies with
    the process, so it must not stay 'running')."""
    import os
    import signal
    import subprocess
    import sys

    from db import repository
    from db.session import session_scope
    from tests.plugins.blocking import fifo_in_place_of, writer_once_read

    with session_scope(home["engine"], readonly=True) as s:
        path = repository.image_path(repository.list_images(s, home["cohort"])[0])
    with fifo_in_place_of(path):
        proc = subprocess.Popen([sys.executable, "-m", "softcam_core",
                                 *_precompute_argv(home, "--methods", "gradcam", "--user", "ada")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # a suite started in the background (nohup, `&`) passes SIGINT on ignored,
                                # and an ignored SIGINT stays ignored: the child gets it as a terminal would
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        writer = None
        try:
            writer = writer_once_read(path, lambda: proc.poll() is None, "softcam jobs precompute")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            if writer is not None:
                os.close(writer)
    assert proc.returncode == 130, err
    with session_scope(home["engine"], readonly=True) as s:
        (job,) = repository.list_jobs(s, "explain")
    assert "precompute job" in out and f"job #{job.id} cancelled" in err
    assert job.status == "cancelled" and job.message == "cancelled by ada"
