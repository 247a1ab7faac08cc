"""Review: one image, its prediction, SoftCAM class-evidence maps beside post-hoc saliency maps."""

from __future__ import annotations

import time

import numpy as np
import streamlit as st

from pages import common
from service.access import allowed as allowed_to
from service.catalogue import model_identity
from service.image_session import ImageSession, MapResult, activation_precision_for
from softcam_core.explain.specs import BASE_METHODS, METHODS, cascam_methods, method_spec, method_title
from service.boxes import zoomed_viewport
from softcam_core.render import (
    DISPLAY_MAX_SIDE,
    ComparisonPage,
    colour_limit,
    comparison_figure_bytes,
    display_pixels,
    map_display_side,
    map_npy,
    map_png,
    map_problem,
    overlay_figure,
    shared_evidence_limit,
    window_presets,
)

started = time.perf_counter()  # the page's own time to maps counts from the start of its run
st.title("Review")

model_info = common.current_model()
if model_info is None:
    st.info("Choose a model in the sidebar to review images.", icon=":material/info:")
    st.stop()

try:
    model, meta = common.load_model(model_info.path)
except Exception as exc:
    st.error(f"{common.plain(model_info.path.name)}: {common.one_line(exc)}")
    st.stop()

# ---------------------------------------------------------------------------------------------- image
loaded = common.image_picker(page="review", default_modality=model_info.modality)
if loaded is None:
    st.stop()
image, record = loaded
# an image of another modality: open it with that modality's model, unless the user picked this one
if (image.modality not in (model_info.modality, "other") and not st.session_state.get("model_chosen_by_user")):
    better = common.model_for_modality(image.modality)
    if better is not None and better.path != model_info.path:
        st.session_state["model_path"] = str(better.path)
        st.rerun()

# ---------------------------------------------------------------------------------------------- controls
# every method of the registry but the evidence maps (always shown for a SoftCAM net), then CasCAM over each base
post_hoc = [m for m in METHODS if m != "softcam"] + list(cascam_methods())
with st.expander("Display and methods", expanded=False, icon=":material/tune:"):
    left, middle, right = st.columns(3)
    with left:
        slow = ", ".join(method_title(m) for m in METHODS if method_spec(m).slow)
        methods = st.multiselect("Post-hoc methods", post_hoc, default=["gradcam"], format_func=method_title,
                                 key="review_methods",
                                 help=f"{slow} and CasCAM are slow: they run on request and are cached in the database.")
        cascam_base = st.selectbox("CasCAM stages of", ["(none)"] + [m for m in BASE_METHODS if m != "softcam"],
                                   format_func=lambda m: m if m == "(none)" else method_title(m),
                                   key="review_cascam")
    with middle:
        opacity = st.slider("Map opacity", 0.0, 1.0, 0.5, 0.05, key="review_opacity")
        shared_scale = st.checkbox("Shared scale for SoftCAM maps", value=True, key="review_shared",
                                   help="One colour range (±max over all classes) so evidence is comparable across classes.")
        show_boxes = st.checkbox("Show annotation boxes", value=True, key="review_boxes")
    with right:
        presets = window_presets(image)
        center = width = None
        function = "LINEAR"
        if presets:
            preset = st.selectbox("Window preset", list(presets), key="review_window")
            chosen = presets[preset]
            low, high = float(np.nanmin(image.raw)), float(np.nanmax(image.raw))
            span = max(2.0, high - low)
            center = st.slider("Level (centre)", low - span / 2, high + span / 2,
                               float(np.clip(chosen.center, low - span / 2, high + span / 2)),
                               key=f"review_level_{preset}")
            width = st.slider("Width", 1.0, 2 * span, float(np.clip(chosen.width, 1.0, 2 * span)),
                              key=f"review_width_{preset}")
            function = chosen.function
        invert = st.checkbox("Invert", value=False, key="review_invert")

# combined CasCAM maps put into the grid by the CasCAM section's button (kept apart from the multiselect's
# own state, which Streamlit owns)
methods = methods + [m for m in st.session_state.get("review_extra_methods", []) if m not in methods]
pixels = display_pixels(image, center=center, width=width, invert=invert, function=function)
boxes = common.image_boxes(record) if show_boxes else []

# ---------------------------------------------------------------------------------------------- prediction
store = common.map_store(model_info, record)
try:
    session = ImageSession(model, meta, image, model_identity(model_info.path), store=store)
    # the fast gradient CAMs of the predicted class come out of the prediction's own forward pass
    prediction = session.predict(with_methods=[m for m in methods if not method_spec(m).slow])
