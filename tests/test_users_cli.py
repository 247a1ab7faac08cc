"""`softcam users`: accounts for the app's local sign-in, with hashed passwords in the database."""

from __future__ import annotations

import io
import sys

import pytest

from db import repository
from db.session import get_engine, session_scope
from softcam_core.cli import main


def _run(monkeypatch, argv: list[str], stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(argv)


def test_add_list_and_change_password(monkeypatch, capsys):
    assert _run(monkeypatch, ["users", "add", "alice", "--role", "annotator", "--password-stdin"], "correct horse\n") == 0
    assert _run(monkeypatch, ["users", "list"]) == 0
    assert "alice\tannotator\tactive" in capsys.readouterr().out
    engine = get_engine()
    with session_scope(engine, readonly=True) as session:
        user = repository.get_user(session, "alice")
        assert user.password_hash and "correct horse" not in user.password_hash  # stored hashed
        assert repository.verify_password(session, "alice", "correct horse") is not None
        assert repository.verify_password(session, "alice", "wrong password") is None
    assert _run(monkeypatch, ["users", "password", "alice", "--password-stdin"], "battery staple\n") == 0
    with session_scope(engine, readonly=True) as session:
        assert repository.verify_password(session, "alice", "correct horse") is None
        assert repository.verify_password(session, "alice", "battery staple") is not None


def test_bad_input_is_one_line_and_creates_nothing(monkeypatch, capsys):
    assert _run(monkeypatch, ["users", "add", "bob", "--role", "clinician", "--password-stdin"], "short\n") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 8 characters" in err[0]
    with pytest.raises(SystemExit):
        _run(monkeypatch, ["users", "add", "bob", "--role", "nurse", "--password-stdin"], "longenough\n")
    assert _run(monkeypatch, ["users", "password", "nobody", "--password-stdin"], "longenough\n") == 2
    assert "nobody" in capsys.readouterr().err
    with session_scope(get_engine(), readonly=True) as session:
        assert repository.get_user(session, "bob") is None


def test_role_changes_deactivation_and_oidc_links_apply_at_once_and_are_audited(monkeypatch, capsys):
    from sqlalchemy import select

    from db.schema import AuditEvent
    from service import access
    from service.signin import current_account, oidc_account

    assert _run(monkeypatch, ["users", "add", "a@example.org", "--role", "admin", "--password-stdin"], "long enough\n") == 0
    engine = get_engine()
    with session_scope(engine, readonly=True) as session:
        user_id = repository.get_user(session, "a@example.org").id
        access.require(session, user_id, "manage_users")
        # OIDC: the subject, or a verified email; never a display name, never an unverified email
        assert oidc_account(session, {"sub": "s-1", "email": "a@example.org", "email_verified": True}).id == user_id
        assert oidc_account(session, {"sub": "s-1", "email": "a@example.org", "email_verified": False}) is None
        assert oidc_account(session, {"sub": "s-2", "name": "a@example.org"}) is None
        assert oidc_account(session, {"sub": "s-3", "name": "admin", "email": "x@example.org", "email_verified": True}) is None
    assert _run(monkeypatch, ["users", "link", "a@example.org", "subject-42"]) == 0
    with session_scope(engine, readonly=True) as session:
        assert oidc_account(session, {"sub": "subject-42"}).id == user_id
        # linked to another subject now: the same verified email from another subject does not match
        assert oidc_account(session, {"sub": "other", "email": "a@example.org", "email_verified": True}) is None
    assert _run(monkeypatch, ["users", "role", "a@example.org", "annotator"]) == 0
    with session_scope(engine, readonly=True) as session:
        with pytest.raises(access.AccessDenied, match="annotator cannot manage users"):
            access.require(session, user_id, "manage_users")
        assert current_account(session, user_id).role == "annotator"
    assert _run(monkeypatch, ["users", "deactivate", "a@example.org"]) == 0
    with session_scope(engine, readonly=True) as session:
        assert current_account(session, user_id) is None  # the next request signs the session out
        assert oidc_account(session, {"sub": "subject-42"}) is None
        with pytest.raises(access.AccessDenied, match="not active"):
            access.require(session, user_id, "edit_annotations")
        events = [(e.event, e.detail) for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert events == [("user_link", "OIDC subject linked"), ("user_role", "admin -> annotator"),
                      ("user_deactivate", "deactivated")]
    assert _run(monkeypatch, ["users", "role", "nobody", "admin"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
