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
There is no pass/fail target (INFO): the figures feed docs/deploy.md.
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


def run(config: Config) -> list[Result]:
    s = settings(config)
    torchrun = Path(sys.executable).with_name("torchrun")
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="softcam-bench-") as tmp:
        root = Path(tmp)
        cohort = make_cohorts(root, (s["images"],), s["synth_size"])[s["images"]]
        from softcam_core.data import CohortFolder

        checkpoint = write_checkpoint(root / "model.pt", list(CohortFolder(cohort).classes), s["img_size"])
        for device in config.devices:
            gpus = torch.cuda.device_count() if device.type == "cuda" else 0
            rates: dict[int, float] = {}
            for n in s["processes"]:
                if device.type == "cuda" and n > gpus:
                    print(f"evaluate_scaling: {n} processes need {n} GPUs, {gpus} visible: not run", flush=True)
                    continue
                env = dict(os.environ, SOFTCAM_DEVICE=str(device.type), SOFTCAM_HOME=str(root / "home"),
                           OMP_NUM_THREADS=str(max(1, cores // n)))
                if device.type == "cpu":
                    env["CUDA_VISIBLE_DEVICES"] = ""
                launcher = [sys.executable] if n == 1 else [str(torchrun), "--standalone", "--nproc_per_node", str(n)]
                command = [*launcher, "-m", "softcam_core", "evaluate", "--model", str(checkpoint), "--data",
                           str(cohort), "--methods", METHODS, "--out", str(root / f"eval-{device.type}-{n}"),
                           "--split", "all", "--no-figures", "--bootstrap", "200", "--steps", str(s["steps"])]
                rates[n] = s["images"] / _run(command, env)
            for n, rate in rates.items():
                if n == 1:
                    continue
                result = Result(
                    f"evaluate images/s, {n} processes vs 1 ({s['images']} images, {METHODS}, {s['img_size']}px)",
                    device_label(device), rate, rates[1], rate / rates[1], None, ">=", unit="img/s",
                    ours_label=f"{n} processes", reference_label="1 process",
                    extra={"threads per process": max(1, cores // n), "images/s": {k: round(v, 3) for k, v in rates.items()}},
                )
                results.append(result)
                print(result.line(), flush=True)
    return results
