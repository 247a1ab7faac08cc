"""Cohort metrics against the boxes in the database (db/evaluation.py): the adapter evaluate_cohort
reads, on SQLite and PostgreSQL (``db_env``), with a real synthetic cohort and a real tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from annotations.geometry import Box, boxes_to_mask

COHORT = "ward"


@pytest.fixture
def ward(db_env, synth_cohort):
    """The shared 24-image fundus cohort imported into the database (images, labels, splits, COCO boxes)."""
    from db.session import session_scope
    from service.cohorts import register_cohort_folder

    folder = synth_cohort("fundus")
    from db import repository

    with session_scope(db_env) as s:
        register_cohort_folder(s, folder, COHORT, modality="fundus")
        repository.create_user(s, "ann", "annotator")
    return folder


def _source(engine, **kw):
    from db.evaluation import load_database_cohort
    from db.session import session_scope

    with session_scope(engine, readonly=True) as s:
        return load_database_cohort(s, COHORT, **kw)


def _live_boxes(engine, image_id):
    from db import repository
    from db.session import session_scope

    with session_scope(engine) as s:
        return [(a.id, a.version, repository.annotation_geometry(a)) for a in repository.list_annotations(s, image_id)
                if a.kind == "box"]


def test_boxes_in_the_database_are_the_ground_truth(ward, db_env):
    from db import repository
    from db.session import session_scope
    from softcam_core.data import CohortFolder

    folder = CohortFolder(ward)
    source = _source(db_env)
    assert source.classes == folder.classes == ["healthy", "diseased"]
    assert len(source.split("all")) == 24 and source.unlabeled_left_out == {}
    assert [r.split for r in source.split("all")] == [r.split for r in folder.split("all")]
    assert [source.classes[r.label_index] for r in source.split("all")] == [r.label for r in folder.split("all")]
    assert len(source.split("test")) == len(folder.split("test"))
    with pytest.raises(ValueError, match="no split named 'holdout'"):
        source.split("holdout")

    # a diseased image: its imported boxes (the folder's annotations.json) are its mask
    record, original = next((r, o) for r, o in zip(source.split("all"), folder.split("all")) if len(folder.boxes(o.stem)))
    height, width = record.height, record.width
    expected = boxes_to_mask([Box(*b) for b in folder.boxes(original.stem)], height, width)
    assert expected.any()
    assert np.array_equal(source.mask(record.stem), expected)
    assert np.array_equal(source.mask(record.path.stem), expected)  # the stored file's stem names it too

    # delete every imported box, draw one: the mask is exactly the drawn box; deleted boxes are gone
    drawn = Box(10, 20, 50, 40)
    with session_scope(db_env) as s:
        for annotation_id, version, _ in _live_boxes(db_env, record.image_id):
            repository.delete_annotation(s, annotation_id, "ann", expected_version=version)
        repository.save_annotation(s, record.image_id, drawn, "drusen", "ann")
    source = _source(db_env)
    mask = source.mask(record.stem)
    assert mask.shape == (height, width) and mask.sum() == 40 * 20
    assert mask[20:40, 10:50].all()
    # label filter: the drawn box is 'drusen'; no other label has boxes on this image
    assert _source(db_env, box_label="drusen").mask(record.stem).sum() == 800
    assert not _source(db_env, box_label="lesion").mask(record.stem).any()
    # an image without boxes: all false, like a folder image without a mask file
    bare = next(r for r in source.split("all") if not source.boxes(r.stem))
    assert source.mask(bare.stem).shape == (bare.height, bare.width) and not source.mask(bare.stem).any()


def test_unlabeled_images_are_left_out_when_their_class_is_needed(ward, db_env):
    from db import repository
    from db.evaluation import evaluation_source, ground_truth_text, label_needed
    from db.session import session_scope

    with session_scope(db_env) as s:
        images = repository.list_images(s, COHORT, split="test")
        for image in images[:2]:
            image.label = None
        test_images = len(images)
    assert label_needed("label", ["activation_precision"], 2)
    assert label_needed("disease", ["activation_consistency"], 2)
    assert label_needed("disease", ["topk"], 5)
    assert not label_needed("disease", ["topk", "deletion"], 2) and not label_needed("pred", ["topk"], 5)

    left_out = _source(db_env)
    assert left_out.unlabeled_left_out == {"test": 2}
    assert left_out.summary("test")["images"] == test_images - 2
    assert left_out.summary("all")["unlabeled_left_out"] == 2

    kept = _source(db_env, include_unlabeled=True)
    assert kept.classes == ["healthy", "diseased", "(unlabeled)"]
    unlabeled = [r for r in kept.split("test") if r.unlabeled]
    assert len(unlabeled) == 2 and all(kept.classes[r.label_index] == "(unlabeled)" for r in unlabeled)

    params = {"cohort": COHORT, "ground_truth": "database", "split": "test", "limit": None, "target": "disease"}
    with session_scope(db_env, readonly=True) as s:
        _, summary = evaluation_source(s, dict(params, metrics=["activation_consistency"]), 2)
        assert summary["images"] == test_images - 2 and summary["unlabeled_left_out"] == 2
        _, summary = evaluation_source(s, dict(params, metrics=["activation_precision"]), 2)
        assert summary["images"] == test_images and summary["unlabeled"] == 2
        assert summary["with_boxes"] == sum(1 for r in kept.split("test") if kept.boxes(r.stem))
        text = ground_truth_text(dict(params, ground_truth_summary=summary))
        assert text == f"database boxes ({summary['with_boxes']} of {test_images} images with boxes)"
    # a cohort whose train images lost their labels: changed in a transaction that is rolled back after
    from sqlalchemy.orm import Session

    with Session(db_env) as s:
        for image in repository.list_images(s, COHORT, split="train"):
            image.label = None
        s.flush()
        with pytest.raises(ValueError, match="no image to score in split 'train'.*no class label"):
            evaluation_source(s, dict(params, split="train", metrics=["activation_consistency"]), 2)
        s.rollback()


def test_evaluate_cohort_scores_maps_against_database_boxes(ward, db_env, tiny_checkpoint, tmp_path):
    """Activation precision of three images, by hand: a full-image box (precision 1 for Grad-CAM, which is
    non-negative), no box (undefined, 'empty annotation mask') and one drawn box (sum of the positive map
    over the box mapped to the model input, divided by the sum of the positive map)."""
    from db import repository
    from db.session import session_scope
    from softcam_core.evaluate import EvalSettings, evaluate_cohort
    from softcam_core.explain import explain
    from softcam_core.imaging import load_image, preprocess
    from softcam_core.models import load_checkpoint

    full, empty, partial = _source(db_env).split("all")[:3]
    drawn = Box(30, 25, 80.5, 70)
    with session_scope(db_env) as s:
        for record in (full, empty, partial):
            for annotation_id, version, _ in _live_boxes(db_env, record.image_id):
                repository.delete_annotation(s, annotation_id, None, expected_version=version)
        repository.save_annotation(s, full.image_id, Box(0, 0, full.width, full.height), "lesion", None)
        repository.save_annotation(s, partial.image_id, drawn, "lesion", None)
        doomed = repository.save_annotation(s, empty.image_id, Box(0, 0, 64, 64), "lesion", None)
        repository.delete_annotation(s, doomed.id, None, expected_version=doomed.version)

    model, meta = load_checkpoint(tiny_checkpoint("fundus"))
    settings = EvalSettings(metrics=("activation_precision",), split="all", limit=3, figures=False, png=False,
                            resamples=50)
    result = evaluate_cohort(model, meta, _source(db_env), ["gradcam"], None, tmp_path / "out", settings=settings)
    # rows are keyed by the stored file's stem (today) or the pseudonym: both name the record
    source = _source(db_env)
    rows = result.per_image.set_index(result.per_image["image"].map(lambda i: source.record(i).stem))
    assert list(rows.index) == [full.stem, empty.stem, partial.stem]
    assert rows.loc[full.stem, "activation_precision"] == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(rows.loc[empty.stem, "activation_precision"])
    assert "empty annotation mask" in rows.loc[empty.stem, "notes"]

    image = load_image(partial.path)
    x, geometry = preprocess(image, meta["img_size"], meta["mean"], meta["std"])
    sal = explain(model.eval(), x.unsqueeze(0), "gradcam", target=[1]).detach().float().numpy()[0]
    positive = np.maximum(sal, 0)
    box_on_input = geometry.mask_to_input(boxes_to_mask([drawn], image.height, image.width))
    assert 0 < box_on_input.sum() < box_on_input.size
    expected = float((positive * box_on_input).sum() / positive.sum())
    assert 0 < expected < 1
    assert rows.loc[partial.stem, "activation_precision"] == pytest.approx(expected, rel=1e-4)
    assert rows.loc[partial.stem, "label"] in ("healthy", "diseased")


def test_the_evaluate_command_is_handed_the_database_cohort_opener(ward, db_env):
    """db/cli.py gives `softcam evaluate` the opener of database cohorts (for `--cohort NAME`), which reads
    SOFTCAM_DB_URL; softcam_core itself never imports db."""
    from db.evaluation import DatabaseCohort, open_database_cohort
    from softcam_core.cli import build_parser
    from softcam_core.evaluate import EvalSettings

    args = build_parser().parse_args(["evaluate", "--model", "m.pt", "--data", "d", "--methods", "softcam",
                                      "--out", "o"])
    assert args.open_database_cohort is open_database_cohort
    source, summary = args.open_database_cohort(COHORT, {"classes": ["healthy", "diseased"]},
                                                EvalSettings(split="test", limit=3, metrics=("topk",)))
    assert isinstance(source, DatabaseCohort) and source.name == COHORT
    assert summary["images"] == 3 and summary["with_boxes"] == sum(1 for r in source.split("test")[:3] if source.boxes(r.stem))
    with pytest.raises(ValueError, match="database cohort 'ward': no split named 'holdout'"):
        open_database_cohort(COHORT, {"classes": ["healthy", "diseased"]}, EvalSettings(split="holdout"))


def test_softcam_evaluate_cohort_scores_a_database_cohort_from_the_command_line(ward, db_env, tiny_checkpoint,
                                                                                 tmp_path, capsys):
    """`softcam evaluate --cohort NAME`: rows named by pseudonym, a full-image box gives precision 1; bad
    combinations of --data / --cohort / --annotations / --box-label exit non-zero with one line."""
    import pandas as pd

    from db import repository
    from db.session import session_scope
    from softcam_core.cli import main

    first = _source(db_env).split("all")[0]
    with session_scope(db_env) as s:
        for annotation_id, version, _ in _live_boxes(db_env, first.image_id):
            repository.delete_annotation(s, annotation_id, None, expected_version=version)
        repository.save_annotation(s, first.image_id, Box(0, 0, first.width, first.height), "lesion", None)
        pseudonym = repository.get_image(s, first.image_id).pseudonym
    checkpoint = str(tiny_checkpoint("fundus"))
    out = tmp_path / "out"
    status = main(["evaluate", "--model", checkpoint, "--cohort", COHORT, "--methods", "gradcam", "--out", str(out),
                   "--split", "all", "--limit", "2", "--metrics", "activation_precision", "--no-figures",
                   "--bootstrap", "50", "--box-label", "lesion"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert f"cohort {COHORT}: 2 images, 1 with boxes" in printed
    rows = pd.read_csv(out / "per_image.csv", dtype={"image": str}).set_index("image")
    assert rows.loc[pseudonym, "activation_precision"] == pytest.approx(1.0, abs=1e-6)

    for extra, message in ((["--data", str(ward)], "either --data DIR"),
                           (["--annotations", str(ward / "annotations.json")], "--annotations replaces")):
        assert main(["evaluate", "--model", checkpoint, "--cohort", COHORT, "--methods", "gradcam",
                     "--out", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--model", checkpoint, "--data", str(ward), "--methods", "gradcam",
                 "--out", str(tmp_path / "bad"), "--box-label", "lesion"]) == 2
    assert "use it with --cohort" in capsys.readouterr().err
