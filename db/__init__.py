"""Database: SQLAlchemy 2 schema, engine/session set-up, Alembic migrations and the repository
functions the app and the CLI call (see docs/database.md). Never imports Streamlit."""
