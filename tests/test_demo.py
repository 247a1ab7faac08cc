"""Demo cohorts + models (`softcam demo`): caching, report, assets; the full-size run is @slow."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from softcam_core import demo
from softcam_core.cli import main as cli_main
from softcam_core.models import load_checkpoint

TINY_DEMO = replace(demo.DEMO_SETTINGS, n=24, epochs=1, epochs_by_modality={}, img_size=32, batch_size=8)


def test_demo_builds_caches_and_reports(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setattr(demo, "DEMO_SETTINGS", TINY_DEMO)
    assets = demo.demo_assets(home)
    assert not assets["ready"]
    assert assets["models"]["oct"]["softcam"] == home.resolve() / "models" / "oct_softcam.pt"

    report = demo.prepare_demo(home, modalities=("oct",), show_progress=False)
    entry = report["modalities"]["oct"]
    assert entry["synth_seconds"] is not None and entry["softcam_seconds"] is not None
    assert entry["images"] == {"train": 12, "val": 4, "test": 8}  # (0.5, 0.15, 0.35) of 24, stratified
    soft, meta = load_checkpoint(assets["models"]["oct"]["softcam"])
    _, base_meta = load_checkpoint(assets["models"]["oct"]["baseline"])
    assert meta["head"] == "softcam" and meta["l1"] == TINY_DEMO.l1 > 0
    assert base_meta["head"] == "baseline" and base_meta["l1"] == 0.0
    assert entry["softcam"]["test_accuracy"] == meta["metrics"]["test"]["accuracy"]
    assert entry["gap"] == pytest.approx(entry["softcam"]["test_accuracy"] - entry["baseline"]["test_accuracy"], abs=1e-4)
    assert json.loads(assets["report"].read_text())["modalities"]["oct"]["gap"] == entry["gap"]

    # second run reuses cohort and checkpoints
    again = demo.prepare_demo(home, modalities=("oct",), show_progress=False)["modalities"]["oct"]
    assert again["synth_seconds"] is None and again["softcam_seconds"] is None and again["baseline_seconds"] is None
    # a corrupt checkpoint is rebuilt, not trusted
    assets["models"]["oct"]["baseline"].write_bytes(b"broken")
    rebuilt = demo.prepare_demo(home, modalities=("oct",), show_progress=False)["modalities"]["oct"]
    assert rebuilt["softcam_seconds"] is None and rebuilt["baseline_seconds"] is not None
    # models trained with other settings (an older demo's) are retrained, not reused
    import dataclasses

    monkeypatch.setattr(demo, "DEMO_SETTINGS", dataclasses.replace(TINY_DEMO, epochs=TINY_DEMO.epochs + 1))
    retrained = demo.prepare_demo(home, modalities=("oct",), show_progress=False)["modalities"]["oct"]
    assert retrained["synth_seconds"] is None and retrained["softcam_seconds"] is not None
    assert "| oct | 8 |" in demo.format_report(report)


@pytest.mark.slow
def test_full_demo_meets_targets_within_ten_minutes(tmp_path, capsys):
    """The shipped demo: six models within 600 s on 2 CPU cores, test accuracy >= 0.90, SoftCAM within
    2 points of its baseline. Run with ``pytest -m slow tests/test_demo.py``."""
    code = cli_main(["demo", "--home", str(tmp_path / "home"), "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "home" / "demo_report.json").read_text())
    assert report["total_seconds"] < 600, demo.format_report(report)
    for modality, entry in report["modalities"].items():
        assert entry["softcam"]["test_accuracy"] >= 0.90, modality
        assert entry["baseline"]["test_accuracy"] >= 0.90, modality
        assert entry["gap"] >= -0.02, modality
    assert demo.demo_assets(tmp_path / "home")["ready"]


def test_a_demo_of_older_settings_is_not_taken_for_ready(tmp_path):
    from dataclasses import asdict

    report = tmp_path / "demo_report.json"
    assert not demo._report_is_current(report)  # no report
    report.write_text(json.dumps({"settings": asdict(demo.DEMO_SETTINGS)}))
    assert demo._report_is_current(report)
    report.write_text(json.dumps({"settings": dict(asdict(demo.DEMO_SETTINGS), epochs_by_modality={})}))
    assert not demo._report_is_current(report)  # e.g. the 10-epoch OCT model of an older demo
