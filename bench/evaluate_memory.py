"""Benchmark 5: peak memory of ``softcam evaluate`` stays flat as the cohort grows.

A synthetic fundus cohort (``softcam_core.synth.make_cohort``) of the small and the large size and
a randomly initialised SoftCAM checkpoint are written to a temporary folder; then
``python -m softcam_core evaluate`` runs on each cohort as a child process and its peak resident
set size is that child's own ``VmHWM`` (/proc polling, see :func:`peak_rss_of`), so nothing
else in this process counts. Target: peak(large) / peak(small) <= 1.10
(full: 1,000 vs 250 images; ``--quick``: 80 vs 20).

The evaluation streams one image at a time, so its memory should not grow with the cohort; a
ratio above target means something accumulates per image (rows, maps, curves, hooks).
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

NAME = "evaluate_memory"
TARGET = 1.10
METHODS = "softcam,gradcam"


def settings(config: Config) -> dict:
    return config.pick(
        tiny=dict(sizes=(4, 8), img_size=32, synth_size=64, steps=4),
        quick=dict(sizes=(20, 80), img_size=64, synth_size=128, steps=20),
        full=dict(sizes=(250, 1000), img_size=64, synth_size=128, steps=20),
    )


def write_checkpoint(path: Path, classes: list[str], img_size: int, arch: str = "resnet18") -> Path:
    """A random-weight SoftCAM checkpoint with the metadata ``softcam evaluate`` needs."""
    from softcam_core.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(arch, len(classes), "softcam")
    meta = {"arch": arch, "head": "softcam", "classes": classes, "img_size": img_size,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "modality": "fundus"}
    return save_checkpoint(path, model, meta)


def make_cohorts(root: Path, sizes: tuple[int, ...], synth_size: int) -> dict[int, Path]:
    from softcam_core.synth import make_cohort

    return {n: make_cohort("fundus", n, 0, root / f"cohort{n}", size=synth_size) for n in sizes}


def _vm_hwm_mib(pid: int) -> float | None:
    """Peak RSS so far (``VmHWM``) of a live process, MiB; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_of(command: list[str], env: dict[str, str], poll_s: float = 0.02) -> tuple[float, float, int]:
    """Run ``command``; return (peak RSS MiB of that child, wall seconds, exit status).

    The peak is the child's own ``VmHWM`` (a high-water mark kept per address space), sampled every
    ``poll_s`` until it exits. Not ``ru_maxrss`` from ``wait4`` / ``RUSAGE_CHILDREN``: Linux carries
    the parent's resident size at ``fork`` into the child's ``ru_maxrss`` across ``exec``, so a large
    benchmark process would mask the child's own figure.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while True:
        # WNOWAIT: learn that it exited without reaping it, so /proc/<pid> stays readable until then
        exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if exited is not None:
            break
        sample = _vm_hwm_mib(proc.pid)
        if sample is not None:
            peak = max(peak, sample)
        time.sleep(poll_s)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    status = proc.wait()
    if proc.stderr:
        proc.stderr.close()
    if status != 0:
        last = err.strip().splitlines()[-1] if err.strip() else "no message"
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {status}: {last}")
    return peak, time.perf_counter() - start, status


def run(config: Config) -> list[Result]:
    s = settings(config)
    results = []
    with tempfile.TemporaryDirectory(prefix="softcam-bench-") as tmp:
        root = Path(tmp)
        cohorts = make_cohorts(root, s["sizes"], s["synth_size"])
        from softcam_core.data import CohortFolder

        classes = list(CohortFolder(cohorts[s["sizes"][0]]).classes)
        checkpoint = write_checkpoint(root / "model.pt", classes, s["img_size"])
        for device in config.devices:
            env = dict(os.environ, SOFTCAM_DEVICE=str(device), SOFTCAM_HOME=str(root / "home"))
            peaks, seconds = {}, {}
            for n, folder in cohorts.items():
                command = [sys.executable, "-m", "softcam_core", "evaluate", "--model", str(checkpoint),
                           "--data", str(folder), "--methods", METHODS, "--out", str(root / f"eval{n}-{device.type}"),
                           "--split", "all", "--no-figures", "--bootstrap", "200", "--steps", str(s["steps"])]
                peaks[n], seconds[n] = peak_rss_of(command, env)[:2]
            small, large = s["sizes"]
            result = Result(
                f"evaluate peak RSS {large} vs {small} images ({METHODS}, {s['img_size']}px)",
                device_label(device), peaks[large], peaks[small], peaks[large] / peaks[small], TARGET, "<=",
                unit="MiB", ours_label=f"{large} images", reference_label=f"{small} images",
                extra={f"wall s {small}": seconds[small], f"wall s {large}": seconds[large],
                       "images/s (large, incl. start-up)": large / seconds[large]},
            )
            results.append(result)
            print(result.line(), flush=True)
    return results

