"""End to end in headless Chromium: keyboard-first annotation (keys choose the label, save, and move
to the next and previous image) and drawing at 4x native zoom on a real 4288x2848 IDRiD photo; the
stored boxes are checked in the database."""

from __future__ import annotations

import json
import re
import sqlite3
from urllib.parse import parse_qs, urlparse

import pytest

from service.boxes import lesion_labels
from tests.plugins.app import prepare_home, run_server, sign_in
from tests.conftest import REAL_DATA
from tests.test_e2e_app import TIMEOUT_MS, assert_no_exception, choose, drag, ready_canvas, wait_idle

pytestmark = pytest.mark.e2e

IDRID_PHOTO = REAL_DATA / "fundus_idrid" / "images" / "0001.jpg"  # 4288 x 2848 px


def _idrid_cohort(session, _cohort_dir) -> None:
    from db import repository

    repository.import_images(session, [IDRID_PHOTO], "idrid", modality="fundus")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not IDRID_PHOTO.is_file():
        pytest.skip(f"the real IDRiD photo is not here: {IDRID_PHOTO}")
    home = tmp_path_factory.mktemp("e2e_annotate_home")
    prepared = prepare_home(home, then=_idrid_cohort)
    with run_server(home, home / "server.log") as url:
        yield {"url": url, "home": home, **prepared}


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def press(page, key: str) -> None:
    """Press ``key`` with the focus off every field (keys typed into a field are not shortcuts)."""
    page.locator("h1").first.click()
    page.keyboard.press(key)
    wait_idle(page)


def _image_in_url(page) -> str:
    return parse_qs(urlparse(page.url).query).get("image", [""])[0]


def test_keys_choose_the_label_save_and_step_through_the_queue(page, server):
    sign_in(page, server["url"])
    page.get_by_role("link", name="Annotate").click()
    page.wait_for_selector("h1:has-text('Annotate')")
    choose(page, "Cohort", server["cohort"])
    wait_idle(page)
    # the shortcuts are listed in the help popover
    page.get_by_role("button", name="Keyboard shortcuts").click()
    page.get_by_text("choose the label for new shapes").wait_for()
    page.keyboard.press("Escape")
    page.locator("h1").first.click()  # focus off any field: keys typed into a field are not shortcuts

    labels = lesion_labels("fundus")
    page.keyboard.press("2")
    wait_idle(page)
    assert page.get_by_role("radio", name=f"2 · {labels[1]}").is_checked()

    canvas = ready_canvas(page)
    box = canvas.bounding_box()
    drag(page, canvas, (0.3 * box["width"], 0.3 * box["height"]), (0.5 * box["width"], 0.5 * box["height"]))
    page.get_by_text("Unsaved: 1 new").wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    page.keyboard.press("s")
    page.get_by_text("Saved 1 new").wait_for()
    assert_no_exception(page)
    with sqlite3.connect(server["home"] / "softcam.db") as db:
        rows = db.execute("SELECT geometry, label FROM annotations WHERE provenance = 'drawn' "
                          "AND deleted_at IS NULL").fetchall()
    assert len(rows) == 1 and rows[0][1] == labels[1]
    assert json.loads(rows[0][0])["x1"] > json.loads(rows[0][0])["x0"]

    # n / p (and the arrows) step through the queue; the image is in the URL, so a reload keeps it
    wait_idle(page)
    page.locator("h1").first.click()
    first = _image_in_url(page)
    page.keyboard.press("n")
    wait_idle(page)
    second = _image_in_url(page)
    assert second and second != first
    page.keyboard.press("ArrowLeft")
    wait_idle(page)
    assert _image_in_url(page) == first
    page.keyboard.press("ArrowRight")
    wait_idle(page)
    assert _image_in_url(page) == second
    page.reload()
    page.wait_for_selector("h1:has-text('Annotate')")
    wait_idle(page)
    assert _image_in_url(page) == second
    assert_no_exception(page)


