"""End to end: the real ``streamlit run app.py`` server driven by headless Debian Chromium (Playwright).

One server per module, with its own SOFTCAM_HOME holding a tiny synthetic fundus cohort and a tiny
SoftCAM model. Screenshots of every page go to the test's tmp dir (the README's come from the demo:
``tools/screenshots.py``).
"""

from __future__ import annotations

import csv
import re
import sqlite3
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.plugins.app import dicom_from_png, prepare_home, run_server, sign_in

pytestmark = pytest.mark.e2e
TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e_home")
    prepared = prepare_home(home)
    with run_server(home, home / "server.log") as url:
        yield {"url": url, "home": home, **prepared}


@pytest.fixture
def page(browser, server, tmp_path):
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def shoot(page, tmp_path: Path, name: str) -> Path:
    """Full-page screenshot into the test's tmp dir (for a failing run's post-mortem)."""
    path = tmp_path / f"{name}.png"
    page.wait_for_timeout(1500)  # let data grids and charts finish drawing
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_no_exception(page) -> None:
    exceptions = page.locator("[data-testid='stException']")
    assert exceptions.count() == 0, exceptions.first.inner_text()


# true once the component holding this upper (mouse) canvas shows its background image: any
# non-transparent pixel on another canvas of its root, sampled on a grid
CANVAS_READY = """(upper) => {
    if (!upper.isConnected) return false;
    const root = upper.closest('.canvas-root') || upper.getRootNode();
    for (const canvas of root.querySelectorAll('canvas')) {
        if (canvas === upper || !canvas.width || !canvas.height) continue;
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const step = 4 * Math.max(1, Math.floor(canvas.width * canvas.height / 997));
        for (let i = 3; i < data.length; i += step) if (data[i] !== 0) return true;
    }
    return false;
}"""


def ready_canvas(page):
    """The visible drawing canvas of the last script run, once it has drawn its background image (a
    drag made before that is lost); see the comment in test_draw_a_box_save_reload_and_find_it."""
    canvas = page.locator("canvas.upper-canvas:visible").last
    canvas.wait_for()
    page.wait_for_function(CANVAS_READY, arg=canvas.element_handle(), timeout=TIMEOUT_MS)
    return canvas


