"""Smoke tests of the benchmarks (bench/): each runs in a tiny configuration and prints its ratio line.

These check that every benchmark runs end to end on real models and libraries and reports what it
should (the line format, identical maps / curves, JSON output); they assert no timing: the figures
come from ``python -m bench`` (docs/performance.md).
"""

from __future__ import annotations

import json
from pathlib import Path
import re
import sys

import pytest
import torch

from bench import BENCHMARKS
from bench.__main__ import main
from bench.common import Config, Paired, Result, time_pair
from bench.evaluate_memory import peak_rss_of

LINE = re.compile(
    r"^(?P<name>[^:\n]+): .+ (?P<ours>[\d.e+-]+) (?P<unit>ms|MiB), .+ (?P<ref>[\d.e+-]+) (?P=unit), "
    r"ratio (?P<ratio>[\d.]+|nan) \(target (?:<=|>=) [\d.]+\) (?P<verdict>PASS|FAIL) \[cpu \(\d+ threads?\)\]",
    re.M,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine spinning OpenMP
    threads slow every test; restored after each test (no process-wide setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_bench(name: str, tmp_path, capsys) -> tuple[str, dict]:
    status = main(["--tiny", "--only", name, "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status in (0, 1), out  # 1 = a ratio missed its target: allowed for tiny timings
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["benchmark"] == name and payload["machine"]["torch"] == torch.__version__
    return out, payload


def test_result_line_and_verdicts():
    paired = Paired(ours_s=[0.010, 0.012, 0.011], reference_s=[0.010, 0.010, 0.010])
    result = Result("demo", "cpu (2 threads)", paired.ours_ms, paired.reference_ms,
                    paired.ours_ms / paired.reference_ms, 1.05)
    assert result.ratio == pytest.approx(1.1)
    assert result.passed is False
    assert LINE.search(result.line()).group("verdict") == "FAIL"
    faster = Result("x", "cpu (2 threads)", 10.0, 20.0, 2.0, 1.5, ">=")
    assert faster.passed is True and "target >= 1.5" in faster.line()
    void = Result("y", "cpu (2 threads)", 10.0, 20.0, float("nan"), 1.5, ">=")
    assert void.passed is False and void.as_dict()["ratio"] is None  # outputs differed: never a pass
    assert Result("z", "cpu", 1.0, float("nan"), float("nan"), None).verdict == "INFO"


def test_time_pair_interleaves_and_counts():
    calls = []
    paired = time_pair(lambda: calls.append("a"), lambda: calls.append("b"), torch.device("cpu"), repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(paired.ours_s) == len(paired.reference_s) == 4


def test_peak_rss_of_sees_the_child_allocation():
    grow = [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.3)"]
    idle = [sys.executable, "-c", "pass"]
    big, _, _ = peak_rss_of(grow, {})
    small, _, _ = peak_rss_of(idle, {})
    assert big - small > 250, (big, small)
    with pytest.raises(RuntimeError, match="exited 3"):
        peak_rss_of([sys.executable, "-c", "raise SystemExit(3)"], {})


def test_forward_tiny(tmp_path, capsys):
    out, payload = run_bench("forward", tmp_path, capsys)
    match = LINE.search(out)
    assert match and match.group("name") == "forward resnet18 64px batch 1", out
    # the ResNet evidence head carries the FC weights: same logits as torchvision
    extra = payload["results"][0]["extra"]
    assert extra["logits max abs diff"] < 1e-4
    assert extra["cpu-time ratio"] > 0  # the load-independent figure beside the wall-clock one


def test_explain_overhead_tiny_maps_identical(tmp_path, capsys):
    out, payload = run_bench("explain_overhead", tmp_path, capsys)
    methods = [r["name"].split()[1] for r in payload["results"]]
    assert methods == ["softcam", "cam", "gradcam", "hirescam", "integrated_gradients"]
    assert len(LINE.findall(out)) == len(methods), out
    assert all(r["extra"]["maps max abs diff"] <= 1e-4 for r in payload["results"])


def test_fast_methods_tiny(tmp_path, capsys):
    out, payload = run_bench("fast_methods", tmp_path, capsys)
    first = payload["results"][0]
    assert first["name"].startswith("integrated_gradients") and first["target"] == 1.10
    assert first["extra"]["same maps"] is True
    assert LINE.search(out), out


def test_deletion_tiny_curves_identical(tmp_path, capsys):
    out, payload = run_bench("deletion", tmp_path, capsys)
    curves, computed, rate = payload["results"]
    assert curves["extra"]["identical"] is True and curves["direction"] == ">=" and curves["target"] == 1.5
    assert curves["name"].endswith("(step 0 given)") and computed["name"].endswith("(step 0 computed)")
    assert computed["extra"]["identical"] is True and computed["target"] is None
    assert rate["unit"] == "images/s" and rate["ours"] > 0 and rate["reference"] > 0  # batched and one at a time
    assert "cohort evaluate throughput softcam" in out and "batched / one-at-a-time" in out and LINE.search(out)


@pytest.mark.slow
def test_evaluate_memory_tiny(tmp_path, capsys):
    out, payload = run_bench("evaluate_memory", tmp_path, capsys)
    (result,) = payload["results"]
    assert result["unit"] == "MiB" and result["ours"] > 100 and result["reference"] > 100
    assert LINE.search(out), out


@pytest.mark.slow
def test_evaluate_scaling_tiny_times_one_and_two_processes(tmp_path, capsys):
    out, payload = run_bench("evaluate_scaling", tmp_path, capsys)
    (result,) = payload["results"]
    assert result["unit"] == "img/s" and result["ours"] > 0 and result["reference"] > 0
    assert "2 processes vs 1" in result["name"] and result["verdict"] == "INFO"  # speed-up reported, no target
    assert re.search(r"2 processes [\d.]+ img/s, 1 process [\d.]+ img/s, ratio [\d.]+ \(no target\) INFO", out), out
    assert result["extra"]["same rows as 1 process"] is True


def test_evaluate_scaling_refuses_sharded_rows_that_differ_from_one_process(tmp_path):
    import pandas as pd

    from bench.evaluate_scaling import same_rows

    rows = pd.DataFrame({"image": ["a", "a", "b", "b"], "method": ["gradcam", "softcam"] * 2,
                         "topk": [0.5, 0.25, 1.0, 0.0], "seconds": [0.1, 0.2, 0.3, 0.4], "notes": ["", "x", "", ""]})
    for name, table in {"one": rows, "same": rows.iloc[::-1].assign(seconds=1.0),
                        "off": rows.assign(topk=[0.5, 0.25, 1.0, 0.01]), "noted": rows.assign(notes="y"),
                        "short": rows.iloc[:3]}.items():
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "per_image.csv", index=False)
    assert same_rows(tmp_path / "same", tmp_path / "one") is None  # row order and timings do not matter
    assert same_rows(tmp_path / "off", tmp_path / "one") == "column topk differs from the one-process run " \
                                                            "(max |diff| 0.01)"
    assert same_rows(tmp_path / "noted", tmp_path / "one") == "column notes differs from the one-process run"
    assert "3 rows of other images" in same_rows(tmp_path / "short", tmp_path / "one")


def test_report_cost_tiny_predicts_against_the_budget(tmp_path, capsys):
    _, payload = run_bench("report_cost", tmp_path, capsys)
    lines = [r for r in payload["results"] if r["name"].startswith("report")]
    names = " ".join(r["name"] for r in lines)
    assert "report one modality, predicted" in names and "report three modalities" in names  # (FAIL lines also print)
    assert len(lines) == 2 and all(r["ours"] > 0 for r in lines)
    assert lines[1]["ours"] == pytest.approx(3 * lines[0]["ours"])


def test_cli_rejects_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--only", "nope"])
    assert exc.value.code == 2 and "unknown benchmark nope" in capsys.readouterr().err
    assert set(BENCHMARKS) == {"forward", "explain_overhead", "fast_methods", "deletion", "evaluate_memory",
                               "review_latency", "report_cost", "evaluate_scaling"}
    assert Config(level="quick").pick(1, 2, 3) == 2


@pytest.mark.e2e
@pytest.mark.slow  # a benchmark's smoke run in Chromium (~25 s); `make test-slow`
def test_review_latency_tiny_measures_open_and_reopen_in_the_browser(tmp_path, capsys):
    import shutil

    from tests.plugins.app import CHROMIUM

    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium: `make chromium`)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    out, payload = run_bench("review_latency", tmp_path, capsys)
    opened, reopened = payload["results"]
    assert opened["unit"] == "ms" and opened["reference"] == 2000 and reopened["reference"] == 500
    assert opened["extra"]["images"] == reopened["extra"]["images"] == 2 and opened["ours"] > 0
    assert "review open to SoftCAM + Grad-CAM on screen" in out and LINE.search(out)
