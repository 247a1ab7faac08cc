"""Shared pytest set-up. Area fixtures live in tests/plugins/<area>.py and are loaded here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = (ROOT.parent / "shared" / "data" / "real").resolve()

pytest_plugins = sorted(
    f"tests.plugins.{p.stem}" for p in (Path(__file__).parent / "plugins").glob("*.py") if p.stem != "__init__"
)

os.environ.setdefault("SOFTCAM_DEVICE", "cpu")  # tests are CPU-only; the GPU path is checked in bench/


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the shared real images (``../shared/data/real``); skips when absent (e.g. a user's laptop)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"shared real data not found at {REAL_DATA}")
    return REAL_DATA


TEST_ADMIN_PASSWORD = "test-admin-pw"  # tests only: the app itself has no default password


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own SOFTCAM_HOME so nothing touches the user's data."""
    home = tmp_path_factory.mktemp("softcam_home")
    monkeypatch.setenv("SOFTCAM_HOME", str(home))
    monkeypatch.setenv("SOFTCAM_KEY_DIR", str(tmp_path_factory.mktemp("softcam_keys")))
    monkeypatch.setenv("SOFTCAM_ADMIN_PASSWORD", TEST_ADMIN_PASSWORD)  # the first-run admin of app tests
    monkeypatch.delenv("SOFTCAM_DB_URL", raising=False)
    yield home


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's AppTest runs the page script as ``__main__`` and leaves it there; a later test that
    spawns processes (multiprocessing re-imports ``__main__`` in the child) would then run app.py."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
