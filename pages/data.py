"""Data: import images (files, folders, zip archives, DICOM series), de-identified, with a report of what was
accepted and rejected and why."""

from __future__ import annotations

import streamlit as st

from pages import common
from service.cohorts import ServerFolderError, server_import_folder
from softcam_core.imaging import MODALITIES
from softcam_core.paths import import_root

st.title("Data")
user = common.current_user()

cohorts = common.cohort_summaries()
if cohorts:
    st.dataframe(cohorts, hide_index=True, width="stretch")
else:
    st.caption("No cohort in the database yet.")

st.subheader("Import images")
st.caption("DICOM files are de-identified on import (the whole PS3.15 Table E.1-1 basic profile); only the "
           "de-identified copy is stored, and no original file name. Zip archives and folders are searched "
           "recursively; several files of one DICOM series become one image each. An image that may show "
           "burned-in text is held in quarantine until an admin releases it below.")
with st.form("import_images", clear_on_submit=True):
    left, right = st.columns(2)
    with left:
        existing = [row["cohort"] for row in cohorts]
        cohort = st.selectbox("Cohort", existing + ["(new cohort)"], key="data_cohort_choice",
                              index=(existing + ["(new cohort)"]).index(st.session_state.get("data_cohort"))
                              if st.session_state.get("data_cohort") in existing else 0)
        new_name = st.text_input("New cohort name", key="data_new_cohort",
                                 help="Used when '(new cohort)' is chosen.")
        modality = st.selectbox("Modality", ["auto"] + list(MODALITIES),
                                help="auto: DICOM files say; photographs are guessed from their content.")
    with right:
        uploads = st.file_uploader("Files or zip archives", accept_multiple_files=True, key="data_files")
        root = import_root()
        folder = st.text_input("…or a folder on the server", placeholder=f"{root}/study42",
                               help=f"Imported recursively, from under {root} only.") if root is not None else ""
    submitted = st.form_submit_button("Import", type="primary", icon=":material/upload:")

if submitted:
    name = new_name.strip() if cohort == "(new cohort)" else cohort
    sources: list = [(f.name, f.getvalue()) for f in uploads or []]
    if folder.strip():
        try:
            sources.append(server_import_folder(folder))
        except ServerFolderError as exc:
            st.error(str(exc))
            sources = []
    if not name:
        st.error("Name the new cohort.")
    elif not sources:
        st.error("Choose files, a zip archive or a folder to import.")
    else:
        with st.status(f"Importing into {common.plain(name)}…", expanded=True) as status:
            try:
                report = common.import_images(sources, name, None if modality == "auto" else modality, user)
            except Exception as exc:
                status.update(label="Import failed", state="error")
                st.error(common.one_line(exc))
            else:
                status.update(label=f"Imported into {common.plain(name)}: {len(report.accepted)} accepted, "
                                    f"{len(report.rejected)} rejected", state="complete")
                st.session_state["data_last_report"] = report
                st.session_state["data_cohort"] = name
                st.rerun()  # redraw the cohort table with the new images

report = st.session_state.get("data_last_report")
if report is not None:
    accepted, held_now, rejected = st.columns(3)
    accepted.metric("Accepted", len(report.accepted))
    held_now.metric("Held (burned-in text)", len(report.quarantined),
                    help="Accepted but hidden from reviewers until an admin releases them.")
    rejected.metric("Rejected", len(report.rejected))
    if report.accepted:
        st.dataframe([common.row_of(item) for item in report.accepted], hide_index=True, width="stretch")
    if report.rejected:
        st.markdown("**Rejected**")
        st.dataframe([common.row_of(item) for item in report.rejected], hide_index=True, width="stretch")

st.subheader("Class labels")
st.caption("A CSV names each image by its original file name (or stem, DICOM PatientID, pseudonym) or by "
           "`image_id`: `image,label` (class names), Kaggle DR `image,level` (grade 0 → first class, 1–4 → "
           "second: DR onset), RSNA `patientId,Target`. Nothing changes unless every row resolves; each change "
           "is kept in the image's label history (who, when, previous value).")
label_cohorts = [row["cohort"] for row in cohorts]
if not label_cohorts:
    st.caption("Import images first.")
else:
    with st.form("import_labels", clear_on_submit=True):
        left, right = st.columns(2)
        label_cohort = left.selectbox("Cohort", label_cohorts, key="labels_cohort")
        partial = left.checkbox("Label the rows that resolve, list the others", key="labels_partial")
        label_file = right.file_uploader("Label CSV", type=["csv"], key="labels_file")
        labels_submitted = st.form_submit_button("Import labels", icon=":material/label:")
    if labels_submitted:
        if label_file is None:
            st.error("Choose a CSV file.")
        else:
            try:
                result = common.import_labels(label_cohort, label_file.getvalue(), label_file.name, user,
                                              partial=partial)
            except Exception as exc:
                st.error(common.one_line(exc))
                for line, text in getattr(exc, "problems", [])[:50]:
                    st.text(f"line {line}: {text}")
            else:
                st.success(f"{result.changed} image(s) labelled, {result.unchanged} unchanged, "
                           f"{len(result.problems)} row(s) skipped ({result.layout} layout)")
                for line, text in result.problems[:50]:
                    st.text(f"skipped line {line}: {text}")
    with st.expander("Edit one image's label"):
        rows = common.cohort_label_rows(st.session_state.get("labels_cohort") or label_cohorts[0])
        if rows:
            st.dataframe(rows, hide_index=True, width="stretch")
            pick = st.selectbox("Image", rows, format_func=lambda r: f"{r['image']} ({r['label'] or 'unlabeled'})",
                                key="labels_pick")
            history = common.label_history_rows(pick["id"])
            if history:
                st.caption(f"History of {pick['image']} (oldest first)")
                st.dataframe(history, hide_index=True, width="stretch")
            new_label = st.text_input("Label (empty clears it)", value=pick["label"], key=f"labels_new_{pick['id']}")
            if st.button("Save label", key="labels_save", icon=":material/save:"):
                try:
                    common.set_image_label(pick["id"], new_label.strip() or None, user)
                except Exception as exc:
                    st.error(common.one_line(exc))
                else:
                    st.rerun()

held = common.held_images()
if user is not None and user.role == "admin":
    st.subheader("Quarantine")
    st.caption("Images that may show burned-in text (BurnedInAnnotation YES, or unknown on ultrasound, secondary "
               "captures, endoscopy and camera photos). Reviewers do not see them and they are not evaluated. "
               "Look at each one; release it only if no patient identity is visible in its pixels.")
    if not held:
        st.caption("No image is held.")
    for record in held:
        with st.expander(f"{record.pseudonym} · {common.plain(record.cohort_name)}"):
            st.text(record.quarantine_reason)
            try:
                image = common.load_record(record)
            except Exception as exc:
                st.error(common.one_line(exc))
            else:
                st.image(image.pixels, caption=record.pseudonym, width="stretch", clamp=True)
            if st.button("Release", key=f"release_{record.id}", icon=":material/lock_open:"):
                try:
                    common.release_image(record.id, user)
                except Exception as exc:
                    st.error(common.one_line(exc))
                else:
                    st.rerun()
elif held:
    st.info(f"{len(held)} imported image(s) are held for possible burned-in text until an admin releases them.",
            icon=":material/lock:")
