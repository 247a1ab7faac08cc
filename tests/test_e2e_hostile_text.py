"""User text is shown as text: cohort names, class and box labels written as HTML and as Markdown
links reach every page of a real ``streamlit run app.py`` in headless Chromium, and no script runs,
no element is injected and no link is made.
"""

from __future__ import annotations

import pytest

from tests.plugins.app import prepare_home, run_server, sign_in

pytestmark = pytest.mark.e2e
TIMEOUT_MS = 180_000
HTML_NAME = "<img src=x onerror=alert(1)>"
LINK_NAME = "[click](javascript:alert(2))"
SQL_NAME = "x'); DROP TABLE images;--"
PAGES = ("Review", "Annotate", "Cohort metrics", "Models", "Data")


def _hostile_cohorts(session, cohort_dir) -> None:
    from annotations.geometry import Box
    from db import repository

    images = sorted((cohort_dir / "images").iterdir())
    for index, name in enumerate((HTML_NAME, LINK_NAME, SQL_NAME)):
        result = repository.import_images(session, [images[index]], name)
        cohort = repository.get_cohort(session, name)
        repository.set_class_labels(session, cohort, ["<b onmouseover=alert(3)>healthy</b>", "[sick](javascript:alert(4))"])
        image = repository.get_image(session, result.accepted[0].image_id)
        repository.set_image_label(session, image, "[sick](javascript:alert(4))", "test")
        repository.save_annotation(session, image.id, Box(2, 2, 30, 30), "<script>alert(5)</script>", None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile_home")
    prepare_home(home, then=_hostile_cohorts)
    with run_server(home, home / "server.log") as url:
        yield url


def _wait_idle(page) -> None:
    page.wait_for_timeout(600)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS)


def _injected(page) -> dict:
    """What a successful injection would leave in the page."""
    return {
        "javascript links": page.locator("a[href^='javascript' i]").count(),
        "img src=x": page.locator("img[src='x']").count(),
        "script elements from data": page.locator("script:text('alert(5)')").count(),
        "b with handler": page.locator("b[onmouseover]").count(),
    }


def test_hostile_names_and_labels_are_shown_as_text_on_every_page(browser, server):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    listed: dict[str, bool] = {}
    try:
        sign_in(page, server)
        for title in PAGES:
            page.get_by_role("link", name=title).click()
            _wait_idle(page)
            box = page.locator("[data-testid='stSelectbox']").filter(has_text="Cohort").first
            if box.count():
                box.click()
                options = page.get_by_role("option")
                texts = options.all_inner_texts()
                page.keyboard.press("Escape")
                # the names are listed verbatim, as text (the Models page lists cohort folders only)
                listed[title] = any(HTML_NAME in t for t in texts) and any(LINK_NAME in t for t in texts)
                for name in (HTML_NAME, LINK_NAME) if listed[title] else ():
                    _wait_idle(page)
                    box.click()
                    page.get_by_role("option").filter(has_text=name).first.click()
                    _wait_idle(page)
                    assert _injected(page) == dict.fromkeys(_injected(page), 0), (title, name)
            assert _injected(page) == dict.fromkeys(_injected(page), 0), title
            assert page.locator("[data-testid='stException']").count() == 0, title
        assert dialogs == []
        assert all(listed.get(title) for title in ("Review", "Annotate", "Cohort metrics")), listed
    finally:
        context.close()
