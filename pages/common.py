"""Streamlit helpers shared by app.py and the pages: database engine, sign-in, sidebar, model choice.

Only Streamlit glue lives here; the logic is in ``service`` (catalogue, image sessions, box edits,
jobs, cohort folders), ``softcam_core.render``, ``db.repository`` and ``annotations``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from db.session import mask_db_url
from service import catalogue
from service import annotations as annotation_service
from service import images as image_service
from service.boxes import BoxEdits
from service.signin import change_password, create_first_admin
from service.catalogue import CheckpointInfo, checkpoint_info, list_checkpoints
from service.cohorts import find_cohort_folders, register_cohort_folder
from service.image_session import DatabaseMapStore, MapStore
from service import jobs
from service import studies as study_service
from softcam_core.paths import db_url

ROLES = ("clinician", "annotator", "researcher", "admin")
# Pages each role is offered, in navigation order. Review is everyone's start page.
ROLE_PAGES = {
    "clinician": ("review", "annotate", "study"),
    "annotator": ("review", "annotate", "study"),
    "researcher": ("review", "annotate", "cohort", "models", "data", "study"),
    "admin": ("review", "annotate", "cohort", "models", "data", "study"),
}
SESSION_PARAM = "session"  # URL query parameter holding the signed sign-in token (service.signin)


@dataclass(frozen=True)
class User:
    id: int | None
    name: str
    role: str


def one_line(exc: BaseException) -> str:
    """An exception as the one-line message users see (never a traceback), as *text*: its Markdown
    characters escaped, since messages quote user text (file, cohort and label names)."""
    return plain(" ".join(str(exc).split()) or exc.__class__.__name__)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&])")


def plain(text) -> str:
    """``text`` (user text: names, labels, messages) escaped so that Streamlit's Markdown shows it
    verbatim: no link, image, emphasis, HTML or LaTeX can come out of it."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def masked_db_url() -> str:
    return mask_db_url(db_url())


def pages_for_role(role: str) -> tuple[str, ...]:
    """The pages ``role`` is offered; none for an unknown role (an identity without an account)."""
    return ROLE_PAGES.get(role, ())


# --------------------------------------------------------------------------------------------------
# Database
# --------------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _engine_for(url: str):
    from db.session import get_engine, upgrade

    engine = get_engine(url)
    upgrade(engine)  # the app migrates on start (issue 7)
    return engine


def engine():
    """The SQLAlchemy engine of ``SOFTCAM_DB_URL``, upgraded to the latest revision on first use."""
    return _engine_for(db_url())


def start_database() -> None:
    """Upgrade the database, create the first admin account when there is no user yet, and register the
    demo cohort folders (once per process and database)."""
    _start_database(db_url())


@st.cache_resource(show_spinner="Preparing the database…")
def _start_database(url: str) -> bool:
    from db import repository
    from db.session import session_scope

    with session_scope(_engine_for(url)) as session:
        created = create_first_admin(session)
        if created is not None and created[1] is not None:  # printed once, in the server's terminal
            print(f"SoftCAM Review: first sign-in as {created[0]!r}; its random password is in {created[1]} "
                  "(delete the file after signing in and changing it)", file=sys.stderr, flush=True)
        # jobs a stopped app process left "running" would otherwise show progress forever
        repository.close_interrupted_jobs(session)
        # Review opens on the demo's SoftCAM net of each modality unless someone chose another default
        catalogue.apply_demo_defaults(session)
    register_demo_cohorts()
    return True


def session():
    """Context manager: one read-write database transaction (``db.session.session_scope``)."""
    from db.session import session_scope

    return session_scope(engine())


def read_session():
    """Context manager: one read-only transaction, for what a page shows (no SQLite write lock; a write
    in it raises)."""
    from db.session import session_scope

    return session_scope(engine(), readonly=True)


# --------------------------------------------------------------------------------------------------
# Sign-in
# --------------------------------------------------------------------------------------------------


def _oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all
        return False


def current_user() -> User | None:
    """The signed-in user: local account from the session, or the OIDC identity when configured. The
    account is re-read on every run (request): a deactivated account is signed out, a changed role
    applies at once."""
    user = st.session_state.get("user")
    if isinstance(user, dict):  # set by tests / AppTest
        return User(user.get("id"), user["name"], user.get("role", "clinician"))
    # (duck-typed: a rerun may re-import this module, and the stored User is then of the old class)
    if user is not None and getattr(user, "id", None) is not None:
        from service.signin import current_account

        with read_session() as s:
            account = current_account(s, user.id)
            fresh = User(account.id, account.username, account.role) if account is not None else None
        if fresh is None:
            sign_out()
            return None
        st.session_state["user"] = fresh
        return fresh
    if user is not None:
        return User(user.id, user.name, user.role)
    token = st.query_params.get(SESSION_PARAM)
    if token:  # a reload (new browser session) of a signed-in page: the URL carries a signed token
        from db.session import session_scope
        from service.signin import user_for_token

        with session_scope(engine(), readonly=True) as s:
            account = user_for_token(s, token)
            user = User(account.id, account.username, account.role) if account is not None else None
        if user is not None:
            st.session_state["user"], st.session_state[SESSION_PARAM] = user, token
            return user
        del st.query_params[SESSION_PARAM]  # expired or refused: back to the sign-in form
    if _oidc_configured() and getattr(st.user, "is_logged_in", False):
        from service.signin import NO_ROLE, oidc_account

        claims = {key: st.user.get(key) for key in ("sub", "email", "email_verified", "name")}
        with read_session() as s:
            account = oidc_account(s, claims)
            user = (User(account.id, account.username, account.role) if account is not None
                    else User(None, str(claims.get("email") or claims.get("name") or "unknown"), NO_ROLE))
        if account is not None:
            st.session_state["user"] = user
        return user  # an unknown identity gets no role (no page) until an admin grants one
    return None


