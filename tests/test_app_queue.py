"""The Annotate queue's filters (mine, disagreements, unannotated) on a real database, and the
filter and image surviving a reload through the URL (AppTest)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from annotations.geometry import Box, Point
from tests.test_app_pages import ADMIN, ROOT, texts


def _queue(at) -> list[str]:
    picker = next(s for s in at.selectbox if s.label.startswith("Image ("))
    return list(picker.options)


def test_queue_filters_and_reload(app_home):
    from db import repository
    from db.session import session_scope

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["user"] = ADMIN
    at.run()  # signs the first admin in (user 1) before the other annotator exists
    with session_scope() as s:
        assert repository.get_user(s, "admin").id == ADMIN["id"]
        images = repository.list_images(s, app_home["cohort"])
        repository.get_or_create_user(s, "ben", role="annotator")
        first, second, third = images[:3]
        # image 1: admin and ben agree (IoU 0.82); image 2: they disagree; image 3: only ben
        repository.save_annotation(s, first, Box(10, 10, 50, 50), "lesion", user=ADMIN["id"])
        repository.save_annotation(s, first, Box(12, 10, 52, 50), "lesion", user="ben")
        repository.save_annotation(s, second, Point(20, 20), "MA", user=ADMIN["id"])
        repository.save_annotation(s, second, Point(90, 90), "MA", user="ben")
        repository.save_annotation(s, third, Box(0, 0, 10, 10), "lesion", user="ben")
        titles = {image.id: f"{image.pseudonym}" for image in images}
        n = len(images)
    with session_scope(readonly=True) as s:  # the demo cohort's imported boxes count as annotations too
        unannotated = repository.count_images(s, app_home["cohort"], annotated=False)
    assert 0 < unannotated <= n - 3

    at.switch_page("pages/annotate.py").run()
    sizes = {}
    for scope in ("my queue (not annotated by me)", "annotated by me", "disagreements (annotators differ)",
                  "unannotated (by anyone)", "all images"):
        at.selectbox(key="annotate_scope").set_value(scope).run()
        assert not at.exception and not at.error, texts(at.error)
        sizes[scope] = _queue(at)
    assert len(sizes["annotated by me"]) == 2 and len(sizes["my queue (not annotated by me)"]) == n - 2
    [disagreement] = sizes["disagreements (annotators differ)"]
    assert disagreement.startswith(titles[second.id])
    assert len(sizes["unannotated (by anyone)"]) == unannotated and len(sizes["all images"]) == n

    at.selectbox(key="annotate_scope").set_value("disagreements (annotators differ)").run()
    assert at.query_params["queue"] == "disagreements (annotators differ)"
    assert at.query_params["image"] == str(second.id)
    # a reload: a new session with the same URL opens the same queue on the same image
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    again.session_state["user"] = ADMIN
    again.query_params["queue"] = "annotated by me"
    again.query_params["image"] = str(first.id)
    again.run()
    again.switch_page("pages/annotate.py").run()
    assert again.selectbox(key="annotate_scope").value == "annotated by me"
    picker = next(s for s in again.selectbox if s.label.startswith("Image ("))
    assert picker.value == first.id
