"""Benchmark 3: Score-CAM, Ablation-CAM and Integrated Gradients, our settings vs the libraries' defaults.

These three methods run tens to hundreds of forward passes per map, so they are where batching,
inference mode, channels-last memory layout and (on CUDA) mixed precision pay. Each first line
times ``explain(model, x, method)`` with the options our explain module chooses by default against
the backing library called with *its* defaults (torchcam ScoreCAM, pytorch-grad-cam AblationCAM,
captum IntegratedGradients; see :mod:`bench.references`) on the same input and target, and checks
the maps agree within 1e-4. Target: a speed-up >= 1.10 (anything less is within the noise of a
shared machine, i.e. not faster).

The ``candidate`` lines that follow (no target) measure settings the explain module could adopt, so
the report can say precisely what would help: a larger internal batch, channels-last layout, and on
CUDA bf16 autocast (whose maps are printed with their difference: autocast cannot meet 1e-4).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from bench.common import Config, Result, device_label, exact_math, max_abs_diff, speedup, time_pair
from bench.explain_overhead import quiet
from bench.references import REFERENCES
from softcam_core.explain import explain
from softcam_core.models import build_model

NAME = "fast_methods"
TARGET = 1.10
MAP_TOLERANCE = 1e-4
METHODS = ("scorecam", "ablationcam", "integrated_gradients")

# settings explain could use instead of its defaults (no target: informative lines)
CANDIDATE_OPTIONS = {
    "scorecam": {"batch_size": 32},  # the library default batch inside explain's other choices
    "ablationcam": {"batch_size": 256},
    "integrated_gradients": {"internal_batch_size": 25},
}


def settings(config: Config, device: torch.device) -> dict:
    """``repeats``: timed calls of each side for the target lines (interleaved, medians); the
    candidate lines get ``candidate_repeats``. Integrated gradients' 1.1x is within a loaded
    machine's noise at one repeat, hence 5 on CPU in the quick run."""
    gpu = device.type == "cuda"
    return config.pick(
        tiny=dict(arch="resnet18", size=32, repeats=1, candidate_repeats=1, methods=("integrated_gradients",),
                  base_options={"integrated_gradients": {"n_steps": 2}}),
        quick=dict(arch="resnet18", size=64, repeats=3 if gpu else 5, candidate_repeats=3 if gpu else 1,
                   methods=METHODS, base_options={}),
        full=dict(arch="resnet18", size=224 if gpu else 128, repeats=5 if gpu else 3,
                  candidate_repeats=3 if gpu else 1, methods=METHODS, base_options={}),
    )


def _channels_last(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    return (copy.deepcopy(model).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last))


def run(config: Config) -> list[Result]:
    results = []
    for device in config.devices:
        s = settings(config, device)
        torch.manual_seed(0)
        model = build_model(s["arch"], 5, "softcam").eval().to(device)
        x = torch.randn(1, 3, s["size"], s["size"], device=device)
        with torch.no_grad():
            targets = model(x).argmax(1).tolist()
        label = f"{s['arch']} {s['size']}px"
        for method in s["methods"]:
            base = s["base_options"].get(method, {})

            def library_default() -> torch.Tensor:
                return REFERENCES[method](model, x, targets, **base)

            with quiet(), exact_math():
                expected = library_default()
            variants: list[tuple[str, Callable[[], torch.Tensor], float | None]] = [
                ("ours (explain defaults)", lambda: explain(model, x, method, target=targets, **base), TARGET)
            ]
            candidates = [dict(base, **CANDIDATE_OPTIONS[method])]
            if method == "integrated_gradients":
                if "n_steps" in base:
                    candidates[0]["internal_batch_size"] = max(1, base["n_steps"] // 2)
                # batch-norm folding: on by default on CPU (measured), off on CUDA (not yet measured)
                candidates.append(dict(base, fold_batchnorm=device.type != "cpu"))
            for candidate in candidates:
                variants.append((
                    "candidate " + ",".join(f"{k}={v}" for k, v in candidate.items() if base.get(k) != v),
                    lambda c=candidate: explain(model, x, method, target=targets, **c), None,
                ))
            cl_model, cl_x = _channels_last(model, x)
            variants.append(("candidate channels_last",
                             lambda: explain(cl_model, cl_x, method, target=targets, **base), None))
            if device.type == "cuda":
                def autocast(c=base) -> torch.Tensor:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        return explain(cl_model, cl_x, method, target=targets, **c)
                variants.append(("candidate channels_last+bf16 autocast", autocast, None))

            for label_variant, fn, target in variants:
                name = f"{method} {label}: {label_variant} vs library default"
                try:
                    with quiet():
                        with exact_math():
                            diff = max_abs_diff(fn(), expected)
                        # the equality check above was each side's warm-up on CPU
                        paired = time_pair(fn, library_default, device,
                                           repeats=s["repeats"] if target is not None else s["candidate_repeats"],
                                           warmup=1 if device.type == "cuda" else 0)
                except Exception as exc:  # e.g. grad-cam cannot turn bf16 activations into numpy
                    if target is not None:
                        raise
                    message = " ".join(str(exc).split())[:120]
                    results.append(Result(name, device_label(device), float("nan"), float("nan"), float("nan"),
                                          None, extra={"not applicable": f"{exc.__class__.__name__}: {message}"}))
                    print(f"{name}: not applicable ({exc.__class__.__name__}: {message}) [{device_label(device)}]",
                          flush=True)
                    continue
                result = speedup(name, device, paired,
                                 target, **{"maps max abs diff": diff, "same maps": bool(diff <= MAP_TOLERANCE)})
                if target is not None and not diff <= MAP_TOLERANCE:
                    result.ratio = float("nan")
                results.append(result)
                print(result.line(), flush=True)
            del cl_model
    return results