def sign_in_page() -> None:
    """Local sign-in form (or the OIDC button when ``[auth]`` is configured in secrets)."""

    left, middle, right = st.columns([1, 1.2, 1])
    with middle:
        st.title("SoftCAM Review")
        st.caption("Self-explainable classifiers, saliency maps, lesion annotations and explainability metrics.")
        if _oidc_configured():
            st.button("Sign in with your organisation", on_click=st.login, type="primary")
            return
        with st.form("sign_in"):
            name = st.text_input("User name", key="sign_in_name")
            password = st.text_input("Password", type="password", key="sign_in_password")
            submitted = st.form_submit_button("Sign in", type="primary", width="stretch")
        if submitted:
            from service.signin import issue_token, sign_in

            with session() as s:  # committed whatever the outcome: failed sign-ins are kept (rate limit, audit)
                result = sign_in(s, name, password)
                account = result.user
                user = User(account.id, account.username, account.role) if account is not None else None
                token = issue_token(account.id, account.password_hash) if account is not None else None
            if user is None:
                st.error(result.message)
            else:
                st.session_state["user"], st.session_state[SESSION_PARAM] = user, token
                keep_signed_in()
                st.rerun()
        st.caption(f"Database: {masked_db_url()}")


def change_password_form(user: User) -> None:
    """Change the signed-in user's password (the first-run admin's random password is in the key folder)."""

    with st.form("change_password", clear_on_submit=True):
        current = st.text_input("Current password", type="password")
        new = st.text_input("New password", type="password")
        again = st.text_input("New password again", type="password")
        if st.form_submit_button("Change password"):
            if new != again:
                st.error("The new password and its repetition differ.")
            else:
                try:
                    with session() as s:
                        change_password(s, user.id, current, new)
                except (ValueError, PermissionError) as exc:
                    st.error(f"{one_line(exc)[:1].upper()}{one_line(exc)[1:]}.")
                else:
                    st.success("Password changed.")


def keep_signed_in() -> None:
    """Put the session's sign-in token into the page URL (every run: Streamlit drops query parameters
    when the page changes), so that reloading the page keeps the user signed in."""
    token = st.session_state.get(SESSION_PARAM)
    if token and st.query_params.get(SESSION_PARAM) != token:
        st.query_params[SESSION_PARAM] = token


def no_role_page() -> None:
    """What a signed-in identity without an account sees: nothing of the data, and how to get access."""
    user = current_user()
    st.title("No access yet")
    st.text(f"Signed in as: {user.name if user else 'unknown'}")  # the provider's text, shown as text
    st.info("No account of this app is linked to this identity, so it has no role. Ask an admin to run "
            "`softcam users add <your email> --role <role>` or `softcam users link <account> <subject>`.",
            icon=":material/lock:")
    st.button("Sign out", on_click=sign_out)


def sign_out() -> None:
    st.session_state.pop("user", None)
    st.session_state.pop(SESSION_PARAM, None)
    if SESSION_PARAM in st.query_params:
        del st.query_params[SESSION_PARAM]
    if _oidc_configured():
        st.logout()


# --------------------------------------------------------------------------------------------------
# Sidebar: user, device, database, model
# --------------------------------------------------------------------------------------------------


def sidebar(user: User) -> None:
    with st.sidebar:
        st.markdown(f"**{plain(user.name)}** · {user.role}")
        left, right = st.columns(2)
        left.button("Sign out", on_click=sign_out, key="sign_out", type="tertiary")
        if user.id is not None and not _oidc_configured():
            with right.popover("Password", type="tertiary"):
                change_password_form(user)
        model_selector()
        st.divider()
        st.caption(f"Compute: {device_text()}")
        st.caption(f"Database: {masked_db_url()}")


@st.cache_resource(show_spinner=False)
def device_text() -> str:
    """Compute device in words (``softcam_core.device.describe_device``), once per process."""
    from softcam_core.device import describe_device

    return describe_device()


def checkpoints() -> list[CheckpointInfo]:
    found, problems = list_checkpoints()
    for problem in problems:
        st.sidebar.warning(problem, icon=":material/warning:")
    return found


def default_model_path(modality: str | None = None) -> str | None:
    """The default checkpoint for a modality as chosen on the Models page (database), else None."""
    from db import repository

    with read_session() as s:
        return repository.get_default_model(s, modality) if modality else None


