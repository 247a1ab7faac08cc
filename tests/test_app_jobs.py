"""Background jobs in the app (AppTest, real temporary database): a running evaluation or training is
cancelled from its page and its worker thread stops at its next progress report; a job left
"running" by an app process that stopped is closed as interrupted when the app starts again."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tests.test_app_pages import open_app, texts


def _start_gated_job(kind: str, params: dict, gate: threading.Event, steps: list[int]):
    """A job row run by the app's own job machinery (``service.jobs.job_callbacks`` and
    ``run_in_background``) whose work reports 10 steps and waits at step 2 until ``gate`` opens,
    so the page sees it running for as long as the test needs."""
    from db import repository
    from db.session import session_scope
    from pages import common
    from service.jobs import job_callbacks, run_in_background

    with session_scope() as s:
        job_id = repository.create_job(s, kind, total=10, params=params, worker=repository.this_worker()).id
    report, finish_with, fail = job_callbacks(common.engine(), job_id)

    def work(progress):
        for step in range(1, 11):
            progress(step, 10, f"step {step}")
            steps.append(step)
            if step == 2:
                gate.wait(60)
        return "finished"

    thread = run_in_background(work, report=report, finish=finish_with(lambda result: {"message": result}),
                                      fail=fail, min_interval=0.0)
    deadline = time.monotonic() + 30
    while steps != [1, 2] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert steps == [1, 2]
    return job_id, thread


@pytest.mark.parametrize("page, kind, button", [("cohort", "evaluate", "cohort_cancel_{}"),
                                                ("models", "train", "train_cancel_{}")])
def test_a_running_job_is_cancelled_from_its_page_and_its_worker_stops(app_home, page, kind, button):
    from db import repository
    from db.session import session_scope

    params = {"model": str(app_home["model"]), "cohort": app_home["cohort"], "methods": ["scorecam"],
              "metrics": ["deletion_auc"], "ground_truth": "folder", "name": "cancel-me"}
    gate, steps = threading.Event(), []
    job_id, thread = _start_gated_job(kind, params, gate, steps)
    try:
        at = open_app(page)
        assert any("Running: 2/10" in p.text or "step 2" in p.text for p in at.get("progress")), \
            [p.text for p in at.get("progress")]
        at.button(key=button.format(job_id)).click().run()
        assert not at.exception, [e.value for e in at.exception]
    finally:
        gate.set()
    thread.join(10)
    assert not thread.is_alive()
    assert steps == [1, 2]  # step 3's report found the job cancelled: the work stopped there
    with session_scope() as s:
        job = repository.get_job(s, job_id)
    assert (job.status, job.message, job.progress_done, job.error) == ("cancelled", "cancelled by admin", 2, None)
    assert job.finished_at is not None

    at.run()
    assert not at.exception and not at.error, texts(at.error)
    shown = texts(at.info)
    if page == "cohort":
        assert "Evaluation cancelled by admin after 2/10 image × method." in shown
        assert not at.get("progress") and not any(s.value == "Cohort summary" for s in at.subheader)
    else:
        assert any(f"#{job_id}" in t and t.endswith("cancelled by admin") for t in shown), shown
    with pytest.raises(KeyError):
        at.button(key=button.format(job_id))  # nothing left to cancel


def test_a_job_left_running_by_a_stopped_app_process_is_closed_when_the_app_starts(app_home):
    """The worker recorded is that of a real process that has exited, as after a server restart."""
    from db import repository
    from db.session import session_scope

    dead = subprocess.run([sys.executable, "-c", "from db.repository import this_worker; print(this_worker())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    params = {"model": str(app_home["model"]), "cohort": app_home["cohort"], "methods": ["gradcam"],
              "metrics": ["pointing_game"], "ground_truth": "folder"}
    with session_scope() as s:
        job_id = repository.create_job(s, "evaluate", total=12, params=params, worker=dead).id
        repository.update_job(s, job_id, status="running", done=7)

    at = open_app("cohort")
    assert not at.get("progress")
    errors = texts(at.error)
    assert len(errors) == 1 and errors[0].startswith(f"Evaluation failed: interrupted: the app process that ran "
                                                     f"it ({dead}) stopped before it finished (7/12 done)"), errors
    assert any(c.startswith("Status: **failed**") for c in texts(at.caption)), texts(at.caption)


def _cancelled_evaluation(app_home, ground_truth: str, done_methods: list[str]) -> tuple[int, dict]:
    """An evaluation job over the demo cohort (softcam + gradcam, every split) as a cancel leaves it:
    the real ``evaluate_cohort`` ran ``done_methods`` into the job's folder, then the job was cancelled."""
    from db import repository
    from db.evaluation import evaluation_source
    from db.session import session_scope
    from pages import common
    from service.catalogue import load_model
    from softcam_core.evaluate import EvalSettings, evaluate_cohort

    params = {"model": str(app_home["model"]), "cohort": app_home["cohort"], "ground_truth": ground_truth,
              "folder": str(app_home["cohort_dir"]), "box_label": None, "methods": ["softcam", "gradcam"],
              "metrics": ["activation_precision", "pointing_game"], "split": "all", "limit": None,
              "target": "disease"}
    with session_scope(readonly=True) as s:
        source, summary = evaluation_source(s, params, 2)
    digest = source.digest("all") if ground_truth == "database" else None
    with session_scope() as s:
        job = repository.create_job(s, "evaluate", total=12, worker=repository.this_worker(),
                                    params=dict(params, ground_truth_summary=summary, ground_truth_digest=digest))
        job_id = job.id
        folder = common.evaluation_folder(job)
    if done_methods:
        model, meta = load_model(params["model"])
        evaluate_cohort(model, meta, source, done_methods, params["metrics"], folder,
                        progress=lambda *a: None, settings=EvalSettings(split="all", target="disease", png=False))
    with session_scope() as s:
        repository.update_job(s, job_id, status="running", done=6)
        repository.cancel_job(s, job_id)
    return job_id, params


