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
