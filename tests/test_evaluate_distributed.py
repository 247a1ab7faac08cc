"""``softcam evaluate`` under torchrun: 2 CPU processes (gloo) shard the cohort, each image x method is
scored once, rank 0 merges tables identical to a one-process run; a process that fails fails the run,
and ``--resume`` then computes only what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from softcam_core.data import CohortFolder

LIMIT = 8
ARGS = ["--methods", "softcam,gradcam", "--split", "all", "--limit", str(LIMIT), "--steps", "3",
        "--bootstrap", "50", "--no-figures", "--batch-size", "1"]
# batch size 1: a process's batches then hold the same single images as the one-process run's, so the
# floating-point work, and every value, is the same (batched kernels may round differently)


def _torchrun() -> Path:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside the interpreter")
    return torchrun


def _evaluate(checkpoint, data, out, *extra, processes: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher = ([str(_torchrun()), "--standalone", "--nproc_per_node", str(processes)] if processes > 1
                else [sys.executable])
    return subprocess.run([*launcher, "-m", "softcam_core", "evaluate", "--model", str(checkpoint), "--data", str(data),
                           "--out", str(out), *ARGS, *extra], capture_output=True, text=True, env=env, timeout=600)


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    """The run's tables without its timings (the only column that may differ between runs)."""
    tables = {}
    for name in ("per_image", "deletion_curves", "cohort", "paired"):
        table = pd.read_csv(out / f"{name}.csv")
        tables[name] = table[[c for c in table.columns if "seconds" not in c]]
    return tables


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoint, synth_cohort):
    out = tmp_path_factory.mktemp("evaluate_one_process")
    proc = _evaluate(tiny_checkpoint("fundus"), synth_cohort("fundus"), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_processes_score_each_image_once_and_merge_the_one_process_tables(tmp_path, one_process,
                                                                               tiny_checkpoint, synth_cohort):
    out = tmp_path / "two"
    proc = _evaluate(tiny_checkpoint("fundus"), synth_cohort("fundus"), out, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports the merged run
    assert not (out / "shards").exists()  # merged and removed
    per_image = pd.read_csv(out / "per_image.csv")
    assert len(per_image) == LIMIT * 2 and not per_image.duplicated(["image", "method"]).any()
    expected, got = _tables(one_process), _tables(out)
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=True, obj=name)


@pytest.mark.slow  # three torchrun launches (~45 s on 2 cores); `make test-slow`
def test_a_failed_process_fails_the_run_and_a_rerun_resumes_where_it_stopped(tmp_path, one_process,
                                                                             tiny_checkpoint, synth_cohort):
    data = tmp_path / "cohort"
    shutil.copytree(synth_cohort("fundus"), data)
    items = CohortFolder(data).split("all")[:LIMIT]
    broken = items[5]  # rank 1 scores items 1, 3, 5, 7: it fails on its third image
    original = broken.path.read_bytes()
    broken.path.write_bytes(b"not an image")
    out = tmp_path / "run"
    failed = _evaluate(tiny_checkpoint("fundus"), data, out, processes=2)
    assert failed.returncode != 0
    assert broken.path.name in failed.stderr and "ChildFailedError" in failed.stderr, failed.stderr[-3000:]
    shard = pd.read_csv(out / "shards" / "rank1-of-2.per_image.csv")
    assert sorted(set(shard.image)) == sorted({items[1].stem, items[3].stem})  # what it finished stays
    assert not (out / "per_image.csv").exists()  # nothing merged from a failed run

    broken.path.write_bytes(original)
    resumed = _evaluate(tiny_checkpoint("fundus"), data, out, "--resume", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    per_image = pd.read_csv(out / "per_image.csv")
    # the rows finished before the failure were kept, not computed again (their timings are unchanged)
    kept = per_image.merge(shard[["image", "method", "seconds"]], on=["image", "method"], suffixes=("", "_before"))
    assert len(kept) == len(shard) and (kept.seconds == kept.seconds_before).all()
    expected, got = _tables(one_process), _tables(out)
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=True, obj=name)
