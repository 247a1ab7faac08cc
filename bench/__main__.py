"""``python -m bench [--quick] [--only NAME[,NAME]]``: run the benchmarks and print ratio lines.

CPU always; CUDA too when ``softcam_core.device.default_device()`` is CUDA. Results are also written
as JSON to ``bench/out/<name>.json``. Exit status: 0 when every line with a target passes (or is
informational), 1 when any fails or a benchmark breaks (the others still run), 2 for a bad argument.
"""

from __future__ import annotations

import os

# On a shared machine, OpenMP threads that spin while waiting for a descheduled sibling make a
# 2-thread CPU forward pass 10x slower and erratic; sleeping waits keep the timings meaningful.
# Must be set before torch loads its OpenMP runtime; OMP_WAIT_POLICY=ACTIVE in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import BENCHMARKS
from bench.common import OUT_DIR, Config, machine_info, write_results
from softcam_core.device import default_device


def devices_to_run(choice: str) -> tuple[torch.device, ...]:
    """``auto``: CPU, plus the default device when it is CUDA; ``cpu`` / ``cuda``: that one only."""
    if choice == "cpu":
        return (torch.device("cpu"),)
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench: error: --device cuda asked for, but torch sees no CUDA device")
        return (torch.device("cuda"),)
    found = default_device()
    return (torch.device("cpu"),) + ((found,) if found.type == "cuda" else ())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a few minutes on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test only
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): CPU, and CUDA when available")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this run (default: torch's choice, one per core)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"JSON results folder (default {OUT_DIR})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    config = Config(level=level, devices=devices_to_run(args.device), out_dir=args.out)
    info = machine_info()
    print(f"# bench level={level} cpu={info['cpu']} cores={info['cores']} torch={info['torch']} "
          f"threads={info['torch_threads']} OMP_WAIT_POLICY={info['omp_wait_policy']} cuda={info['cuda']}", flush=True)
    failed, errors = [], []
    for name in names:
        start = time.perf_counter()
        print(f"## {name}", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            results = module.run(config)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            errors.append(name)
            print(f"## {name}: ERROR {exc.__class__.__name__}: {' '.join(str(exc).split())}", flush=True)
            continue
        path = write_results(config, name, results)
        failed += [r for r in results if r.passed is False]
        print(f"## {name}: {len(results)} lines in {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    if failed:
        print(f"# {len(failed)} line(s) FAIL: " + "; ".join(r.name + " [" + r.device + "]" for r in failed))
    if errors:
        print(f"# {len(errors)} benchmark(s) broke: {', '.join(errors)}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
