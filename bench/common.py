"""Timing, result and machine-description utilities shared by every benchmark.

Every benchmark times *our* code and a *reference* side by side in the same process, interleaving
their repeats (ours, ref, ref, ours, ...) so slow drift of a shared machine (other processes,
thermal state, allocator warm-up) hits both equally; the median of each side is reported.
On CUDA each timed call is bracketed by ``torch.cuda.synchronize`` so asynchronous kernel launches
are not mistaken for finished work.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"

LEVELS = ("tiny", "quick", "full")


@dataclass(frozen=True)
class Config:
    """What a benchmark run should do.

    level: ``"full"`` (default: the sizes the issue names), ``"quick"`` (``--quick``: small sizes,
        few repeats, a few minutes on 2 CPU cores) or ``"tiny"`` (the smoke test: seconds).
    devices: devices to run on, CPU first; CUDA is added when ``default_device()`` is CUDA.
    out_dir: folder the JSON results go to.
    """

    level: str = "full"
    devices: tuple[torch.device, ...] = (torch.device("cpu"),)
    out_dir: Path = OUT_DIR

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        """The value for this run's level."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.level]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, including all device work it queued."""
    return time_once_with_cpu(fn, device)[0]


def time_once_with_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds: user + system, all threads) of one call."""
    synchronize(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


@dataclass
class Paired:
    """Per-repeat seconds of two implementations timed side by side.

    ``*_cpu_s`` hold the process CPU time of the same calls: on a CPU shared with other jobs the
    wall clock also counts time spent waiting for a core, the CPU time does not, so the CPU-time
    ratio is the steadier figure there (it does not see parallel speed-ups, only work done).
    """

    ours_s: list[float]
    reference_s: list[float]
    ours_cpu_s: list[float] = field(default_factory=list)
    reference_cpu_s: list[float] = field(default_factory=list)

    @property
    def cpu_time_ratio(self) -> float | None:
        """Median CPU seconds, ours / reference (None when not recorded)."""
        if not self.ours_cpu_s or not self.reference_cpu_s:
            return None
        reference = statistics.median(self.reference_cpu_s)
        return statistics.median(self.ours_cpu_s) / reference if reference > 0 else None

    @property
    def ours_ms(self) -> float:
        return 1e3 * statistics.median(self.ours_s)

    @property
    def reference_ms(self) -> float:
        return 1e3 * statistics.median(self.reference_s)


def time_pair(
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
) -> Paired:
    """Time ``ours`` and ``reference`` interleaved: ``warmup`` untimed calls of each, then
    ``repeats`` timed calls of each in ABBA order (so neither always runs first after the other).
    """
    for _ in range(warmup):
        ours()
        reference()
    gc.collect()
    result = Paired([], [])
    for i in range(repeats):
        pairs = ((ours, result.ours_s, result.ours_cpu_s), (reference, result.reference_s, result.reference_cpu_s))
        for fn, wall_sink, cpu_sink in pairs if i % 2 == 0 else pairs[::-1]:
            wall, cpu = time_once_with_cpu(fn, device)
            wall_sink.append(wall)
            cpu_sink.append(cpu)
    return result


@dataclass
class Result:
    """One printed ratio line.

    ratio: ``ours / reference`` when ``direction == "<="`` (an overhead: lower is better), or
        ``reference / ours`` when ``direction == ">="`` (a speed-up: higher is better).
    target: the pass threshold for ``ratio``; ``None`` when the line is informational only.
    """

    name: str
    device: str
    ours: float
    reference: float
    ratio: float
    target: float | None
    direction: str = "<="
    unit: str = "ms"
    ours_label: str = "ours"
    reference_label: str = "reference"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        if self.ratio != self.ratio:  # NaN: the outputs disagreed, so the timing is void
            return False
        return self.ratio <= self.target if self.direction == "<=" else self.ratio >= self.target

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "INFO"}[self.passed]

    def line(self) -> str:
        """``name: ours X ms, reference Y ms, ratio R (target <= T) PASS [device] (extras)``."""
        target = "no target" if self.target is None else f"target {self.direction} {self.target:g}"
        text = (
            f"{self.name}: {self.ours_label} {_fmt(self.ours)} {self.unit}, "
            f"{self.reference_label} {_fmt(self.reference)} {self.unit}, "
            f"ratio {self.ratio:.3f} ({target}) {self.verdict} [{self.device}]"
        )
        if self.extra:
            text += " (" + ", ".join(f"{k} {_fmt(v)}" for k, v in self.extra.items()) + ")"
        return text

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (nothing to compare) becomes null."""
        data = dict(asdict(self), passed=self.passed, verdict=self.verdict)
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in data.items()}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or value != value:
            return f"{value:g}"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _cpu_extra(device: torch.device, paired: Paired, invert: bool) -> dict[str, Any]:
    ratio = paired.cpu_time_ratio
    if device.type != "cpu" or not ratio:
        return {}
    return {"cpu-time ratio": 1.0 / ratio if invert else ratio}


def overhead(name: str, device: torch.device, paired: Paired, target: float | None, **extra: Any) -> Result:
    """Result whose ratio is ``ours / reference`` (lower is better); on CPU also the CPU-time ratio."""
    return Result(name, device_label(device), paired.ours_ms, paired.reference_ms,
                  paired.ours_ms / paired.reference_ms, target, "<=",
                  extra={**extra, **_cpu_extra(device, paired, invert=False)})


def speedup(name: str, device: torch.device, paired: Paired, target: float | None, **extra: Any) -> Result:
    """Result whose ratio is ``reference / ours`` (higher is better); on CPU also the CPU-time ratio."""
    return Result(name, device_label(device), paired.ours_ms, paired.reference_ms,
                  paired.reference_ms / paired.ours_ms, target, ">=",
                  extra={**extra, **_cpu_extra(device, paired, invert=True)})


def device_label(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda: NVIDIA H100 80GB HBM3``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def write_results(config: Config, name: str, results: list[Result]) -> Path:
    """Write ``results`` and the machine description to ``<out_dir>/<name>.json``."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    path = config.out_dir / f"{name}.json"
    payload = {
        "benchmark": name,
        "level": config.level,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "results": [r.as_dict() for r in results],
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


@contextlib.contextmanager
def exact_math():
    """Full-fp32, deterministic kernels for an equality check; the previous settings come back after.

    On CUDA, convolutions use TF32 by default (10-bit mantissa) and cuDNN picks different
    algorithms for different batch sizes, so a batched and a one-at-a-time computation of the same
    maths differ around 1e-4..1e-3. Comparing outputs under this context checks the implementation,
    not the hardware's rounding; timings are still taken with the default settings.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute element difference of two array-likes of equal shape (tensors or numpy)."""
    ta = torch.as_tensor(a).detach().float().cpu()
    tb = torch.as_tensor(b).detach().float().cpu()
    if ta.shape != tb.shape:
        raise ValueError(f"shape mismatch: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    return float((ta - tb).abs().max()) if ta.numel() else 0.0