def model_selector() -> CheckpointInfo | None:
    """Sidebar choice of the current model; remembered in the session as ``model_path``."""
    found = checkpoints()
    if not found:
        st.warning("No model yet. Train one on the Models page or run `make run` for the demo models.")
        st.session_state.pop("model_path", None)
        return None
    paths = [str(info.path) for info in found]
    current = st.session_state.get("model_path")
    if current not in paths:  # the default of a modality (Models page, or the demo's), else a SoftCAM net
        current = str(catalogue.preferred_model(found, default_models()).path)
    st.session_state["model_path"] = current
    st.session_state["model_choice"] = current  # pages may switch the model (e.g. Review's modality hint)

    def chosen() -> None:
        st.session_state["model_path"] = st.session_state["model_choice"]
        st.session_state["model_chosen_by_user"] = True  # Review then keeps it whatever the image

    st.selectbox("Model", paths, format_func=lambda p: found[paths.index(p)].label(), key="model_choice",
                 on_change=chosen)
    return found[paths.index(current)]


def model_for_modality(modality: str) -> CheckpointInfo | None:
    """The model to use for images of ``modality`` when the user chose none: its default (Models page or
    demo), else the newest SoftCAM net of that modality; None when no checkpoint is of that modality."""
    found, _ = list_checkpoints()  # its problems are already in the sidebar (model_selector): not twice
    preferred = catalogue.preferred_model(found, default_models(), modality)
    return preferred if preferred is not None and preferred.modality == modality else None


def current_model() -> CheckpointInfo | None:
    path = st.session_state.get("model_path")
    if not path:
        return None
    for info in checkpoints():
        if str(info.path) == path:
            return info
    return None


_FROZEN_MODELS: set[int] = set()


def load_model(path):
    """``(model, meta)`` from ``softcam_core.catalogue.load_model`` (cached across sessions by path and mtime).

    After a model is first loaded, the process's long-lived objects (libraries, the model) are moved
    out of the garbage collector's reach (``gc.freeze``): a full collection then scans only what page
    runs allocate instead of ~0.3 s of torch and plotly objects, which otherwise lands in a page run
    now and then (docs/performance.md, finding 7).
    """
    import gc

    model, meta = catalogue.load_model(path)
    if id(model) not in _FROZEN_MODELS:
        _FROZEN_MODELS.add(id(model))
        gc.freeze()
    return model, meta


# --------------------------------------------------------------------------------------------------
# Cohorts and images
# --------------------------------------------------------------------------------------------------



def register_demo_cohorts() -> None:
    """Cohort folders under SOFTCAM_HOME/demo and /cohorts become database cohorts (idempotent)."""
    from db import repository

    for name, folder in find_cohort_folders().items():
        with session() as s:
            if any(c.name == name for c in repository.list_cohorts(s)):
                continue
            modality = folder.name if folder.name in ("fundus", "oct", "cxr") else None
            register_cohort_folder(s, folder, name, modality)


def cohort_folders() -> dict:
    return find_cohort_folders()


@st.cache_resource(max_entries=32, show_spinner=False)
def _load_stored_image(path: str, name: str, modality: str | None, mtime: float):
    from softcam_core.imaging import load_image

    return load_image(path, name=name, modality=modality)


def load_record(record):
    """The MedicalImage of a database image row (decoded once per process)."""
    from db import repository

    path = repository.image_path(record)
    name = f"{record.pseudonym}{record.extension}"  # the original file name is not kept
    return _load_stored_image(str(path), name, record.modality, path.stat().st_mtime)


def record_title(record) -> str:
    name = record.pseudonym
    extra = " · ".join(v for v in (record.label, record.split) if v)
    return f"{name}" + (f" ({extra})" if extra else "")


def _cohort_select(page: str, default_modality: str | None = None):
    from db import repository

    with read_session() as s:
        cohorts = repository.list_cohorts(s)
    if not cohorts:
        return None
    names = [c.name for c in cohorts]
    preferred = next((c.name for c in cohorts if c.modality == default_modality), names[0])
    current = st.session_state.get(f"{page}_cohort", preferred)
    index = names.index(current) if current in names else 0
    name = st.selectbox("Cohort", names, index=index, key=f"{page}_cohort_choice")
    st.session_state[f"{page}_cohort"] = name
    return next(c for c in cohorts if c.name == name)


def _step_buttons(page: str, ids: list[int], selected: int, compact: bool = False) -> int:
    """Previous / next image buttons; ``compact`` shows arrows only (narrow columns)."""
    previous, following = st.columns(2)
    position = ids.index(selected)

    def go(offset: int) -> None:
        # a callback runs before the rerun, so this run already draws the buttons for the new image
        # (returning the new id from the click instead left Previous disabled one image too long)
        st.session_state[f"{page}_image"] = ids[position + offset]

    previous.button("◀" if compact else "Previous", key=f"{page}_prev", help="Previous image", on_click=go, args=(-1,),
                    icon=None if compact else ":material/chevron_left:", disabled=position == 0, width="stretch")
    following.button("▶" if compact else "Next", key=f"{page}_next", help="Next image", on_click=go, args=(1,),
                     icon=None if compact else ":material/chevron_right:", disabled=position == len(ids) - 1,
                     width="stretch")
    return selected


