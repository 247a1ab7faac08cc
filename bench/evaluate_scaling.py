"""Benchmark 8: ``softcam evaluate`` throughput with 1, 2 and 4 processes (torchrun sharding).

One synthetic fundus cohort and a randomly initialised SoftCAM checkpoint are written to a temporary
folder; ``softcam evaluate`` then runs on it as one process and under ``torchrun --standalone
--nproc_per_node N`` (gloo on CPU, NCCL on CUDA), each run a child process timed from start to exit
(start-up, process group and rank 0's merge included: what a user waits for). Reported: images per
second of each run and the speed-up over one process.

On CPU the machine's cores are split between the processes (``OMP_NUM_THREADS`` = cores / N), so
every run has the same compute and the speed-up shows what sharding adds or costs beyond it (less
thread synchronisation per process, more start-up). On CUDA each rank needs its own GPU
(``LOCAL_RANK``): N processes run only where N GPUs are visible; the others are reported as not run.
On CUDA ``torchrun --nproc_per_node 1`` runs too, so that one GPU already exercises the NCCL process
group and rank 0's merge (its row: the cost of torchrun over a plain process).
There is no pass/fail target (INFO): the figures feed docs/deploy.md. Each torchrun run's
``per_image.csv`` must hold the rows of the one-process run (same image × method pairs, values
within rtol 1e-4); otherwise the benchmark fails with the first differing column.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Config, Result, device_label
from bench.evaluate_memory import make_cohorts, write_checkpoint

NAME = "evaluate_scaling"
METHODS = "softcam,gradcam"


def settings(config: Config) -> dict:
    return config.pick(
        tiny=dict(images=8, processes=(1, 2), img_size=32, synth_size=64, steps=4),
        quick=dict(images=48, processes=(1, 2, 4), img_size=64, synth_size=128, steps=10),
        full=dict(images=240, processes=(1, 2, 4), img_size=128, synth_size=256, steps=20),
    )


def _run(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {proc.returncode}: {last}")
    return time.perf_counter() - start


def same_rows(sharded: Path, single: Path) -> str | None:
    """``None`` when ``sharded/per_image.csv`` holds the rows of ``single/per_image.csv`` (same image ×
    method pairs, every numeric column but ``seconds`` within rtol 1e-4, atol 1e-6, the others equal);
    else what differs, in words."""
    import numpy as np
    import pandas as pd

    a, b = (pd.read_csv(folder / "per_image.csv").sort_values(["image", "method"]).reset_index(drop=True)
            for folder in (sharded, single))
    if list(a.columns) != list(b.columns) or a[["image", "method"]].values.tolist() != b[["image", "method"]].values.tolist():
        return f"{len(a)} rows of other images, methods or columns than the one-process run's {len(b)}"
    for column in (c for c in a.columns if c != "seconds"):  # seconds: each run's own timing
        if a[column].dtype.kind not in "fiub":
            if not a[column].fillna("").astype(str).equals(b[column].fillna("").astype(str)):
                return f"column {column} differs from the one-process run"
        elif not np.allclose(a[column], b[column], rtol=1e-4, atol=1e-6, equal_nan=True):
            return f"column {column} differs from the one-process run (max |diff| {float((a[column] - b[column]).abs().max()):.3g})"
    return None


def run(config: Config) -> list[Result]:
    s = settings(config)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun`, wherever this Python's scripts are
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="softcam-bench-") as tmp:
        root = Path(tmp)
        cohort = make_cohorts(root, (s["images"],), s["synth_size"])[s["images"]]
        from softcam_core.data import CohortFolder

        checkpoint = write_checkpoint(root / "model.pt", list(CohortFolder(cohort).classes), s["img_size"])
        for device in config.devices:
            gpus = torch.cuda.device_count() if device.type == "cuda" else 0
            # (processes, launched by torchrun); one torchrun rank only on CUDA, where it is the NCCL path
            runs = [(1, False)] + [(1, True)] * (device.type == "cuda") + [(n, True) for n in s["processes"] if n > 1]
            rates: dict[tuple[int, bool], float] = {}
            for n, launched in runs:
                if device.type == "cuda" and n > gpus:
                    print(f"evaluate_scaling: {n} processes need {n} GPUs, {gpus} visible: not run", flush=True)
                    continue
                env = dict(os.environ, SOFTCAM_DEVICE=str(device.type), SOFTCAM_HOME=str(root / "home"),
                           OMP_NUM_THREADS=str(max(1, cores // n)))
                if device.type == "cpu":
                    env["CUDA_VISIBLE_DEVICES"] = ""
                launcher = [*torchrun, "--standalone", "--nproc_per_node", str(n)] if launched else [sys.executable]
                out = root / f"eval-{device.type}-{n}{'-torchrun' * launched}"
                command = [*launcher, "-m", "softcam_core", "evaluate", "--model", str(checkpoint), "--data",
                           str(cohort), "--methods", METHODS, "--out", str(out),
                           "--split", "all", "--no-figures", "--bootstrap", "200", "--steps", str(s["steps"])]
                rates[n, launched] = s["images"] / _run(command, env)
                if launched:
                    differs = same_rows(out, root / f"eval-{device.type}-1")
                    if differs:
                        raise RuntimeError(f"{n} torchrun process(es) on {device.type}: {differs}")
            single = rates[1, False]
            for (n, launched), rate in rates.items():
                if not launched:
                    continue
                what = f"{n} processes" if n > 1 else "torchrun 1 process"
                result = Result(
                    f"evaluate images/s, {what} vs 1 ({s['images']} images, {METHODS}, {s['img_size']}px)",
                    device_label(device), rate, single, rate / single, None, ">=", unit="img/s",
                    ours_label=what, reference_label="1 process",
                    extra={"threads per process": max(1, cores // n), "same rows as 1 process": True,
                           "images/s": {f"{k}{' torchrun' * t}": round(v, 3) for (k, t), v in rates.items()}},
                )
                results.append(result)
                print(result.line(), flush=True)
    return results
