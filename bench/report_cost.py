"""Benchmark 7: what ``softcam report`` costs, predicted from measured pieces against issue 16's budget.

The report's wall time is dominated by its trainings (per modality: the lambda sweep, four models
per seed, the shortcut baseline) and its evaluations (maps of every method on the test split,
deletion curves on ``deletion_limit`` images). This benchmark times the real pieces on a small
synthetic cohort at the report's input size:

* the second epoch of a :func:`softcam_core.training.train` run (seconds per training image-step,
  loading, augmentation and the validation pass included) and the first epoch's extra set-up;
* :func:`softcam_core.evaluate.evaluate_cohort` for each method class the report runs (its own
  SoftCAM maps, Grad-CAM, Guided Backprop, CasCAM, a sanity map) without deletion, and with the
  deletion protocol alone (seconds per image x method);

and multiplies them by the counts of :class:`softcam_core.report.ReportConfig` (defaults). Lines:
predicted minutes for one modality against 45 (``<=``), for all three against 120. The prediction
leaves out the cohort rendering and the tables (seconds). A real run's recorded steps are in
``<out>/work/steps.json`` and the report header.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import Config, Result, device_label
from bench.explain_overhead import quiet

NAME = "report_cost"
ONE_MODALITY_MINUTES = 45.0
ALL_MODALITIES_MINUTES = 120.0


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(config: Config, device: torch.device) -> dict:
    """Seconds per training image-step and per evaluated image x method (maps; deletion)."""
    from softcam_core import evaluate as E
    from softcam_core.models import load_checkpoint
    from softcam_core.report import ReportConfig
    from softcam_core.synth import make_cohort
    from softcam_core.training import train

    report = ReportConfig()
    n, img_size = config.pick(12, 40, 80), config.pick(64, 224, report.img_size)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        root = Path(tmp)
        data = make_cohort("fundus", n, 0, root / "data", size=report.synth_size, split=(0.5, 0.2, 0.3))
        n_train = sum(1 for line in (data / "labels.csv").read_text().splitlines()[1:] if line.endswith(",train"))
        checkpoint = root / "m.pt"
        # the second epoch's wall time (its training steps and the validation pass): the first one
        # also pays for building the model and warming the allocator, once per training
        result = train(data, checkpoint, arch=report.arch, head="softcam", l1=0.01, epochs=2,
                       img_size=img_size, batch_size=report.batch_size, device=device, show_progress=False)
        seconds = float(result.history[-1]["seconds"])
        setup = max(0.0, float(result.history[0]["seconds"]) - seconds)
        model, meta = load_checkpoint(checkpoint)
        images = config.pick(2, 4, 8)
        settings = E.EvalSettings(split="all", limit=images, topk=report.topk, deletion_steps=min(report.deletion_steps, 16 * 16),
                                  figures=False, png=False, resamples=50)
        maps_metrics = [m for m in E.METRIC_CHOICES if not m.startswith("deletion")]
        per_method = {}
        for method in ("softcam", "gradcam", "guided_backprop", "cascam:gradcam", "sanity:edge"):
            per_method[method] = _time(lambda: E.evaluate_cohort(model, meta, data, [method], maps_metrics, root / method,
                                                                 settings=settings, device=device)) / images
        deletion = _time(lambda: E.evaluate_cohort(model, meta, data, ["softcam"], ["deletion"], root / "deletion",
                                                   settings=settings, device=device)) / images
    # a training epoch also scores the validation split and, at the end, the test split
    return {"train_step": seconds / max(1, n_train), "train_setup": setup, "maps": per_method, "deletion": deletion,
            "img_size": img_size}


def predict_minutes(pieces: dict, report=None) -> float:
    """Minutes of one modality of ``report`` (default :class:`ReportConfig`) from measured pieces."""
    from softcam_core.report import ReportConfig, cohort_sizes

    report = report or ReportConfig()
    sizes = {part.split()[1]: int(part.split()[0]) for part in cohort_sizes(report).split(" / ")}
    image_epochs = (len(report.l1_grid) + len(report.l2_grid)) * report.sweep_epochs
    image_epochs += len(report.seeds) * 4 * report.epochs + (report.epochs if report.shortcut_rate > 0 else 0)
    trainings = len(report.l1_grid) + len(report.l2_grid) + 4 * len(report.seeds) + (1 if report.shortcut_rate > 0 else 0)
    train = image_epochs * sizes["train"] * pieces["train_step"] + trainings * pieces.get("train_setup", 0.0)
    maps = pieces["maps"]

    def cost(method: str) -> float:
        return maps.get(method) or maps["cascam:gradcam" if method.startswith("cascam:") else
                                        "sanity:edge" if method.startswith("sanity:") else "gradcam"]

    test = report.eval_limit or sizes["test"]
    deletion_images = min(report.deletion_limit or test, test)
    per_seed = 0.0
    for head, methods in (("baseline", list(report.methods) + list(report.sanity_methods)),
                          ("softcam", ["softcam"] + list(report.within_methods))):
        count = 1 if head == "baseline" else 3
        per_seed += count * (sum(cost(m) for m in methods) * test + len(methods) * deletion_images * pieces["deletion"])
    evaluation = len(report.seeds) * per_seed
    shortcut = test * sum(cost(m) for m in report.methods if m.startswith("cascam:")) * 2 if report.shortcut_rate else 0
    # the model-randomisation test: first seed, every model, maps of the trained and the re-initialised net
    randomisation = 2 * report.randomisation_images * (
        sum(cost(m) for m in list(report.methods) + list(report.sanity_methods))
        + 3 * sum(cost(m) for m in ["softcam"] + list(report.within_methods)))
    return (train + evaluation + shortcut + randomisation) / 60.0


def run(config: Config) -> list[Result]:
    results = []
    for device in config.devices:
        pieces = measure(config, device)
        one = predict_minutes(pieces)
        label = device_label(device)
        extra = {"train s/image-step": pieces["train_step"], "train set-up s": pieces["train_setup"],
                 "deletion s/map": pieces["deletion"],
                 **{f"{m} s/map": v for m, v in pieces["maps"].items()}}
        results.append(Result(f"report one modality, predicted from {pieces['img_size']} px pieces", label, one,
                              ONE_MODALITY_MINUTES, one / ONE_MODALITY_MINUTES, 1.0, unit="min",
                              ours_label="predicted", reference_label="budget", extra=extra))
        results.append(Result(f"report three modalities, predicted from {pieces['img_size']} px pieces", label, 3 * one,
                              ALL_MODALITIES_MINUTES, 3 * one / ALL_MODALITIES_MINUTES, 1.0, unit="min",
                              ours_label="predicted", reference_label="budget", extra=extra))
    return results