def image_picker(page: str, default_modality: str | None = None):
    """Sidebar-free image choice for Review: a cohort image (search, filters, previous/next) or an
    upload (imported, de-identified, into cohort ``Uploads``). Returns ``(MedicalImage, record)`` or None."""
    from db import repository

    source = st.segmented_control("Image source", ["Cohort", "Upload"], default="Cohort", required=True, key=f"{page}_source",
                                  label_visibility="collapsed")
    if source == "Upload":
        upload = st.file_uploader("Image file (PNG, JPEG, TIFF or DICOM)", key=f"{page}_upload",
                                  help="Stored de-identified in the cohort 'Uploads' so it can be annotated.")
        if upload is None:
            st.info("Upload an image to review it.", icon=":material/upload_file:")
            return None
        try:
            record = import_upload(upload.name, upload.getvalue(), current_user())
            return load_record(record), record
        except Exception as exc:
            st.error(one_line(exc))
            return None

    columns = st.columns([1.2, 1.2, 1, 1, 1.4])
    with columns[0]:
        cohort = _cohort_select(page, default_modality)
    if cohort is None:
        st.info("No cohort yet: import images on the Data page or upload one.", icon=":material/info:")
        return None
    with read_session() as s:
        labels = sorted({i.label for i in repository.list_images(s, cohort) if i.label})
    with columns[1]:
        search = st.text_input("Search", key=f"{page}_search", placeholder="pseudonym, exact file name or DICOM id")
    with columns[2]:
        label = st.selectbox("Class", ["all"] + labels, key=f"{page}_label")
    with columns[3]:
        split = st.selectbox("Split", ["all", "train", "val", "test"], key=f"{page}_split")
    with columns[4]:
        annotated = st.selectbox("Annotations", ["all", "annotated", "not annotated"], key=f"{page}_annotated")
    with read_session() as s:
        records = repository.list_images(
            s, cohort, search=search or None, label=None if label == "all" else label,
            split=None if split == "all" else split,
            annotated=None if annotated == "all" else annotated == "annotated")
    if not records:
        st.warning("No image matches these filters.")
        return None
    ids = [r.id for r in records]
    selected = st.session_state.get(f"{page}_image")
    if selected not in ids:
        selected = ids[0]
    pick, step = st.columns([3, 1])
    with step:
        st.write("")  # align the buttons with the select box
        selected = _step_buttons(page, ids, selected)
    with pick:
        chosen = st.selectbox(f"Image ({len(ids)} found)", ids, index=ids.index(selected), key=f"{page}_image_{selected}",
                              format_func=lambda i: record_title(records[ids.index(i)]))
    st.session_state[f"{page}_image"] = chosen
    record = records[ids.index(chosen)]
    try:
        return load_record(record), record
    except Exception as exc:
        st.error(one_line(exc))
        return None


def import_upload(name: str, data: bytes, user: User | None, cohort: str = "Uploads"):
    """Import one uploaded file (de-identified) and return its image row; bad files raise with one line."""
    import tempfile
    from pathlib import Path


    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(name).name
        path.write_bytes(data)
        with session() as s:
            return image_service.upload_for_review(s, user.id if user else None, path, cohort)


QUEUE_SCOPES = ("my queue (not annotated by me)", "annotated by me", "disagreements (annotators differ)",
                "unannotated (by anyone)", "all images")


def cohort_image_picker(page: str, queue_for: User | None = None):
    """Annotate's picker: a cohort, the queue of images this user has not annotated, previous/next."""
    from db import repository

    top = st.columns([1, 1, 2, 1])
    with top[0]:
        cohort = _cohort_select(page)
    if cohort is None:
        st.info("No cohort yet: import images on the Data page.", icon=":material/info:")
        return None
    # the filter and the image live in the URL too, so a reload (or a shared link) opens the same queue
    scopes = list(QUEUE_SCOPES)
    if f"{page}_scope" not in st.session_state and st.query_params.get("queue") in scopes:
        st.session_state[f"{page}_scope"] = st.query_params["queue"]
    if f"{page}_image" not in st.session_state and str(st.query_params.get("image", "")).isdigit():
        st.session_state[f"{page}_image"] = int(st.query_params["image"])
    with top[1]:
        scope = st.selectbox("Show", scopes, key=f"{page}_scope", help="my queue: images without my shapes; mine: "
                             "images with my shapes; disagreements: two annotators' shapes do not all match "
                             "(points within 10 px, boxes at IoU 0.5); unannotated: nobody's shapes yet")
    st.query_params["queue"] = scope
    me = queue_for.id if queue_for is not None and queue_for.id is not None else None
    with read_session() as s:  # each queue is one or two queries, however large the cohort
        if scope == "disagreements (annotators differ)":
            from db.agreement import images_with_disagreement

            records = images_with_disagreement(s, cohort)
        else:
            records = repository.list_images(
                s, cohort, not_annotated_by=me if scope.startswith("my queue") else None,
                annotated_by=me if scope == "annotated by me" else None,
                annotated=False if scope == "unannotated (by anyone)" else None)
    if not records:
        st.success({"my queue (not annotated by me)": "Queue empty: every image of this cohort has your annotations."}
                   .get(scope, "No image in this queue."), icon=":material/task_alt:")
        return None
    ids = [r.id for r in records]
    selected = st.session_state.get(f"{page}_image")
    if selected not in ids:
        selected = ids[0]
    with top[3]:
        st.write("")
        selected = _step_buttons(page, ids, selected, compact=True)
    with top[2]:
        chosen = st.selectbox(f"Image ({len(ids)})", ids, index=ids.index(selected), key=f"{page}_image_{selected}",
                              format_func=lambda i: record_title(records[ids.index(i)]))
    st.session_state[f"{page}_image"] = chosen
    st.query_params["image"] = str(chosen)
    record = records[ids.index(chosen)]
    try:
        return load_record(record), record
    except Exception as exc:
        st.error(one_line(exc))
        return None