except Exception as exc:
    st.error(f"{common.plain(image.name)}: cannot run {common.plain(model_info.name)}: {common.one_line(exc)}")
    st.stop()

classes = prediction.classes
head_left, head_right = st.columns([1, 2])
with head_left:
    st.metric("Prediction", prediction.predicted_name, f"{prediction.probabilities[prediction.predicted]:.1%}",
              delta_color="off", delta_arrow="off")
    if model_info.modality not in (image.modality, "other") and image.modality != "other":
        st.warning(f"The model was trained on {model_info.modality} images; this is a {image.modality} image.")
        better = common.model_for_modality(image.modality)
        if better is not None and better.path != model_info.path:
            if st.button(f"Use the {image.modality} model {better.name}", key="review_switch_model"):
                st.session_state["model_path"] = str(better.path)
                st.rerun()
    if image.flags.get("burned_in_annotation"):
        st.warning("This DICOM file declares burned-in annotation: text in the pixels may identify the patient.")
with head_right:
    st.dataframe(prediction.table(), hide_index=True, width="stretch",
                 column_config={"class": st.column_config.TextColumn("Class"),
                                "probability": st.column_config.ProgressColumn("Probability", format="percent",
                                                                               min_value=0.0, max_value=1.0)})
target = st.radio("Maps for class", range(len(classes)), index=prediction.predicted, horizontal=True,
                  format_func=lambda c: classes[c] + (" (predicted)" if c == prediction.predicted else ""),
                  key=f"review_target_{len(classes)}")

# ---------------------------------------------------------------------------------------------- maps
results: list[MapResult] = []
problems: list[str] = []
# the selected class's evidence map first, then the other classes' (each titled with its class)
evidence = sorted(session.evidence_maps(), key=lambda r: r.target != target)
if not evidence:
    st.caption("This is a black-box baseline: it has no SoftCAM evidence maps; only post-hoc maps are shown.")
results.extend(evidence)

pending = []
for method in methods:
    if method_spec(method).slow and not session.is_cached(method, target):
        pending.append(method)
        continue
    try:
        results.append(session.explain(method, target))
    except Exception as exc:
        problems.append(f"{method_title(method)}: {common.one_line(exc)}")

if pending:
    names = ", ".join(method_title(m) for m in pending)
    if st.button(f"Compute {names}", icon=":material/hourglass_top:", key="review_run_slow"):
        with st.status(f"Computing {names}…", expanded=True) as status:
            bar = st.progress(0.0)
            for index, method in enumerate(pending):
                status.update(label=f"Computing {method_title(method)} ({index + 1}/{len(pending)})…")
                try:
                    results.append(session.explain(method, target))
                except Exception as exc:
                    problems.append(f"{method_title(method)}: {common.one_line(exc)}")
                bar.progress((index + 1) / len(pending))
            status.update(label="Slow methods done and cached", state="complete", expanded=False)
    else:
        st.caption(f"{names}: slow on this device; computed on request and cached for next time.")
for problem in problems:
    st.error(problem)

# ---- one zoom and pan for the image and every map beside it
REVIEW_ZOOMS = (1, 2, 4, 8, 16, 32)  # magnification of the whole-image view
zoom_row = st.columns([1, 2, 2])
zoom = zoom_row[0].selectbox("Zoom", REVIEW_ZOOMS, format_func=lambda z: "Whole image" if z == 1 else f"{z}×",
                             key="review_zoom", help="One zoom and pan for the image and every map beside it.")
view = None
if zoom > 1:
    centre = (zoom_row[1].slider("Pan ↔ (image x at the centre)", 0, image.width, image.width // 2,
                                 key=f"review_pan_x_{record.id}"),
              zoom_row[2].slider("Pan ↕ (image y at the centre)", 0, image.height, image.height // 2,
                                 key=f"review_pan_y_{record.id}"))
    view = zoomed_viewport(image.width, image.height, zoom, centre, image.width, image.height).box
    side = max(view[2] - view[0], view[3] - view[1])
    st.caption(f"All panels show image pixels x {view[0]}–{view[2]}, y {view[1]}–{view[3]}"
               + (" at native resolution." if side <= DISPLAY_MAX_SIDE else
                  f", subsampled {int(np.ceil(side / DISPLAY_MAX_SIDE))}× for display (zoom further for native pixels)."))

