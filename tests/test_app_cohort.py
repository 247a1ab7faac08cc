"""AppTest of the Cohort metrics page scoring against the boxes in the database (drawn or imported),
on a real temporary database, a real synthetic cohort and a real tiny SoftCAM model (``app_home``)."""

from __future__ import annotations

import time

import pytest

from tests.test_app_pages import open_app, texts


def _wait_for_job(timeout: float = 90.0):
    from db import repository
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as s:
            job = repository.list_jobs(s, "evaluate")[0]
        if job.status in ("done", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def test_cohort_without_a_folder_is_scored_against_its_database_boxes(app_home):
    """Images imported into a new cohort (no folder, no labels, no split) and one box drawn on the first
    image covering all of it: the job records the database ground truth, and that image's activation
    precision is 1 (all positive evidence lies in the box) while the others are undefined (no box)."""
    from annotations.geometry import Box
    from db import repository
    from db.session import session_scope

    with session_scope() as s:
        result = repository.import_images(s, [app_home["cohort_dir"] / "images"], "Clinic B")
        assert len(result.accepted) == 6 and not result.rejected
        first = repository.list_images(s, "Clinic B")[0]
        names = {repository.image_path(first).stem, first.pseudonym}  # evaluate keys rows by either
        repository.save_annotation(s, first, Box(0, 0, first.width, first.height), "lesion", None)

    at = open_app("cohort")
    at.selectbox(key="cohort_name").set_value("demo-fundus").run()
    assert at.radio(key="cohort_truth").options == ["Boxes in the database (drawn or imported)",
                                                    "Lesion masks of the cohort folder"]  # demo-fundus has both
    at.selectbox(key="cohort_name").set_value("Clinic B").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Clinic B — 6 images, 1 with boxes" in at.selectbox(key="cohort_name").format_func("Clinic B")
    truth = at.radio(key="cohort_truth")
    assert truth.options == ["Boxes in the database (drawn or imported)"]  # no folder: no masks to offer
    assert truth.value == "database"
    at.multiselect[0].set_value(["softcam"])
    at.multiselect[1].set_value(["activation_precision", "pointing_game", "lesion_occlusion"])
    at.selectbox[2].set_value("all")  # imported images have no split
    at.number_input[0].set_value(3)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)

    job = _wait_for_job()
    assert job.status == "done", job.error
    assert job.params["ground_truth"] == "database" and job.params["folder"] is None
    assert job.params["ground_truth_summary"] == {"images": 3, "with_boxes": 1, "boxes": 1, "with_points": 0, "points": 0,
                                                  "with_regions": 0, "regions": 0, "unlabeled": 3,
                                                  "unlabeled_left_out": 0}
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    label = at.selectbox(key="cohort_job_choice").format_func(job.id)
    assert "Clinic B" in label and "database boxes (1 of 3 images with boxes)" in label
    assert any("Ground truth: database boxes (1 of 3 images with boxes)" in c for c in texts(at.caption))
    assert any(s.value == "Cohort summary" for s in at.subheader)
    # one image annotated, its box the whole image (no same-size control outside): the check says so
    [lesion] = [w for w in texts(at.warning) if "Does the model use the annotated lesions?" in w]
    assert "cannot tell" in lesion and "fewer than 6 annotated images" in lesion
    per_image = next(d.value for d in at.dataframe if "activation_precision" in d.value.columns
                     and "image" in d.value.columns)
    rows = per_image.set_index("image")
    assert len(rows) == 3 and set(rows["label"]) == {"(unlabeled)"}
    stem = next(i for i in rows.index if i in names)
    assert rows.loc[stem, "activation_precision"] == pytest.approx(1.0)
    others = rows.drop(index=stem)
    assert others["activation_precision"].isna().all()
    assert others["notes"].str.contains("empty annotation mask").all()


def test_a_split_with_no_image_is_refused_with_one_line(app_home):
    from db import repository
    from db.session import session_scope

    with session_scope() as s:
        repository.import_images(s, [app_home["cohort_dir"] / "images"], "Clinic C")
    at = open_app("cohort")
    at.selectbox(key="cohort_name").set_value("Clinic C").run()
    at.button[0].click().run()  # default split: test; these images have none
    assert not at.exception, [e.value for e in at.exception]
    assert texts(at.error) == ["Could not start the evaluation: database cohort 'Clinic C': no image to score in "
                               "split 'test' (its images have no split; choose 'all')"]
    with session_scope() as s:
        assert repository.list_jobs(s, "evaluate") == []


def test_folder_cohort_can_still_be_scored_against_its_lesion_masks(app_home):
    from softcam_core.data import CohortFolder

    folder = CohortFolder(app_home["cohort_dir"])
    with_masks = sum(1 for r in folder.split("all")[:3] if folder.mask(r.stem) is not None)
    at = open_app("cohort")
    at.selectbox(key="cohort_name").set_value("demo-fundus").run()
    at.radio(key="cohort_truth").set_value("folder").run()
    at.multiselect[0].set_value(["softcam"])
    at.multiselect[1].set_value(["activation_precision"])
    at.selectbox[2].set_value("all")
    at.number_input[0].set_value(3)
    at.button[0].click().run()
    assert not at.exception and not at.error, texts(at.error)
    job = _wait_for_job()
    assert job.status == "done", job.error
    assert job.params["ground_truth"] == "folder" and job.params["folder"] == str(app_home["cohort_dir"])
    assert job.params["ground_truth_summary"] == {"images": 3, "with_masks": with_masks}
    at.run()
    assert any(f"Ground truth: folder masks ({with_masks} of 3 images with a mask)" in c for c in texts(at.caption))
    per_image = next(d.value for d in at.dataframe if "image" in d.value.columns)
    assert list(per_image["image"]) == [r.stem for r in folder.split("all")[:3]]  # folder stems, not hashes
