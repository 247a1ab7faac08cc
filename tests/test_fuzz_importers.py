"""A fuzz pass over every importer with hostile files (tests/plugins/fuzz_importers.py): truncated,
wrong magic, huge dimensions, deep nesting, wrong encodings, bombs, a pickle exploit. Each file gets
the importer's one clear error type, changes nothing in the database, and the whole pass stays
within 2 GB of memory (measured on its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT_BYTES = 2 * 1024**3
EXPECTED_ERRORS = {"images": "RejectedImage", "checkpoints": "CheckpointError"}


def test_every_importer_refuses_hostile_files_cleanly_and_within_2_gb(tmp_path):
    marker = Path("/tmp/softcam-fuzz-pwned")
    marker.unlink(missing_ok=True)
    # a clean environment: nothing the rest of the test session set (caps, devices, thread counts)
    env = {key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "TMPDIR") if key in os.environ}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"), SOFTCAM_HOME=str(tmp_path / "softcam_home"),
               SOFTCAM_KEY_DIR=str(tmp_path / "keys"), SOFTCAM_DEVICE="cpu")
    done = subprocess.run([sys.executable, "-m", "tests.plugins.fuzz_importers", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows, peak = results["rows"], results["peak_rss_bytes"]
    assert len(rows) >= 30
    for row in rows:
        where = (row["importer"], row["file"], row["error_type"], row["message"])
        assert row["outcome"] == "rejected", where
        kind = row["importer"].split(":")[0]
        expected = EXPECTED_ERRORS.get(kind, ("AnnotationImportError", "AnnotationFormatError"))
        assert row["error_type"] in (expected if isinstance(expected, tuple) else (expected,)), where
        assert row["message"] and "Traceback" not in row["message"], where
        assert row["before"] == row["after"], where  # the database is unchanged
    assert not marker.exists(), "the pickled checkpoint ran code"
    largest = sorted(rows, key=lambda row: -row["peak_rss_bytes"])[:3]
    assert peak < MEMORY_LIMIT_BYTES, (f"peak {peak / 1024**2:.0f} MiB, reached by", [
        (row["importer"], row["file"], round(row["peak_rss_bytes"] / 1024**2)) for row in largest])
    print(f"fuzz: {len(rows)} hostile files refused; peak memory {peak / 1024**2:.0f} MiB")