shared = shared_evidence_limit(results) if shared_scale else None
scores = {r.title: activation_precision_for(r, session, [b[:4] for b in boxes]) for r in results}

columns_per_row = 3
panels = [None] + results  # the image itself first
for row_start in range(0, len(panels), columns_per_row):
    columns = st.columns(columns_per_row)
    for column, result in zip(columns, panels[row_start:row_start + columns_per_row]):
        with column:
            if result is None:
                figure = overlay_figure(pixels, None, title=f"Image · {image.name}", boxes=boxes,
                                        crop=session.crop_box(), view=view)
                st.plotly_chart(figure, width="stretch", key="review_fig_image",
                                config={"displaylogo": False})
                st.caption(f"{image.width}×{image.height} px · {image.modality}"
                           + (" · dashed: region the model sees" if session.crop_box() else "")
                           + (f" · {image.spacing[0]:.3f}×{image.spacing[1]:.3f} mm/px" if image.spacing else ""))
                continue
            shown_title = result.title + (" (selected)" if result.method == "softcam" and result.target == target
                                          and len(evidence) > 1 else "")
            problem = map_problem(result.input_map)
            figure = overlay_figure(  # a degenerate map is not drawn: one flat colour would look like a finding
                pixels, None if problem else result.image_map, title=shown_title, signed=result.signed,
                zmax=colour_limit(result, shared), opacity=opacity, boxes=boxes,
                colorbar_title="evidence" if result.signed else "saliency", crop=session.crop_box(),
                heat_max_side=map_display_side(result.method), view=view)
            st.plotly_chart(figure, width="stretch", key=f"review_fig_{result.method}_{result.target}",
                            config={"displaylogo": False})
            if problem:
                st.warning(f"{result.title}: {problem}. Nothing is drawn.", icon=":material/warning:")
            score = scores.get(result.title)
            caption = f"{result.seconds:.2f} s" + (" (cached)" if result.cached else "")
            caption += (f" · activation precision {score:.3f}" if score is not None
                        else " · activation precision: no annotation" if not boxes else "")
            st.caption(caption)
            stem = f"{image.name.rsplit('.', 1)[0]}_{result.method.replace(':', '-')}_{result.target_name}"
            png, npy = st.columns(2)
            # rendered on click only: encoding every map's PNG up front cost ~0.1 s per map per rerun
            png.download_button("PNG", lambda result=result: map_png(
                                    pixels, result.image_map, signed=result.signed, opacity=opacity,
                                    zmax=colour_limit(result, shared)),
                                file_name=f"{stem}.png", mime="image/png", key=f"dl_png_{stem}",
                                icon=":material/image:", width="stretch")
            npy.download_button("NPY", lambda result=result: map_npy(result.input_map), file_name=f"{stem}.npy",
                                mime="application/octet-stream", key=f"dl_npy_{stem}",
                                icon=":material/data_array:", width="stretch")

st.session_state["review_seconds_to_maps"] = time.perf_counter() - started
st.caption(f"Maps of {common.plain(image.name)} ready in {st.session_state['review_seconds_to_maps']:.2f} s on "
           f"{common.device_text()}.")

# ---------------------------------------------------------------------------------------------- CasCAM
if cascam_base != "(none)":
    st.subheader(f"CasCAM stages · {method_title(cascam_base)}")
    stages_key = f"cascam_{session.model_id}_{session.image_id}_{cascam_base}_{target}"
    if stages_key not in st.session_state and st.button("Run CasCAM cascade", key="review_run_cascam",
                                                        icon=":material/layers:"):
        with st.status("Running the CasCAM cascade…", expanded=False) as status:
            try:
                st.session_state[stages_key] = session.cascam_stages(cascam_base, target)
                status.update(label="CasCAM cascade done; its combined map is cached", state="complete")
            except Exception as exc:
                status.update(label="CasCAM failed", state="error")
                st.error(f"CasCAM: {common.one_line(exc)}")
    stages = st.session_state.get(stages_key)
    if stages:
        strip = st.columns(len(stages))
        for index, (column, stage) in enumerate(zip(strip, stages)):
            with column:
                st.image(stage.masked_input, caption=f"Stage {index + 1}: input", width="stretch")
                st.image(map_png(stage.input_pixels, stage.heat, signed=False, opacity=opacity),
                         caption=f"Stage {index + 1}: map · weight {stage.weight:.2f}", width="stretch")
        combined = f"cascam:{cascam_base}"
        if combined not in methods:
            def show_combined(name: str = combined) -> None:
                st.session_state["review_extra_methods"] = st.session_state.get("review_extra_methods", []) + [name]

            st.button(f"Show the combined {method_title(combined)} map in the grid", key="review_show_cascam",
                      icon=":material/grid_view:", on_click=show_combined)
    else:
        st.caption("Each stage masks what the previous stage found and explains the rest; once run, the combined "
                   f"map is cached and can be shown in the grid ({method_title('cascam:' + cascam_base)}).")