def test_box_drawn_at_4x_zoom_on_a_real_idrid_photo_is_stored_in_original_pixels(page, server):
    sign_in(page, server["url"])
    page.get_by_role("link", name="Annotate").click()
    page.wait_for_selector("h1:has-text('Annotate')")
    choose(page, "Cohort", "idrid")
    choose(page, "Zoom", "4×")
    # pan: the horizontal slider to its far right (End), then three image pixels back (ArrowLeft)
    page.locator("[data-testid='stSlider']").filter(has_text="Pan ↔").get_by_role("slider").focus()
    page.keyboard.press("End")
    wait_idle(page)
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    wait_idle(page)
    caption = page.get_by_text(re.compile(r"Showing image pixels x \d+")).inner_text()
    left, top = (int(v) for v in re.search(r"x (\d+)–\d+, y (\d+)–", caption).groups())
    # centre x = 4288 - 3: the 190 px wide view is still pulled in to the right edge; y stays centred
    assert (left, top) == (4288 - 190, round(2848 / 2 - 155 / 2))

    canvas = ready_canvas(page)
    box = canvas.bounding_box()
    assert (round(box["width"]), round(box["height"])) == (760, 620)  # 190 x 155 image px at 4 view px each
    drag(page, canvas, (41, 37), (121, 103))
    page.get_by_text("Unsaved: 1 new").wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    # "o" switches to points (a new canvas, the unsaved box kept); "3" chooses the third label; a click places one
    press(page, "o")
    page.keyboard.press("3")
    wait_idle(page)
    assert page.get_by_role("radio", name="Point").is_checked()
    canvas = ready_canvas(page)
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + 303, box["y"] + 211)
    page.get_by_text("Unsaved: 2 new").wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    # "g": polygons; click three vertices, then the first again to close it
    press(page, "g")
    canvas = ready_canvas(page)
    box = canvas.bounding_box()
    vertices = [(401, 301), (481, 301), (441, 401)]
    for x, y in vertices + vertices[:1]:
        page.mouse.click(box["x"] + x, box["y"] + y)
        page.wait_for_timeout(150)
    page.get_by_text("Unsaved: 3 new").wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    # one box too many: the canvas's Edit mode, a click selects it, the Delete key removes it
    press(page, "b")
    canvas = ready_canvas(page)
    drag(page, canvas, (600, 500), (700, 580))
    page.get_by_text("Unsaved: 4 new").wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    page.get_by_role("button", name="Edit", exact=True).last.click()
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + 650, box["y"] + 540)
    page.keyboard.press("Delete")
    page.get_by_text("Unsaved: 3 new").wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    # panning away draws a new canvas; the unsaved box stays in the edit, outside the view, and saves from there
    page.locator("[data-testid='stSlider']").filter(has_text="Pan ↔").get_by_role("slider").focus()
    page.keyboard.press("Home")
    wait_idle(page)
    page.get_by_text(re.compile(r"Showing image pixels x 0–190")).wait_for()
    page.get_by_text(re.compile(r"3 shape\(s\) outside the view")).wait_for()
    page.get_by_text("Unsaved: 3 new").wait_for()
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Saved 3 new").wait_for()
    assert_no_exception(page)
    with sqlite3.connect(server["home"] / "softcam.db") as db:
        rows = dict(db.execute("SELECT a.kind, a.geometry FROM annotations a JOIN images i ON i.id = a.image_id "
                               "JOIN cohorts c ON c.id = i.cohort_id WHERE c.name = 'idrid' AND a.deleted_at IS NULL"
                               ).fetchall())
        point_label = db.execute("SELECT label FROM annotations WHERE kind = 'point'").fetchone()[0]
    assert sorted(rows) == ["box", "point", "polygon"]
    polygon = json.loads(rows["polygon"])["points"]
    assert len(polygon) == 3 and all(abs(px - (left + x / 4)) <= 1.0 and abs(py - (top + y / 4)) <= 1.0
                                     for (px, py), (x, y) in zip(polygon, vertices)), polygon
    point = json.loads(rows["point"])
    assert abs(point["x"] - (left + 303 / 4)) <= 1.0 and abs(point["y"] - (top + 211 / 4)) <= 1.0, point
    assert point_label == lesion_labels("fundus")[2]
    stored = json.loads(rows["box"])
    expected = {"x0": left + 41 / 4, "y0": top + 37 / 4, "x1": left + 121 / 4, "y1": top + 103 / 4}
    assert all(abs(stored[k] - v) <= 1.0 for k, v in expected.items()), (stored, expected)

