"""Pure functions behind the Streamlit pages (service.*, softcam_core.render): no browser, no Streamlit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annotations.geometry import box_iou
from db.session import mask_db_url
from service.boxes import (
    ZOOM_LEVELS,
    Viewport,
    canvas_boxes_to_image,
    canvas_scale,
    canvas_size,
    diff_boxes,
    canvas_points_to_image,
    canvas_polygons_to_image,
    diff_points,
    diff_polygons,
    image_boxes_to_canvas,
    image_points_to_canvas,
    image_polygons_to_canvas,
    lesion_labels,
    merge_edits,
    zoomed_viewport,
)
from service.catalogue import list_checkpoints
from service.image_session import MapResult, Prediction
from service.jobs import JobCancelled, run_in_background
from softcam_core.explain.specs import method_spec, method_title
from softcam_core.render import (
    COARSE_MAP_MAX_SIDE,
    DISPLAY_MAX_SIDE,
    ComparisonPage,
    comparison_figure_bytes,
    map_display_side,
    map_npy,
    map_png,
    overlay_figure,
    symmetric_range,
)


# ------------------------------------------------------------------------------------ canvas scaling
def test_canvas_scale_fits_and_keeps_aspect():
    assert canvas_scale(1000, 500, 600, 600) == pytest.approx(0.6)
    assert canvas_scale(500, 1000, 600, 600) == pytest.approx(0.6)
    assert canvas_scale(64, 64, 600, 600) == 4.0  # tiny images enlarged at most 4x
    assert canvas_size(1000, 500, 0.6) == (600, 300)
    with pytest.raises(ValueError):
        canvas_scale(0, 10, 100, 100)


def test_new_canvas_box_maps_to_image_pixels_by_hand():
    # canvas shows a 1000x500 image at 0.6: a box drawn at canvas (60, 30)-(120, 90) is image (100, 50)-(200, 150)
    boxes = canvas_boxes_to_image([{"label": "drusen", "left": 60, "top": 30, "width": 60, "height": 60}],
                                         0.6, 0.6, 1000, 500)
    assert boxes == [(100.0, 50.0, 200.0, 150.0, "drusen")]


def test_boxes_drawn_right_to_left_and_outside_are_normalised_and_clipped():
    boxes = canvas_boxes_to_image(
        [{"label": "a", "left": 50, "top": 50, "width": -20, "height": -10},
         {"label": "b", "left": -10, "top": 90, "width": 30, "height": 40},
         {"label": "c", "left": 200, "top": 200, "width": 10, "height": 10}],  # fully outside: dropped
        1.0, 1.0, 100, 100)
    assert boxes == [(30.0, 40.0, 50.0, 50.0, "a"), (0.0, 90.0, 20.0, 100.0, "b")]


@settings(max_examples=200, deadline=None)
@given(
    x0=st.floats(0, 3000), y0=st.floats(0, 2000), w=st.floats(0.5, 1000), h=st.floats(0.5, 800),
    scale=st.floats(0.05, 4.0),
)
def test_untouched_boxes_reload_exactly_whatever_the_canvas_size(x0, y0, w, h, scale):
    from annotations.geometry import Box

    box = Box(x0, y0, x0 + w, y0 + h)
    saved = [(box.x0, box.y0, box.x1, box.y1, "lesion")]
    drawn = image_boxes_to_canvas(saved, scale)
    # the canvas hands back what it was given, possibly re-serialised through float32-ish JSON
    returned = [{k: (v if k == "label" else float(np.float64(v))) for k, v in d.items()} for d in drawn]
    back = canvas_boxes_to_image(returned, scale, scale, 5000, 5000, originals=saved)
    assert back == saved


def test_moved_box_is_not_snapped_back_to_original():
    saved = [(10.0, 10.0, 20.0, 20.0, "lesion")]
    moved = [{"label": "lesion", "left": 15 * 2.0, "top": 10 * 2.0, "width": 20.0, "height": 20.0}]
    assert canvas_boxes_to_image(moved, 2.0, 2.0, 100, 100, originals=saved) == [(15.0, 10.0, 25.0, 20.0, "lesion")]


# ------------------------------------------------------------------------------------ zoom and pan
def test_zoomed_viewport_by_hand():
    # a 4288x2848 IDRiD photo at 4 view px per image px in a 760x620 view: 190x155 image px
    view = zoomed_viewport(4288, 2848, 4.0, (1000, 700), 760, 620)
    assert view == Viewport(905, 622, 190, 155, 4.0)  # left = 1000 - 95; top = round(700 - 77.5) = 622 (half to even)
    assert view.canvas_size == (760, 620) and view.box == (905, 622, 1095, 777)
    # the centre is pulled in so the view stays inside the image
    assert zoomed_viewport(4288, 2848, 4.0, (0, 2848), 760, 620).box == (0, 2693, 190, 2848)
    assert zoomed_viewport(4288, 2848, 4.0, (9999, -5), 760, 620).box == (4098, 0, 4288, 155)
    # a view larger than the image shows all of it; Fit is the whole image at the fitting scale
    assert zoomed_viewport(100, 50, 2.0, (10, 10), 760, 620).box == (0, 0, 100, 50)
    fit = zoomed_viewport(4288, 2848, ZOOM_LEVELS["Fit"], (0, 0), 760, 620)
    assert fit.box == (0, 0, 4288, 2848) and fit.scale == pytest.approx(760 / 4288)
    with pytest.raises(ValueError):
        zoomed_viewport(100, 100, 0.0, (0, 0), 760, 620)


def test_viewport_shows_boxes_that_overlap_it():
    view = Viewport(100, 100, 50, 50, 4.0)
    assert view.shows((140, 140, 200, 200, "a")) and view.shows((90, 90, 101, 101))
    assert not view.shows((150, 100, 160, 110)) and not view.shows((0, 0, 100, 100))  # touching is not showing


def test_box_drawn_at_4x_zoom_maps_to_original_pixels_by_hand():
    # view from image (905, 622) at 4x: canvas (40, 40)-(120, 100) is image (915, 632)-(935, 647)
    drawn = [{"label": "microaneurysm", "left": 40, "top": 40, "width": 80, "height": 60}]
    assert canvas_boxes_to_image(drawn, 4.0, 4.0, 4288, 2848, offset=(905, 622)) == [
        (915.0, 632.0, 935.0, 647.0, "microaneurysm")]
    # and back: a stored box is drawn where it belongs, partly outside the canvas if it leaves the view
    assert image_boxes_to_canvas([(900, 630, 910, 640, "a")], 4.0, 4.0, (905, 622)) == [
        {"label": "a", "left": -20.0, "top": 32.0, "width": 40.0, "height": 40.0}]


@settings(max_examples=200, deadline=None)
@given(x0=st.floats(0, 4000), y0=st.floats(0, 2500), w=st.floats(0.5, 200), h=st.floats(0.5, 200),
       zoom=st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0]), cx=st.floats(0, 4288), cy=st.floats(0, 2848))
def test_untouched_boxes_survive_any_zoom_and_pan_exactly(x0, y0, w, h, zoom, cx, cy):
    view = zoomed_viewport(4288, 2848, zoom, (cx, cy), 760, 620)
    saved = [(x0, y0, x0 + w, y0 + h, "lesion")]
    drawn = image_boxes_to_canvas(saved, view.scale, view.scale, (view.left, view.top))
    back = canvas_boxes_to_image(drawn, view.scale, view.scale, 4288, 2848, originals=saved,
                                 offset=(view.left, view.top))
    assert back == saved


def test_points_on_the_canvas_by_hand():
    # the canvas's point tool puts a click at (41, 37) as a circle of radius 3, stroke 2, whose left edge
    # is at 41 - 3 - 1 and whose vertical centre is at 37; at 4x from (905, 622) that is image (915.25, 631.25)
    clicked = {"type": "circle", "left": 37.0, "top": 37.0, "originX": "left", "originY": "center",
               "radius": 3, "strokeWidth": 2, "scaleX": 1, "scaleY": 1}
    box = {"type": "LabeledRect", "left": 0, "top": 0, "width": 5, "height": 5}
    assert canvas_points_to_image([clicked, box], 4.0, 4.0, 4288, 2848, label="microaneurysm", offset=(905, 622)) == [
        (915.25, 631.25, "microaneurysm")]
    # a stored point is drawn the same way and reads back exactly, with its own label
    saved = [(1000.1, 700.7, "haemorrhage")]
    drawn = image_points_to_canvas(saved, 4.0, 4.0, (905, 622))
    assert drawn[0]["left"] == pytest.approx((1000.1 - 905) * 4 - 4) and drawn[0]["top"] == pytest.approx((700.7 - 622) * 4)
    assert canvas_points_to_image(drawn, 4.0, 4.0, 4288, 2848, label="other", originals=saved,
                                  offset=(905, 622)) == saved
    # a centred origin reads the same centre; a point off the image is dropped
    centred = {"type": "Circle", "left": 41.0, "top": 37.0, "originX": "center", "originY": "center", "radius": 3}
    assert canvas_points_to_image([centred], 4.0, 4.0, 4288, 2848, label="a", offset=(905, 622)) == [
        (915.25, 631.25, "a")]
    assert canvas_points_to_image([dict(centred, left=-100.0)], 1.0, 1.0, 100, 100, label="a") == []


def test_polygons_on_the_canvas_by_hand():
    # the canvas closes a polygon at canvas vertices (40, 40), (80, 40), (60, 100): fabric keeps them as
    # points and puts the object's left/top at the bounding box's corner less half the 2 px stroke
    closed = {"type": "Polygon", "points": [{"x": 40, "y": 40}, {"x": 80, "y": 40}, {"x": 60, "y": 100}],
              "left": 39, "top": 39, "width": 40, "height": 60, "originX": "left", "originY": "top",
              "scaleX": 1, "scaleY": 1, "strokeWidth": 2}
    # at 4x from (905, 622): image (915, 632), (925, 632), (920, 647)
    assert canvas_polygons_to_image([closed], 4.0, 4.0, 4288, 2848, label="drusen", offset=(905, 622)) == [
        (((915.0, 632.0), (925.0, 632.0), (920.0, 647.0)), "drusen")]
    # moved 8 view px right in edit mode: only left changes; the polygon moves 2 image px
    moved = dict(closed, left=47)
    assert canvas_polygons_to_image([moved], 4.0, 4.0, 4288, 2848, label="x", offset=(905, 622))[0][0] == (
        (917.0, 632.0), (927.0, 632.0), (922.0, 647.0))
    # a stored polygon is drawn so that it reads back exactly, with its own label
    saved = [(((915.3, 632.1), (925.0, 632.0), (920.0, 647.7)), "haemorrhage")]
    drawn = image_polygons_to_canvas(saved, 4.0, 4.0, (905, 622))
    assert canvas_polygons_to_image(drawn, 4.0, 4.0, 4288, 2848, label="other", originals=saved,
                                    offset=(905, 622)) == saved
    edits = diff_polygons([(7, saved[0])], [(((916.0, 632.0), (926.0, 632.0), (921.0, 648.0)), "other")])
    assert edits.update == [(7, (((916.0, 632.0), (926.0, 632.0), (921.0, 648.0)), "haemorrhage"))]


def test_diff_points_keeps_a_moved_points_label():
    saved = [(1, (10.0, 10.0, "microaneurysm")), (2, (50.0, 50.0, "haemorrhage")), (3, (90.0, 90.0, "a"))]
    edited = [(10.0, 10.0, "microaneurysm"), (52.0, 49.0, "new-label"), (5.0, 95.0, "new-label")]
    edits = diff_points(saved, edited)
    assert edits.unchanged == [1]
    assert edits.update == [(2, (52.0, 49.0, "haemorrhage"))]  # nearest pairing: moved, label kept
    assert edits.delete == [3] and edits.create == [(5.0, 95.0, "new-label")]  # 85 px away: not a move
    assert diff_points(saved[2:], edited[2:], max_distance=100).update == [(3, (5.0, 95.0, "a"))]
    assert diff_points(saved[:1], []).delete == [1] and diff_points([], edited[:1]).create == [edited[0]]
    both = merge_edits(diff_points([], edited[:1]), diff_points(saved[:1], []))
    assert both.create == [edited[0]] and both.delete == [1] and both.summary() == "1 new, 0 changed, 1 deleted"


# ------------------------------------------------------------------------------------ box edits
def test_diff_boxes_classifies_every_edit():
    saved = [(1, (0, 0, 10, 10, "a")), (2, (50, 50, 60, 60, "b")), (3, (80, 80, 90, 90, "c"))]
    edited = [(0, 0, 10, 10, "a"),          # unchanged
              (52, 50, 62, 60, "b"),        # moved: overlaps 2
              (20, 20, 30, 30, "new")]      # new; 3 deleted
    edits = diff_boxes(saved, edited)
    assert edits.unchanged == [1]
    assert edits.update == [(2, (52, 50, 62, 60, "b"))]
    assert edits.delete == [3]
    assert edits.create == [(20, 20, 30, 30, "new")]
    assert edits.summary() == "1 new, 1 changed, 1 deleted"
    assert diff_boxes(saved, [b for _, b in saved]).empty


def test_relabelled_box_is_an_update():
    edits = diff_boxes([(7, (0, 0, 10, 10, "a"))], [(0, 0, 10, 10, "b")])
    assert edits.update == [(7, (0, 0, 10, 10, "b"))] and not edits.create and not edits.delete


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_lesion_labels_keep_existing_labels():
    labels = lesion_labels("oct", ["drusen", "scar"])
    assert labels[0] == "drusen" and labels.count("drusen") == 1 and labels[-1] == "scar"
    from softcam_core.synth import LESION_KINDS

    for modality, kinds in LESION_KINDS.items():  # drawn boxes share the synthetic cohorts' labels
        assert set(kinds) <= set(lesion_labels(modality))


# ------------------------------------------------------------------------------------ figures and export
def test_overlay_figure_signed_map_is_centred_with_hover_and_boxes():
    pixels = np.zeros((40, 60), dtype=np.uint8)
    heat = np.zeros((40, 60), dtype=np.float32)
    heat[10, 20], heat[30, 40] = 2.0, -0.5
    fig = overlay_figure(pixels, heat, title="SoftCAM · disease", signed=True, opacity=0.4,
                                boxes=[(5, 5, 15, 25, "lesion")])
    image_trace, heatmap = fig.data
    assert image_trace.type == "image" and heatmap.type == "heatmap"
    assert heatmap.zmin == -2.0 and heatmap.zmax == 2.0 and heatmap.opacity == 0.4
    assert heatmap.colorscale is not None and "value" in heatmap.hovertemplate
    assert np.asarray(heatmap.z).shape == (40, 60)
    shape = fig.layout.shapes[0]
    assert (shape.x0, shape.y0, shape.x1, shape.y1) == (4.5, 4.5, 14.5, 24.5)  # pixel edges, not centres
    assert fig.layout.annotations[0].text == "lesion"


def test_overlay_figure_view_sends_the_window_at_native_resolution_in_image_coordinates():
    pixels = np.zeros((2848, 4288, 3), np.uint8)
    heat = np.zeros((2848, 4288), np.float32)
    heat[700, 1000] = 5.0
    boxes = [(990, 690, 1010, 710, "inside"), (0, 0, 10, 10, "outside")]
    fig = overlay_figure(pixels, heat, boxes=boxes, view=(905, 622, 1095, 777))
    image, heatmap = fig.data
    assert (image.x0, image.y0, image.dx, image.dy) == (905, 622, 1, 1)  # 190 px wide: native pixels
    assert np.asarray(heatmap.z).shape == (155, 190) and np.asarray(heatmap.z)[700 - 622, 1000 - 905] == 5.0
    assert heatmap.x0 == 905 and heatmap.y0 == 622
    assert list(fig.layout.xaxis.range) == [904.5, 1094.5] and list(fig.layout.yaxis.range) == [776.5, 621.5]
    assert fig.layout.xaxis.fixedrange and fig.layout.yaxis.fixedrange  # the page's zoom, not the panel's
    assert len(fig.layout.shapes) == 1  # the box outside the view is not drawn
    with pytest.raises(ValueError, match="not inside"):
        overlay_figure(pixels, heat, view=(0, 0, 5000, 10))


def test_overlay_figure_subsamples_large_images_but_keeps_image_coordinates():
    pixels = np.zeros((1000, 2000, 3), dtype=np.uint8)
    heat = np.ones((1000, 2000), dtype=np.float32)
    fig = overlay_figure(pixels, heat, zmax=3.0)
    image_trace, heatmap = fig.data
    step = int(np.ceil(2000 / DISPLAY_MAX_SIDE))
    assert image_trace.dx == step and heatmap.dx == step
    assert np.asarray(heatmap.z).shape == (int(np.ceil(1000 / step)), int(np.ceil(2000 / step)))
    assert heatmap.zmax == 3.0
    assert tuple(fig.layout.xaxis.range) == (-0.5, 1999.5)


def test_cam_maps_are_sent_coarser_than_pixel_level_attributions():
    pixels = np.zeros((512, 512), dtype=np.uint8)
    heat = np.arange(512 * 512, dtype=np.float32).reshape(512, 512)
    assert map_display_side("gradcam") == COARSE_MAP_MAX_SIDE == 128
    assert map_display_side("integrated_gradients") == DISPLAY_MAX_SIDE
    coarse = overlay_figure(pixels, heat, heat_max_side=map_display_side("softcam"))
    image_trace, heatmap = coarse.data
    assert image_trace.dx == 2 and heatmap.dx == 4 and np.asarray(heatmap.z).shape == (128, 128)
    # sample (i, j) covers image pixels 4i..4i+3: its centre is 4i + 1.5 and it holds pixel (4i, 4j)
    assert heatmap.x0 == heatmap.y0 == 1.5 and np.asarray(heatmap.z)[1, 2] == heat[4, 8]
    fine = overlay_figure(pixels, heat, heat_max_side=map_display_side("guided_backprop"))
    assert np.asarray(fine.data[1].z).shape == (256, 256)
    # the image is encoded once for every panel of the page
    assert coarse.data[0].source == fine.data[0].source


def test_overlay_rejects_a_map_of_the_wrong_shape():
    with pytest.raises(ValueError, match="does not match"):
        overlay_figure(np.zeros((10, 10), np.uint8), np.zeros((5, 5), np.float32))


def test_symmetric_range():
    assert symmetric_range([np.array([-3.0, 1.0]), np.array([2.0])]) == 3.0
    assert symmetric_range([np.zeros(3)]) == 1e-6


def test_map_png_blends_signed_evidence_red_and_blue():
    from PIL import Image

    pixels = np.full((4, 4), 128, dtype=np.uint8)
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0], heat[3, 3] = 1.0, -1.0
    out = np.asarray(Image.open(io.BytesIO(map_png(pixels, heat, signed=True, opacity=1.0))))
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] > out[0, 0, 2]  # positive evidence: red
    assert out[3, 3, 2] > out[3, 3, 0]  # negative evidence: blue


def test_comparison_export_png_and_pdf():
    prediction = Prediction(["healthy", "disease"], np.array([0.25, 0.75]), 0.01)
    pixels = np.zeros((32, 32), dtype=np.uint8)
    heat = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    result = MapResult("softcam", 1, "disease", heat, heat, 0.02)
    page = ComparisonPage("img.png", "demo", prediction, pixels, [result], {result.title: 0.5},
                                 boxes=[(1, 1, 10, 10)])
    assert comparison_figure_bytes(page, "png").startswith(b"\x89PNG")
    assert comparison_figure_bytes(page, "pdf").startswith(b"%PDF")
    with pytest.raises(ValueError):
        comparison_figure_bytes(page, "svg")


def test_map_npy_is_the_input_resolution_map():
    heat = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = MapResult("gradcam", 0, "a", heat, np.zeros((6, 8), np.float32), 0.1)
    assert np.array_equal(np.load(io.BytesIO(map_npy(result.input_map))), heat)


def test_prediction_table_sorted():
    prediction = Prediction(["a", "b", "c"], np.array([0.2, 0.5, 0.3]), 0.0)
    assert [r["class"] for r in prediction.table()] == ["b", "c", "a"]
    assert prediction.predicted_name == "b"


def test_mask_db_url_hides_password():
    assert mask_db_url("postgresql+psycopg://alice:s3cret@db:5432/x") == "postgresql+psycopg://alice:***@db:5432/x"
    assert mask_db_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_method_titles_and_slowness():
    assert method_title("gradcampp") == "Grad-CAM++"
    assert method_title("cascam:gradcam") == "CasCAM (Grad-CAM)"
    assert method_title("sanity:edge") == "Edge (sanity)" and method_title("softcam_contrast") == "SoftCAM contrast"
    assert not any(method_spec(m).slow for m in ("sanity:edge", "sanity:random", "sanity:centre", "softcam_contrast"))
    assert method_spec("scorecam").slow and method_spec("cascam:gradcam").slow
    assert not method_spec("gradcam").slow


# ------------------------------------------------------------------------------------ background jobs
def test_run_in_background_reports_progress_and_result():
    reports, finished, failed = [], [], []

    def work(progress):
        for i in range(1, 4):
            progress(i, 3, f"step {i}")
        return "result"

    run_in_background(work, report=lambda *a: reports.append(a), finish=finished.append,
                             fail=failed.append, min_interval=0.0).join(5)
    assert reports == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    assert finished == ["result"] and failed == []


def test_run_in_background_throttles_but_always_reports_the_last_step_and_failures():
    reports, finished, failed = [], [], []

    def work(progress):
        for i in range(1, 101):
            progress(i, 100, "")
        raise RuntimeError("cohort.csv:\n disk full")

    run_in_background(work, report=lambda *a: reports.append(a), finish=finished.append,
                             fail=failed.append, min_interval=60.0).join(5)
    assert reports[-1][:2] == (100, 100) and len(reports) <= 2
    assert finished == [] and failed == ["cohort.csv: disk full"]


def test_run_in_background_stops_quietly_when_the_job_is_cancelled():
    """A report raising JobCancelled (the job row was cancelled) ends the work: no more steps, and
    neither finish nor fail is called, since either would overwrite the cancellation."""
    steps, finished, failed = [], [], []

    def report(done, total, message):
        if done == 3:
            raise JobCancelled("job 1 is cancelled")

    def work(progress):
        for i in range(1, 11):
            steps.append(i)
            progress(i, 10, "")
        return "result"

    run_in_background(work, report=report, finish=finished.append, fail=failed.append,
                             min_interval=0.0).join(5)
    assert steps == [1, 2, 3] and finished == [] and failed == []


def test_overlay_makes_the_map_transparent_outside_the_model_crop():
    pixels = np.zeros((10, 20), dtype=np.uint8)
    heat = np.ones((10, 20), dtype=np.float32)
    fig = overlay_figure(pixels, heat, crop=(5, 0, 15, 10))
    z = np.asarray(fig.data[1].z, dtype=float)
    assert np.isnan(z[:, :5]).all() and np.isnan(z[:, 15:]).all() and (z[:, 5:15] == 1).all()
    assert fig.layout.shapes[0].line.dash == "dash"


def test_list_checkpoints_reads_metadata_skips_training_state_and_reports_bad_files(tmp_path):
    from tests.plugins.app import make_tiny_checkpoint

    good = make_tiny_checkpoint(tmp_path / "a_softcam.pt", modality="oct")
    (tmp_path / "a_softcam.last.pt").write_bytes(good.read_bytes())  # resumable state: not listed
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    found, problems = list_checkpoints(tmp_path)
    assert [info.name for info in found] == ["a_softcam"]
    assert found[0].modality == "oct" and found[0].meta["classes"] == ["healthy", "disease"]
    assert "a_softcam — resnet18/softcam, oct, 2 classes" == found[0].label()
    assert len(problems) == 1 and problems[0].startswith("broken.pt:")


# ------------------------------------------------------------------------------------ model catalogue
def _info(name: str, modality: str, head: str, modified: float):
    from pathlib import Path

    from service.catalogue import CheckpointInfo

    return CheckpointInfo(Path(f"/models/{name}.pt"), {"modality": modality, "head": head, "classes": ["a", "b"]},
                          1.0, modified)


def test_preferred_model_is_a_default_then_a_softcam_net_never_a_newer_black_box():
    from service.catalogue import preferred_model

    cxr_base, cxr_soft = _info("cxr_baseline", "cxr", "baseline", 9), _info("cxr_softcam", "cxr", "softcam", 8)
    oct_soft, fundus_soft = _info("oct_softcam", "oct", "softcam", 5), _info("fundus_softcam", "fundus", "softcam", 3)
    found = [cxr_base, cxr_soft, oct_soft, fundus_soft]  # newest first, as list_checkpoints returns them
    assert preferred_model(found, {}) is cxr_soft  # the newest is a black box: skipped
    assert preferred_model(found, {}, "oct") is oct_soft
    defaults = {"cxr": str(cxr_base.path), "fundus": str(fundus_soft.path)}
    assert preferred_model(found, defaults) is fundus_soft  # defaults in modality order
    assert preferred_model(found, defaults, "cxr") is cxr_base  # a chosen default wins, black box or not
    assert preferred_model(found, {"oct": "/gone.pt"}, "oct") is oct_soft
    assert preferred_model([cxr_base], {}) is cxr_base and preferred_model([], {}) is None


def test_the_demo_sets_each_modality_default_once_and_never_over_a_chosen_one(tmp_path, monkeypatch):
    import json

    from db import repository
    from db.session import get_engine, session_scope, upgrade
    from service.catalogue import apply_demo_defaults, registered_model
    from tests.plugins.app import make_tiny_checkpoint

    monkeypatch.setenv("SOFTCAM_HOME", str(tmp_path))
    engine = get_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    fundus = make_tiny_checkpoint(tmp_path / "models" / "fundus_softcam.pt", modality="fundus")
    oct_soft = make_tiny_checkpoint(tmp_path / "models" / "oct_softcam.pt", modality="oct")
    oct_base = make_tiny_checkpoint(tmp_path / "models" / "oct_baseline.pt", modality="oct", head="baseline")
    report = tmp_path / "demo_report.json"
    with session_scope(engine) as s:
        assert apply_demo_defaults(s, report) == {}  # no demo yet: nothing to do
        repository.set_default_model(s, registered_model(s, oct_base))  # someone chose the OCT baseline
    report.write_text(json.dumps({"default_models": {"fundus": str(fundus), "oct": str(oct_soft)}}))
    with session_scope(engine) as s:
        assert apply_demo_defaults(s, report) == {"fundus": str(fundus)}
    with session_scope(engine) as s:
        assert repository.get_default_model(s, "fundus").checkpoint_path == str(fundus.resolve())
        assert repository.get_default_model(s, "oct").checkpoint_path == str(oct_base.resolve())
        assert apply_demo_defaults(s, report) == {}  # idempotent
        assert len(repository.list_models(s)) == 2


# ------------------------------------------------------------------------------------ degenerate maps
def test_map_problem_names_each_degenerate_map_by_hand():
    from softcam_core.render import map_problem

    assert map_problem(np.array([[0.0, 1.0], [0.5, 0.2]])) is None
    assert map_problem(np.array([[1e-9, 2e-9], [0.0, 0.0]])) is None  # tiny but structured: drawable
    assert map_problem(np.array([[-3.0, 2.0]])) is None
    assert "empty" in map_problem(np.zeros((0, 3)))
    assert "all zero" in map_problem(np.zeros((4, 4)))
    assert "1 non-finite" in map_problem(np.array([[0.0, np.nan], [1.0, 2.0]]))
    assert "2 non-finite" in map_problem(np.array([np.inf, -np.inf, 1.0]))
    assert "constant (0.7 everywhere)" in map_problem(np.full((3, 3), 0.7))
    assert "nearly constant" in map_problem(np.array([1000.0, 1000.0 + 1e-4]))  # 1e-7 of the magnitude
    assert map_problem(np.array([1000.0, 1000.0 + 1e-2])) is None  # 1e-5: real, if small, contrast


# ------------------------------------------------------------------------------------ sign-in tokens
def test_sign_in_tokens_expire_and_refuse_tampering_and_foreign_keys():
    from service.signin import issue_token, password_stamp, token_user_id

    key, other = b"k" * 32, b"o" * 32
    token = issue_token(7, "scrypt$hash", key=key, now=1000.0, lifetime=60)
    assert token.startswith("v1.7.1060.")
    assert token_user_id(token, key=key, now=1059.9) == (7, password_stamp("scrypt$hash"))
    assert token_user_id(token, key=key, now=1060.0) is None  # expired at the second it says
    assert token_user_id(token, key=other, now=1000.0) is None  # another server's key
    forged = token.replace("v1.7.", "v1.1.", 1)  # someone else's id under the same signature
    assert token_user_id(forged, key=key, now=1000.0) is None
    longer = token.replace(".1060.", ".9999999999.", 1)
    assert token_user_id(longer, key=key, now=1000.0) is None
    for junk in (None, "", "v1.7", "v2." + token[3:], "x" * 500, token + "x"):
        assert token_user_id(junk, key=key, now=1000.0) is None


def test_a_token_signs_in_the_active_account_until_its_password_changes(tmp_path):
    from db import repository
    from db.session import get_engine, session_scope, upgrade
    from service.signin import issue_token, user_for_token

    engine = get_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade(engine)
    key = b"s" * 32
    with session_scope(engine) as s:
        user = repository.create_user(s, "reader", "clinician", "first-password")
        token = issue_token(user.id, user.password_hash, key=key)
    with session_scope(engine, readonly=True) as s:
        assert user_for_token(s, token, key=key).username == "reader"
    with session_scope(engine) as s:
        repository.set_password(s, "reader", "second-password")
    with session_scope(engine, readonly=True) as s:
        assert user_for_token(s, token, key=key) is None  # a password change ends the session
        fresh = issue_token(user.id, repository.get_user(s, "reader").password_hash, key=key)
        assert user_for_token(s, fresh, key=key).id == user.id
    with session_scope(engine) as s:
        repository.get_user(s, "reader").active = False
    with session_scope(engine, readonly=True) as s:
        assert user_for_token(s, fresh, key=key) is None  # a disabled account


def test_server_folder_import_only_reads_under_the_import_root(tmp_path, monkeypatch):
    from service.cohorts import ServerFolderError, server_import_folder

    root = tmp_path / "imports"
    (root / "study42").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (root / "escape").symlink_to(tmp_path / "private")
    monkeypatch.delenv("SOFTCAM_IMPORT_ROOT", raising=False)
    with pytest.raises(ServerFolderError, match="off"):
        server_import_folder(str(root / "study42"))
    monkeypatch.setenv("SOFTCAM_IMPORT_ROOT", str(root))
    assert server_import_folder(str(root / "study42")) == (root / "study42").resolve()
    assert server_import_folder("study42") == (root / "study42").resolve()  # relative to the root
    messages = []
    for hostile in ("../private", str(tmp_path / "private"), "escape", "/etc", "does-not-exist", str(tmp_path / "nope")):
        with pytest.raises(ServerFolderError) as info:
            server_import_folder(hostile)
        messages.append(str(info.value))
    # one message for all of them: it names the root, never the path, and does not tell what exists
    assert len(set(messages)) == 1 and str(root.resolve()) in messages[0] and "private" not in messages[0]
