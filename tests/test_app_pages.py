"""AppTest (streamlit.testing.v1) of every page on a real temporary database, a real synthetic cohort and a
real tiny SoftCAM model (tests/plugins/app.py: ``app_home``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"id": 1, "name": "admin", "role": "admin"}


def open_app(page: str | None = None, user: dict | None = ADMIN, timeout: float = 120) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    if user is not None:
        at.session_state["user"] = user
    at.run()
    if page is not None:
        at.switch_page(f"pages/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> list[str]:
    """What the user reads in these elements: their Markdown with the escapes that
    ``pages.common.plain`` adds to user text taken out again (``boxes\\.csv`` reads ``boxes.csv``)."""
    import re

    return [re.sub(r"\\([\\`*_{}\[\]()#+\-.!|<>~$:&])", r"\1", str(e.value)) for e in elements]


def charts(at: AppTest) -> list[dict]:
    """Each plotly chart on the page as ``{"title", "heatmap"}`` (the heatmap trace as plotly JSON, or None)."""
    import json

    found = []
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        heatmaps = [t for t in spec.get("data", []) if t.get("type") == "heatmap"]
        found.append({"title": spec.get("layout", {}).get("title", {}).get("text", ""),
                      "heatmap": heatmaps[0] if heatmaps else None})
    return found


def heat_values(heatmap: dict):
    """The z values of a plotly heatmap trace as float64 (H, W): plotly sends numpy arrays base64-encoded."""
    import base64

    import numpy as np

    z = heatmap["z"]
    if isinstance(z, dict):
        shape = tuple(int(v) for v in str(z["shape"]).split(","))
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape).astype(np.float64)
    return np.asarray(z, dtype=np.float64)


def latest_job_finished(kind: str, timeout: float = 120.0):
    """The newest ``kind`` job row once it is done or failed (or as it stands after ``timeout`` s)."""
    from db import repository
    from db.session import session_scope

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as s:
            job = repository.list_jobs(s, kind)[0]
        if job.status in ("done", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def annotated_image(cohort: str) -> tuple[int, str]:
    from db import repository
    from db.session import session_scope

    with session_scope() as s:
        record = repository.list_images(s, cohort, annotated=True)[0]
        return record.id, record.pseudonym


def test_sign_in_with_the_first_run_admin_account(app_home):
    at = open_app(user=None)
    assert at.title[0].value == "SoftCAM Review"
    at.text_input(key="sign_in_name").input("admin")
    at.text_input(key="sign_in_password").input("wrong")
    at.button[0].click().run()
    assert "wrong password" in " ".join(texts(at.error))
    at.text_input(key="sign_in_password").input("test-admin-pw")
    at.button[0].click().run()
    assert not at.exception
    assert at.title[0].value == "Review"
    assert any("admin" in m for m in texts(at.sidebar.markdown))


def test_clinician_is_offered_review_annotate_and_reader_study_only(app_home):
    from pages.common import pages_for_role

    assert pages_for_role("clinician") == ("review", "annotate", "study")
    at = open_app(user={"id": None, "name": "dr-a", "role": "clinician"})
    assert at.title[0].value == "Review"


def test_review_shows_prediction_softcam_maps_gradcam_and_activation_precision(app_home):
    at = open_app("review")
    assert at.title[0].value == "Review"
    image_id, name = annotated_image(app_home["cohort"])
    at.session_state["review_image"] = image_id
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    assert at.metric[0].label == "Prediction" and at.metric[0].value in ("healthy", "diseased")
    charts = at.get("plotly_chart")
    # the image, one SoftCAM evidence map per class (2) and Grad-CAM
    assert len(charts) == 4
    captions = texts(at.caption)
    scored = [c for c in captions if "activation precision" in c]
    assert len(scored) == 3, captions
    values = [float(c.split("activation precision ")[1]) for c in scored]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert not any("(cached)" in c for c in captions)  # Grad-CAM came from the prediction's own pass
    image_select = next(s for s in at.selectbox if s.label.startswith("Image ("))
    assert image_select.value == image_id and name in image_select.format_func(image_id)


def test_review_zoom_and_pan_apply_to_the_image_and_every_map_together(app_home):
    import json

    at = open_app("review")
    image_id, _ = annotated_image(app_home["cohort"])
    at.session_state["review_image"] = image_id
    at.run()
    zoom = next(s for s in at.selectbox if s.label == "Zoom")
    zoom.set_value(4).run()
    pan_x = next(s for s in at.slider if s.label.startswith("Pan ↔"))
    pan_x.set_value(100).run()  # the synthetic image is 128 px: a 32 px view centred at x 100 -> x 84..116
    assert not at.exception and not at.error, texts(at.error)
    specs = [json.loads(element.proto.spec) for element in at.get("plotly_chart")]
    assert len(specs) == 4  # the image, two evidence maps, Grad-CAM
    ranges = {(tuple(s["layout"]["xaxis"]["range"]), tuple(s["layout"]["yaxis"]["range"])) for s in specs}
    assert ranges == {((83.5, 115.5), (79.5, 47.5))}  # one view for every panel
    assert all(s["layout"]["xaxis"]["fixedrange"] for s in specs)
    image = specs[0]["data"][0]
    assert (image["x0"], image["dx"]) == (84, 1)  # native pixels
    assert any("All panels show image pixels x 84–116, y 48–80 at native resolution" in c for c in texts(at.caption))


def test_review_maps_are_cached_in_the_database(app_home):
    open_app("review")
    from sqlalchemy import select

    from db.schema import CachedMap
    from db.session import session_scope

    with session_scope() as s:
        rows = list(s.scalars(select(CachedMap)))
    # the prediction's forward pass (logits, SoftCAM evidence) and the Grad-CAM it computed alongside
    assert sorted(row.method for row in rows) == ["forward:evidence", "forward:logits", "gradcam"]
    assert all(row.seconds > 0 for row in rows)
    # a reopened image (fresh session, empty memory cache: as after a restart) runs no forward pass
    from service import image_session

    image_session._MAP_CACHE.clear()
    again = open_app("review")
    assert len(again.get("plotly_chart")) == 4
    assert sum("(cached)" in c for c in texts(again.caption)) == 3  # two SoftCAM maps and Grad-CAM


@pytest.mark.slow
def test_review_of_a_slow_method_runs_on_request_and_is_cached_in_the_database(app_home):
    at = open_app("review")
    at.multiselect(key="review_methods").set_value(["gradcam", "integrated_gradients"]).run()
    assert len(at.get("plotly_chart")) == 4  # Integrated Gradients waits for the button
    button = next(b for b in at.button if b.key == "review_run_slow")
    button.click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert len(at.get("plotly_chart")) == 5

    from sqlalchemy import select

    from db.schema import CachedMap
    from db.session import session_scope

    with session_scope() as s:
        methods = {row.method for row in s.scalars(select(CachedMap))}
    assert "integrated_gradients" in methods
    # a fresh session (page reload) finds it cached: no button, five maps at once
    again = open_app("review")
    again.multiselect(key="review_methods").set_value(["gradcam", "integrated_gradients"]).run()
    assert len(again.get("plotly_chart")) == 5
    assert any("(cached)" in c for c in texts(again.caption))


def test_review_precomputes_a_cohorts_maps_and_then_opens_them_cached(app_home):
    from db import repository
    from db.session import session_scope

    at = open_app("review")
    maps = next(m for m in at.multiselect if m.label == "Maps")
    assert maps.value == ["softcam", "gradcam"]  # the evidence maps and the methods the grid shows
    maps.set_value(["softcam", "gradcam", "scorecam"])
    next(b for b in at.button if b.label == "Precompute").click().run()
    assert not at.exception and not at.error, texts(at.error)
    job = latest_job_finished("explain")
    assert job.status == "done", job.error
    with session_scope() as s:
        images = repository.count_images(s, app_home["cohort"])
    assert job.params["cohort"] == app_home["cohort"] and job.progress_done == images * 3
    from service import image_session

    image_session._MAP_CACHE.clear()  # as after a restart: only the database cache is left
    again = open_app("review")
    again.multiselect(key="review_methods").set_value(["gradcam", "scorecam"]).run()
    assert not any(b.key == "review_run_slow" for b in again.button)  # Score-CAM needs no button: it is cached
    assert len(again.get("plotly_chart")) == 5
    assert sum("(cached)" in c for c in texts(again.caption)) == 4  # two SoftCAM maps, Grad-CAM, Score-CAM
    assert any(f"{images * 3} maps of {images} images ready" in c for c in texts(again.caption))


def test_review_precompute_is_for_researchers_and_admins(app_home):
    from db import repository
    from db.session import session_scope

    open_app()  # creates the admin
    with session_scope() as s:
        clinician = repository.create_user(s, "cleo", "clinician", password="cleo-password-123")
        user = {"id": clinician.id, "name": "cleo", "role": "clinician"}
    at = open_app("review", user=user)
    assert next(b for b in at.button if b.label == "Precompute").disabled


def test_annotate_lists_saved_boxes_in_image_pixels(app_home):
    at = open_app("annotate")
    assert at.title[0].value == "Annotate"
    image_id, _ = annotated_image(app_home["cohort"])
    at.selectbox(key="annotate_scope").set_value("all images").run()
    at.session_state["annotate_image"] = image_id
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    from pages import common

    saved = common.saved_boxes(type("R", (), {"id": image_id})())
    assert saved and any(f"{len(saved)} saved box(es)" in c for c in texts(at.caption))
    table = at.dataframe[0].value
    assert len(table) == len(saved)
    assert sorted(table["x0"].round(4)) == sorted(round(b[0], 4) for _, b in saved)


def test_annotate_shows_each_annotator_only_their_own_and_unattributed_shapes(app_home):
    from annotations.geometry import Box, Point
    from db import repository
    from db.session import session_scope

    at = open_app("annotate")  # creates the admin (id 1) first
    image_id, _ = annotated_image(app_home["cohort"])
    with session_scope() as s:
        unattributed = len([a for a in repository.list_annotations(s, image_id) if a.kind == "box"])
        alice = repository.create_user(s, "alice", "annotator", password="alice-pw-123456").id
        bob = repository.create_user(s, "bob", "annotator", password="bob-pw-1234567").id
        repository.save_annotation(s, image_id, Box(1, 1, 9, 9), "haemorrhage", alice)
        repository.save_annotation(s, image_id, Point(5, 5), "microaneurysm", alice)
    for user, boxes, points, hidden in (({"id": alice, "name": "alice", "role": "annotator"}, unattributed + 1, 1, 0),
                                        ({"id": bob, "name": "bob", "role": "annotator"}, unattributed, 0, 2)):
        at = open_app("annotate", user=user)
        at.selectbox(key="annotate_scope").set_value("all images").run()
        at.session_state["annotate_image"] = image_id
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        caption = next(c for c in texts(at.caption) if "saved box(es)" in c)
        assert caption.startswith(f"{boxes} saved box(es) · {points} saved point(s)"), caption
        assert (f"{hidden} shape(s) by other annotators not shown" in caption) == bool(hidden), caption


def test_cohort_metrics_run_as_a_background_job_with_results(app_home):
    at = open_app("cohort")
    assert at.title[0].value == "Cohort metrics"
    at.multiselect[0].set_value(["softcam", "gradcam"])
    at.multiselect[1].set_value(["activation_precision", "pointing_game"])
    at.selectbox[2].set_value("all")
    at.number_input[0].set_value(3)  # the first three images: a healthy one, a diseased one and one more
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    from db import repository
    from db.session import session_scope

    deadline = time.monotonic() + 90
    while True:
        with session_scope() as s:
            job = repository.list_jobs(s, "evaluate")[0]
        if job.status in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert job.status == "done", job.error
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    assert any(s.value == "Cohort summary" for s in at.subheader)
    cohort_table = at.dataframe[0].value
    assert set(cohort_table["method"]) == {"SoftCAM", "Grad-CAM"}
    assert {"activation_precision", "pointing_game"} <= set(cohort_table.columns)
    assert any(b.label.startswith("per_image") for b in at.get("download_button"))


def test_models_page_lists_the_checkpoint_and_sets_a_default(app_home):
    at = open_app("models")
    assert at.title[0].value == "Models"
    table = at.dataframe[0].value
    assert list(table["name"]) == ["fundus_softcam"] and table["architecture"][0] == "resnet18"
    # no default yet: the selector says so instead of showing the first model as if it were one
    chooser = at.selectbox(key="default_fundus")
    assert chooser.value is None and bool(table["default"][0]) is False
    with pytest.raises(KeyError):
        at.button(key="make_default_fundus")
    chooser.set_value(str(app_home["model"])).run()
    at.button(key="make_default_fundus").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert bool(at.dataframe[0].value["default"][0]) is True
    assert at.selectbox(key="default_fundus").value == str(app_home["model"])
    with pytest.raises(KeyError):
        at.button(key="make_default_fundus")  # it is the default now
    from pages import common

    assert common.default_models() == {"fundus": str(app_home["model"])}


def test_data_page_imports_a_folder_and_reports_rejections(app_home, tmp_path, real_data, monkeypatch):
    at = open_app("data")
    assert not any(t.label.startswith("…or a folder") for t in at.text_input)  # no import root: no field
    root = tmp_path / "imports"
    folder = root / "incoming"
    folder.mkdir(parents=True)
    fundus = sorted((real_data / "fundus_kaggle_dr").rglob("*.png"))[0]
    (folder / fundus.name).write_bytes(fundus.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    monkeypatch.setenv("SOFTCAM_IMPORT_ROOT", str(root))
    # a folder outside the root is refused with a message that names the root, not the path
    at = open_app("data")
    at.selectbox(key="data_cohort_choice").set_value("(new cohort)")
    at.text_input(key="data_new_cohort").input("Clinic A")
    next(t for t in at.text_input if t.label.startswith("…or a folder")).input(str(tmp_path))
    at.button[0].click().run()
    assert any(str(root.resolve()) in e and str(tmp_path) + " " not in e for e in texts(at.error)), texts(at.error)
    at = open_app("data")
    at.selectbox(key="data_cohort_choice").set_value("(new cohort)")
    at.text_input(key="data_new_cohort").input("Clinic A")
    next(t for t in at.text_input if t.label.startswith("…or a folder")).input(str(folder))
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)
    assert [m.value for m in at.metric] == ["1", "0", "1"]  # accepted, held, rejected
    rejected = next(d.value for d in at.dataframe if "reason" in d.value.columns)
    assert rejected["name"][0] == "broken.png" and rejected["reason"][0]
    assert "Clinic A" in list(at.dataframe[0].value["cohort"])


def _train_one_epoch(at: AppTest, name: str):
    """Fill the Models page's training form (1 epoch, 64 px), submit it and wait for the job to end;
    returns the job row."""

    next(t for t in at.text_input if t.label == "Checkpoint name").input(name)
    next(n for n in at.number_input if n.label == "Epochs").set_value(1)
    next(s for s in at.select_slider if s.label == "Input size (px)").set_value(64)
    next(b for b in at.button if b.label == "Train").click().run()
    assert not at.exception and not at.error, texts(at.error)
    job = latest_job_finished("train")
    assert job.status == "done", job.error
    return job


@pytest.mark.slow
def test_models_page_trains_a_model_in_the_background(app_home):
    at = open_app("models")
    job = _train_one_epoch(at, "tiny_trained")
    assert job.progress_done == job.progress_total > 0
    at.run()
    names = list(at.dataframe[0].value["name"])
    assert "tiny_trained" in names


@pytest.mark.slow
def test_models_page_trains_on_a_labelled_database_cohort(app_home):
    at = open_app("models")
    choice = at.selectbox(key="train_source")
    assert any(option.startswith(f"{app_home['cohort']} — database") for option in choice.options), choice.options
    choice.set_value(f"cohort:{app_home['cohort']}")
    job = _train_one_epoch(at, "from_database")
    assert job.params["cohort"] == app_home["cohort"] and "data" not in job.params
    from softcam_core.models import load_checkpoint

    _, meta = load_checkpoint(job.result_path)
    assert meta["data"] == f"database cohort {app_home['cohort']!r}"


def test_review_cascam_stage_strip(app_home):
    at = open_app("review")
    at.selectbox(key="review_cascam").set_value("gradcam").run()
    next(b for b in at.button if b.key == "review_run_cascam").click().run()
    assert not at.exception and not at.error, texts(at.error)
    stages = next(at.session_state[k] for k in at.session_state.keys() if k.startswith("cascam_"))
    assert len(stages) >= 2 and abs(sum(stage.weight for stage in stages) - 1) < 1e-6
    images = at.get("image")
    assert len(images) == 2 * len(stages)  # each stage: its masked input and its map
    assert len(at.get("plotly_chart")) == 4  # the combined CasCAM map is cached, not added unasked
    # one click puts the cached combined map into the grid: no second cascade, no "compute" button
    next(b for b in at.button if b.key == "review_show_cascam").click().run()
    assert not at.exception and not at.error, texts(at.error)
    titles = [c["title"] for c in charts(at)]
    assert len(titles) == 5 and any(t.startswith("CasCAM (Grad-CAM) · ") for t in titles), titles
    assert not any(b.key == "review_run_slow" for b in at.button)
    assert any("(cached)" in c for c in texts(at.caption))


def test_review_draws_every_signed_method_on_a_diverging_scale_centred_at_zero(app_home):
    import plotly.colors

    from softcam_core.explain import method_spec

    at = open_app("review")
    methods = ["gradcam", "guided_backprop", "sanity:random", "sanity:edge", "softcam_contrast"]
    at.multiselect(key="review_methods").set_value(methods).run()
    assert not at.exception and not at.error, texts(at.error)
    diverging = [colour for _, colour in plotly.colors.get_colorscale("RdBu_r")]
    drawn = {}
    for chart in charts(at)[1:]:
        title, heat = chart["title"], chart["heatmap"]
        method = next(m for m in ["softcam_contrast", "softcam"] + methods
                      if title.startswith(method_spec(m).title + " · "))
        scale = [colour for _, colour in heat["colorscale"]]
        drawn[method] = (scale == diverging, heat["zmin"] == -heat["zmax"] and heat["zmax"] > 0)
    assert set(drawn) == {"softcam", *methods}, drawn
    for method, (is_diverging, centred) in drawn.items():
        signed = method_spec(method).signed
        assert is_diverging == signed and (centred or not signed), (method, is_diverging, centred)


def test_review_maps_and_titles_follow_the_selected_class(app_home):
    import numpy as np

    at = open_app("review")
    predicted = at.metric[0].value
    classes = ["healthy", "disease"]  # the tiny model's classes (tests/plugins/app.py)
    other = classes[1 - classes.index(predicted)]
    before = {c["title"]: heat_values(c["heatmap"]) for c in charts(at)[1:]}
    assert f"Grad-CAM · {predicted}" in before and f"SoftCAM · {predicted} (selected)" in before, list(before)
    at.radio(key="review_target_2").set_value(classes.index(other)).run()
    assert not at.exception and not at.error, texts(at.error)
    after = [c for c in charts(at)[1:]]
    titles = [c["title"] for c in after]
    assert titles[0] == f"SoftCAM · {other} (selected)", titles
    post_hoc = [t for t in titles if not t.startswith("SoftCAM · ")]
    assert post_hoc == [f"Grad-CAM · {other}"], titles
    gradcam = heat_values(after[titles.index(f"Grad-CAM · {other}")]["heatmap"])
    assert not np.allclose(np.nan_to_num(gradcam), np.nan_to_num(before[f"Grad-CAM · {predicted}"]))


def test_switching_to_a_black_box_baseline_shows_post_hoc_maps_only(app_home):
    from tests.plugins.app import make_tiny_checkpoint

    baseline = make_tiny_checkpoint(app_home["model"].parent / "fundus_baseline.pt", head="baseline")
    at = open_app()  # Review is the start page; the sidebar (app.py) holds the model choice
    at.sidebar.selectbox(key="model_choice").set_value(str(baseline)).run()
    assert not at.exception and not at.error, texts(at.error)
    assert at.session_state["model_path"] == str(baseline)
    assert len(at.get("plotly_chart")) == 2  # the image and Grad-CAM; a black box has no evidence maps
    assert any("black-box baseline" in c for c in texts(at.caption))


def test_review_opens_on_a_softcam_net_even_when_a_black_box_is_newer(app_home):
    from tests.plugins.app import make_tiny_checkpoint

    make_tiny_checkpoint(app_home["model"].parent / "fundus_baseline.pt", head="baseline")  # the newest file
    at = open_app("review")
    assert not at.exception and not at.error, texts(at.error)
    assert at.session_state["model_path"] == str(app_home["model"])
    assert any(c["title"].startswith("SoftCAM · ") for c in charts(at))


def test_review_warns_of_degenerate_maps_instead_of_drawing_them(app_home):
    """A SoftCAM net whose evidence layer is all zero: its evidence maps are all zero and Grad-CAM's
    gradients vanish; each panel says so, and no flat heatmap is drawn."""
    import torch

    from softcam_core.models import build_model, save_checkpoint

    model = build_model("resnet18", 2, "softcam")
    with torch.no_grad():
        for parameter in model.evidence.parameters():
            parameter.zero_()
    meta = {"arch": "resnet18", "head": "softcam", "classes": ["healthy", "disease"], "img_size": 64,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "modality": "fundus",
            "l1": 0.0, "l2": 0.0, "data_hash": "zero", "metrics": {}}
    path = save_checkpoint(app_home["model"].parent / "fundus_zero.pt", model, meta)
    at = open_app()
    at.sidebar.selectbox(key="model_choice").set_value(str(path)).run()
    assert not at.exception and not at.error, texts(at.error)
    warnings = [w for w in texts(at.warning) if "Nothing is drawn" in w]
    assert len(warnings) == 3 and all("all zero" in w for w in warnings), texts(at.warning)
    drawn = charts(at)
    assert len(drawn) == 4 and all(c["heatmap"] is None for c in drawn), [c["title"] for c in drawn]


def test_sign_in_survives_a_reload_through_its_signed_token_and_sign_out_ends_it(app_home):
    at = open_app(user=None)
    at.text_input(key="sign_in_name").input("admin")
    at.text_input(key="sign_in_password").input("test-admin-pw")
    at.button[0].click().run()
    assert at.title[0].value == "Review"
    token = at.query_params["session"]
    token = token[0] if isinstance(token, list) else token
    assert token.startswith("v1.")
    # a reload: a new browser session (empty session state) on the same URL
    reloaded = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    reloaded.query_params["session"] = token
    reloaded.run()
    assert not reloaded.exception and reloaded.title[0].value == "Review"
    assert reloaded.session_state["user"].name == "admin"
    # a tampered token signs in no one
    forged = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    forged.query_params["session"] = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    forged.run()
    assert not forged.exception and forged.title[0].value == "SoftCAM Review"  # the sign-in form
    # signing out takes the token out of the URL: a reload then shows the sign-in form
    reloaded.sidebar.button(key="sign_out").click().run()
    assert "session" not in reloaded.query_params and "user" not in reloaded.session_state


def test_a_deactivated_account_is_signed_out_on_its_next_request_and_a_new_role_applies_at_once(app_home):
    from db import repository
    from db.session import session_scope
    from pages.common import User

    with session_scope() as s:
        user_id = repository.create_user(s, "res", "researcher", "research-pw").id

    def next_request():
        """The next run of a session in which "res" signed in as a researcher (the state it keeps)."""
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.session_state["user"] = User(user_id, "res", "researcher")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    at = next_request()
    assert at.title[0].value == "Review" and at.session_state["user"].role == "researcher"
    with session_scope() as s:
        repository.get_user(s, "res").role = "annotator"
    at = next_request()
    assert at.session_state["user"].role == "annotator"  # read from the database on this request
    with session_scope() as s:
        repository.get_user(s, "res").active = False
    at = next_request()
    assert at.title[0].value == "SoftCAM Review" and "user" not in at.session_state  # signed out


def test_an_oidc_identity_without_an_account_gets_no_page():
    from pages.common import pages_for_role
    from service.signin import NO_ROLE

    assert pages_for_role(NO_ROLE) == () and pages_for_role("anything-else") == ()
