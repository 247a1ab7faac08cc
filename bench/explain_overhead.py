"""Benchmark 2: overhead of ``softcam_core.explain.explain`` over calling the libraries directly.

For every method in ``METHODS`` the same network, input, target classes and options go through
``explain(model, x, method, target=...)`` and through the library call a user would write
(:mod:`bench.references`: torchcam / pytorch-grad-cam / captum with their documented usage).
Target: ours / direct <= 1.10 per method, and identical maps (max abs diff printed; > 1e-4 fails).

Our wrapper adds a per-model lock, a snapshot/restore of hooks, modes and ``requires_grad`` flags
(the "guard") and a resize; it also freezes the parameters while inside, so gradient methods skip
weight gradients the direct call computes. Ratios below 1 are therefore possible.

``cam`` needs a GAP + Linear head, so it runs on the black-box baseline of the same backbone;
every other method runs on the SoftCAM net. The methods that run hundreds of forward passes
(Score-CAM, Ablation-CAM, Integrated Gradients) use a smaller input on CPU so the run stays short;
the overhead being measured is per call, not per pixel.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

from bench.common import Config, Result, exact_math, max_abs_diff, overhead, time_pair
from bench.references import REFERENCES
from softcam_core.explain import METHODS, explain
from softcam_core.models import build_model

NAME = "explain_overhead"
TARGET = 1.10
MAP_TOLERANCE = 1e-4
# methods with a library to compare against (the model-free sanity maps and softcam_contrast have none)
WITH_REFERENCE = tuple(m for m in METHODS if m in REFERENCES)
HEAVY = ("scorecam", "ablationcam", "integrated_gradients")


def settings(config: Config, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return config.pick(
        tiny=dict(arch="resnet18", size=32, heavy_size=32, batch=1, repeats=1, heavy_repeats=1,
                  methods=("softcam", "cam", "gradcam", "hirescam", "integrated_gradients"),
                  options={"integrated_gradients": {"n_steps": 2}}),
        # CPU repeats: a 10 % overhead is within one repeat's noise on a shared machine (medians of 7 / 3)
        quick=dict(arch="resnet18", size=128, heavy_size=64, batch=1, repeats=10 if gpu else 7,
                   heavy_repeats=3, methods=WITH_REFERENCE, options={}),
        full=dict(arch="resnet18", size=224, heavy_size=224 if gpu else 128, batch=1, repeats=20 if gpu else 9,
                  heavy_repeats=5 if gpu else 3, methods=WITH_REFERENCE, options={}),
    )


@contextlib.contextmanager
def quiet():
    """Silence the libraries' progress bars and repeated warnings (they would interleave with our lines)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def run(config: Config) -> list[Result]:
    results = []
    for device in config.devices:
        s = settings(config, device)
        torch.manual_seed(0)
        softcam_net = build_model(s["arch"], 5, "softcam").eval().to(device)
        baseline_net = build_model(s["arch"], 5, "baseline").eval().to(device)
        for method in s["methods"]:
            model = baseline_net if method == "cam" else softcam_net
            heavy = method in HEAVY
            size = s["heavy_size"] if heavy else s["size"]
            x = torch.randn(s["batch"], 3, size, size, device=device)
            with torch.no_grad():
                targets = model(x).argmax(1).tolist()
            options = s["options"].get(method, {})
            reference = REFERENCES[method]

            def ours():
                return explain(model, x, method, target=targets, **options)

            def direct():
                return reference(model, x, targets, **options)

            with quiet():
                with exact_math():  # maps compared without TF32 / nondeterministic kernels
                    diff = max_abs_diff(ours(), direct())
                if device.type == "cuda":  # warm-up under the default (TF32) settings that are timed
                    ours(), direct()
                paired = time_pair(ours, direct, device, repeats=s["heavy_repeats"] if heavy else s["repeats"],
                                   warmup=0)
            result = overhead(f"explain {method} {s['arch']} {size}px batch {s['batch']}", device, paired, TARGET,
                              **{"maps max abs diff": diff})
            if not diff <= MAP_TOLERANCE:  # different maps: the speed means nothing
                result.ratio = float("nan")
                result.extra["maps differ"] = True
            results.append(result)
            print(result.line(), flush=True)
            model.zero_grad(set_to_none=True)  # direct library calls leave weight gradients behind
    return results
