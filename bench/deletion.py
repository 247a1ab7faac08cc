"""Benchmark 4a: deletion-curve faithfulness over a cohort, batched vs step-by-step.

``softcam_core.metrics.deletion_curves`` occludes every (image, step) pair of a cohort in a few
large batched forward passes; ``deletion_curve_reference`` runs the obvious loop, one forward pass
of one occluded image per step. Both run the same SoftCAM network (eval mode, inference mode) on
the same images and maps; the curves must agree (max abs diff printed, tolerance 1e-5: batched
convolutions may sum in another order; on CUDA compared with TF32 off, see
``bench.common.exact_math``) and the batched one must be >= 1.5x faster on 2 CPU cores
and >= 5x on a GPU.

The maps are the network's own SoftCAM evidence for the predicted class, upsampled to the input,
so the cell ranking is a realistic one (the cost does not depend on it). As in
``softcam evaluate``, the batched call is given the intact images' target probabilities from the
forward pass that produced the maps and chose the targets (``intact_probs``: step 0 is not
recomputed); the reference computes every step itself. A second, informational line times the
batched call without them.

Benchmark 4b, cohort evaluation throughput: ``softcam_core.evaluate.evaluate_cohort`` (what
``softcam evaluate`` runs: load, preprocess, explain, every metric, deletion curve, tables) over a
synthetic fundus cohort, one method at a time, in its default batches; printed as images/s per
method (no target). For softcam and gradcam it also runs ``batch_size=1`` (one image at a time)
and prints the batched / one-at-a-time throughput ratio.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import Config, Result, device_label, exact_math, speedup, synchronize, time_pair
from bench.explain_overhead import quiet
from softcam_core import metrics
from softcam_core.models import build_model

NAME = "deletion"
CURVE_TOLERANCE = 1e-5


def target_for(device: torch.device) -> float:
    return 5.0 if device.type == "cuda" else 1.5


def setup(config: Config, device: torch.device) -> dict:
    """Model, cohort and maps for the run level and device."""
    arch, size, patch, steps = config.pick(
        tiny=("resnet18", 64, 16, 4), quick=("resnet18", 224, 16, 10), full=("resnet18", 224, 16, 20)
    )
    n_images = config.pick(tiny=2, quick=4, full=64 if device.type == "cuda" else 12)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, head="softcam").eval().to(device)
    images = torch.randn(n_images, 3, size, size, device=device)
    with torch.inference_mode():
        logits, maps = model.forward_with_maps(images)
        targets = logits.argmax(1)
        intact = metrics.target_probability(logits, targets)  # what evaluate computes to choose the target
        chosen = maps[torch.arange(n_images, device=device), targets]
        sals = F.interpolate(chosen[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return dict(model=model, images=images, sals=sals.float().cpu().numpy(), targets=targets.cpu().numpy(),
                intact=intact.double().cpu().numpy(), patch=patch, steps=steps, arch=arch, size=size)


def run(config: Config) -> list[Result]:
    results = []
    for device in config.devices:
        s = setup(config, device)
        args = (s["model"], s["images"], s["sals"], s["targets"], s["patch"], s["steps"])
        known = dict(intact_probs=s["intact"])
        with exact_math():  # equality checked without TF32 rounding (see exact_math)
            batched = metrics.deletion_curves(*args, **known)
            unknown = metrics.deletion_curves(*args)
            reference = metrics.deletion_curve_reference(*args)
        if device.type == "cuda":  # warm-up under the default (TF32) settings that are timed
            metrics.deletion_curves(*args, **known)
            metrics.deletion_curves(*args)
            metrics.deletion_curve_reference(*args)
        n = s["images"].shape[0]
        repeats = config.pick(tiny=1, quick=2, full=3 if device.type == "cpu" else 10)
        name = f"deletion curves {s['arch']} {s['size']}px {n} images x {s['steps'] + 1} steps"
        for label, curves, kwargs, target in ((" (step 0 given)", batched, known, target_for(device)),
                                              (" (step 0 computed)", unknown, {}, None)):
            diff = float(np.nanmax(np.abs(curves - reference)))
            paired = time_pair(
                lambda: metrics.deletion_curves(*args, **kwargs),
                lambda: metrics.deletion_curve_reference(*args),
                device,
                repeats=repeats,
                warmup=0,
            )
            result = speedup(
                name + label, device, paired, target,
                **{"curves max abs diff": diff, "identical": bool(diff <= CURVE_TOLERANCE),
                   "batched images/s": n / (paired.ours_ms / 1e3)},
            )
            if diff > CURVE_TOLERANCE:  # a fast wrong answer is a failure whatever the speed
                result.ratio = float("nan")
            results.append(result)
            print(result.line(), flush=True)
        del s, args
    results += throughput(config)
    return results


def throughput_settings(config: Config, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return config.pick(
        tiny=dict(img_size=32, n=2, heavy_n=1, methods=("softcam",)),
        quick=dict(img_size=64, n=8, heavy_n=2, methods=("softcam", "gradcam", "integrated_gradients", "scorecam")),
        full=dict(img_size=224, n=64 if gpu else 16, heavy_n=16 if gpu else 2,
                  methods=("softcam", "gradcam", "hirescam", "integrated_gradients", "scorecam")),
    )


HEAVY = ("scorecam", "ablationcam", "integrated_gradients")
COMPARED = ("softcam", "gradcam")  # also run one image at a time: batched / one-at-a-time ratio


def throughput(config: Config) -> list[Result]:
    """Images/s of the whole cohort evaluation, per method and device (informational lines)."""
    from softcam_core.data import CohortFolder
    from softcam_core.evaluate import EvalSettings, evaluate_cohort
    from softcam_core.synth import make_cohort

    from bench.evaluate_memory import write_checkpoint

    results = []
    with tempfile.TemporaryDirectory(prefix="softcam-bench-") as tmp:
        root = Path(tmp)
        largest = max(throughput_settings(config, d)["n"] for d in config.devices)
        synth_size = max(throughput_settings(config, d)["img_size"] for d in config.devices)
        folder = CohortFolder(make_cohort("fundus", largest, 0, root / "cohort", size=max(64, synth_size)))
        for device in config.devices:
            t = throughput_settings(config, device)
            from softcam_core.models import load_checkpoint

            model, meta = load_checkpoint(write_checkpoint(root / f"model{t['img_size']}.pt", list(folder.classes),
                                                           t["img_size"]))
            for method in t["methods"]:
                n = t["heavy_n"] if method in HEAVY else t["n"]

                def timed(batch_size: int | None) -> float:
                    settings = EvalSettings(split="all", limit=n, resamples=100, figures=False, batch_size=batch_size)
                    with quiet():
                        synchronize(device)
                        start = time.perf_counter()
                        evaluate_cohort(model, meta, folder, [method], out_dir=root / f"eval-{method}-{batch_size}",
                                        device=device, progress=lambda *_: None, settings=settings)
                        synchronize(device)
                        return time.perf_counter() - start

                with quiet():
                    # a few images first: loads the libraries and warms the kernels, untimed
                    evaluate_cohort(model, meta, folder, [method], out_dir=root / "warm", device=device,
                                    progress=lambda *_: None, settings=EvalSettings(split="all", limit=min(n, 2),
                                                                                    resamples=10, figures=False))
                seconds = timed(None)
                single = timed(1) if method in COMPARED and n > 1 else float("nan")
                rate, single_rate = n / seconds, n / single
                result = Result(f"cohort evaluate throughput {method} {meta['arch']} {t['img_size']}px {n} images",
                                device_label(device), rate, single_rate, rate / single_rate, None, ">=",
                                unit="images/s", ours_label="evaluate_cohort batched",
                                reference_label="one image at a time", extra={"seconds": seconds})
                results.append(result)
                compared = (f", one at a time {single_rate:.3g} images/s, batched / one-at-a-time {rate / single_rate:.2f}"
                            if single == single else "")
                print(f"{result.name}: {rate:.3g} images/s ({seconds:.1f} s){compared} [{result.device}]", flush=True)
    return results