# --------------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------------


def saved_shapes(record, editor: User | None = None) -> tuple[list, list, list, int]:
    """Live boxes, points and polygons of an image, ``([((id, version), (x0, y0, x1, y1, label))],
    [((id, version), (x, y, label))], [((id, version), (((x, y), ...), label))], hidden)`` in image
    pixels.

    With ``editor``, only the shapes that user may edit on the canvas: their own and those without
    an author (a cohort folder's, a system import's). Other annotators' shapes are left out and
    counted in ``hidden``, so annotations stay independent (agreement means nothing otherwise) and
    nobody edits another annotator's set; the Adjudicate tab compares and merges them.
    """
    from db import repository

    if record is None:
        return [], [], [], 0
    boxes, points, polygons, hidden = [], [], [], 0
    with read_session() as s:
        for row in repository.list_annotations(s, record.id):
            if row.kind not in ("box", "point", "polygon"):
                continue
            if editor is not None and row.author_id not in (None, editor.id):
                hidden += 1
                continue
            shape = repository.annotation_geometry(row)
            if row.kind == "box":
                boxes.append(((row.id, row.version), (shape.x0, shape.y0, shape.x1, shape.y1, row.label or "")))
            elif row.kind == "point":
                points.append(((row.id, row.version), (shape.x, shape.y, row.label or "")))
            else:
                polygons.append(((row.id, row.version), (tuple(shape.points), row.label or "")))
    return boxes, points, polygons, hidden


def saved_boxes(record) -> list[tuple[tuple[int, int], tuple]]:
    """Live box annotations of an image (every annotator's): ``[((id, version), (x0, y0, x1, y1, label))]``."""
    return saved_shapes(record)[0]


def image_boxes(record) -> list[tuple]:
    return [box for _, box in saved_boxes(record)]


def boxes_signature(saved) -> str:
    import hashlib

    return hashlib.sha1(repr([ref for ref, _ in saved]).encode()).hexdigest()[:10]


def apply_box_edits(record, edits: BoxEdits, user: User | None) -> None:
    """Store one canvas save in ONE transaction: all edits or none (a conflict rolls everything back)."""
    with session() as s:
        annotation_service.apply_box_edits(s, user.id if user is not None else None, record.id, edits)


def adjudication_queue(cohort: str) -> list:
    """Images of ``cohort`` with shapes by at least two annotators (``db.repository.images_to_adjudicate``)."""
    from db import repository

    with read_session() as s:
        return repository.images_to_adjudicate(s, cohort)


def adjudication_view(image_id: int, tolerance: float, iou: float) -> tuple[dict, list, list[dict]]:
    """``(shapes by annotator, consensus proposals, record of decisions)`` of one image."""
    from db import repository
    from db.agreement import annotator_shapes
    from db.schema import Image as ImageRow

    with read_session() as s:
        image = s.get(ImageRow, image_id)
        _, shapes = annotator_shapes(s, image.cohort, image_ids=[image_id])
        proposals = repository.consensus_proposals(s, image_id, tolerance=tolerance, iou=iou)
        record = repository.adjudication_record(s, image_id)
    return {name: dict(drawn) for name, drawn in shapes.get(image_id, {}).items()}, proposals, record


def save_consensus(image_id: int, accepted: list, rejected: list, user: User | None) -> int:
    """An adjudication of one image (``service.annotations.save_consensus``), one transaction."""
    with session() as s:
        return annotation_service.save_consensus(s, user.id if user else None, image_id, accepted, rejected)


ANNOTATION_FORMATS = {"coco": "COCO JSON", "voc": "Pascal VOC XML (file or zip)", "rsna": "RSNA pneumonia CSV",
                      "yolo": "YOLO txt (file or zip)", "csv": "Plain CSV", "mask": "Binary mask PNG (file or zip)"}


