"""Annotate: draw, move, resize, relabel and delete lesion boxes; save with conflict detection; import
files; adjudicate several annotators' shapes into a consensus set."""

from __future__ import annotations

import streamlit as st
from PIL import Image
from streamlit_drawable_canvas import boxes_to_drawing, st_canvas

from pages import common
from service.boxes import (
    canvas_boxes_to_image,
    canvas_scale,
    canvas_size,
    diff_boxes,
    image_boxes_to_canvas,
    lesion_labels,
)
from softcam_core.render import annotators_figure, display_pixels

CANVAS_MAX_WIDTH, CANVAS_MAX_HEIGHT = 760, 620

st.title("Annotate")
user = common.current_user()
draw_tab, import_tab, adjudicate_tab = st.tabs(["Draw boxes", "Import annotation file", "Adjudicate"])


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

    saved = common.saved_boxes(record)  # [(annotation, (x0, y0, x1, y1, label))]
    labels = lesion_labels(image.modality, [box[4] for _, box in saved])
    tools, board = st.columns([1, 3])
    with tools:
        label = st.selectbox("Label for new boxes", labels, key="annotate_label")
        st.caption("Draw a box by dragging on the image. Turn on the canvas's edit toggle to move, resize, "
                   "relabel (click a selected box) or delete (Delete key) a box. Nothing is stored until you save.")
        save_clicked = st.button("Save", type="primary", icon=":material/save:", key="annotate_save",
                                 width="stretch")
        reload_clicked = st.button("Discard changes", icon=":material/undo:", key="annotate_reload",
                                   width="stretch")
        st.caption(f"{len(saved)} saved box(es) · {image.width}×{image.height} px")

    scale = canvas_scale(image.width, image.height, CANVAS_MAX_WIDTH, CANVAS_MAX_HEIGHT)
    width, height = canvas_size(image.width, image.height, scale)
    scale_x, scale_y = width / image.width, height / image.height
    originals = [box for _, box in saved]
    # a new key whenever the stored boxes change (save, discard, other user's edit) resets the canvas
    generation = st.session_state.setdefault("annotate_generation", 0)
    canvas_key = f"canvas_{record.id}_{common.boxes_signature(saved)}_{generation}"
    background = Image.fromarray(display_pixels(image)).resize((width, height), Image.Resampling.BILINEAR)
    with board:
        result = st_canvas(
            fill_color="rgba(0, 229, 255, 0.08)", stroke_width=2, stroke_color="#00e5ff",
            background_image=background, background_image_fit="stretch", update_streamlit=True,
            width=width, height=height, drawing_mode="labeled_rect", label=label, font_size=14,
            initial_drawing=boxes_to_drawing(image_boxes_to_canvas(originals, scale_x, scale_y),
                                             stroke_color="#00e5ff", stroke_width=2,
                                             fill_color="rgba(0, 229, 255, 0.08)"),
            key=canvas_key,
        )
    edited = canvas_boxes_to_image(result.boxes, scale_x, scale_y, image.width, image.height,
                                          originals=originals)
    edits = diff_boxes([(annotation, box) for annotation, box in saved], edited)

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
    if edited:
        st.dataframe([{"label": b[4], "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]} for b in edited],
                     hide_index=True, width="stretch")


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
