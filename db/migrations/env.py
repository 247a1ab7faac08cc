"""Alembic environment: run against the connection db.session.upgrade() hands over, or a URL."""

from __future__ import annotations

from alembic import context

from db.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    from db.session import get_engine

    url = config.get_main_option("sqlalchemy.url") or str(get_engine().url)
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        from db.session import get_engine

        url = config.get_main_option("sqlalchemy.url") or None
        with get_engine(url).connect() as connection:
            _run(connection)
            connection.commit()
        return
    _run(connection)


def _run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
