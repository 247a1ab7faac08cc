"""Roles enforced on the server: every write of the service layer, called as every role.

Each service function is called for real (real database, real files) as a clinician, an annotator,
a researcher, an admin, a deactivated admin and no one. It must succeed exactly for the roles
``service.access.PERMISSIONS`` grants and raise AccessDenied, changing nothing, for the others.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from db import repository as repo
from db.schema import Annotation, Image
from service import access

ROLES = ("clinician", "annotator", "researcher", "admin")


def _png(path, seed: int = 0):
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def world(session, tmp_path):
    """A cohort with one image and one held image, and one user per role."""
    users = {role: repo.create_user(session, f"u-{role}", role, "password-1").id for role in ROLES}
    inactive = repo.create_user(session, "u-gone", "admin", "password-1")
    inactive.active = False
    users["inactive"] = inactive.id
    users["nobody"] = None
    result = repo.import_images(session, [_png(tmp_path / "a.png")], "c")
    image_id = result.accepted[0].image_id
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "held.dcm")
    held_id = repo.import_images(session, [tmp_path / "held.dcm"], "c").accepted[0].image_id
    session.flush()
    return {"users": users, "image": image_id, "held": held_id, "tmp": tmp_path}


def _calls(session, world, user_id):
    """action -> a callable doing that action as ``user_id``."""
    from service import annotations, images
    from service.boxes import BoxEdits
    from service.signin import change_password

    tmp = world["tmp"]
    labels = tmp / "labels.csv"
    labels.write_text("image,x0,y0,x1,y1,label\na.png,1,1,5,5,lesion\n")
    return {
        "edit_annotations": lambda: annotations.apply_box_edits(
            session, user_id, world["image"], BoxEdits(create=[(1, 1, 6, 6, "lesion")])),
        "import_annotations": lambda: annotations.import_annotation_file(session, user_id, labels, "csv", "c"),
        "import_images": lambda: images.import_images(session, user_id, [_png(tmp / f"n{user_id}.png", 7)], "c"),
        "upload_for_review": lambda: images.upload_for_review(session, user_id, _png(tmp / f"r{user_id}.png", 9)),
        "label_images": lambda: images.set_image_label(session, user_id, world["image"], "healthy", "test"),
        "release_images": lambda: images.release_image(session, user_id, world["held"]),
        "change_own_password": lambda: change_password(session, user_id, "password-1", "password-2"),
    }


def _state(session) -> tuple:
    """What the writes change: annotation rows, image rows, labels, released images, password hashes."""
    from db.schema import User

    return (session.scalar(select(func.count()).select_from(Annotation)),
            session.scalar(select(func.count()).select_from(Image)),
            tuple(session.scalars(select(Image.label).order_by(Image.id))),
            tuple(session.scalars(select(Image.released_at).order_by(Image.id))),
            tuple(session.scalars(select(User.password_hash).order_by(User.id))))


@pytest.mark.parametrize("who", [*ROLES, "inactive", "nobody"])
def test_every_service_write_checks_the_role_of_the_signed_in_user(session, world, who):
    user_id = world["users"][who]
    calls = _calls(session, world, user_id)
    assert set(calls) <= set(access.PERMISSIONS)
    for action, call in calls.items():
        granted = who in access.PERMISSIONS[action]
        before = _state(session)
        if granted:
            call()
            session.flush()
        else:
            with pytest.raises(access.AccessDenied):
                call()
            assert _state(session) == before, (who, action)  # refused before anything was written


def test_jobs_and_models_need_a_researcher(engine, tmp_path):
    from db.session import session_scope
    from service import catalogue, jobs

    with session_scope(engine) as s:
        annotator = repo.create_user(s, "ann", "annotator", "password-1").id
        researcher = repo.create_user(s, "res", "researcher", "password-1").id
    with pytest.raises(access.AccessDenied, match="annotator cannot run jobs"):
        jobs.start_training_job(engine, {"name": "x", "epochs": 1}, annotator)
    with pytest.raises(access.AccessDenied, match="annotator cannot run jobs"):
        jobs.start_evaluation_job(engine, {"name": "x"}, annotator)
    with session_scope(engine) as s, pytest.raises(access.AccessDenied, match="manage models"):
        catalogue.set_default_model(s, annotator, 1)
    with session_scope(engine) as s:  # a researcher passes the check (and then meets the missing model)
        with pytest.raises(repo.NotFoundError):
            catalogue.set_default_model(s, researcher, 12345)


def test_a_revoked_role_takes_effect_on_the_next_write(session, world):
    from service import images

    admin = world["users"]["admin"]
    images.set_image_label(session, admin, world["image"], "healthy")
    from db.schema import User

    user = session.get(User, admin)
    user.role = "annotator"  # an admin demotes this account; the user's page still thinks "admin"
    session.flush()
    with pytest.raises(access.AccessDenied, match="annotator cannot label images"):
        images.set_image_label(session, admin, world["image"], "diseased")
    user.active = False
    session.flush()
    with pytest.raises(access.AccessDenied, match="not active"):
        images.upload_for_review(session, admin, _png(world["tmp"] / "late.png", 3))


def test_the_pages_offer_no_action_the_role_cannot_do():
    from pages.common import ROLE_PAGES

    for role, pages in ROLE_PAGES.items():
        if "data" in pages:
            assert access.allowed(role, "import_images")
        if "models" in pages or "cohort" in pages:
            assert access.allowed(role, "run_jobs")
        if "annotate" in pages:
            assert access.allowed(role, "edit_annotations")
    with pytest.raises(KeyError):
        access.allowed("admin", "launch_missiles")


def test_the_first_admin_gets_a_random_password_written_once_and_no_default(session, monkeypatch):
    from softcam_core.paths import key_dir
    from service.signin import FIRST_ADMIN_PASSWORD_FILE, create_first_admin

    monkeypatch.delenv("SOFTCAM_ADMIN_PASSWORD")
    name, path = create_first_admin(session)
    assert path == key_dir() / FIRST_ADMIN_PASSWORD_FILE and oct(path.stat().st_mode & 0o777) == "0o600"
    password = path.read_text().strip()
    assert len(password) >= 16
    assert repo.verify_password(session, name, password) is not None
    assert repo.verify_password(session, name, "softcam-admin") is None  # the old published default is gone
    assert create_first_admin(session) is None  # once: users exist now


def test_failed_sign_ins_are_rate_limited_and_written_to_the_audit_log(session):
    from datetime import timedelta

    from db.schema import AuditEvent, utcnow
    from service.signin import MAX_FAILED_SIGN_INS, SIGN_IN_WINDOW_MINUTES, sign_in

    repo.create_user(session, "alice", "annotator", "right-password")
    now = utcnow()
    assert sign_in(session, "alice", "right-password", now=now).user is not None
    for attempt in range(MAX_FAILED_SIGN_INS):
        result = sign_in(session, "alice", f"guess-{attempt}", now=now + timedelta(seconds=attempt))
        assert result.user is None and result.message == "Unknown user name or wrong password."
    locked = sign_in(session, "alice", "right-password", now=now + timedelta(minutes=1))
    assert locked.user is None and "Too many failed sign-ins" in locked.message  # even the right password
    later = now + timedelta(minutes=SIGN_IN_WINDOW_MINUTES, seconds=MAX_FAILED_SIGN_INS + 1)
    assert sign_in(session, "alice", "right-password", now=later).user is not None  # the window has passed
    events = [(e.event, e.subject) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert events[0] == ("sign_in", "alice") and events.count(("sign_in_failed", "alice")) == MAX_FAILED_SIGN_INS
    assert ("sign_in_locked", "alice") in events and events[-1] == ("sign_in", "alice")
    # a password typed into the name field is not stored in clear
    sign_in(session, "my-Secret-pw!", "x", now=later)
    last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc())).first()
    assert last.event == "sign_in_failed" and last.subject.startswith("unknown:") and "Secret" not in last.subject


def test_releasing_a_held_image_is_audited(session, world):
    from db.schema import AuditEvent
    from service import images

    images.release_image(session, world["users"]["admin"], world["held"])
    [event] = session.scalars(select(AuditEvent).where(AuditEvent.event == "image_released"))
    assert event.actor_id == world["users"]["admin"] and event.detail == "BurnedInAnnotation is YES"
