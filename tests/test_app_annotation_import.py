"""AppTest of the Annotate page's "Import annotation file" tab (``pages.common.annotation_import_form``):
a real annotation file uploaded through the form into a real temporary database.

The good file is the real RSNA sample (``../shared/data/real/cxr_rsna_png``: four 1024 x 1024 chest
radiographs and their official stage-2 boxes); the malformed file is the same CSV with bad rows added.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_app_pages import open_app, texts

COHORT = "RSNA sample"


@pytest.fixture
def rsna(app_home, real_data) -> Path:
    """The four real RSNA radiographs imported (de-identified) into the cohort ``RSNA sample``."""
    from db import repository
    from db.session import session_scope

    folder = real_data / "cxr_rsna_png"
    with session_scope() as s:
        result = repository.import_images(s, [folder / "images"], COHORT, modality="cxr")
    assert len(result.accepted) == 4 and not result.rejected
    return folder


def _live_boxes() -> list[tuple[str, tuple[float, float, float, float], str, str]]:
    """(image pseudonym, (x0, y0, x1, y1), label, provenance) of every live box of the cohort."""
    from db import repository
    from db.session import session_scope

    with session_scope(readonly=True) as s:
        out = []
        for image in repository.list_images(s, COHORT):
            for row in repository.list_annotations(s, image):
                box = repository.annotation_geometry(row)
                out.append((image.pseudonym, (box.x0, box.y0, box.x1, box.y1), row.label, row.provenance))
        return sorted(out)


def _pseudonym(file_name: str) -> str:
    """The pseudonym of the image imported from ``file_name`` (found by its name's keyed hash; the
    name itself is not stored)."""
    from db import repository
    from db.session import session_scope

    with session_scope(readonly=True) as s:
        [image] = repository.list_images(s, COHORT, search=file_name)
        return image.pseudonym


def _upload(name: str, data: bytes, fmt: str = "rsna"):
    at = open_app("annotate")
    at.selectbox(key="annotate_scope").set_value("all images").run()  # Draw tab: every image of the cohort
    at.selectbox(key="import_cohort").set_value(COHORT)
    at.selectbox(key="import_fmt").set_value(fmt)
    at.file_uploader(key="import_file").set_value((name, data, "text/csv"))
    next(b for b in at.button if b.label == "Import annotations").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _reports(at) -> list[str]:
    """Success messages of the import form (the Draw tab may show its own, e.g. an empty queue)."""
    return [t for t in texts(at.success) if ": " in t and "annotation(s) added" in t]


def test_a_good_rsna_file_is_imported_and_counted(rsna):
    data = (rsna / "stage_2_train_labels.csv").read_bytes()
    at = _upload("stage_2_train_labels.csv", data)
    assert not at.error, texts(at.error)
    assert _reports(at) == ["stage_2_train_labels.csv: 8 annotation(s) added on 4 image(s); 0 already present."]
    # the Draw tab, run before the import in the same script run, was rerun and shows the imported boxes
    assert any("2 saved box(es) · 0 saved point(s) · 0 saved polygon(s) · 1024×1024 px" in c for c in texts(at.caption)), texts(at.caption)
    boxes = _live_boxes()
    assert len(boxes) == 8
    assert {label for _, _, label, _ in boxes} == {"Lung Opacity"}
    assert {provenance for *_, provenance in boxes} == {"imported"}
    # RSNA x, y, width, height -> x0, y0, x0 + width, y0 + height, in the image's own pixels
    assert (_pseudonym("4b048bdc-0a0a-43ed-aa0d-5971e433874b.png"), (637.0, 276.0, 825.0, 558.0), "Lung Opacity", "imported") in boxes
    assert (_pseudonym("bce1a9aa-127b-4535-9e96-d1ca41d72e0c.png"), (634.0, 240.0, 891.0, 850.0), "Lung Opacity", "imported") in boxes

    again = _upload("stage_2_train_labels.csv", data)  # the same file twice adds nothing
    assert _reports(again) == ["stage_2_train_labels.csv: 0 annotation(s) added on 4 image(s); 8 already present."]
    assert len(_live_boxes()) == 8


def test_a_malformed_file_shows_every_bad_row_and_imports_nothing(rsna):
    good = (rsna / "stage_2_train_labels.csv").read_text()
    bad = good + ("4b048bdc-0a0a-43ed-aa0d-5971e433874b,100.0,100.0,-20.0,50.0,1\n"   # line 10: negative width
                  "ffffffff-0000-0000-0000-000000000000,10.0,10.0,20.0,20.0,1\n"       # line 11: no such image
                  "719bb18b-a428-4fd8-9338-46f1187ffa5c,abc,10.0,20.0,20.0,1\n")       # line 12: not a number
    at = _upload("boxes.csv", bad.encode())
    assert texts(at.error) == ["boxes.csv: 3 bad row(s) of 11; nothing was imported."]
    report = at.dataframe[-1].value
    assert list(report.columns) == ["where", "problem"]
    assert list(report["where"]) == ["line 10", "line 11", "line 12"]
    problems = list(report["problem"])
    assert "width" in problems[0] and "ffffffff" in problems[1] and "abc" in problems[2], problems
    assert not _reports(at)
    assert _live_boxes() == []  # the eight good rows were not imported either: all or nothing
