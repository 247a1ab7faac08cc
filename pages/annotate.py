"""Annotate: draw, move, resize, relabel and delete lesion boxes; save with conflict detection; import
files; adjudicate several annotators' shapes into a consensus set."""

from __future__ import annotations

import streamlit as st
from PIL import Image
from streamlit_drawable_canvas import boxes_to_drawing, st_canvas

from pages import common
from service.boxes import (
    POINT_RADIUS,
    ZOOM_LEVELS,
    canvas_boxes_to_image,
    canvas_points_to_image,
    canvas_polygons_to_image,
    diff_boxes,
    diff_points,
    diff_polygons,
    image_boxes_to_canvas,
    image_points_to_canvas,
    image_polygons_to_canvas,
    lesion_labels,
    merge_edits,
    polygon_bounds,
    zoomed_viewport,
)
from softcam_core.render import annotators_figure, display_pixels

CANVAS_MAX_WIDTH, CANVAS_MAX_HEIGHT = 760, 620
SHORTCUT_HELP = (("1 … 9", "choose the label for new shapes"), ("b / o / g", "draw boxes / points / polygons"),
                 ("s", "save"), ("z", "discard unsaved changes (undo)"), ("n or →", "next image"),
                 ("p or ←", "previous image"),
                 ("Delete or Backspace", "delete the selected shape (after the canvas toolbar's Edit button)"))

st.title("Annotate")
user = common.current_user()
draw_tab, import_tab, adjudicate_tab = st.tabs(["Draw", "Import annotation file", "Adjudicate"])


