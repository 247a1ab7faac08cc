"""Cohort metrics: model x methods x metrics over a cohort, run as a background job stored in the database."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import common
from softcam_core.explain.specs import method_title

st.title("Cohort metrics")
user = common.current_user()

from db import evaluation  # noqa: E402
from softcam_core.evaluate import METRIC_CHOICES  # noqa: E402
from softcam_core.explain import METHODS  # noqa: E402

METRIC_TITLES = {
    "topk": "Top-k localization precision", "topk_positive": "Top-k precision over the positive cells (variant)",
    "activation_precision": "Activation precision",
    "activation_sensitivity": "Activation sensitivity", "activation_consistency": "Activation consistency",
    "pointing_game": "Pointing game", "iou_top": "IoU of the top 10 %", "energy_top": "Energy in the top 15 %",
    "average_precision": "Pixel average precision", "deletion": "Deletion curve (AUDC)",
    "deletion_full": "Deletion of the whole image (variant)", "deletion_blur": "Deletion with a blur fill (variant)",
    "deletion_logodds": "Deletion in log-odds (variant)",
}

checkpoints = common.checkpoints()
with common.read_session() as _s:
    choices = {c["name"]: c for c in evaluation.evaluation_cohorts(_s, common.cohort_folders())}
if not checkpoints or not choices:
    st.info("A cohort metric needs a model and a cohort: images in the database (Data page, `softcam images "
            "import`) with boxes drawn or imported on the Annotate page, or a cohort folder with lesion masks "
            "(e.g. the demo cohorts made by `make run`, or `softcam synth`).", icon=":material/info:")
    st.stop()


def cohort_title(name: str) -> str:
    choice = choices[name]
    if not choice["in_database"]:
        return f"{name} — folder {choice['folder']}"
    where = f" · folder {choice['folder'].name}" if choice["folder"] else ""
    return f"{name} — {choice['images']} images, {choice['with_boxes']} with boxes{where}"


# Cohort and ground truth sit outside the form: the ground truths and box labels offered depend on the cohort.
top_left, top_right = st.columns(2)
with top_left:
    cohort_names = list(choices)
    # first offer a cohort with a folder (labelled, split: the demo cohorts) over e.g. the unlabelled uploads
    default = next((i for i, n in enumerate(cohort_names) if choices[n]["folder"]), 0)
    cohort_name = st.selectbox("Cohort", cohort_names, index=default, format_func=cohort_title, key="cohort_name")
choice = choices[cohort_name]
truths = [t for t in evaluation.GROUND_TRUTHS
          if (t == "database" and choice["in_database"]) or (t == "folder" and choice["folder"])]
with top_right:
    ground_truth = st.radio("Ground truth", truths, format_func=evaluation.GROUND_TRUTHS.get, key="cohort_truth",
                            help="Database boxes: the union of each image's current boxes (drawn on the Annotate "
                                 "page or imported), read when the job starts. Folder masks: the cohort folder's "
                                 "masks/<image>.png.")

with st.form("cohort_run"):
    left, right = st.columns(2)
    with left:
        paths = [str(c.path) for c in checkpoints]
        current = st.session_state.get("model_path")
        model_path = st.selectbox("Model", paths, index=paths.index(current) if current in paths else 0,
                                  format_func=lambda p: checkpoints[paths.index(p)].label())
        split = st.selectbox("Images", ["test", "val", "train", "all"], help="Which split of the cohort to score.")
        limit = st.number_input("At most this many images (0 = all)", 0, 100000, 0, step=10)
        box_label = annotator = None
        if ground_truth == "database":
            with common.read_session() as _s:
                labels = evaluation.box_labels(_s, cohort_name)
                annotators = evaluation.cohort_annotators(_s, cohort_name)
            box_label = st.selectbox("Boxes", [None, *labels], key="cohort_box_label",
                                     format_func=lambda v: "every label" if v is None else f"labelled {v}")
            if len(annotators) > 1:
                annotator = st.selectbox(
                    "Annotator", [None, *annotators], key="cohort_annotator",
                    format_func=lambda v: "every annotator's shapes" if v is None else v,
                    help="Score against one reader's shapes, or the adjudicated consensus (Annotate → "
                         "Adjudicate). Run once per annotator to see how far the metrics move with the reader: "
                         "`softcam evaluate --annotator each` writes that spread.")
    with right:
        methods = st.multiselect("Methods", list(METHODS), default=["softcam", "gradcam"],
                                 format_func=method_title)
        metrics = st.multiselect("Metrics", list(METRIC_CHOICES),
                                 default=["topk", "activation_precision", "pointing_game", "deletion"],
                                 format_func=lambda m: METRIC_TITLES.get(m, m))
        target = st.selectbox("Explained class", ["disease", "label", "pred"],
                              format_func={"disease": "Disease class", "label": "True label",
                                           "pred": "Predicted class"}.get)
    submitted = st.form_submit_button("Run evaluation", type="primary", icon=":material/play_arrow:")
if ground_truth == "database":
    st.caption("Images without a class label are scored under '(unlabeled)' when nothing needs their class; with "
               "the true-label target, activation consistency or a multi-class disease target they are left out "
               "(the job summary counts them).")

if submitted:
    if not methods or not metrics:
        st.error("Choose at least one method and one metric.")
    else:
        folder = choice["folder"]
        params = {"model": model_path, "cohort": cohort_name, "ground_truth": ground_truth,
                  "folder": str(folder) if folder else None, "box_label": box_label, "annotator": annotator,
                  "methods": methods, "metrics": metrics, "split": split, "limit": int(limit) or None,
                  "target": target}
        try:
            job_id = common.start_evaluation_job(params, user)
        except Exception as exc:
            st.error(f"Could not start the evaluation: {common.one_line(exc)}")
        else:
            st.session_state["cohort_job_started"] = job_id
            st.toast(f"Evaluation job {job_id} started.")

jobs = common.list_jobs("evaluate")
if not jobs:
    st.caption("No evaluation has run yet.")
    st.stop()

job_ids = [job.id for job in jobs]
# The selector's value is set through its key: a job just started or resumed is shown at once, and
# the choice survives a visit to another page (which drops the widget's own state).
started = st.session_state.pop("cohort_job_started", None)
if started in job_ids:
    st.session_state["cohort_job_choice"] = started
elif st.session_state.get("cohort_job_choice") not in job_ids:
    remembered = st.session_state.get("cohort_job")
    st.session_state["cohort_job_choice"] = remembered if remembered in job_ids else job_ids[0]
job_id = st.selectbox("Evaluation", job_ids, key="cohort_job_choice",
                      format_func=lambda i: common.job_label(next(j for j in jobs if j.id == i), status=False))
st.session_state["cohort_job"] = job_id


def compact_summary(cohort: pd.DataFrame) -> pd.DataFrame:
    """One column per metric: ``mean [95 % CI]  (n)``; the full table is in the downloads."""
    metrics = [c[:-5] for c in cohort.columns if c.endswith("_mean")]
    rows = []
    for _, row in cohort.iterrows():
        out = {"method": method_title(str(row["method"]))}
        for metric in metrics:
            mean, low, high, n = (row.get(f"{metric}_{k}") for k in ("mean", "ci_low", "ci_high", "n"))
            out[metric] = ("undefined" if pd.isna(mean) else
                           f"{mean:.3f} [{low:.3f}, {high:.3f}]" if not pd.isna(low) else f"{mean:.3f}")
            out[metric] += f"  (n={int(n)})" if not pd.isna(n) else ""
        rows.append(out)
    return pd.DataFrame(rows)


job = next(j for j in jobs if j.id == job_id)  # the snapshot the selector's label was drawn from
finished = f" {job.finished_at:%Y-%m-%d %H:%M} UTC" if job.finished_at else ""
st.caption(f"Status: **{job.status}**{finished} · Ground truth: {common.plain(evaluation.ground_truth_text(job.params or {}))}")
if job.status in ("queued", "running"):
    common.job_progress(job_id, job.status, "image × method")
    # outside the polling fragment: a click there could land while the fragment redraws itself
    st.button("Cancel evaluation", key=f"cohort_cancel_{job_id}", icon=":material/cancel:",
              on_click=common.cancel_job_and_tell, args=(job_id, user),
              help="Stops at its next step (one method's maps for a batch of images, or their deletion curves). "
                   "Rows already written are kept: Resume continues from them.")
if job.status in ("failed", "cancelled"):
    if job.status == "failed":
        st.error(f"Evaluation failed: {common.plain(job.error)}")
    else:
        st.info(f"Evaluation {common.plain(job.message or 'cancelled')} after {job.progress_done}/{job.progress_total or '?'} "
                "image × method.")
    if common.resumable(job, jobs) and st.button(
            "Resume", key=f"cohort_resume_{job.id}", icon=":material/play_arrow:",
            help="A new job with the same settings continues in this evaluation's folder: the image × method "
                 "pairs already computed are kept, the rest are computed."):
        try:
            st.session_state["cohort_job_started"] = common.start_evaluation_job(None, user, resume=job.id)
        except Exception as exc:
            st.error(f"Could not resume: {common.one_line(exc)}")
        else:
            st.rerun()
    st.stop()
if job.status != "done" or not job.result_path:
    st.stop()

result = common.load_evaluation(job.result_path)
if result is None:
    st.warning(f"The results of job {job.id} are no longer at {common.plain(job.result_path)}.")
    st.stop()

for warning in result.warnings:
    st.warning(common.plain(warning), icon=":material/warning:")
lesion_file = result.files.get("lesion_occlusion")
if lesion_file is not None and Path(lesion_file).is_file():
    lesion = pd.read_csv(lesion_file).iloc[0]
    show = {"holds": st.success, "fails": st.error}.get(lesion["verdict"], st.warning)
    show(f"**Does the model use the annotated lesions? {common.plain(lesion['verdict'])}.** "
         f"{common.plain(lesion['evidence'])}", icon=":material/center_focus_strong:")
st.subheader("Cohort summary")
st.caption("Mean, standard deviation and 95 % bootstrap interval over the images where the metric is defined.")
st.dataframe(compact_summary(result.cohort), hide_index=True, width="stretch")
tabs = st.tabs(["Figures", "Per image", "Paired tests", "Downloads"])
with tabs[0]:
    from softcam_core.evaluate import cohort_figures

    figures = cohort_figures(result.per_image, result.curves)
    for name, figure in figures.items():
        st.plotly_chart(figure, width="stretch", key=f"cohort_fig_{name}")
    if not figures:
        st.caption("No figure for the chosen metrics.")
with tabs[1]:
    st.dataframe(result.per_image, hide_index=True, width="stretch")
with tabs[2]:
    if result.paired.empty:
        st.caption("Paired tests need at least two methods.")
    else:
        st.dataframe(result.paired, hide_index=True, width="stretch")
with tabs[3]:
    out_dir = Path(job.result_path)
    for name, path in sorted(result.files.items()):
        path = Path(path)
        if path.is_file():
            st.download_button(f"{path.relative_to(out_dir)}", path.read_bytes(), file_name=path.name,
                               key=f"cohort_dl_{name}", icon=":material/download:")