# ---------------------------------------------------------------------------------------------- precompute
def precompute_panel(cohort_name: str) -> None:
    """Start (and follow) an ``explain`` job: this model's maps of every image of the cohort, cached."""
    st.caption("Computes the chosen maps of every image of the cohort in the background and keeps them in the "
               "database map cache: opening an image then shows them at once, slow methods included. It runs in "
               "the app, or on `softcam worker` processes when the app is started with SOFTCAM_JOB_RUNNER=worker.")
    user = common.current_user()
    allowed = user is not None and allowed_to(user.role, "run_jobs")
    offered = (["softcam"] if session.is_softcam else []) + post_hoc
    chosen = [m for m in (["softcam"] if session.is_softcam else []) + methods if m in offered]
    with st.form("review_precompute"):
        left, middle, right = st.columns([3, 1, 1])
        wanted = left.multiselect("Maps", offered, default=chosen, format_func=method_title,
                                  key="review_precompute_methods")
        target_choice = middle.radio("For", ["pred", "all"], format_func={"pred": "predicted class",
                                                                          "all": "every class"}.get)
        split = right.selectbox("Images", ["all", "test", "val", "train"], help="Which split of the cohort.")
        submitted = st.form_submit_button("Precompute", icon=":material/dynamic_feed:", disabled=not allowed,
                                          help=None if allowed else "Researchers and admins run jobs.")
    if submitted:
        try:
            job_id = common.start_explain_job({"model": str(model_info.path), "cohort": cohort_name,
                                               "methods": wanted, "target": target_choice, "split": split}, user)
        except Exception as exc:
            st.error(f"Could not start: {common.one_line(exc)}")
        else:
            st.toast(f"Precompute job {job_id} started.")
    jobs = [j for j in common.list_jobs("explain") if (j.params or {}).get("cohort") == cohort_name
            and (j.params or {}).get("model") == str(model_info.path)]
    if not jobs:
        return
    job = jobs[0]  # the latest
    st.caption(f"Latest: {common.plain(common.job_label(job))}")
    if job.status in ("queued", "running"):
        common.job_progress(job.id, job.status, "maps")
        st.button("Cancel precompute", key=f"review_cancel_explain_{job.id}", icon=":material/cancel:",
                  on_click=common.cancel_job_and_tell, args=(job.id, user), disabled=not allowed,
                  help="Stops after the current map; the maps computed so far stay cached.")
    elif job.status == "failed":
        st.error(f"Precompute failed: {common.plain(job.error)}")
    elif job.message:
        st.caption(common.plain(job.message))


cohort_name = st.session_state.get("review_cohort") if st.session_state.get("review_source") == "Cohort" else None
if cohort_name:
    with st.expander(f"Precompute maps for the cohort {cohort_name}", icon=":material/dynamic_feed:"):
        precompute_panel(cohort_name)

# ---------------------------------------------------------------------------------------------- export
st.divider()
page = ComparisonPage(image_name=image.name, model_name=model_info.name, prediction=prediction,
                      pixels=pixels, maps=results, scores=scores, boxes=boxes, shared_scale=shared_scale)
export_png, export_pdf, _ = st.columns([1, 1, 3])
export_png.download_button("Comparison (PNG)", lambda: comparison_figure_bytes(page, "png", opacity),
                           file_name=f"{image.name.rsplit('.', 1)[0]}_comparison.png", mime="image/png",
                           icon=":material/download:", key="dl_comparison_png", width="stretch")
export_pdf.download_button("Comparison (PDF)", lambda: comparison_figure_bytes(page, "pdf", opacity),
                           file_name=f"{image.name.rsplit('.', 1)[0]}_comparison.pdf", mime="application/pdf",
                           icon=":material/picture_as_pdf:", key="dl_comparison_pdf", width="stretch")
