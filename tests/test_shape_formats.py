"""Points and polygons beside boxes in the file formats and in the ground truth: COCO polygon
segmentations and keypoints in and out, the clinician study's points CSV out and back, and
polygons counted in the database ground truth's mask.

Images: the 15 real EyePACS photos and the clinician study's points (``../shared/data/real``)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from annotations.formats import folder_resolver, read_annotations
from annotations.geometry import Box, Point, Polygon
from softcam_core.cli import main

STUDY = "fundus_kaggle_dr/labels/annotation_task_outcome.csv"


def test_polygon_area_and_mask_pins():
    triangle = Polygon(((0, 0), (4, 0), (0, 4)))
    assert triangle.area == 8.0  # shoelace: |0*0 - 4*0 + 4*4 - 0*0 + 0*0 - 0*4| / 2
    # pixel centres inside x + y < 4: (0.5, 0.5) .. rows 0-3 with 4, 3, 2, 1 pixels minus the diagonal halves
    assert triangle.to_mask(4, 4).sum() == 6
    assert Polygon(((1, 1), (3, 1), (3, 3), (1, 3))).to_mask(4, 4).sum() == 4 == Box(1, 1, 3, 3).to_mask(4, 4).sum()


def test_coco_polygons_and_keypoints_are_read_as_such(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
            "categories": [{"id": 1, "name": "drusen"}, {"id": 2, "name": "MA", "keypoints": ["point"]}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                 "segmentation": [[10, 10, 30, 10, 30, 30], [50, 50, 60, 50, 55, 60]]},
                {"id": 2, "image_id": 1, "category_id": 2, "bbox": [5, 6, 0, 0], "keypoints": [5, 6, 2, 7, 8, 0]},
                {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
                {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3]]},
            ]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco))
    report = read_annotations(path, "coco", folder_resolver({"a.png": (100, 80)}))
    assert [e.location for e in report.errors] == ["annotations[3] (id 4)"]
    assert "at least 3 x, y pairs" in report.errors[0].problem
    coco["annotations"].pop()
    path.write_text(json.dumps(coco))
    report = read_annotations(path, "coco", folder_resolver({"a.png": (100, 80)}))
    shapes = [(p.geometry, p.label) for p in report.annotations]
    assert shapes == [(Polygon(((10, 10), (30, 10), (30, 30))), "drusen"), (Polygon(((50, 50), (60, 50), (55, 60))), "drusen"),
                      (Point(5, 6), "MA"), (Box(1, 2, 4, 6), "drusen")]  # the invisible keypoint (v 0) is left out


def test_voc_polygons_are_read_in_both_layouts_and_round_trip(tmp_path):
    from annotations.formats import ExportAnnotation, ExportImage, write_annotations

    xml = """<annotation><filename>a.png</filename><size><width>100</width><height>80</height></size>
      <object><name>drusen</name><bndbox><xmin>11</xmin><ymin>11</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>
        <polygon><x1>11</x1><y1>11</y1><x2>31</x2><y2>11</y2><x3>31</x3><y3>31</y3></polygon></object>
      <object><name>fluid</name><polygon><pt><x>51</x><y>51</y></pt><pt><x>61</x><y>51</y></pt>
        <pt><x>56</x><y>61.5</y></pt></polygon></object>
      <object><name>bad</name><polygon><x1>1</x1><y1>1</y1><x2>2</x2><y2>2</y2></polygon></object>
      <object><name>box</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object>
    </annotation>"""
    path = tmp_path / "a.xml"
    path.write_text(xml)
    resolver = folder_resolver({"a.png": (100, 80)})
    report = read_annotations(path, "voc", resolver)
    assert [(e.location, e.problem) for e in report.errors] == [("a.xml: object 3", "<polygon> needs at least 3 vertices, got 2")]
    # 1-based like <bndbox>: vertex (11, 11) is image (10, 10); a polygon's <bndbox> is only its bounding box
    shapes = [(p.geometry, p.label) for p in report.annotations]
    assert shapes == [(Polygon(((10, 10), (30, 10), (30, 30))), "drusen"),
                      (Polygon(((50, 50), (60, 50), (55, 60.5))), "fluid"), (Box(0, 1, 3, 4), "box")]
    image = ExportImage("a", ".png", 100, 80, [ExportAnnotation(g, label) for g, label in shapes])
    out = write_annotations(tmp_path / "voc", "voc", [image])
    written = (out / "a.xml").read_text()
    assert "<polygon>" in written and "<xmin>51</xmin>" in written  # the fluid polygon's bounding box too
    again = read_annotations(out, "voc", resolver)
    assert not again.errors and sorted(map(repr, (p.geometry for p in again.annotations))) == sorted(
        map(repr, (g for g, _ in shapes)))


def test_shapes_round_trip_through_coco_and_points_csv(real_data, db_env, session, tmp_path, capsys):
    from db import repository
    from db.evaluation import load_database_cohort
    from db.repository.annotation_files import import_annotations

    repository.import_images(session, [real_data / "fundus_kaggle_dr" / "images"], "shapes")
    assert import_annotations(session, real_data / STUDY, "points", "shapes", skip_unknown_images=True).added == 11
    [image] = repository.images_to_adjudicate(session, "shapes")  # 26127_right, the annotated one
    repository.get_or_create_user(session, "ana", role="annotator")
    polygon = Polygon(((100, 100), (160, 110), (120, 170)))
    repository.save_annotation(session, image, polygon, "EX", user="ana")
    repository.save_annotation(session, image, Box(200, 200, 240, 230), "HE", user="ana")
    session.commit()

    # the ground truth's mask now holds the polygon beside the box
    cohort = load_database_cohort(session, "shapes", include_unlabeled=True)
    mask = cohort.mask(image.pseudonym)
    expected = polygon.to_mask(image.height, image.width) | Box(200, 200, 240, 230).to_mask(image.height, image.width)
    assert np.array_equal(mask, expected)
    assert cohort.summary()["regions"] == 1 and cohort.summary()["points"] == 11
    session.commit()  # the CLI below is another connection: end this one's transaction

    # COCO out: 1 box, 1 polygon, 11 keypoints; read back into a new cohort: the same shapes
    assert main(["annotations", "export", "--format", "coco", "--cohort", "shapes", "--out", str(tmp_path / "c.json")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    kinds = sorted("keypoints" if "keypoints" in a else "segmentation" if "segmentation" in a else "bbox"
                   for a in data["annotations"])
    assert kinds == ["bbox"] + ["keypoints"] * 11 + ["segmentation"]
    ex = next(a for a in data["annotations"] if "segmentation" in a)
    assert ex["segmentation"] == [[100.0, 100.0, 160.0, 110.0, 120.0, 170.0]] and ex["area"] == pytest.approx(polygon.area)
    repository.import_images(session, [real_data / "fundus_kaggle_dr" / "images"], "again")
    session.commit()
    assert main(["annotations", "import", str(tmp_path / "c.json"), "--format", "coco", "--cohort", "again"]) == 0
    assert "12 annotation(s) imported, 1 already present" in capsys.readouterr().out
    [copy] = [i for i in repository.list_images(session, "again") if repository.list_annotations(session, i)]
    back = sorted((a.kind, json.dumps(a.geometry, sort_keys=True), a.label) for a in repository.list_annotations(session, copy))
    original = sorted((a.kind, json.dumps(a.geometry, sort_keys=True), a.label) for a in repository.list_annotations(session, image))
    # COCO carries no annotator: annotators 2's and 3's identical MA (265, 370) come back as one
    # (the points CSV below keeps both)
    assert len(back) == len(original) - 1 and set(back) == set(original)
    session.commit()

    # the clinician study's layout out and back, participants kept
    assert main(["annotations", "export", "--format", "points", "--cohort", "shapes", "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(real_data / STUDY, newline="") as handle:
        study = [r for r in csv.DictReader(handle) if r["filename"] == "26127_right"]
    assert sorted((r["label"], float(r["x"]), float(r["y"]), r["participant"]) for r in rows) == \
        sorted((r["label"], float(r["x"]), float(r["y"]), r["participant"]) for r in study)
    assert {r["filename"] for r in rows} == {f"{image.pseudonym}{image.extension}"}  # pseudonyms only
