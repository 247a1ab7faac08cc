"""Where the app keeps its data: ``SOFTCAM_HOME`` and ``SOFTCAM_DB_URL``."""

from __future__ import annotations

import os
from pathlib import Path


def softcam_home() -> Path:
    """Data directory (``SOFTCAM_HOME``, default ``./.softcam``); created on first use."""
    home = Path(os.environ.get("SOFTCAM_HOME") or Path.cwd() / ".softcam").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def db_url() -> str:
    """SQLAlchemy URL of the database (``SOFTCAM_DB_URL``, default SQLite file inside ``SOFTCAM_HOME``)."""
    return os.environ.get("SOFTCAM_DB_URL") or f"sqlite:///{softcam_home() / 'softcam.db'}"


def models_dir() -> Path:
    """Folder holding checkpoints (demo models and trained ones)."""
    path = softcam_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_dir() -> Path:
    """Folder holding the demo cohorts, one sub-folder per modality."""
    path = softcam_home() / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    """Folder holding imported (de-identified) image files, addressed by content hash."""
    path = softcam_home() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def secret_key(file_name: str, env_var: str) -> bytes:
    """A server secret: the environment variable ``env_var`` when set, else ``SOFTCAM_HOME/<file_name>``,
    made on first use (64 random hex characters, mode 0600). Two processes starting together agree on
    one key: the file appears complete or not at all (written aside, then hard-linked into place)."""
    import secrets
    import tempfile

    value = os.environ.get(env_var)
    if value:
        return value.encode("utf-8")
    path = softcam_home() / file_name
    if not path.exists():
        fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{file_name}.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
            os.chmod(scratch, 0o600)
            try:
                os.link(scratch, path)
            except FileExistsError:  # another process made it first: use theirs
                pass
        finally:
            os.unlink(scratch)
    return path.read_text().strip().encode("utf-8")