def annotation_import_form(user: User | None) -> None:
    """Upload an annotation file; import it atomically; show the per-row error report when rows are bad."""
    import tempfile
    from pathlib import Path

    from db import repository

    with read_session() as s:
        cohorts = [c.name for c in repository.list_cohorts(s)]
    if not cohorts:
        st.info("Import images first (Data page).")
        return
    done = st.session_state.pop("annotation_import_report", None)
    if done is not None:
        st.success(done[0])
        for warning in done[1]:
            st.warning(warning)
    with st.form("annotation_import"):
        left, right = st.columns(2)
        cohort = left.selectbox("Cohort", cohorts, key="import_cohort")
        fmt = left.selectbox("Format", list(ANNOTATION_FORMATS), format_func=ANNOTATION_FORMATS.get, key="import_fmt")
        label = left.text_input("Label for mask imports", value="lesion", key="import_label")
        upload = right.file_uploader("Annotation file", key="import_file")
        submitted = st.form_submit_button("Import annotations", type="primary", icon=":material/upload:")
    if not submitted:
        return
    if upload is None:
        st.error("Choose an annotation file.")
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(upload.name).name
        path.write_bytes(upload.getvalue())
        try:
            with session() as s:
                result = annotation_service.import_annotation_file(s, user.id if user else None, path, fmt, cohort,
                                                            label=label or None)
        except repository.AnnotationImportError as exc:
            report = exc.report
            st.error(f"{plain(upload.name)}: {len(report.errors)} bad row(s) of {report.rows}; nothing was imported.")
            st.dataframe([{"where": e.location, "problem": e.problem} for e in report.errors],
                         hide_index=True, width="stretch")
            return
        except Exception as exc:
            st.error(f"{plain(upload.name)}: {one_line(exc)}")
            return
    # rerun so the Draw tab (drawn earlier in this run) shows the imported boxes; the report survives it
    st.session_state["annotation_import_report"] = (
        f"{upload.name}: {result.added} annotation(s) added on {result.images} image(s); "
        f"{result.duplicates} already present.",
        [f"{w.location}: {w.problem}" for w in result.report.warnings])
    st.rerun()


# --------------------------------------------------------------------------------------------------
# Models in the database, map cache
# --------------------------------------------------------------------------------------------------


def _model_row(info: CheckpointInfo):
    """The database row of a checkpoint, registered on first use (hashing the file once per mtime)."""
    return _registered_model(str(info.path), info.path.stat().st_mtime_ns, db_url())


@st.cache_resource(max_entries=64, show_spinner=False)
def _registered_model(path: str, mtime: int, url: str):
    with session() as s:
        return catalogue.registered_model(s, path)


def map_store(info: CheckpointInfo | None = None, record=None) -> MapStore | None:
    """The database map cache for this model and stored image (None for an image not in the database)."""
    if info is None or record is None:
        return None
    return DatabaseMapStore(engine(), _model_row(info), record)


def default_models() -> dict[str, str]:
    """``{modality: checkpoint path}`` of the default models chosen on the Models page."""
    from db import repository

    with read_session() as s:
        return {row.modality: row.checkpoint_path for row in repository.list_models(s)
                if row.is_default and row.modality}


def set_default_model(path: str, modality: str, user: User | None) -> None:

    info = checkpoint_info(path)
    row = _model_row(info)
    with session() as s:
        catalogue.set_default_model(s, user.id if user else None, row.id)


# --------------------------------------------------------------------------------------------------
# Background jobs
# --------------------------------------------------------------------------------------------------


def list_jobs(kind: str) -> list:
    from db import repository

    with read_session() as s:
        return repository.list_jobs(s, kind)


def get_job(job_id: int):
    from db import repository

    with read_session() as s:
        try:
            return repository.get_job(s, job_id)
        except repository.NotFoundError:
            return None


def job_label(job, *, status: bool = True) -> str:
    return jobs.job_label(job, status=status)


def evaluation_folder(job) -> Path:
    return jobs.evaluation_folder(job)


def resumable(job, listed: list) -> bool:
    return jobs.resumable(job, listed)


@st.fragment(run_every=1.0)
def job_progress(job_id: int, drawn_status: str, unit: str) -> None:
    """A progress bar that polls the job row: progress survives reloads because it lives in the
    database, not the session. ``unit`` names what the job counts (``"maps"``).

    ``drawn_status`` is the status the rest of the page was drawn for; when the row has moved on
    (queued -> running -> done, failed or cancelled) the whole page is redrawn, so the status line,
    the Cancel button and the results always describe the same moment.
    """
    job = get_job(job_id)
    if job is None:
        return
    if job.status != drawn_status:
        st.rerun()
    total = job.progress_total or 0
    fraction = (job.progress_done / total) if total else 0.0
    st.progress(min(fraction, 1.0), text=f"{job.status.capitalize()}: {job.progress_done}/{total or '?'} "
                                            f"{unit} · {job.message or ''}")


def cancel_job_and_tell(job_id: int, user: User | None) -> None:
    """A Cancel button's callback: cancel a queued or running job, or say in a toast why not (it had
    just finished)."""
    from db import repository
    from service.access import AccessDenied

    try:
        jobs.cancel_job(engine(), job_id, user.id if user else None)
    except (repository.RepositoryError, AccessDenied) as exc:
        st.toast(one_line(exc))


def start_evaluation_job(params: dict | None, user: User | None, *, resume: int | None = None) -> int:
    """``service.jobs.start_evaluation_job`` on the app's database, as ``user``."""
    return jobs.start_evaluation_job(engine(), params, user.id if user else None, resume=resume)


def load_evaluation(result_path: str):
    return jobs.load_evaluation(result_path)


# --------------------------------------------------------------------------------------------------
# Data page
# --------------------------------------------------------------------------------------------------


