"""Inter-annotator agreement: the matching, F1 and Cohen's κ pinned on hand-computed cases, and
`softcam annotations agreement` on the Sparse-BagNet clinician study's real points (three
annotators on EyePACS 26127_right), against SQLite and PostgreSQL."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from annotations.agreement import box_iou_matrix, cohen_kappa, match_boxes, match_points
from annotations.geometry import box_iou
from softcam_core.cli import main

STUDY_POINTS = "fundus_kaggle_dr/labels/annotation_task_outcome.csv"


def test_point_matching_maximises_pairs_then_minimises_distance():
    # nearest-first would pair (4,0)-(3,0) and leave the others 7 px apart: 1 match; the one-to-one
    # matching with the most pairs is (0,0)-(3,0) and (4,0)-(7,0), both 3 px: 2 matches, F1 1
    m = match_points([(0, 0), (4, 0)], [(3, 0), (7, 0)], tolerance=3.5)
    assert m.pairs == ((0, 0), (1, 1)) and m.f1 == 1.0
    # among maximal matchings the closer partner wins
    assert match_points([(0, 0)], [(2, 0), (1, 0)], tolerance=5).pairs == ((0, 1),)
    # the tolerance is inclusive; beyond it there is no pair
    assert match_points([(0, 0)], [(3, 4)], tolerance=5).matched == 1
    assert match_points([(0, 0)], [(3, 4)], tolerance=4.99).matched == 0
    # only the same label matches: 1 of 2 here, F1 = 2 * 1 / (2 + 2)
    m = match_points([(0, 0), (10, 10)], [(0, 1), (10, 11)], 2, ["MA", "EX"], ["MA", "HE"])
    assert m.pairs == ((0, 0),) and m.f1 == 0.5
    assert math.isnan(match_points(np.zeros((0, 2)), np.zeros((0, 2)), 3).f1)
    assert match_points([(1, 1)], np.zeros((0, 2)), 3).f1 == 0.0


def test_box_matching_by_iou():
    a, b = [(0, 0, 10, 10)], [(5, 0, 15, 10)]  # overlap 5 x 10 = 50, union 150: IoU 1/3
    assert box_iou_matrix(a, b)[0, 0] == pytest.approx(1 / 3) == box_iou(a[0], b[0])
    assert match_boxes(a, b, iou=0.3).matched == 1 and match_boxes(a, b, iou=0.5).matched == 0
    # one box of A overlapping two of B is matched once, to the better one
    m = match_boxes([(0, 0, 10, 10)], [(2, 0, 12, 10), (0, 0, 10, 9)], iou=0.5)
    assert m.pairs == ((0, 1),) and m.f1 == pytest.approx(2 / 3)
    assert match_boxes([(0, 0, 10, 10)], [(0, 0, 10, 10)], 0.5, ["a"], ["b"]).matched == 0
    with pytest.raises(ValueError, match="IoU threshold"):
        match_boxes(a, b, iou=1.5)


def test_cohen_kappa_pins():
    # p_o 3/4; p_a 1/2, p_b 1/4: p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2; κ = (3/4 - 1/2) / (1 - 1/2) = 1/2
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    assert cohen_kappa([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert cohen_kappa([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))  # chance agreement 1: undefined
    assert math.isnan(cohen_kappa([], []))


def _study(session, real_data):
    from db import repository
    from db.repository.annotation_files import import_annotations

    repository.import_images(session, [real_data / "fundus_kaggle_dr" / "images"], "study")
    result = import_annotations(session, real_data / STUDY_POINTS, "points", "study", skip_unknown_images=True)
    assert result.added == 11
    session.commit()


def test_clinician_study_agreement_on_the_real_points(real_data, db_env, session, tmp_path, capsys):
    _study(session, real_data)
    out = tmp_path / "agreement.csv"
    assert main(["annotations", "agreement", "--cohort", "study", "--tolerance", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 annotators, 1 image(s) per pair" in printed
    rows = pd.read_csv(out)
    assert len(rows) == 3 and set(rows.image) == {rows.image[0]}  # one image (26127_right), three pairs
    by_pair = {(r.annotator_a, r.annotator_b): r for r in rows.itertuples()}
    # by hand from the CSV, same label within 10 px:
    #   1 vs 2: MA (266,371)-(265,370), EX (206,188)-(203,189); 1's MA (143,376) is 31 px from 2's
    #           (134,346), and 1's HE has no HE partner: 2 of 4 + 3 -> F1 4/7
    #   1 vs 3: MA (266,371)-(265,370), EX (206,188)-(204,191): 2 of 4 + 4 -> 1/2
    #   2 vs 3: MA (265,370)=(265,370), MA (134,346)-(135,348), EX (203,189)-(204,191): 3 of 3 + 4 -> 6/7
    expected = {("annotator_1", "annotator_2"): (4, 3, 2, 4 / 7), ("annotator_1", "annotator_3"): (4, 4, 2, 0.5),
                ("annotator_2", "annotator_3"): (3, 4, 3, 6 / 7)}
    for pair, (n_a, n_b, matched, f1) in expected.items():
        row = by_pair[pair]
        assert (row.points_a, row.points_b, row.points_matched) == (n_a, n_b, matched), pair
        assert row.points_f1 == pytest.approx(f1) and row.f1 == pytest.approx(f1)
        assert row.boxes_a == row.boxes_b == 0 and math.isnan(row.boxes_f1)
    summary = pd.read_csv(tmp_path / "agreement.summary.csv")
    overall = summary[summary.annotator_a == "(all pairs)"].iloc[0]
    assert overall.f1_pooled == pytest.approx((4 / 7 + 0.5 + 6 / 7) / 3)
    # one image, marked by everyone: presence never varies, so κ is undefined, not 1
    assert summary.kappa_presence.isna().all()

    # every image of the cohort read: 14 agreed absences and one agreed presence -> κ 1. Within 1 px
    # only 2's and 3's identical MA (265,370) matches (the others are 1.4 px or more apart): 2 vs 3
    # F1 2 * 1 / (3 + 4) = 2/7, the other pairs 0
    assert main(["annotations", "agreement", "--cohort", "study", "--all-images", "--tolerance", "1",
                 "--out", str(out)]) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 3 * 15
    summary = pd.read_csv(tmp_path / "agreement.summary.csv")
    assert (summary.kappa_presence == 1.0).all() and (summary.images.iloc[:3] == 15).all()
    assert list(summary.f1_pooled.iloc[:3]) == pytest.approx([0.0, 0.0, 2 / 7])


def test_box_agreement_and_one_annotator_is_an_error(real_data, db_env, session, tmp_path, capsys):
    from annotations.geometry import Box
    from db import repository

    repository.import_images(session, [real_data / "fundus_kaggle_dr" / "images"], "boxes")
    images = repository.list_images(session, "boxes")
    repository.get_or_create_user(session, "ana", role="annotator")
    repository.get_or_create_user(session, "ben", role="annotator")
    repository.save_annotation(session, images[0], Box(10, 10, 50, 50), "lesion", user="ana")
    session.commit()
    code = main(["annotations", "agreement", "--cohort", "boxes", "--out", str(tmp_path / "a.csv")])
    assert code != 0 and "at least two annotators (found only 'ana')" in capsys.readouterr().err
    # ben: the same lesion shifted by 10 px (IoU 30x40 / (2*1600 - 1200) = 0.6) and one lesion ana missed
    repository.save_annotation(session, images[0], Box(20, 10, 60, 50), "lesion", user="ben")
    repository.save_annotation(session, images[1], Box(0, 0, 20, 20), "lesion", user="ben")
    session.commit()
    assert main(["annotations", "agreement", "--cohort", "boxes", "--iou", "0.5", "--out", str(tmp_path / "a.csv")]) == 0
    rows = pd.read_csv(tmp_path / "a.csv")
    assert list(zip(rows.boxes_a, rows.boxes_b, rows.boxes_matched)) == [(1, 1, 1), (0, 1, 0)]
    summary = pd.read_csv(tmp_path / "a.summary.csv")
    pair = summary.iloc[0]
    assert pair.boxes_f1 == pytest.approx(2 * 1 / 3) and pair.f1_mean == pytest.approx((1.0 + 0.0) / 2)
    assert pair.presence_agreement == 0.5
    assert main(["annotations", "agreement", "--cohort", "boxes", "--iou", "0.7", "--out", str(tmp_path / "b.csv")]) == 0
    assert pd.read_csv(tmp_path / "b.csv").boxes_matched.sum() == 0


def test_annotator_spread_pins():
    from softcam_core.evaluate import annotator_spread

    a = pd.DataFrame({"method": ["softcam", "gradcam"], "pointing_game_mean": [0.8, 0.5], "audc_mean": [0.1, 0.2]})
    b = pd.DataFrame({"method": ["softcam", "gradcam"], "pointing_game_mean": [0.6, 0.55], "audc_mean": [0.1, math.nan]})
    spread = annotator_spread({"ana": a, "ben": b}).set_index(["method", "metric"])
    assert spread.loc[("softcam", "pointing_game"), ["ana", "ben", "min", "max"]].tolist() == [0.8, 0.6, 0.6, 0.8]
    assert spread.loc[("softcam", "pointing_game"), "spread"] == pytest.approx(0.2)
    assert spread.loc[("gradcam", "pointing_game"), "spread"] == pytest.approx(0.05)
    assert spread.loc[("gradcam", "audc"), "spread"] == 0.0  # one annotator left it undefined
    assert spread.loc[("softcam", "audc"), "spread"] == 0.0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_evaluate_against_each_annotator_reports_the_spread(real_data, db_env, session, tmp_path, capsys):
    import torch
    import torchvision

    _study(session, real_data)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r.pth")
    assert main(["models", "import", "--arch", "resnet18", "--weights", str(tmp_path / "r.pth"), "--classes",
                 "healthy,diseased", "--img-size", "64", "--modality", "fundus", "--mean", "0.485,0.456,0.406",
                 "--std", "0.229,0.224,0.225", "--to-softcam", "--out", str(tmp_path / "m.pt")]) == 0
    common = ["evaluate", "--model", str(tmp_path / "m.pt"), "--cohort", "study", "--split", "all", "--target", "pred",
              "--methods", "softcam,sanity:centre", "--metrics", "topk,pointing_game", "--point-radius", "6",
              "--no-figures"]
    code = main([*common, "--annotator", "nobody", "--out", str(tmp_path / "x")])
    assert code != 0 and "no shapes by 'nobody' (annotators: annotator_1, annotator_2, annotator_3)" in capsys.readouterr().err
    assert main([*common, "--annotator", "each", "--out", str(tmp_path / "ev")]) == 0
    spread = pd.read_csv(tmp_path / "ev" / "annotator_spread.csv")
    for name in ("annotator_1", "annotator_2", "annotator_3"):
        cohort = pd.read_csv(tmp_path / "ev" / f"annotator-{name}" / "cohort.csv").set_index("method")
        for row in spread.itertuples():
            assert getattr(row, name) == pytest.approx(cohort.loc[row.method, f"{row.metric}_mean"], nan_ok=True)
        per_image = pd.read_csv(tmp_path / "ev" / f"annotator-{name}" / "per_image.csv")
        assert per_image.topk_precision_k5.notna().sum() == 2  # the one annotated image, two methods
    values = spread.set_index(["method", "metric"]).loc[:, ["annotator_1", "annotator_2", "annotator_3"]]
    assert (spread["spread"] == values.max(axis=1).values - values.min(axis=1).values).all()
    # annotator 1's points differ from 2's and 3's (an HE where they marked an MA, another MA): the
    # ground truth, so at least one cohort mean, moves with the reader
    assert spread["spread"].max() > 0
