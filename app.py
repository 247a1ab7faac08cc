"""SoftCAM Review — Streamlit entry point: sign-in, navigation by role, and the sidebar.

Run with ``streamlit run app.py`` (``make run``). Pages live in ``pages/``; all logic lives in
``service``, ``softcam_core``, ``annotations`` and ``db`` (docs/architecture.md).
"""

from __future__ import annotations

import streamlit as st

from pages import common

st.set_page_config(page_title="SoftCAM Review", page_icon=":material/biotech:", layout="wide")

PAGES = {
    "review": st.Page("pages/review.py", title="Review", icon=":material/visibility:", default=True),
    "annotate": st.Page("pages/annotate.py", title="Annotate", icon=":material/draw:"),
    "cohort": st.Page("pages/cohort.py", title="Cohort metrics", icon=":material/analytics:"),
    "models": st.Page("pages/models.py", title="Models", icon=":material/model_training:"),
    "data": st.Page("pages/data.py", title="Data", icon=":material/upload_file:"),
    "study": st.Page("pages/study.py", title="Reader study", icon=":material/rate_review:"),
}

try:
    common.start_database()
except Exception as exc:  # unreachable server, bad URL: say so instead of a traceback
    st.error(f"Database unavailable ({common.masked_db_url()}): {common.one_line(exc)}")
    st.stop()

user = common.current_user()
if user is None:
    # only the sign-in page exists until someone signs in; any deep link lands here
    st.navigation([st.Page(common.sign_in_page, title="Sign in", icon=":material/login:")], position="hidden").run()
    st.stop()

allowed = [PAGES[key] for key in common.pages_for_role(user.role)]
if not allowed:
    # an identity the provider vouches for but no admin has given an account (or a role) yet
    st.navigation([st.Page(common.no_role_page, title="No access yet", icon=":material/lock:")], position="hidden").run()
    st.stop()
common.keep_signed_in()
navigation = st.navigation({"SoftCAM Review": allowed})
common.sidebar(user)
navigation.run()
