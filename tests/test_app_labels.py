"""AppTest of the Data page's "Class labels" section: a real label CSV uploaded through the form into
a real temporary database (atomic; a bad file lists its rows and changes nothing), then one image
relabelled in the editor, with its history (who, when, previous value) on the page.

Images: the 15 real EyePACS photos of ``../shared/data/real/fundus_kaggle_dr`` with their Kaggle grades.
"""

from __future__ import annotations

import pandas as pd
import pytest

from tests.test_app_pages import open_app, texts

COHORT = "EyePACS sample"
GRADES = "fundus_kaggle_dr/labels/softcam_kaggle_gradable_test__subset.csv"


@pytest.fixture
def eyepacs(app_home, real_data):
    from db import repository
    from db.session import session_scope

    with session_scope() as s:
        result = repository.import_images(s, [real_data / "fundus_kaggle_dr" / "images"], COHORT, modality="fundus")
    assert len(result.accepted) == 15
    return real_data


def _labels() -> dict[str, str | None]:
    from db import repository
    from db.session import session_scope

    with session_scope(readonly=True) as s:
        return {image.pseudonym: image.label for image in repository.list_images(s, COHORT)}


def _upload(name: str, data: bytes):
    at = open_app("data")
    at.selectbox(key="labels_cohort").set_value(COHORT)
    at.file_uploader(key="labels_file").set_value((name, data, "text/csv"))
    next(b for b in at.button if b.label == "Import labels").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_data_page_imports_a_label_csv_atomically_and_edits_one_label(eyepacs):
    grades = (eyepacs / GRADES).read_bytes()
    # a file with two unknown images and a bad grade: refused as a whole, every problem listed
    bad = grades + b"no_such_image,1,,,,,,\nother_missing,0,,,,,,\n650_left,9,,,,,,\n"
    at = _upload("grades_bad.csv", bad)
    errors = texts(at.error)
    assert errors and "3 row(s) not usable, nothing changed" in errors[0], errors
    listed = [t.value for t in at.text]
    assert any("no image 'no_such_image'" in t for t in listed) and any("level '9'" in t for t in listed), listed
    assert set(_labels().values()) == {None}

    at = _upload("grades.csv", grades)
    assert not at.error, texts(at.error)
    assert any("15 image(s) labelled, 0 unchanged, 0 row(s) skipped (kaggle_dr layout)" in t for t in texts(at.success))
    table = pd.read_csv(eyepacs / GRADES)
    labels = _labels()
    assert sorted(labels.values()) == sorted("diseased" if g > 0 else "healthy" for g in table.level)

    # the editor: relabel one image; its history shows the CSV import and the edit, with who and before
    at = open_app("data")
    at.selectbox(key="labels_cohort").set_value(COHORT).run()
    pick = at.selectbox(key="labels_pick")
    first = pick.options[0]
    pseudonym = first.split(" ")[0]
    before = labels[pseudonym]
    after = "healthy" if before == "diseased" else "diseased"
    editor = next(t for t in at.text_input if t.label == "Label (empty clears it)")
    editor.input(after)
    at.button(key="labels_save").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert _labels()[pseudonym] == after
    history = next(d.value for d in at.dataframe if "before" in d.value.columns)
    assert list(history["field"]) == ["label", "label"]
    assert list(history["before"]) == ["", before] and list(history["after"]) == [before, after]
    assert list(history["by"]) == ["admin", "admin"] and list(history["source"]) == ["csv kaggle_dr", "edit"]
