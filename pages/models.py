"""Models: checkpoints with their metadata and metrics, default model per modality, training with live progress."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from pages import common
from softcam_core.models import ARCHS

st.title("Models")
user = common.current_user()

checkpoints = common.checkpoints()
defaults = common.default_models()  # modality -> checkpoint path

if checkpoints:
    rows = []
    for info in checkpoints:
        meta = info.meta
        metrics = meta.get("metrics") or {}
        row = {
            "default": str(info.path) == defaults.get(info.modality),
            "name": info.name, "modality": info.modality, "architecture": meta.get("arch"), "head": info.head,
            "classes": ", ".join(map(str, meta.get("classes", []))), "input": f"{meta.get('img_size')} px",
            "L1": meta.get("l1"), "L2": meta.get("l2"),
            "size (MB)": round(info.size_mb, 1),
            "modified": dt.datetime.fromtimestamp(info.modified).strftime("%Y-%m-%d %H:%M"),
        }
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                row[key] = round(float(value), 4)
        rows.append(row)
    st.dataframe(rows, hide_index=True, width="stretch",
                 column_config={"default": st.column_config.CheckboxColumn("Default")})

    st.subheader("Default model per modality")
    st.caption("The Review page starts with the default model of the image's modality.")
    modalities = sorted({info.modality for info in checkpoints})
    columns = st.columns(max(1, len(modalities)))
    for column, modality in zip(columns, modalities):
        candidates = [str(info.path) for info in checkpoints if info.modality == modality]
        current = defaults.get(modality)
        with column:
            # no preselection when none is set: showing the first model would read as "this is the default"
            chosen = st.selectbox(modality, candidates, key=f"default_{modality}",
                                  index=candidates.index(current) if current in candidates else None,
                                  placeholder="none set: choose one",
                                  format_func=lambda p: next(i.name for i in checkpoints if str(i.path) == p))
            if chosen is not None and chosen != current:
                if st.button("Make default", key=f"make_default_{modality}", disabled=user.role not in ("admin", "researcher")):
                    common.set_default_model(chosen, modality, user)
                    st.rerun()
else:
    st.info("No checkpoint yet: train one below, or run `make run` to prepare the demo models.")

st.subheader("Import a model trained elsewhere")
st.caption("A torchvision `state_dict` (or the SoftCAM authors' checkpoint). The imported model is checked "
           "against the original network (class probabilities to 1e-4) before it is written; weights that do "
           "not fit the architecture are refused with the keys named. Whole pickled models run code when "
           "read: import those with `softcam models import --trust` on the command line.")
with st.form("import_model", clear_on_submit=False):
    left, middle, right = st.columns(3)
    with left:
        weights_file = st.file_uploader("Weights (.pth / .pt)", type=["pth", "pt"], key="import_weights")
        import_name = st.text_input("Name", value="imported_model", key="import_name")
    with middle:
        import_arch = st.selectbox("Architecture", ARCHS, index=ARCHS.index("resnet18"), key="import_arch")
        import_classes = st.text_input("Classes (output order, negative first)", value="healthy,diseased",
                                       key="import_classes")
        import_modality = st.selectbox("Modality", ["fundus", "oct", "cxr", "other"], key="import_modality")
    with right:
        import_size = st.number_input("Input size (px)", 16, 2048, 224, key="import_size")
        import_mean = st.text_input("Mean", value="0.485,0.456,0.406", key="import_mean")
        import_std = st.text_input("Std", value="0.229,0.224,0.225", key="import_std")
        import_convert = st.checkbox("Convert to SoftCAM (exact GAP + FC conversion)", value=True, key="import_convert")
    import_submitted = st.form_submit_button("Import model", icon=":material/upload_file:",
                                             disabled=user.role not in ("admin", "researcher"))
if import_submitted:
    if weights_file is None:
        st.error("Choose a weights file.")
    else:
        try:
            imported = common.import_model(weights_file.getvalue(), user, name=import_name.strip(), arch=import_arch,
                                           classes=[c.strip() for c in import_classes.split(",")],
                                           img_size=int(import_size), modality=import_modality,
                                           mean=tuple(float(v) for v in import_mean.split(",")),
                                           std=tuple(float(v) for v in import_std.split(",")),
                                           to_softcam=import_convert)
        except Exception as exc:
            st.error(common.one_line(exc))
        else:
            st.success(f"Imported {common.plain(imported.path.name)}")
            st.json(imported.meta)

st.subheader("Train a model")
folders = common.cohort_folders()
labelled = common.trainable_cohorts()
sources = {f"folder:{name}": f"{name} — folder {path}" for name, path in folders.items()}
sources |= {f"cohort:{name}": f"{name} — database, " + ", ".join(f"{n} {label}" for label, n in counts.items())
            for name, counts in labelled.items()}
if not sources:
    st.caption("Training needs labelled images: a cohort folder laid out like `softcam synth` output "
               "(images/, labels.csv), or a database cohort labelled on the Data page.")
else:
    with st.form("train"):
        left, middle, right = st.columns(3)
        with left:
            source = st.selectbox("Cohort", list(sources), format_func=sources.get, key="train_source",
                                  help="A database cohort trains on its saved train/val/test split; images "
                                  "without a split get a stratified one (saved with the cohort), unlabelled "
                                  "images are left out.")
            name = st.text_input("Checkpoint name", value="my_model")
        with middle:
            arch = st.selectbox("Architecture", ARCHS, index=ARCHS.index("resnet18"))
            head = st.radio("Head", ["softcam", "baseline"], horizontal=True,
                            format_func={"softcam": "SoftCAM (evidence maps)", "baseline": "Black box (GAP + FC)"}.get)
        with right:
            epochs = st.number_input("Epochs", 1, 500, 5)
            img_size = st.select_slider("Input size (px)", [64, 96, 128, 160, 224, 256, 384, 512], value=128)
            l1 = st.number_input("L1 (sparsity) weight", 0.0, 1.0, 0.0, format="%.5f")
            l2 = st.number_input("L2 (ridge) weight", 0.0, 1.0, 0.0, format="%.5f")
        submitted = st.form_submit_button("Train", type="primary", icon=":material/model_training:")
    if submitted:
        kind, cohort = source.split(":", 1)
        params = {"arch": arch, "head": head, "epochs": int(epochs),
                  "img_size": int(img_size), "l1": float(l1), "l2": float(l2), "name": name.strip() or "model"}
        params |= {"data": str(folders[cohort])} if kind == "folder" else {"cohort": cohort}
        try:
            st.session_state["train_job"] = common.start_training_job(params, user)
        except Exception as exc:
            st.error(f"Could not start training: {common.one_line(exc)}")

jobs = common.list_jobs("train")
if jobs:
    st.subheader("Training runs")

    @st.fragment(run_every=1.0)
    def training_progress(drawn_running: frozenset[int]) -> None:
        """Polls the job rows; when the set of running jobs differs from the one the page was drawn
        for, the whole page is redrawn (new checkpoints in the list, Cancel buttons up to date)."""
        latest = common.list_jobs("train")[:5]
        if frozenset(j.id for j in latest if j.status in ("queued", "running")) != drawn_running:
            st.rerun()
        for job in latest:
            label = common.job_label(job)
            if job.status in ("queued", "running"):
                total = job.progress_total or 0
                st.progress(min(job.progress_done / total, 1.0) if total else 0.0,
                            text=f"{label} · {job.message or ''}")
            elif job.status == "failed":
                st.error(f"{common.plain(label)}: {common.plain(job.error)}")
            elif job.status == "cancelled":
                st.info(f"{common.plain(label)}: {common.plain(job.message or 'cancelled')}")
            else:
                st.success(f"{common.plain(label)}: {common.plain(job.message or 'done')}")

    running = [job for job in jobs[:5] if job.status in ("queued", "running")]
    training_progress(frozenset(job.id for job in running))
    # outside the polling fragment: a click there could land while the fragment redraws itself
    for job in running:
        st.button(f"Cancel training #{job.id}", key=f"train_cancel_{job.id}", icon=":material/cancel:",
                  on_click=common.cancel_job_and_tell, args=(job.id, user),
                  help="Stops after the current step. Once an epoch has finished, its best-on-validation "
                       "checkpoint so far stays in the model list.")