def cohort_summaries() -> list[dict]:
    from db import repository

    with read_session() as s:
        rows = []
        for cohort in repository.list_cohorts(s):
            rows.append({"cohort": cohort.name, "modality": cohort.modality or "mixed",
                         "images": repository.count_images(s, cohort),
                         "annotated": repository.count_images(s, cohort, annotated=True),
                         "created": cohort.created_at.strftime("%Y-%m-%d %H:%M") if cohort.created_at else ""})
    return rows


def import_images(sources, cohort: str, modality: str | None, user: User | None):
    """Import uploaded ``(name, bytes)`` pairs and server paths (already checked by
    ``service.cohorts.server_import_folder``) through ``db.repository.import_images``; nothing outside
    the upload folder and the import root is read, links that leave them included."""
    import tempfile
    from pathlib import Path

    from softcam_core.paths import import_root

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for source in sources:
            if isinstance(source, tuple):
                name, data = source
                path = Path(folder) / Path(name).name
                path.write_bytes(data)
                paths.append(path)
            else:
                paths.append(source)
        roots = [Path(folder)] + ([import_root()] if import_root() is not None else [])
        with session() as s:
            return image_service.import_images(s, user.id if user else None, paths, cohort, modality=modality,
                                        confine_to=roots)


def held_images() -> list:
    """Images held in quarantine for possible burned-in text (every cohort), oldest first."""
    from db import repository

    with read_session() as s:
        records = repository.list_images(s, quarantined=True)
        for record in records:
            record.cohort_name = record.cohort.name  # read while the session is open
        return records


def release_image(image_id: int, user: User | None) -> None:
    """Release one held image (``service.images.release_image``: admins only)."""
    with session() as s:
        image_service.release_image(s, user.id if user else None, image_id)


def import_labels(cohort: str, data: bytes, source: str, user: User | None, *, partial: bool = False):
    """A label CSV for ``cohort`` (``service.images.import_labels``): one transaction, atomic unless partial."""
    with session() as s:
        return image_service.import_labels(s, user.id if user else None, cohort, data, source=source, partial=partial)


def set_image_label(image_id: int, label: str | None, user: User | None) -> None:
    """One image's class label, recorded in its label history (``service.images.set_image_label``)."""
    with session() as s:
        image_service.set_image_label(s, user.id if user else None, image_id, label)


def cohort_label_rows(cohort: str) -> list[dict]:
    """Pseudonym, label, split and the last change of each image of a cohort, for the label editor."""
    from db import repository

    with read_session() as s:
        changes = repository.label_change_counts(s, cohort)
        rows = []
        for image in repository.list_images(s, cohort):
            count, last = changes.get(image.id, (0, None))
            rows.append({"id": image.id, "image": image.pseudonym, "label": image.label or "", "split": image.split or "",
                         "changed": last.strftime("%Y-%m-%d %H:%M") if last else "", "changes": count})
        return rows


def label_history_rows(image_id: int) -> list[dict]:
    """An image's label and split changes, oldest first: when, what, before, after, who, source."""
    from db import repository
    from db.schema import User as UserRow

    with read_session() as s:
        rows = []
        for change in repository.label_history(s, image_id):
            who = s.get(UserRow, change.user_id).username if change.user_id else ""
            rows.append({"when": change.at.strftime("%Y-%m-%d %H:%M:%S"), "field": change.field,
                         "before": change.before or "", "after": change.after or "", "by": who,
                         "source": change.source})
        return rows


def trainable_cohorts() -> dict[str, dict[str, int]]:
    """Database cohorts with at least two labels: ``{name: {label: images}}``."""
    from db.evaluation import trainable_cohorts as find

    with read_session() as s:
        return find(s)


def import_model(data: bytes, user: User | None, **options):
    """An uploaded weights file -> a checkpoint in the models folder (researchers and admins;
    ``softcam_core.model_import.import_uploaded_model``, never unpickling a whole model)."""
    from service.access import require
    from softcam_core.model_import import import_uploaded_model
    from softcam_core.paths import models_dir

    with read_session() as s:
        require(s, user.id if user else None, "manage_models")
    return import_uploaded_model(data, models_dir(), **options)


def row_of(item) -> dict:
    from dataclasses import asdict

    return asdict(item)


def start_explain_job(params: dict, user: User | None) -> int:
    """``service.jobs.start_explain_job`` (precompute a cohort's maps) on the app's database, as ``user``."""
    return jobs.start_explain_job(engine(), params, user.id if user else None)


def start_training_job(params: dict, user: User | None) -> int:
    """``service.jobs.start_training_job`` on the app's database, as ``user``."""
    return jobs.start_training_job(engine(), params, user.id if user else None)


# --------------------------------------------------------------------------------------------------
# Reader studies
# --------------------------------------------------------------------------------------------------


def reader_studies() -> list[dict]:
    """``{"id", "name", "cohort", "model_path", "methods", "images", "seed"}`` of every study."""
    from db import repository

    with read_session() as s:
        return [{"id": x.id, "name": x.name, "cohort": x.cohort.name, "model_path": x.model_path, "methods": list(x.methods),
                 "images": list(x.image_ids), "seed": x.seed} for x in repository.list_studies(s)]


def study_method_choices() -> list[str]:
    from softcam_core.explain.specs import BASE_METHODS

    return [m for m in BASE_METHODS]