def drag(page, canvas, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag the mouse on ``canvas`` from ``start`` to ``end``, both in the canvas's own pixels."""
    box = canvas.bounding_box()
    (x0, y0), (x1, y1) = ((box["x"] + x, box["y"] + y) for x, y in (start, end))
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()


def wait_idle(page) -> None:
    """Until the script run ends (Streamlit shows its status widget while running); the short pause
    lets a run triggered by the last action start first."""
    page.wait_for_timeout(600)
    page.wait_for_function(
        "!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS)


def maps_on_screen(page, count: int, title: str) -> None:
    """Until ``count`` plotly figures are drawn, one of them titled ``title`` (the image panel)."""
    page.wait_for_function(
        """([count, title]) => {
            const plots = document.querySelectorAll('.js-plotly-plot');
            if (plots.length < count) return false;
            const titles = Array.from(plots).map(p => p.textContent);
            return titles.some(t => t.includes(title)) &&
                   Array.from(plots).filter(p => p.querySelector('.heatmaplayer, .hm, image')).length >= count;
        }""",
        arg=[count, title], timeout=TIMEOUT_MS)


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` (first option whose text contains it) in the select box whose label starts with ``label``.

    Opens the list only once the app is idle: a rerun still in flight would replace the select box
    while its list is open, and the click would land on a detached element."""
    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).first
    wait_idle(page)
    if option in box.locator("input").input_value():
        return
    box.click()
    page.get_by_role("option").filter(has_text=option).first.click()
    wait_idle(page)
    expect(box.locator("input")).to_have_value(re.compile(re.escape(option)))


def upload(page, path: Path, title: str) -> float:
    """Upload a file on Review; returns seconds from the upload until image + SoftCAM + Grad-CAM are drawn
    (the image panel titled ``title``: an upload is shown by its pseudonym, never its file name)."""
    page.locator("[data-testid='stButtonGroup']").get_by_text("Upload", exact=True).click()
    start = time.monotonic()
    page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(path))
    maps_on_screen(page, 4, title)
    seconds = time.monotonic() - start
    wait_idle(page)
    return seconds


def test_review_uploaded_dicom_and_fundus_show_image_and_both_maps(page, server, tmp_path, real_data):
    sign_in(page, server["url"])
    first, second = server["pseudonyms"][:2]  # images are shown by pseudonym: file names are not stored
    maps_on_screen(page, 4, f"Image · {first}")
    wait_idle(page)
    assert_no_exception(page)
    # opening another cohort image: time until its SoftCAM and Grad-CAM maps are on screen (warm server)
    start = time.monotonic()
    page.get_by_role("button", name="Next").click()
    maps_on_screen(page, 4, f"Image · {second}")
    seconds_to_maps = time.monotonic() - start
    wait_idle(page)
    shoot(page, tmp_path, "review")

    png = sorted((real_data / "cxr_tbx11k_nih").rglob("*.png"))[0]
    dicom = dicom_from_png(png, tmp_path / "chest.dcm")
    dicom_seconds = upload(page, dicom, "Image · img-")
    assert_no_exception(page)
    text = page.locator("[data-testid='stMain']").inner_text()
    assert "SoftCAM" in text and "Grad-CAM" in text and "Doe" not in text and "PID-0042" not in text
    page.get_by_text("Display and methods").click()
    page.get_by_text("Window preset").wait_for()  # DICOM: window / level controls offered
    shoot(page, tmp_path, "review_dicom")

    fundus = sorted((real_data / "fundus_kaggle_dr").rglob("*.png"))[0]
    fundus_seconds = upload(page, fundus, "Image · img-")  # a photo too: its file name is not kept
    assert_no_exception(page)
    print(f"\nReview, browser-measured time to SoftCAM + Grad-CAM on screen: cohort image {seconds_to_maps:.2f} s, "
          f"DICOM upload {dicom_seconds:.2f} s, fundus upload {fundus_seconds:.2f} s (tiny ResNet-18, 64 px, CPU)")


def test_draw_a_box_save_reload_and_find_it(page, server, tmp_path):
    sign_in(page, server["url"])
    page.get_by_role("link", name="Annotate").click()
    page.wait_for_selector("h1:has-text('Annotate')")
    choose(page, "Cohort", server["cohort"])
    wait_idle(page)
    # after the cohort switch the page can hold the previous run's canvas beside the new one: take
    # the visible one the last script run rendered. Fabric.js takes the mouse once the component has
    # drawn the background image on its own canvas beside the drawing layers (a drag made before
    # that is lost): wait for those pixels. The component lives in a shadow root (isolate_styles),
    # which Playwright's locators pierce and document.querySelector does not: hand the element over.
    canvas = ready_canvas(page)
    box = canvas.bounding_box()
    # drag from 20 % to 60 % of the canvas: the box must come back in image pixels
    drag(page, canvas, (0.2 * box["width"], 0.2 * box["height"]), (0.6 * box["width"], 0.6 * box["height"]))
    page.get_by_text("Unsaved: 1 new").wait_for(timeout=TIMEOUT_MS)
    wait_idle(page)
    shoot(page, tmp_path, "annotate")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Saved 1 new").wait_for()
    assert_no_exception(page)

    with sqlite3.connect(server["home"] / "softcam.db") as db:
        rows = db.execute("SELECT a.geometry, a.label, i.pseudonym, i.width, i.id = (SELECT min(id) FROM images "
                          "WHERE cohort_id = i.cohort_id) FROM annotations a JOIN images i ON i.id = a.image_id "
                          "WHERE a.provenance = 'drawn' AND a.deleted_at IS NULL").fetchall()
    assert len(rows) == 1
    import json

    geometry, label, name, width, first = rows[0]
    geometry = json.loads(geometry)
    assert first and label == "hard_exudate"  # the first image of the queue (import order), default label
    # 20 %..60 % of a 128-px image, within the stroke and mouse rounding
    assert geometry["x0"] == pytest.approx(0.2 * width, abs=2) and geometry["x1"] == pytest.approx(0.6 * width, abs=2)

    # a reload is a new browser session: the signed token in the URL keeps the user signed in, on this page
    assert "session=v1." in page.url
    page.reload()
    page.wait_for_selector("h1:has-text('Annotate')")
    assert page.get_by_role("button", name="Sign in").count() == 0
    choose(page, "Cohort", server["cohort"])
    choose(page, "Show", "all images")
    choose(page, "Image (", name)
    page.get_by_text("1 saved box(es)").wait_for()
    assert_no_exception(page)
    shoot(page, tmp_path, "annotate_reloaded")


def test_cohort_evaluation_runs_and_its_csv_downloads(page, server, tmp_path):
    sign_in(page, server["url"])
    page.get_by_role("link", name="Cohort metrics").click()
    page.wait_for_selector("h1:has-text('Cohort metrics')")
    wait_idle(page)
    limit = page.get_by_label("At most this many images (0 = all)")
    limit.fill("2")
    limit.press("Tab")  # commits the value; Enter would submit the form and start a second job
    page.get_by_role("button", name="Run evaluation").click()
    page.get_by_text("Cohort summary").wait_for(timeout=300_000)
    assert page.get_by_text("Evaluation job 2 started").count() == 0  # one click, one job
    wait_idle(page)
    page.locator(".js-plotly-plot").first.wait_for()  # the figures of the finished evaluation
    assert_no_exception(page)
    shoot(page, tmp_path, "cohort")
    page.get_by_role("tab", name="Downloads").click()
    with page.expect_download() as download_info:
        page.get_by_role("button", name="per_image.csv").click()
    target = tmp_path / "per_image.csv"
    download_info.value.save_as(target)
    rows = list(csv.DictReader(target.open()))
    assert rows and {r["method"] for r in rows} == {"softcam", "gradcam"}
    assert all("activation_precision" in r for r in rows)


def test_cohort_evaluation_is_cancelled_and_resumed_in_the_browser(page, server, tmp_path):
    """Score-CAM + Integrated Gradients over every image: long enough to click Cancel while it runs
    (the button lives in the polling fragment, whose click reruns only the fragment, then the page)."""
    sign_in(page, server["url"])
    page.get_by_role("link", name="Cohort metrics").click()
    page.wait_for_selector("h1:has-text('Cohort metrics')")
    wait_idle(page)
    choose(page, "Images", "all")
    methods = page.locator("[data-testid='stMultiSelect']").filter(has_text="Methods").first
    for title in ("Score-CAM", "Integrated Gradients"):  # typed: the filtered list has one option
        methods.locator("input").fill(title)
        page.get_by_role("option").filter(has_text=title).first.wait_for()
        methods.locator("input").press("Enter")
        page.keyboard.press("Escape")
    expect(methods).to_contain_text("Score-CAM")
    expect(methods).to_contain_text("Integrated Gradients")
    page.get_by_role("button", name="Run evaluation").click()
    page.get_by_role("button", name="Cancel evaluation").wait_for()
    wait_idle(page)  # the page's own run first, as a person would see it
    page.get_by_role("button", name="Cancel evaluation").click()
    page.get_by_text("Evaluation cancelled by admin after").wait_for()
    wait_idle(page)
    assert page.get_by_role("button", name="Cancel evaluation").count() == 0
    assert page.get_by_text("Cohort summary").count() == 0
    assert_no_exception(page)
    page.get_by_role("button", name="Resume").click()
    page.get_by_text("Cohort summary").wait_for(timeout=300_000)
    wait_idle(page)
    assert_no_exception(page)
    label = page.locator("[data-testid='stSelectbox']").filter(has_text="Evaluation").first.locator("input").input_value()
    assert re.search(r"resumes #\d+", label), label
    assert page.get_by_text("Status: done").count() == 1


def test_models_and_data_pages_render(page, server, tmp_path):
    sign_in(page, server["url"])
    for link, title in (("Models", "Models"), ("Data", "Data")):
        page.get_by_role("link", name=link).click()
        page.wait_for_selector(f"h1:has-text('{title}')")
        wait_idle(page)
        assert_no_exception(page)
        shoot(page, tmp_path, title.lower())
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Sign in").wait_for()
    shoot(page, tmp_path, "sign_in")
