"""The app's logic, shared by the Streamlit pages and the CLI: no Streamlit here.

``catalogue`` (checkpoints and loaded models), ``image_session`` (one image x one model: prediction
and maps, cached in memory and the database), ``boxes`` (canvas editing -> box changes), ``jobs``
(background work with progress in the jobs table), ``cohorts`` (cohort folders -> database).
Rendering lives in :mod:`softcam_core.render`; the layers are in docs/architecture.md.
"""
