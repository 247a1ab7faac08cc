"""Bring your own labelled data: `softcam images label`, stratified saved splits, point annotations
as ground truth, and `softcam evaluate --cohort` scoring real images with the true class.

Runs on the real EyePACS / RSNA images of ``../shared/data/real`` against SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from softcam_core.cli import main
from softcam_core.evaluate import POINTS_ONLY, EvalSettings, score_map
from softcam_core import metrics as M

KAGGLE_GRADES = "fundus_kaggle_dr/labels/softcam_kaggle_gradable_test__subset.csv"
STUDY_POINTS = "fundus_kaggle_dr/labels/annotation_task_outcome.csv"


@pytest.fixture
def kaggle(real_data, db_env, session):
    """The 15 EyePACS photos imported (de-identified) into cohort ``kaggle``, unlabelled."""
    from db import repository

    result = repository.import_images(session, [real_data / "fundus_kaggle_dr" / "images"], "kaggle")
    assert len(result.accepted) == 15 and not result.rejected
    session.commit()
    return session


def grades(real_data: Path) -> pd.DataFrame:
    return pd.read_csv(real_data / KAGGLE_GRADES)


def test_kaggle_grades_label_the_cohort_as_dr_onset_with_history(kaggle, real_data):
    from db import repository

    session = kaggle
    repository.get_or_create_user(session, "dr_reader", role="researcher")
    result = repository.import_labels(session, "kaggle", real_data / KAGGLE_GRADES, user="dr_reader",
                                      source="grades.csv")
    table = grades(real_data)
    assert result.layout == "kaggle_dr" and result.changed == 15 and not result.problems
    # the documented mapping: grade 0 -> healthy, 1-4 -> diseased, i.e. SoftCAM's onset1 column
    assert result.counts == {"healthy": int((table.level == 0).sum()), "diseased": int((table.level > 0).sum())}
    assert (table.onset1 == (table.level > 0)).all()
    cohort = repository.get_cohort(session, "kaggle")
    assert [c.name for c in sorted(cohort.labels, key=lambda c: c.position)] == ["healthy", "diseased"]
    resolver = repository.CohortResolver(session, cohort)
    for _, row in table.iterrows():
        image = repository.get_image(session, resolver(row.image).key)
        assert image.label == ("diseased" if row.level > 0 else "healthy")
    # re-labelling one image by hand is versioned: who, when, previous value
    image = repository.get_image(session, resolver("26127_right").key)
    repository.set_image_label(session, image, "healthy", user="dr_reader", source="edit")
    history = repository.label_history(session, image)
    assert [(h.field, h.before, h.after, h.source) for h in history] == [
        ("label", None, "diseased", "csv kaggle_dr"), ("label", "diseased", "healthy", "edit")]
    assert history[0].user_id == history[1].user_id == repository.get_user(session, "dr_reader").id
    assert history[0].at <= history[1].at
    # importing the same file again changes only what differs, and records it
    again = repository.import_labels(session, "kaggle", real_data / KAGGLE_GRADES)
    assert (again.changed, again.unchanged) == (1, 14)
    assert [h.after for h in repository.label_history(session, image)] == ["diseased", "healthy", "diseased"]


def test_unknown_names_change_nothing_unless_partial(kaggle, real_data, tmp_path):
    from db import repository

    session = kaggle
    study = real_data / "fundus_kaggle_dr" / "labels" / "annotation_task_dataset.csv"  # 65 names, 1 imported
    with pytest.raises(repository.LabelImportError) as caught:
        repository.import_labels(session, "kaggle", study)
    assert len(caught.value.problems) == 64 and caught.value.resolved == 1
    assert "no image '21025_right.png' in cohort 'kaggle'" in str(caught.value)
    assert repository.label_counts(session, repository.get_cohort(session, "kaggle")) == {"": 15}
    result = repository.import_labels(session, "kaggle", study, partial=True)
    assert result.layout == "kaggle_dr" and result.changed == 1 and len(result.problems) == 64  # gt_level -> onset
    # bad values and contradicting rows are listed with their line
    bad = tmp_path / "bad.csv"
    bad.write_text("image,level\n650_left,7\n5139_left,2\n5139_left.png,0\n")
    with pytest.raises(repository.LabelImportError) as caught:
        repository.import_labels(session, "kaggle", bad)
    assert [line for line, _ in caught.value.problems] == [2, 4]
    assert "level '7' is not one of 0, 1, 2, 3, 4" in caught.value.problems[0][1]
    with pytest.raises(repository.RepositoryError, match="no label column"):
        repository.import_labels(session, "kaggle", b"image,grade\n650_left,1\n")


def test_the_cli_labels_by_rsna_patient_id_and_by_image_id(real_data, db_env, tmp_path, capsys):
    from db import repository
    from db.session import session_scope

    assert main(["images", "import", str(real_data / "cxr_rsna_png" / "images"), "--cohort", "rsna"]) == 0
    labels = real_data / "cxr_rsna_png" / "stage_2_train_labels.csv"
    assert main(["images", "label", "--cohort", "rsna", "--labels", str(labels), "--classes", "normal,pneumonia"]) == 0
    out = capsys.readouterr().out
    assert "(rsna layout)" in out and "pneumonia 4" in out
    with session_scope(db_env) as session:
        ids = [i.id for i in repository.list_images(session, "rsna")]
    by_id = tmp_path / "by_id.csv"
    by_id.write_text("image_id,label\n" + f"{ids[0]},normal\n" + "999999,normal\n")
    assert main(["images", "label", "--cohort", "rsna", "--labels", str(by_id)]) == 1
    err = capsys.readouterr().err
    assert "line 3: no image '999999'" in err and "nothing changed" in err
    assert main(["images", "label", "--cohort", "rsna", "--labels", str(by_id), "--partial"]) == 0
    with session_scope(db_env) as session:
        labels = {i.id: i.label for i in repository.list_images(session, "rsna")}
    assert labels[ids[0]] == "normal" and sorted(labels.values()) == ["normal", "pneumonia", "pneumonia", "pneumonia"]


def test_stratified_splits_are_saved_and_deterministic(kaggle, real_data):
    from db import repository

    session = kaggle
    repository.import_labels(session, "kaggle", real_data / KAGGLE_GRADES)
    table = repository.assign_splits(session, "kaggle", (0.6, 0.2, 0.2), seed=3)
    # 11 diseased, 4 healthy: every class is in every split, in proportion
    assert table == {"diseased": {"train": 7, "val": 2, "test": 2}, "healthy": {"train": 2, "val": 1, "test": 1}}
    first = {i.id: i.split for i in repository.list_images(session, "kaggle")}
    assert repository.assign_splits(session, "kaggle", (0.6, 0.2, 0.2), seed=99) == table  # kept: already split
    assert {i.id: i.split for i in repository.list_images(session, "kaggle")} == first
    repository.assign_splits(session, "kaggle", (0.6, 0.2, 0.2), seed=3, overwrite=True)
    assert {i.id: i.split for i in repository.list_images(session, "kaggle")} == first
    with pytest.raises(repository.RepositoryError, match="summing to 1"):
        repository.assign_splits(session, "kaggle", (0.5, 0.2, 0.2))


def test_the_clinician_study_points_import_per_annotator(kaggle, real_data):
    from db import repository
    from db.schema import Annotation

    session = kaggle
    path = real_data / STUDY_POINTS
    with pytest.raises(repository.AnnotationImportError):  # 64 of its 65 images are not in the cohort
        repository.import_annotations(session, path, "points", "kaggle")
    result = repository.import_annotations(session, path, "points", "kaggle", skip_unknown_images=True)
    study = pd.read_csv(path)
    ours = study[study.filename == "26127_right"]
    assert result.added == len(ours) and result.images == 1
    assert sum(result.report.unknown.values()) == len(study) - len(ours)
    rows = session.query(Annotation).filter(Annotation.kind == "point").all()
    got = sorted((r.author.username, r.label, r.geometry["x"], r.geometry["y"]) for r in rows)
    assert got == sorted(zip(ours.participant, ours.label, ours.x.astype(float), ours.y.astype(float)))
    again = repository.import_annotations(session, path, "points", "kaggle", skip_unknown_images=True)
    assert (again.added, again.duplicates) == (0, len(ours))


def test_point_region_pins():
    region = M.point_region([(2.5, 1.5)], (4, 5), 0)
    assert region.sum() == 1 and region[1, 2]
    # radius 1 around a pixel centre: the 4-neighbourhood (diagonal centres are sqrt(2) away)
    region = M.point_region([(2.5, 1.5)], (4, 5), 1.0)
    assert sorted(zip(*np.nonzero(region))) == [(0, 2), (1, 1), (1, 2), (1, 3), (2, 2)]
    # a point on a pixel corner lies in the pixel below-right of it; radius 0.75 reaches the 4 around the corner
    assert sorted(zip(*np.nonzero(M.point_region([(2.0, 2.0)], (4, 4), 0.75)))) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert not M.point_region([(9.0, 1.0), (-0.5, 1.0)], (4, 4), 2).any()  # cropped away
    with pytest.raises(ValueError):
        M.point_region([(1, 1)], (4, 4), -1)


def test_points_score_where_and_leave_area_metrics_undefined():
    sal = np.zeros((28, 28), dtype=np.float32)
    sal[20, 5] = 1.0  # the peak
    settings = EvalSettings(metrics=("topk", "pointing_game", "activation_precision", "iou_top"), topk=(1,))
    mask = np.zeros_like(sal, dtype=bool)
    near = M.point_region([(6.0, 19.0)], sal.shape, 2.0)  # 1.4 px from the peak's centre
    values, reasons = score_map(sal, mask, 1, settings, 7, "softcam", near)
    assert values["pointing_game"] == 1.0 and values["topk_precision_k1"] == 1.0
    assert np.isnan(values["activation_precision"]) and reasons["activation_precision"] == POINTS_ONLY
    far = M.point_region([(25.0, 3.0)], sal.shape, 2.0)
    values, _ = score_map(sal, mask, 1, settings, 7, "softcam", far)
    assert values["pointing_game"] == 0.0 and values["topk_precision_k1"] == 0.0
    # with a box as well, the area metrics use the box alone
    box = np.zeros_like(mask)
    box[18:23, 3:8] = True
    values, reasons = score_map(sal, box, 1, settings, 7, "softcam", far)
    assert values["activation_precision"] == 1.0 and values["pointing_game"] == 1.0


def test_evaluate_a_labelled_database_cohort_against_its_points(kaggle, real_data, tmp_path, capsys):
    """The whole path on real images: label, split, import the study's points, import a torchvision
    model, evaluate the held-out split with the true class as target."""
    from db import repository

    session = kaggle
    repository.import_labels(session, "kaggle", real_data / KAGGLE_GRADES)
    repository.import_annotations(session, real_data / STUDY_POINTS, "points", "kaggle", skip_unknown_images=True)
    session.commit()
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    model = tmp_path / "dr.pt"
    assert main(["models", "import", "--arch", "resnet18", "--weights", str(weights), "--classes", "healthy,diseased",
                 "--img-size", "96", "--modality", "fundus", "--mean", "0.5", "--std", "0.25", "--to-softcam",
                 "--out", str(model)]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--cohort", "kaggle", "--split", "all", "--methods",
                 "softcam,sanity:centre", "--target", "label", "--metrics", "topk,pointing_game,activation_precision",
                 "--topk", "1,3", "--point-radius", "3", "--bootstrap", "50", "--no-figures", "--out", str(out)]) == 0
    assert "15 images, 0 with boxes, 1 with points" in capsys.readouterr().out
    rows = pd.read_csv(out / "per_image.csv")
    truth = {("diseased" if g > 0 else "healthy") for g in grades(real_data).level}
    assert set(rows.label) == truth and (rows.target == rows.label).all()  # the true class is the target
    scored = rows[rows.pointing_game.notna()]
    assert len(scored) == 2 and scored.label.eq("diseased").all()  # only 26127_right has points
    assert scored.activation_precision.isna().all() and scored.notes.str.contains("point annotations only").all()
    # a cohort whose labels are not the model's classes is refused instead of scoring the wrong class
    repository.set_image_label(session, repository.list_images(session, "kaggle")[0], "referable")
    session.commit()
    assert main(["evaluate", "--model", str(model), "--cohort", "kaggle", "--split", "all", "--methods", "softcam",
                 "--target", "label", "--no-figures", "--out", str(tmp_path / "eval2")]) == 2
    assert "labels that are not classes of the model (referable" in capsys.readouterr().err