def draw_boxes() -> None:
    # shown before the picker (a saved image may have left the queue), and on every run until the next
    # save or reload: a one-shot message popped by the run after the save was lost whenever another
    # rerun (the new image's canvas reporting in) interrupted that run, though the save had happened
    saved_message = st.session_state.get("annotate_saved_message")
    if saved_message and saved_message[0] == st.session_state.get("annotate_generation", 0):
        st.success(saved_message[1], icon=":material/check_circle:")
    picked = common.cohort_image_picker(page="annotate", queue_for=user)
    if picked is None:
        return
    image, record = picked

    # [(annotation, (x0, y0, x1, y1, label))], [(annotation, (x, y, label))]: this annotator's own shapes
    saved, saved_points, saved_polygons, hidden = common.saved_shapes(record, editor=user)
    labels = lesion_labels(image.modality, [box[4] for _, box in saved] + [p[2] for _, p in saved_points]
                           + [p[1] for _, p in saved_polygons])
    tools, board = st.columns([1, 3])
    with tools:
        shape = st.radio("Shape", ["Box", "Point", "Polygon"], horizontal=True, key="annotate_shape",
                         help="Boxes for lesions with an extent; points for lesions marked by a click "
                              "(microaneurysms, the clinician study's layout); polygons for outlines (click the "
                              "vertices, then the first one again to close).")
        label = st.radio("Label for new shapes", labels, key="annotate_label",
                         format_func=lambda name: f"{labels.index(name) + 1} · {name}" if labels.index(name) < 9 else name)
        st.caption("Drag to draw a box, click to place a point, or click a polygon's vertices and then its first "
                   "vertex to close it. Turn on the canvas's edit toggle to move, "
                   "resize, relabel (click a selected box) or delete (Delete key) a shape. Nothing is stored until "
                   "you save.")
        save_clicked = st.button("Save", type="primary", icon=":material/save:", key="annotate_save",
                                 width="stretch")
        reload_clicked = st.button("Discard changes", icon=":material/undo:", key="annotate_reload",
                                   width="stretch")
        st.caption(f"{len(saved)} saved box(es) · {len(saved_points)} saved point(s) · "
                   f"{len(saved_polygons)} saved polygon(s) · {image.width}×{image.height} px"
                   + (f" · {hidden} shape(s) by other annotators not shown: annotations stay independent; "
                      "compare and merge them on Adjudicate" if hidden else ""))
        with st.popover("Keyboard shortcuts", icon=":material/keyboard:", width="stretch"):
            st.markdown("\n".join(f"- `{key}` {what}" for key, what in SHORTCUT_HELP))
    # the keys act like clicks on the buttons above (typing in a field is never taken for a shortcut)
    common.keyboard_shortcuts({
        "s": ".st-key-annotate_save button", "z": ".st-key-annotate_reload button",
        "b": ".st-key-annotate_shape [role=radiogroup] > div:nth-child(1) input",
        "o": ".st-key-annotate_shape [role=radiogroup] > div:nth-child(2) input",
        "g": ".st-key-annotate_shape [role=radiogroup] > div:nth-child(3) input",
        # the canvas's own "Delete selected" button (its edit mode's toolbar)
        "delete": "button[aria-label='Delete selected']", "backspace": "button[aria-label='Delete selected']",
        "n": ".st-key-annotate_next button", "arrowright": ".st-key-annotate_next button",
        "p": ".st-key-annotate_prev button", "arrowleft": ".st-key-annotate_prev button",
        **{str(k): f".st-key-annotate_label [role=radiogroup] > div:nth-child({k}) input" for k in range(1, min(len(labels), 9) + 1)},
    })

    # ---- view: the whole image fitted, or a zoomed window at the image's native resolution
    view_row = board.columns([1, 2, 2])
    zoom_name = view_row[0].selectbox("Zoom", list(ZOOM_LEVELS), key="annotate_zoom",
                                      help="View pixels per image pixel. Boxes are stored in the image's own pixels "
                                           "at every zoom.")
    centre = (image.width / 2, image.height / 2)
    if ZOOM_LEVELS[zoom_name] is not None:
        centre = (view_row[1].slider("Pan ↔ (image x at the centre)", 0, image.width, image.width // 2,
                                     key=f"annotate_pan_x_{record.id}"),
                  view_row[2].slider("Pan ↕ (image y at the centre)", 0, image.height, image.height // 2,
                                     key=f"annotate_pan_y_{record.id}"))
    view = zoomed_viewport(image.width, image.height, ZOOM_LEVELS[zoom_name], centre,
                           CANVAS_MAX_WIDTH, CANVAS_MAX_HEIGHT)
    width, height = view.canvas_size
    scale_x, scale_y = width / view.width, height / view.height
    offset = (view.left, view.top)
    originals = [box for _, box in saved]
    original_points = [point for _, point in saved_points]
    original_polygons = [polygon for _, polygon in saved_polygons]
    # a new key whenever the stored shapes change (save, discard, other user's edit) resets the canvas
    generation = st.session_state.setdefault("annotate_generation", 0)
    shapes_key = f"{record.id}_{common.boxes_signature(saved + saved_points + saved_polygons)}_{generation}"
    # the shapes as edited so far, in image pixels: panning or zooming draws a new canvas from them, so
    # unsaved work outside the new view is kept, not reset to the stored shapes
    working_key, working_boxes, working_points, working_polygons = st.session_state.get(
        "annotate_working", (None, None, None, None))
    if working_key != shapes_key:
        working_boxes, working_points, working_polygons = list(originals), list(original_points), list(original_polygons)
    in_view = [box for box in working_boxes if view.shows(box)]
    points_in_view = [p for p in working_points if view.contains(p)]
    out_of_view = [box for box in working_boxes if box not in in_view]
    points_out_of_view = [p for p in working_points if p not in points_in_view]
    polygons_in_view = [p for p in working_polygons if view.shows(polygon_bounds(p))]
    polygons_out_of_view = [p for p in working_polygons if p not in polygons_in_view]
    pixels = display_pixels(image)[view.top:view.top + view.height, view.left:view.left + view.width]
    # native pixels enlarged stay square (a microaneurysm is a few pixels wide); a fitted view is smoothed
    resample = Image.Resampling.NEAREST if view.scale >= 1 else Image.Resampling.BILINEAR
    background = Image.fromarray(pixels).resize((width, height), resample)
    canvas_key = f"canvas_{shapes_key}_{view.box}_{view.scale}_{shape}"
    # a canvas keeps the drawing it was created with: handing it the shapes edited since would make it
    # reload them, and a reload built before the run that took in a deletion brings the deleted shape back
    drawn_key, drawing = st.session_state.get("annotate_initial_drawing", (None, None))
    if drawn_key != canvas_key:
        drawing = boxes_to_drawing(image_boxes_to_canvas(in_view, scale_x, scale_y, offset), stroke_color="#00e5ff",
                                   stroke_width=2, fill_color="rgba(0, 229, 255, 0.08)")
        drawing["objects"] += image_points_to_canvas(points_in_view, scale_x, scale_y, offset)
        drawing["objects"] += image_polygons_to_canvas(polygons_in_view, scale_x, scale_y, offset)
        st.session_state["annotate_initial_drawing"] = (canvas_key, drawing)
    mode = {"Box": "labeled_rect", "Point": "point", "Polygon": "polygon"}[shape]
    colour = {"Box": ("#00e5ff", "rgba(0, 229, 255, 0.08)"), "Point": ("#ffea00", "rgba(255, 234, 0, 0.6)"),
              "Polygon": ("#76ff03", "rgba(118, 255, 3, 0.15)")}[shape]
    with board:
        result = st_canvas(
            fill_color=colour[1], stroke_width=2, stroke_color=colour[0],
            background_image=background, background_image_fit="stretch", update_streamlit=True,
            width=width, height=height, drawing_mode=mode,
            label=label if shape == "Box" else "", font_size=14, point_display_radius=int(POINT_RADIUS),
            initial_drawing=drawing, key=canvas_key,
        )
        if view.scale >= 1:
            st.caption(f"Showing image pixels x {view.left}–{view.left + view.width}, y {view.top}–"
                       f"{view.top + view.height} of {image.width}×{image.height} at {zoom_name}; "
                       f"{len(out_of_view) + len(points_out_of_view) + len(polygons_out_of_view)} shape(s) "
                       "outside the view.")
    edited = out_of_view + canvas_boxes_to_image(result.boxes, scale_x, scale_y, image.width, image.height,
                                                 originals=in_view, offset=offset)
    edited_points = points_out_of_view + canvas_points_to_image(
        (result.json_data or {}).get("objects", []), scale_x, scale_y, image.width, image.height, label=label,
        originals=points_in_view, offset=offset)
    edited_polygons = polygons_out_of_view + canvas_polygons_to_image(
        (result.json_data or {}).get("objects", []), scale_x, scale_y, image.width, image.height, label=label,
        originals=polygons_in_view, offset=offset)
    st.session_state["annotate_working"] = (shapes_key, edited, edited_points, edited_polygons)
    edits = merge_edits(diff_boxes(saved, edited),
                        diff_points(saved_points, edited_points, max_distance=40 / view.scale),  # a 40 view px drag
                        diff_polygons(saved_polygons, edited_polygons))

    with tools:
        if not edits.empty:
            st.info(f"Unsaved: {edits.summary()}.", icon=":material/edit_note:")
    if reload_clicked:
        st.session_state["annotate_generation"] = generation + 1
        st.rerun()
    if save_clicked:
        if edits.empty:
            st.toast("Nothing to save.")
        else:
            try:
                common.apply_box_edits(record, edits, user)
            except common.ConflictError as exc:
                st.error(f"Not saved: {common.one_line(exc)} Reload the image to see the current boxes, then redo "
                         "your change.", icon=":material/sync_problem:")
            except Exception as exc:
                st.error(f"Not saved: {common.one_line(exc)}")
            else:
                st.session_state["annotate_generation"] = generation + 1
                st.session_state["annotate_saved_message"] = (generation + 1,
                                                              f"Saved {edits.summary()} on {image.name}.")
                st.rerun()
    if edited or edited_points or edited_polygons:
        st.dataframe([{"shape": "box", "label": b[4], "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]} for b in edited]
                     + [{"shape": "point", "label": p[2], "x0": p[0], "y0": p[1], "x1": None, "y1": None}
                        for p in edited_points]
                     + [dict(zip(("x0", "y0", "x1", "y1"), polygon_bounds(p)), shape=f"polygon ({len(p[0])} vertices)",
                             label=p[1]) for p in edited_polygons], hide_index=True, width="stretch",
                     column_order=("shape", "label", "x0", "y0", "x1", "y1"))


with draw_tab:
    draw_boxes()

with import_tab:
    common.annotation_import_form(user)


def adjudicate() -> None:
    st.caption("Images with points or boxes by two or more annotators. Shapes of one label that the "
               "annotators' one-to-one matching pairs (points within the tolerance, boxes at the IoU) form one "
               "proposal at their mean; those marked by more than half of the annotators are ticked. Saving "
               "stores the ticked ones as the image's consensus set (author `consensus`), with who decided "
               "what; `softcam evaluate --annotator consensus` and the Cohort page score against it.")
    from db import repository

    with common.read_session() as s:
        names = [c.name for c in repository.list_cohorts(s)]
    if not names:
        st.info("No cohort yet: import images on the Data page.", icon=":material/info:")
        return
    top = st.columns([1, 2, 1, 1])
    cohort = top[0].selectbox("Cohort", names, key="adjudicate_cohort")
    queue = common.adjudication_queue(cohort)
    if not queue:
        st.info("No image of this cohort has shapes by two annotators.", icon=":material/info:")
        return
    ids = [r.id for r in queue]
    chosen = top[1].selectbox(f"Image ({len(ids)} to adjudicate)", ids, key="adjudicate_image",
                              format_func=lambda i: common.record_title(queue[ids.index(i)]))
    tolerance = top[2].number_input("Point tolerance (px)", 0.0, 500.0, 10.0, key="adjudicate_tolerance")
    iou = top[3].number_input("Box IoU", 0.05, 1.0, 0.5, step=0.05, key="adjudicate_iou")
    record = queue[ids.index(chosen)]
    shapes, proposals, decisions = common.adjudication_view(record.id, tolerance, iou)
    image = common.load_record(record)
    left, right = st.columns([3, 2])
    with left:
        st.plotly_chart(annotators_figure(display_pixels(image), shapes, proposals), key=f"adjudicate_fig_{record.id}",
                        config={"scrollZoom": True, "displaylogo": False})
    with right:
        rows = [{"accept": p.suggested, "#": n, "kind": p.kind, "label": p.label or "", "votes": p.votes,
                 "annotators": ", ".join(p.annotators),
                 "where": (f"{p.geometry.x:.0f}, {p.geometry.y:.0f}" if p.kind == "point" else
                           f"{p.geometry.x0:.0f}, {p.geometry.y0:.0f} – {p.geometry.x1:.0f}, {p.geometry.y1:.0f}")}
                for n, p in enumerate(proposals, start=1)]
        edited = st.data_editor(rows, hide_index=True, width="stretch", key=f"adjudicate_table_{record.id}",
                                disabled=["#", "kind", "label", "votes", "annotators", "where"])
        accepted = [p for p, row in zip(proposals, edited) if row["accept"]]
        rejected = [p for p, row in zip(proposals, edited) if not row["accept"]]
        if st.button(f"Save consensus ({len(accepted)} of {len(proposals)})", type="primary",
                     icon=":material/gavel:", key="adjudicate_save"):
            try:
                saved = common.save_consensus(record.id, accepted, rejected, user)
            except Exception as exc:
                st.error(f"Not saved: {common.one_line(exc)}")
            else:
                st.success(f"Consensus of {common.plain(common.record_title(record))}: {saved} shape(s) saved, "
                           f"{len(rejected)} rejected.")
                decisions = common.adjudication_view(record.id, tolerance, iou)[2]
        if decisions:
            st.caption("Decisions (oldest first)")
            st.dataframe([dict(d, at=d["at"].strftime("%Y-%m-%d %H:%M:%S")) for d in decisions], hide_index=True,
                         width="stretch")


with adjudicate_tab:
    adjudicate()
