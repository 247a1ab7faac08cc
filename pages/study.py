"""Reader study: blinded maps in a seeded order per reader, a plausibility rating (1-5) for each and
optionally where the evidence should be; researchers create studies and see the per-method summary."""

from __future__ import annotations

import time

import streamlit as st

from pages import common
from softcam_core.reader_study import RATINGS

RATING_TEXT = {1: "1 · implausible", 2: "2", 3: "3 · partly plausible", 4: "4", 5: "5 · fully plausible"}

st.title("Reader study")
user = common.current_user()
researcher = user is not None and user.role in ("researcher", "admin")
studies = common.reader_studies()

if researcher:
    with st.expander("Create a reader study", expanded=not studies):
        with st.form("study_create"):
            left, right = st.columns(2)
            name = left.text_input("Name")
            cohorts = [row["cohort"] for row in common.cohort_summaries()]
            cohort = left.selectbox("Cohort", cohorts) if cohorts else None
            models = common.checkpoints()
            paths = [str(m.path) for m in models]
            model_path = right.selectbox("Model", paths, format_func=lambda p: models[paths.index(p)].label()) if paths else None
            methods = right.multiselect("Methods (shown blinded)", common.study_method_choices(),
                                        default=["softcam", "gradcam", "sanity:centre"])
            seed = left.number_input("Seed", 0, 2**31 - 1, 0)
            images = right.number_input("Images (0 = all)", 0, 100000, 0)
            if st.form_submit_button("Create study", icon=":material/add:"):
                try:
                    common.create_study(name, cohort, model_path, methods, int(seed), int(images) or None, user)
                except Exception as exc:
                    st.error(f"Not created: {common.one_line(exc)}")
                else:
                    st.rerun()

if not studies:
    st.info("No reader study yet." + ("" if researcher else " A researcher creates one."), icon=":material/info:")
    st.stop()

names = [s["name"] for s in studies]
chosen = st.selectbox("Study", names, key="study_name")
study = studies[names.index(chosen)]
items, answered = common.reader_items(study["id"], user)
done = len(answered)
st.progress(done / len(items) if items else 1.0, text=f"{done} of {len(items)} maps rated")
remaining = [item for item in items if item not in answered]

if remaining:
    image_id, method = remaining[0]
    number = items.index((image_id, method)) + 1
    key = f"study_{study['id']}_{image_id}_{method}"
    started = st.session_state.setdefault(f"{key}_shown", time.monotonic())
    try:
        image, heat = common.study_map(study, image_id, method)
    except Exception as exc:
        st.error(f"Cannot show map {number}: {common.one_line(exc)}")
        st.stop()
    # blinded: the method is never named on the page; the map is "Map n"
    left, right = st.columns(2)
    with left:
        st.plotly_chart(common.study_figure(image, None, f"Image {number}"), key=f"{key}_image",
                        config={"scrollZoom": True, "displaylogo": False})
    with right:
        st.plotly_chart(common.study_figure(image, heat, f"Map {number}"), key=f"{key}_map",
                        config={"scrollZoom": True, "displaylogo": False})
    rating = st.radio("How plausible is the highlighted evidence?", RATINGS, index=None, horizontal=True,
                      format_func=RATING_TEXT.get, key=f"{key}_rating")
    point = None
    with st.expander("Mark where the evidence should be (optional)"):
        st.caption("Image pixels of the location you would expect the evidence at.")
        mark_left, mark_right = st.columns(2)
        x = mark_left.number_input("x (px)", 0.0, float(image.pixels.shape[1]), value=None, key=f"{key}_x")
        y = mark_right.number_input("y (px)", 0.0, float(image.pixels.shape[0]), value=None, key=f"{key}_y")
        if x is not None and y is not None:
            point = (float(x), float(y))
    if st.button("Save and next", type="primary", icon=":material/navigate_next:", key="study_save",
                 disabled=rating is None):
        try:
            common.record_study_answer(study["id"], image_id, method, int(rating), user, point=point,
                                       seconds=time.monotonic() - started)
        except Exception as exc:
            st.error(f"Not saved: {common.one_line(exc)}")
        else:
            st.rerun()
else:
    st.success("You have rated every map of this study. Thank you.", icon=":material/task_alt:")

if researcher:
    st.subheader("Answers so far")
    answers, summary = common.study_results(study["id"])
    if answers.empty:
        st.caption("No answer yet.")
    else:
        st.caption("Mean plausibility per method with a 95 % bootstrap interval over all ratings (readers and images "
                   "pooled). `sanity:*` maps are model-free baselines: a method that does not beat them is not "
                   "judged more plausible than a fixed prior.")
        st.plotly_chart(common.study_summary_figure(summary), key="study_summary_fig")
        st.dataframe(summary, hide_index=True, width="stretch")
        st.download_button("Download answers (CSV)", answers.to_csv(index=False).encode(), f"{chosen}-answers.csv",
                           "text/csv", icon=":material/download:")