def create_study(name: str, cohort: str | None, model_path: str | None, methods: list[str], seed: int,
                 images: int | None, user: User | None) -> None:
    if cohort is None or model_path is None:
        raise ValueError("a reader study needs a cohort and a model")
    with session() as s:
        study_service.create_study(s, user.id if user else None, name, cohort, model_path, methods, seed=seed,
                                   images=images)


def reader_items(study_id: int, user: User | None) -> tuple[list[tuple[int, str]], set[tuple[int, str]]]:
    """This reader's blinded order of the study's ``(image id, method)`` items, and those answered."""
    from db import repository

    if user is None or user.id is None:
        return [], set()
    with read_session() as s:
        return repository.reader_items(s, study_id, user.id)


def study_map(study: dict, image_id: int, method: str):
    """``(MedicalImage, MapResult)`` of one study item: the study model's map for its predicted class."""
    from db.schema import Image as ImageRow
    from service.catalogue import model_identity
    from service.image_session import ImageSession

    with read_session() as s:
        record = s.get(ImageRow, image_id)
        s.expunge(record)
    image = load_record(record)
    model, meta = load_model(study["model_path"])
    info = next((c for c in checkpoints() if str(c.path) == study["model_path"]), None)
    session_ = ImageSession(model, meta, image, model_identity(Path(study["model_path"])),
                            store=map_store(info, record) if info else None)
    return image, session_.explain(method)


def study_figure(image, result, title: str):
    """The image, or the image with a study map over it (one colour scale per kind of map)."""
    from softcam_core.render import display_pixels, overlay_figure

    pixels = display_pixels(image)
    if result is None:
        return overlay_figure(pixels, None, title=title, height=420)
    return overlay_figure(pixels, result.image_map, title=title, signed=result.signed, height=420)


def record_study_answer(study_id: int, image_id: int, method: str, rating: int, user: User | None, *,
                        point: tuple[float, float] | None = None, seconds: float | None = None) -> None:
    with session() as s:
        study_service.record_answer(s, user.id if user else None, study_id, image_id, method, rating, point=point,
                                    seconds=seconds)


def study_results(study_id: int):
    """``(answers table, per-method summary)`` of a study (``softcam_core.reader_study.rating_summary``)."""
    from db import repository
    from softcam_core.reader_study import rating_summary

    with read_session() as s:
        answers = repository.answers_table(s, study_id)
    return answers, rating_summary(answers)


def study_summary_figure(summary):
    from softcam_core.plots import rating_figure

    return rating_figure(summary)


# --------------------------------------------------------------------------------------------------
# Keyboard shortcuts
# --------------------------------------------------------------------------------------------------

# The listener is installed by a <script> element added to the app's own document, so it belongs to
# the app's page: a listener added from this iframe stops firing once a rerun replaces the iframe
# (a callback whose registering document is gone is not run).
_SHORTCUT_LISTENER = """
if (!window.__softcamShortcutListener) {
  window.__softcamShortcutListener = (event) => {
    if (event.ctrlKey || event.altKey || event.metaKey) return;
    const target = event.composedPath()[0] || event.target;
    const tag = (target.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea' || tag === 'select' || target.isContentEditable) return;
    // a focused slider (the pan sliders) takes the arrow keys itself
    if (target.closest && target.closest('[role=slider]')) return;
    const selector = (window.__softcamShortcuts || {})[event.key.toLowerCase()];
    if (!selector) return;
    // components such as the drawing canvas render inside shadow roots, which querySelector skips
    const find = (root) => {
      const hit = root.querySelector(selector);
      if (hit) return hit;
      for (const host of root.querySelectorAll('*')) {
        if (host.shadowRoot) {
          const inner = find(host.shadowRoot);
          if (inner) return inner;
        }
      }
      return null;
    };
    const element = find(document);
    if (!element || element.disabled) return;
    event.preventDefault();
    element.click();
  };
  // window, capture phase: components (the drawing canvas) handle keys and stop them on the way
  window.addEventListener('keydown', window.__softcamShortcutListener, true);
}
"""

_SHORTCUT_SCRIPT = """<script>
// Single keys click the element their selector names; keys typed into a text field, a number field
// or a select box are left alone, and so are keys with Ctrl / Alt / Meta (the browser's own).
const win = window.parent;
win.__softcamShortcuts = SHORTCUTS;
if (!win.__softcamShortcutListener) {
  const script = win.document.createElement("script");
  script.textContent = LISTENER;
  win.document.head.appendChild(script);
}
</script>"""


def keyboard_shortcuts(shortcuts: dict[str, str]) -> None:
    """Bind single keys (``"s"``, ``"n"``, ``"arrowright"``, ``"1"`` ...) to clicks on the elements
    the CSS selectors name (e.g. ``".st-key-annotate_save button"``), for this page run."""
    import json

    script = _SHORTCUT_SCRIPT.replace("SHORTCUTS", json.dumps({k.lower(): v for k, v in shortcuts.items()}))
    # st.iframe runs the HTML with same-origin access to the app (this script is ours, never user text)
    with st.container(key="keyboard_shortcuts", height=1, border=False):
        st.iframe(script.replace("LISTENER", json.dumps(_SHORTCUT_LISTENER)), height=1)