def _wait_done(job_id: int, timeout: float = 120.0):
    from db import repository
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as s:
            job = repository.get_job(s, job_id)
        if job.status in ("done", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.3)


def test_a_cancelled_evaluation_resumes_in_its_folder_keeping_the_rows_it_finished(app_home):
    import pandas as pd

    from pages import common

    old_id, _ = _cancelled_evaluation(app_home, "folder", ["softcam"])
    folder = app_home["cohort_dir"].parents[1] / "evaluations" / f"job-{old_id}"
    before = pd.read_csv(folder / "per_image.csv")
    assert sorted(before["method"].unique()) == ["softcam"] and len(before) == 6

    at = open_app("cohort")
    assert "Evaluation cancelled after 6/12 image × method." in texts(at.info)
    at.button(key=f"cohort_resume_{old_id}").click().run()
    assert not at.exception and not at.error, texts(at.error)
    new_id = at.session_state["cohort_job"]
    assert new_id != old_id
    job = _wait_done(new_id)
    assert job.status == "done", job.error
    assert job.params["resumed_from"] == old_id and job.result_path == str(folder)

    after = pd.read_csv(folder / "per_image.csv")
    assert sorted(after.groupby("method").size().items()) == [("gradcam", 6), ("softcam", 6)]
    # the softcam rows are the ones the cancelled job wrote, not recomputed (their timings would differ)
    kept = after[after["method"] == "softcam"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[before.columns], before, check_dtype=False)

    at.run()
    assert any(s.value == "Cohort summary" for s in at.subheader)
    assert f"resumes #{old_id}" in at.selectbox(key="cohort_job_choice").format_func(new_id)
    at.selectbox(key="cohort_job_choice").set_value(old_id).run()
    with pytest.raises(KeyError):
        at.button(key=f"cohort_resume_{old_id}")  # continued already: no second resume into the folder
    with pytest.raises(ValueError, match=f"evaluation #{old_id} cannot be resumed"):
        common.start_evaluation_job(None, common.User(1, "admin", "admin"), resume=old_id)


def test_resuming_is_refused_when_the_boxes_changed_since_the_evaluation_started(app_home):
    from annotations.geometry import Box
    from db import repository
    from db.session import session_scope

    old_id, _ = _cancelled_evaluation(app_home, "database", [])
    with session_scope() as s:
        image = repository.list_images(s, app_home["cohort"])[0]
        repository.save_annotation(s, image, Box(1, 1, 9, 9), "lesion", None)

    at = open_app("cohort")
    at.button(key=f"cohort_resume_{old_id}").click().run()
    assert texts(at.error) == [f"Could not resume: the labels or boxes of cohort {app_home['cohort']!r} changed "
                               f"since evaluation #{old_id} started; start a new evaluation"]
    with session_scope() as s:
        assert [j.id for j in repository.list_jobs(s, "evaluate")] == [old_id]  # nothing started
