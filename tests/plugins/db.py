"""Database fixtures, shared with other areas' tests.

``db_url`` is parametrised over a SQLite file and the PostgreSQL server at ``SOFTCAM_TEST_PG_URL``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Each PostgreSQL test runs in a
fresh schema (dropped afterwards); when no server answers, the PostgreSQL params skip with the
reason (after trying ``pg_ctlcluster`` once when we are root).

* ``db_url``   - URL of an empty database (both backends)
* ``engine``   - engine on it, migrated to head
* ``session``  - a Session in one transaction, committed at the end
* ``db_env``   - like ``engine`` but also sets ``SOFTCAM_DB_URL`` so CLI / app code uses it
* ``sqlite_url`` - SQLite only (tests that need a file, e.g. several processes)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from urllib.parse import quote

import pytest

PG_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_pg_state: dict[str, str | None] = {}


def pg_base_url() -> str:
    return os.environ.get("SOFTCAM_TEST_PG_URL") or PG_DEFAULT_URL


def _pg_connect_error(url: str) -> str | None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable server"
        return " ".join(str(exc).split())[:200]
    finally:
        engine.dispose()


def _try_start_cluster() -> None:
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None or os.geteuid() != 0:
        return
    listing = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=20)
    for line in listing.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3] != "online":
            subprocess.run(["pg_ctlcluster", parts[0], parts[1], "start"], capture_output=True, timeout=60)


def pg_unavailable_reason() -> str | None:
    """None when the test server answers, else why not (checked once per test session)."""
    if "reason" not in _pg_state:
        url = pg_base_url()
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _pg_state["reason"] = "psycopg is not installed"
            return _pg_state["reason"]
        reason = _pg_connect_error(url)
        if reason is not None:
            _try_start_cluster()
            reason = _pg_connect_error(url)
        _pg_state["reason"] = None if reason is None else f"no PostgreSQL server at {url}: {reason}"
    return _pg_state["reason"]


def _with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """URL of a fresh, empty database: a SQLite file, or a new PostgreSQL schema (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'softcam-test.db'}"
        return
    reason = pg_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from sqlalchemy import create_engine, text

    from db.session import dispose_engines

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_base_url())
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _with_search_path(pg_base_url(), schema)
    finally:
        dispose_engines()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'softcam-test.db'}"


@pytest.fixture
def engine(db_url):
    """Engine on ``db_url``, migrated to the newest revision."""
    from db.session import get_engine, upgrade

    eng = get_engine(db_url)
    upgrade(eng)
    yield eng


@pytest.fixture
def session(engine):
    """One transaction on ``engine``; committed when the test ends."""
    from db.session import session_scope

    with session_scope(engine) as s:
        yield s


@pytest.fixture
def db_env(engine, monkeypatch):
    """``engine``, with ``SOFTCAM_DB_URL`` pointing at it for code that opens the default database."""
    monkeypatch.setenv("SOFTCAM_DB_URL", engine.url.render_as_string(hide_password=False))
    return engine
