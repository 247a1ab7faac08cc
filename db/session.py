"""Engines, sessions and migrations.

SQLite (the default, a file inside ``SOFTCAM_HOME``) is set up for several processes writing at once:

* ``journal_mode=WAL``: readers never block the writer and the writer never blocks readers;
* ``busy_timeout`` 30 s: a writer waits for the lock instead of failing with "database is locked";
* every transaction starts with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite recipe: the
  driver's own BEGIN handling is switched off and SQLAlchemy emits BEGIN itself). Taking the write
  lock up front means a read-then-write transaction can never hit the lock-upgrade deadlock that
  SQLite reports as SQLITE_BUSY without waiting. Read-only scopes (``session_scope(readonly=True)``)
  use a plain deferred BEGIN so they never queue behind writers;
* ``foreign_keys=ON``; ``synchronous=FULL`` so a committed annotation survives a power cut.

Any other SQLAlchemy URL (``SOFTCAM_DB_URL``, e.g. PostgreSQL) is used as given.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record):  # noqa: ARG001 - event signature
        # let SQLAlchemy, not the sqlite3 module, decide when transactions begin
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        options = connection.get_execution_options()
        mode = options.get("sqlite_begin", "IMMEDIATE")
        # a read-only scope that writes fails loudly instead of losing the write in its rollback; set
        # before BEGIN (a query-only connection cannot even BEGIN IMMEDIATE), and per transaction, since
        # the pool hands the same connection to read and write scopes
        connection.exec_driver_sql(f"PRAGMA query_only = {'ON' if options.get('softcam_readonly') else 'OFF'}")
        connection.exec_driver_sql("BEGIN" if mode == "DEFERRED" else f"BEGIN {mode}")


def _configure_server(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        if connection.get_execution_options().get("softcam_readonly") and engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def get_engine(url: str | None = None) -> Engine:
    """Engine for ``url`` (default :func:`softcam_core.paths.db_url`), created once per URL and process.

    SQLite files get WAL, a 30 s busy timeout, foreign keys and BEGIN IMMEDIATE; their folder is
    created. Other URLs are passed to SQLAlchemy unchanged (``pool_pre_ping`` on).
    """
    if url is None:
        from softcam_core.paths import db_url

        url = db_url()
    url = str(url)
    with _lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
            _configure_sqlite(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True)
            _configure_server(engine)
        _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every cached engine's connections (tests; after a fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(engine: Engine | str | None = None, *, readonly: bool = False) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception (then re-raise).

    ``engine`` may be an Engine, a URL or None (the default database). ``readonly=True`` is a read-only
    transaction: deferred on SQLite (no write lock; ``PRAGMA query_only``), ``READ ONLY`` on
    PostgreSQL; a write in it raises instead of being rolled back unseen. It rolls back at the end
    (by closing the session, so the objects it returns keep the attributes they loaded).
    """
    if not isinstance(engine, Engine):
        engine = get_engine(engine)
    bind = engine.execution_options(sqlite_begin="DEFERRED", softcam_readonly=True) if readonly else engine
    session = Session(bind=bind, expire_on_commit=False)
    try:
        yield session
        if not readonly:  # a read-only scope ends in close(): it rolls back without expiring what was read
            session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(connection=None):
    """Alembic Config pointing into the installed package (works outside the source tree)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine_or_url: Engine | str | None = None, revision: str = "head") -> str | None:
    """Create or migrate the database to ``revision`` (default: the newest). Returns the revision now
    current. Safe to call on every app start and from several processes at once (the migration runs
    inside one BEGIN IMMEDIATE transaction on SQLite)."""
    from alembic import command

    engine = engine_or_url if isinstance(engine_or_url, Engine) else get_engine(engine_or_url)
    with engine.begin() as connection:
        _serialise_migrations(connection)
        command.upgrade(alembic_config(connection), revision)
    return current_revision(engine)


MIGRATION_LOCK_ID = 0x50F7CA4  # PostgreSQL advisory lock key taken while migrating


def _serialise_migrations(connection) -> None:
    """Only one process migrates at a time: SQLite already holds the write lock (BEGIN IMMEDIATE);
    PostgreSQL takes a transaction-scoped advisory lock, so app instances starting together wait
    for the first one instead of racing to create the same tables."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")


def downgrade(engine_or_url: Engine | str | None, revision: str) -> str | None:
    """Migrate down to ``revision`` (for tests and emergencies)."""
    from alembic import command

    engine = engine_or_url if isinstance(engine_or_url, Engine) else get_engine(engine_or_url)
    with engine.begin() as connection:
        _serialise_migrations(connection)
        command.downgrade(alembic_config(connection), revision)
    return current_revision(engine)


def current_revision(engine_or_url: Engine | str | None = None) -> str | None:
    """The Alembic revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    engine = engine_or_url if isinstance(engine_or_url, Engine) else get_engine(engine_or_url)
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def mask_db_url(url: str) -> str:
    """Database URL with any password replaced by ``***`` (for the sidebar and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url
