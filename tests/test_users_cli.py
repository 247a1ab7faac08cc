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
