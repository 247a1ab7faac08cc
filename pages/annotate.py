"""Annotate: draw, move, resize, relabel and delete lesion boxes; save with conflict detection; import files."""

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
from softcam_core.render import display_pixels

CANVAS_MAX_WIDTH, CANVAS_MAX_HEIGHT = 760, 620

st.title("Annotate")
user = common.current_user()
draw_tab, import_tab = st.tabs(["Draw boxes", "Import annotation file"])


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
