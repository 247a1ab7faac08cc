"""`softcam report`: pooling, tables, steps and the CLI on hand-made results; `--quick` end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from softcam_core import report as R


def _evaluation(model: str, seed: int, method: str, correct: list[bool], audc: list[float]) -> pd.DataFrame:
    rows = []
    for i, (ok, a) in enumerate(zip(correct, audc)):
        label = "diseased" if i % 2 == 0 else "healthy"
        pred = label if ok else ("healthy" if label == "diseased" else "diseased")
        rows.append({"model": model, "seed": seed, "image": f"im{i}", "label": label, "pred": pred, "method": method,
                     "activation_consistency": 0.25 * (i + 1), "audc": a, "topk_precision_k5": 0.5, "seconds": 0.1,
                     "notes": ""})
    return pd.DataFrame(rows)


def test_row_labels():
    assert R.row_label("lasso", "softcam") == "SoftCAM lasso"
    assert R.row_label("baseline", "cascam:gradcam") == "cascam:gradcam · baseline"
    assert R.row_label("lasso", "gradcam") == "gradcam · lasso"  # within-model comparison row


def test_pool_tables_units_consistency_and_common_correct_audc():
    tables = [
        _evaluation("baseline", 0, "gradcam", [True, True, False, True], [0.1, 0.2, 0.3, 0.4]),
        _evaluation("lasso", 0, "softcam", [True, False, True, True], [0.5, 0.6, 0.7, 0.8]),
        _evaluation("baseline", 1, "gradcam", [True, True, True, True], [0.1, 0.2, 0.3, 0.4]),
        _evaluation("lasso", 1, "softcam", [True, True, True, True], [0.5, 0.6, 0.7, 0.8]),
    ]
    pooled = R.pool_tables(tables)
    assert set(pooled["row"]) == {"gradcam · baseline", "SoftCAM lasso"}
    assert pooled.loc[0, "unit"] == "0/im0"
    # seed 0: im1 wrong for lasso, im2 wrong for baseline -> AUDC only on im0 and im3; seed 1: all four
    kept = pooled.dropna(subset=["audc_common_correct"]).groupby("seed")["image"].apply(lambda s: sorted(set(s)))
    assert kept[0] == ["im0", "im3"] and kept[1] == ["im0", "im1", "im2", "im3"]
    first = pooled[(pooled["seed"] == 0) & (pooled["model"] == "baseline")].set_index("image")
    assert list(first["label_is_diseased"]) == [True, False, True, False]
    assert list(first["correct"]) == [True, True, False, True]


def test_choose_lambda_best_validation_then_larger_weight():
    sweep = pd.DataFrame({"lambda": [0.001, 0.01, 0.1], "val_accuracy": [0.8, 0.9, 0.9], "val_auc": [0.9, 0.95, 0.95]})
    assert R.choose_lambda(sweep) == 0.1
    sweep.loc[2, "val_auc"] = 0.5
    assert R.choose_lambda(sweep) == 0.01


def test_metrics_table_spread_over_seeds_and_not_applicable():
    config = R.ReportConfig(seeds=(0, 1), resamples=100, claim_k=5)
    per_image = R.pool_tables([
        _evaluation("baseline", 0, "gradcam", [True] * 4, [0.1] * 4).assign(topk_precision_k5=0.4),
        _evaluation("baseline", 1, "gradcam", [True] * 4, [0.1] * 4).assign(topk_precision_k5=0.6),
    ])
    per_image["activation_consistency_diseased"] = np.nan
    per_image["notes"] = "not applicable: gradcam maps are non-negative by construction (activation_consistency)"
    table = R.metrics_table(per_image, config).set_index("row")
    cell = table.loc["gradcam · baseline", "topk_precision_k5"]
    # mean 0.5 over the 4 diseased units; per-seed means 0.4 and 0.6 -> sd 0.141
    assert cell.startswith("0.500 ± 0.141 [") and cell.endswith("(4)")
    assert table.loc["gradcam · baseline", "activation_consistency_diseased"] == "n/a (non-negative map)"


def test_saturation_flag():
    table = pd.DataFrame({"model": ["baseline", "baseline"], "test_accuracy": [1.0, 0.99]})
    assert "saturates" in R.saturation_flag(table)
    assert R.saturation_flag(table.assign(test_accuracy=[0.9, 0.88])) is None
    assert "weak" in R.saturation_flag(table.assign(test_accuracy=[0.6, 0.6]))


def test_steps_skip_finished_work_with_same_settings(tmp_path):
    calls = []
    steps = R.Steps(tmp_path / "steps.json", log=lambda s: None)
    assert steps.run("a", {"x": 1}, lambda: calls.append(1) or {"v": 1}) == {"v": 1}
    again = R.Steps(tmp_path / "steps.json", log=lambda s: None)  # a new process reads the record
    assert again.run("a", {"x": 1}, lambda: calls.append(2) or {"v": 2}) == {"v": 1}
    assert again.run("a", {"x": 2}, lambda: calls.append(3) or {"v": 3}) == {"v": 3}  # other settings: rerun
    assert calls == [1, 3]
    from softcam_core.synth import GENERATOR_VERSION

    recorded = json.loads((tmp_path / "steps.json").read_text())
    assert recorded["a"]["settings"] == {"x": 2, "generator_version": GENERATOR_VERSION}
    # a step recorded by another generator version (older images) is redone, not reused
    recorded["a"]["settings"]["generator_version"] = GENERATOR_VERSION - 1
    (tmp_path / "steps.json").write_text(json.dumps(recorded))
    older = R.Steps(tmp_path / "steps.json", log=lambda s: None)
    assert older.run("a", {"x": 2}, lambda: calls.append(4) or {"v": 4}) == {"v": 4} and calls == [1, 3, 4]


def test_cli_options_quick_preset_and_round_trip():
    parser = argparse.ArgumentParser()
    R.register_cli(parser.add_subparsers())
    default = R.config_from_args(parser.parse_args(["report", "--out", "x"]))
    assert default == R.ReportConfig()
    assert default.img_size >= 224 and len(default.seeds) >= 2  # issue 16: 7x7 maps, two seeds
    quick = R.config_from_args(parser.parse_args(["report", "--out", "x", "--quick", "--epochs", "2"]))
    assert quick.epochs == 2 and quick.n == R.QUICK["n"] and quick.seeds == R.QUICK["seeds"]
    assert R.config_from_args(parser.parse_args(["report", "--out", "x", "--limit", "0"])).eval_limit is None
    command = R.canonical_command("x", quick).split()[1:]
    assert R.config_from_args(parser.parse_args(command)) == quick
    with pytest.raises(ValueError, match="unknown method"):
        R.config_from_args(parser.parse_args(["report", "--out", "x", "--methods", "nonsense"]))


def test_default_maps_are_7x7():
    config = R.ReportConfig()
    assert R.feature_map_size(config.arch, "softcam", config.img_size) == "7x7"


def test_cli_rejects_unknown_modality(capsys, tmp_path):
    from softcam_core.cli import main

    assert main(["report", "--out", str(tmp_path), "--modalities", "mri"]) == 2
    assert "unknown modality mri" in capsys.readouterr().err


def test_quick_report_end_to_end_and_resume(tmp_path):
    """`softcam report --quick` on one modality: every step, every table, a verdict per claim; a
    second run finds every step recorded and recomputes nothing."""
    parser = argparse.ArgumentParser()
    R.register_cli(parser.add_subparsers())
    config = R.config_from_args(parser.parse_args(["report", "--out", str(tmp_path), "--quick", "--modalities", "oct",
                                                   "--no-png"]))
    md = R.run_report(tmp_path, config)
    text = md.read_text()
    for needle in ("## Claims", "Lambda sweep", "SoftCAM lasso", "gradcam · lasso", "sanity:edge · baseline",
                   "cascam:gradcam · baseline", "Shortcut cohort", "Wall time", "Model randomisation"):
        assert needle in text, needle
    claims = pd.read_csv(tmp_path / "tables" / "oct_claims.csv")
    assert set(claims["verdict"]) <= {"holds", "fails", "cannot tell"} and len(claims) >= 6
    per_image = pd.read_csv(tmp_path / "tables" / "oct_per_image.csv")
    assert set(per_image["model"]) == {"baseline", "dense", "lasso", "ridge"}
    assert per_image["audc"].notna().any()
    randomisation = pd.read_csv(tmp_path / "tables" / "oct_randomisation.csv")
    edge = randomisation[randomisation["row"] == "sanity:edge · baseline"]
    assert len(edge) and np.allclose(edge["spearman"], 1.0)  # model-free: survives any randomisation
    steps = json.loads((tmp_path / "work" / "steps.json").read_text())
    # cohort, 2 sweep trainings, 4 models x (training, maps, deletion, randomisation), shortcut cohort + training + maps
    assert len(steps) == 1 + 2 + 4 * 4 + 3
    before = {k: v["seconds"] for k, v in steps.items()}
    R.run_report(tmp_path, config)  # resume: nothing left to do
    after = json.loads((tmp_path / "work" / "steps.json").read_text())
    assert {k: v["seconds"] for k, v in after.items()} == before
