"""``softcam report``: the SoftCAM paper's claims, tested on synthetic cohorts that can falsify them.

Per modality (fundus, OCT, chest X-ray) it

1. renders a fair synthetic cohort (:func:`softcam_core.synth.make_cohort`: only the lesions
   discriminate) and, for the CasCAM claim, a *shortcut* cohort in which a share of the diseased
   images also carries a burned-in artifact;
2. chooses the lasso and ridge weights on the validation split from a sweep (one seed, a shorter
   schedule; the table is written);
3. trains, for every seed, the black-box baseline (GAP + FC) and the dense, lasso and ridge
   SoftCAM nets (:func:`softcam_core.training.train`, best-on-validation checkpoint);
4. evaluates on the test split (:func:`softcam_core.evaluate.evaluate_cohort`): post-hoc methods
   on the baseline *and* on the SoftCAM nets (within-model comparisons), each SoftCAM net's own
   evidence maps, and the model-free sanity maps (``sanity:edge``, ``sanity:random``,
   ``sanity:centre``) as rows of every table; the deletion curves (paper protocol) on the first
   ``deletion_limit`` test images, their AUDC averaged over the images every model of that seed
   classifies correctly;
5. writes ``report.md`` + ``report.html``: a verdict per paper claim (:mod:`softcam_core.claims`:
   holds / fails / cannot tell, with the evidence), tables of mean ± spread over seeds with 95 %
   intervals, paired tests, figures, the exact command, and what it cost.

Every step (cohort, training, evaluation) records its settings and seconds in
``work/steps.json``; a run that was interrupted starts again where it stopped (trainings resume
from their last epoch, evaluations from their last written row).

Layout of ``--out``: report.md, report.html, tables/*.csv, figures/*.html|png, and work/ (cohorts,
checkpoints, evaluation folders, steps.json; large, not meant for version control).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from softcam_core import claims as C
from softcam_core import evaluate as E
from softcam_core.explain.specs import SANITY_METHODS

MODALITIES = ("fundus", "oct", "cxr")
HEALTHY = "healthy"  # the synthetic cohorts' negative class
# post-hoc methods run on the black-box baseline (the paper's set that is affordable on a CPU, CasCAM)
BASELINE_METHODS = ("gradcam", "layercam", "guided_backprop", "cascam:gradcam")
# post-hoc methods run on the SoftCAM nets too (within-model comparison: same weights, other explainer)
WITHIN_METHODS = ("gradcam",)
LOWER_IS_BETTER = {"audc", "seconds"}


@dataclass(frozen=True)
class ReportConfig:
    """Everything that determines the report's numbers (written into it).

    Sizes fit the budget of issue 16 on 2 CPU cores (docs/report/README or the report header
    states the measured cost): ResNet-18 at 224 px (7 x 7 evidence maps) trained from random
    weights for ``epochs`` epochs on ``n * split[0]`` images (~1,800 image-steps per training;
    ``python -m bench --only report_cost`` predicts the wall time from measured pieces);
    the lambda sweep trains ``len(l1_grid) + len(l2_grid)`` models for ``sweep_epochs`` epochs on
    the first seed. ``deletion_limit`` test images get deletion curves of ``deletion_steps``
    patches (``patch = img_size // 16``). ``shortcut_rate``: share of the shortcut cohort's
    diseased images with the artifact (0: no shortcut cohort, no CasCAM claim).
    """

    n: int = 340
    split: tuple[float, float, float] = (0.6, 0.15, 0.25)
    synth_size: int = 256
    img_size: int = 224
    arch: str = "resnet18"
    epochs: int = 9
    batch_size: int = 16
    lr: float = 0.01
    min_lr: float = 1e-4
    seeds: tuple[int, ...] = (0, 1)
    l1_grid: tuple[float, ...] = (0.001, 0.01, 0.1)
    l2_grid: tuple[float, ...] = (0.001, 0.01, 0.1)
    sweep_epochs: int = 2
    modalities: tuple[str, ...] = MODALITIES
    methods: tuple[str, ...] = BASELINE_METHODS
    within_methods: tuple[str, ...] = WITHIN_METHODS
    sanity_methods: tuple[str, ...] = SANITY_METHODS
    shortcut_rate: float = 0.5
    eval_limit: int | None = 40
    deletion_limit: int | None = 16
    deletion_steps: int = 20
    topk: tuple[int, ...] = (1, 3, 5, 10, 15, 20)
    claim_k: int = 15
    randomisation_images: int = 6
    resamples: int = E.BOOTSTRAP_RESAMPLES
    png: bool = True


# `--quick`: every step end to end in a few minutes on CPU; its models are barely trained and its
# verdicts say so ("cannot tell"), which is what the test checks
QUICK = {"n": 24, "epochs": 1, "img_size": 64, "synth_size": 256, "seeds": (0,), "l1_grid": (0.01,), "l2_grid": (0.01,),
         "sweep_epochs": 1, "eval_limit": 6, "deletion_limit": 4, "deletion_steps": 4, "methods": ("gradcam", "cascam:gradcam"),
         "within_methods": ("gradcam",), "sanity_methods": ("sanity:edge", "sanity:random"), "resamples": 200,
         "split": (0.5, 0.25, 0.25), "topk": (1, 5), "claim_k": 5,
         "randomisation_images": 2}


def row_label(variant: str, method: str) -> str:
    """Row label of tables and figures: ``SoftCAM <variant>`` for a net's own evidence maps,
    ``<method> · <variant>`` for every other map (post-hoc or sanity, on that model)."""
    return f"SoftCAM {variant}" if method == "softcam" else f"{method} · {variant}"


# ----------------------------------------------------------------------------------------------
# steps: recorded, skipped when done with the same settings


class Steps:
    """``work/steps.json``: per step key its settings fingerprint, seconds and result.

    ``run(key, settings, fn)`` returns the recorded result when the step finished before with the
    same settings, else runs ``fn()`` (which must itself continue partial work: training resume,
    evaluation resume) and records what it returns (JSON-able) and its seconds. The synthetic
    generator's version is part of every step's settings: a changed generator redoes the cohorts
    and everything trained or scored on them, never mixing old results with new images.
    """

    def __init__(self, path: Path, log: Callable[[str], None] = print):
        self.path = path
        self.log = log
        self.records: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def fingerprint(settings: dict) -> dict:
        from softcam_core.synth import GENERATOR_VERSION

        return json.loads(json.dumps(dict(settings, generator_version=GENERATOR_VERSION)))

    def done(self, key: str, settings: dict) -> bool:
        record = self.records.get(key)
        return record is not None and record.get("settings") == self.fingerprint(settings)

    def run(self, key: str, settings: dict, fn: Callable[[], Any]) -> Any:
        if self.done(key, settings):
            return self.records[key].get("result")
        self.log(f"{key} ...")
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.records[key] = {"settings": self.fingerprint(settings), "seconds": round(seconds, 1),
                             "result": json.loads(json.dumps(result, default=str))}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1))
        os.replace(tmp, self.path)  # atomic: a kill never leaves a torn record
        self.log(f"{key}: {seconds:.0f} s")
        return self.records[key]["result"]

    def seconds(self, prefix: str = "") -> float:
        return float(sum(r.get("seconds", 0.0) for k, r in self.records.items() if k.startswith(prefix)))


# ----------------------------------------------------------------------------------------------
# one modality


@dataclass
class ModalityResult:
    """The pooled tables of one modality (all seeds)."""

    modality: str
    per_image: pd.DataFrame        # one row per (seed, image, model, method); `row`, `unit` columns
    curves: pd.DataFrame           # deletion curves, `row` column
    cohort: pd.DataFrame           # summarise() over `row`
    classification: pd.DataFrame  # one row per (model, seed)
    sweep: pd.DataFrame            # lambda sweep
    shortcut: pd.DataFrame = field(default_factory=pd.DataFrame)  # shortcut cohort per-image rows
    randomisation: pd.DataFrame = field(default_factory=pd.DataFrame)  # model-randomisation test, first seed
    verdicts: list[C.Verdict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _train_settings(config: ReportConfig) -> dict:
    return {"arch": config.arch, "img_size": config.img_size, "batch_size": config.batch_size, "lr": config.lr,
            "min_lr": config.min_lr}


def _train(steps: Steps, key: str, data: Path, out: Path, head: str, l1: float, l2: float, epochs: int, seed: int,
           config: ReportConfig) -> dict:
    """One training step (resumed from its last epoch when interrupted); returns its metrics."""
    from softcam_core.training import state_path, train

    settings = dict(_train_settings(config), head=head, l1=l1, l2=l2, epochs=epochs, seed=seed, data=str(data))

    def run() -> dict:
        result = train(data, out, arch=config.arch, head=head, l1=l1, l2=l2, epochs=epochs, img_size=config.img_size,
                       batch_size=config.batch_size, lr=config.lr, min_lr=config.min_lr, seed=seed,
                       resume=state_path(out).is_file() and key not in steps.records, show_progress=True)
        metrics = result.meta.get("metrics") or {}
        return {"val": metrics.get("val"), "test": metrics.get("test"), "best_epoch": metrics.get("best_epoch")}

    return steps.run(key, settings, run)


def choose_lambda(sweep: pd.DataFrame) -> float:
    """The sweep's choice for one penalty: highest validation accuracy + AUC; ties go to the
    larger weight (the sparser / smoother model at equal accuracy). ``sweep``: columns
    ``lambda``, ``val_accuracy``, ``val_auc``."""
    score = sweep["val_accuracy"].fillna(0) + sweep["val_auc"].fillna(0)
    best = score.max()
    return float(sweep.loc[np.isclose(score, best), "lambda"].max())


def _artifact_stems(data: Path) -> dict[str, bool]:
    meta = json.loads((data / "synth_meta.json").read_text())
    return {str(v["stem"]): v.get("artifact") is not None for v in meta["images"].values()}


def _evaluate(steps: Steps, key: str, checkpoint: Path, data: Path, methods: Sequence[str], out: Path,
              config: ReportConfig, deletion: bool) -> pd.DataFrame:
    """Maps and metrics (``deletion=False``: every metric but deletion on the test split, or the
    first ``eval_limit`` images; ``True``: the deletion AUDC on the first ``deletion_limit``)."""
    from softcam_core.models import load_checkpoint

    metrics = [m for m in E.METRIC_CHOICES if (m == "deletion") == deletion and not (m.startswith("deletion") and m != "deletion")]
    limit = config.deletion_limit if deletion else config.eval_limit
    settings = {"checkpoint": str(checkpoint), "methods": list(methods), "metrics": metrics, "limit": limit,
                "deletion_steps": config.deletion_steps, "topk": list(config.topk)}

    def run() -> dict:
        model, meta = load_checkpoint(checkpoint)
        eval_settings = E.EvalSettings(split="test", limit=limit, deletion_steps=config.deletion_steps,
                                       topk=config.topk, resamples=config.resamples, figures=False, png=False)
        # a record under this key was made with other settings: start afresh instead of resuming
        resume = (out / "config.json").is_file() and key not in steps.records
        E.evaluate_cohort(model, meta, data, list(methods), metrics, out, resume=resume, settings=eval_settings)
        return {"rows": int(sum(1 for _ in open(out / "per_image.csv")) - 1)}

    steps.run(key, settings, run)
    per_image = pd.read_csv(out / "per_image.csv", dtype={"image": str, "notes": str})
    return per_image.drop_duplicates(["image", "method"], keep="last")


def _curves(out: Path) -> pd.DataFrame:
    path = out / "deletion_curves.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path, dtype={"image": str}).drop_duplicates(["image", "method"], keep="last")


def variants(l1: float, l2: float) -> list[tuple[str, str, float, float]]:
    """(name, head, l1, l2) of the four compared models."""
    return [("baseline", "baseline", 0.0, 0.0), ("dense", "softcam", 0.0, 0.0), ("lasso", "softcam", l1, 0.0),
            ("ridge", "softcam", 0.0, l2)]


def run_modality(modality: str, config: ReportConfig, work: Path, steps: Steps, bar=None) -> ModalityResult:
    """Cohorts, sweep, trainings and evaluations of one modality; every step resumable."""
    from softcam_core.synth import make_cohort

    def tick(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)

    cohort_settings = {"n": config.n, "size": config.synth_size, "split": list(config.split)}
    data = work / "data" / modality
    steps.run(f"{modality}/synth", dict(cohort_settings, seed=config.seeds[0]),
              lambda: str(make_cohort(modality, config.n, config.seeds[0], data, size=config.synth_size,
                                      split=tuple(config.split))))
    tick(f"{modality} cohort")

    # lambda sweep: first seed, shorter schedule, chosen on the validation split
    sweep_rows = []
    for penalty, grid in (("l1", config.l1_grid), ("l2", config.l2_grid)):
        for lam in grid:
            l1, l2 = (lam, 0.0) if penalty == "l1" else (0.0, lam)
            metrics = _train(steps, f"{modality}/sweep/{penalty}={lam:g}", data, work / "sweep" / modality / f"{penalty}_{lam:g}.pt",
                             "softcam", l1, l2, config.sweep_epochs, config.seeds[0], config)
            val = metrics.get("val") or {}
            sweep_rows.append({"penalty": penalty, "lambda": lam, "val_accuracy": val.get("accuracy"),
                               "val_auc": val.get("auc"), "epochs": config.sweep_epochs, "seed": config.seeds[0]})
            tick(f"{modality} sweep {penalty}={lam:g}")
    sweep = pd.DataFrame(sweep_rows)
    chosen = {p: choose_lambda(sweep[sweep["penalty"] == p]) for p in ("l1", "l2")}
    sweep["chosen"] = [row["lambda"] == chosen[row["penalty"]] for _, row in sweep.iterrows()]

    models = variants(chosen["l1"], chosen["l2"])
    per_images, curve_tables, classification, randomisations = [], [], [], []
    for seed in config.seeds:
        for variant, head, l1, l2 in models:
            checkpoint = work / "models" / modality / f"seed{seed}" / f"{variant}.pt"
            metrics = _train(steps, f"{modality}/seed{seed}/train/{variant}", data, checkpoint, head, l1, l2,
                             config.epochs, seed, config)
            tick(f"{modality} seed {seed} {variant}")
            test, val = metrics.get("test") or {}, metrics.get("val") or {}
            classification.append({"model": variant, "seed": seed, "head": head, "l1": l1, "l2": l2,
                                   "test_accuracy": test.get("accuracy"), "test_auc": test.get("auc"),
                                   "test_n": test.get("n"), "val_accuracy": val.get("accuracy"),
                                   "best_epoch": metrics.get("best_epoch"),
                                   "feature_map": feature_map_size(config.arch, head, config.img_size)})
            own = ["softcam"] if head == "softcam" else []
            methods = own + list(config.methods if head == "baseline" else config.within_methods)
            methods += list(config.sanity_methods) if head == "baseline" else []
            folder = work / "eval" / modality / f"seed{seed}" / variant
            table = _evaluate(steps, f"{modality}/seed{seed}/evaluate/{variant}", checkpoint, data, methods, folder,
                              config, deletion=False)
            tick(f"{modality} seed {seed} {variant} maps")
            deletion = _evaluate(steps, f"{modality}/seed{seed}/deletion/{variant}", checkpoint, data, methods,
                                 folder.with_name(variant + "_deletion"), config, deletion=True)
            tick(f"{modality} seed {seed} {variant} deletion")
            if seed == config.seeds[0] and config.randomisation_images:
                randomisations.append(_randomisation(steps, f"{modality}/seed{seed}/randomisation/{variant}", checkpoint,
                                                     data, methods, variant, config))
                tick(f"{modality} seed {seed} {variant} randomisation")
            table = table.merge(deletion[["image", "method", "audc"]], on=["image", "method"], how="left")
            table.insert(0, "model", variant)
            table.insert(1, "seed", seed)
            per_images.append(table)
            curves = _curves(folder.with_name(variant + "_deletion"))
            if not curves.empty:
                curves.insert(0, "model", variant)
                curves.insert(1, "seed", seed)
                curve_tables.append(curves)
    per_image = pool_tables(per_images)
    curve_table = pd.concat(curve_tables, ignore_index=True) if curve_tables else pd.DataFrame()
    if not curve_table.empty:
        curve_table["row"] = [row_label(v, m) for v, m in zip(curve_table["model"], curve_table["method"])]
    shortcut = pd.DataFrame()
    if config.shortcut_rate > 0:
        shortcut = run_shortcut(modality, config, work, steps, tick)
    classification_table = pd.DataFrame(classification)
    result = ModalityResult(modality, per_image, curve_table, pd.DataFrame(), classification_table, sweep, shortcut,
                            pd.DataFrame([r for rows in randomisations for r in rows]))
    result.cohort = E.summarise(per_image, group="row", resamples=config.resamples, seed=config.seeds[0])
    result.verdicts = verdicts(result, config)
    result.seconds = {"steps": steps.seconds(f"{modality}/")}
    return result


def _randomisation(steps: Steps, key: str, checkpoint: Path, data: Path, methods: Sequence[str], variant: str,
                   config: ReportConfig) -> list[dict]:
    """Adebayo et al. (2018) cascading model randomisation of each of ``methods`` on the first
    ``randomisation_images`` diseased test images: Spearman rank correlation (and of the absolute
    maps, and SSIM) between the trained model's map and the map after re-initialising the head,
    the head and the top two blocks, and every block. A map that does not depend on the weights
    (``sanity:*``) stays at 1."""
    settings = {"checkpoint": str(checkpoint), "methods": list(methods), "images": config.randomisation_images}

    def run() -> list[dict]:
        import torch

        from softcam_core.data import CohortFolder
        from softcam_core.explain.randomisation import model_randomisation_test, randomisation_units
        from softcam_core.inference import model_input
        from softcam_core.models import load_checkpoint

        model, meta = load_checkpoint(checkpoint)
        folder = CohortFolder(data)
        records = [r for r in folder.split("test") if r.label_index != 0]
        records = records[: config.randomisation_images]
        x = torch.stack([model_input(r.path, meta)[0] for r in records])
        n_units = len(randomisation_units(model))
        depths = sorted({1, min(3, n_units), n_units})
        rows = []
        for method in methods:
            result = model_randomisation_test(model, x, method, target=1, depths=depths, seed=0)
            for row in result.summary():
                rows.append(dict(row, row=row_label(variant, method), images=len(records),
                                 randomised="head" if row["depth"] == 1 else
                                 ("all blocks" if row["depth"] == n_units else f"head + top {row['depth'] - 1} blocks")))
        return rows

    return steps.run(key, settings, run)


def run_shortcut(modality: str, config: ReportConfig, work: Path, steps: Steps, tick) -> pd.DataFrame:
    """The shortcut cohort: baseline (first seed) trained on it; base methods and CasCAM scored
    against the lesions on its diseased test images, with the ``artifact`` flag per image."""
    from softcam_core.synth import make_cohort

    seed = config.seeds[0]
    data = work / "data" / f"{modality}_shortcut"
    steps.run(f"{modality}/shortcut/synth", {"n": config.n, "size": config.synth_size, "split": list(config.split),
                                             "rate": config.shortcut_rate, "seed": seed},
              lambda: str(make_cohort(modality, config.n, seed, data, size=config.synth_size, split=tuple(config.split),
                                      artifact_rate=config.shortcut_rate)))
    checkpoint = work / "models" / modality / "shortcut" / "baseline.pt"
    metrics = _train(steps, f"{modality}/shortcut/train/baseline", data, checkpoint, "baseline", 0.0, 0.0,
                     config.epochs, seed, config)
    tick(f"{modality} shortcut baseline")
    cascams = [m for m in config.methods if m.startswith("cascam:")]
    methods = list(dict.fromkeys([m.split(":", 1)[1] for m in cascams] + cascams))
    if not methods:
        return pd.DataFrame()
    table = _evaluate(steps, f"{modality}/shortcut/evaluate/baseline", checkpoint, data, methods,
                      work / "eval" / modality / "shortcut", config, deletion=False)
    tick(f"{modality} shortcut maps")
    artifact = _artifact_stems(data)
    table.insert(0, "model", "baseline")
    table.insert(1, "seed", seed)
    table = pool_tables([table])
    table["artifact"] = table["image"].map(artifact).fillna(False).astype(bool)
    table["test_accuracy"] = (metrics.get("test") or {}).get("accuracy")
    return table


def pool_tables(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-(seed, model) evaluation tables and add the report's columns: ``row``
    (:func:`row_label`), ``unit`` (``"<seed>/<image>"``: the pairing key), ``label_is_diseased``,
    ``correct`` (the model's prediction equals the label; evaluate's column when present) and
    ``audc_common_correct`` (AUDC on the images that every model of the same seed classifies
    correctly: the paper's faithfulness cohort). The class-wise activation consistency columns
    come from evaluate (``activation_consistency_diseased`` / ``_healthy``)."""
    if not tables:
        return pd.DataFrame()
    table = pd.concat(tables, ignore_index=True)
    table["row"] = [row_label(v, m) for v, m in zip(table["model"], table["method"])]
    table["unit"] = table["seed"].astype(str) + "/" + table["image"].astype(str)
    table["label_is_diseased"] = table["label"].astype(str).str.lower() != HEALTHY
    table["correct"] = table["pred"].astype(str) == table["label"].astype(str)
    if "audc" in table:
        per_unit = table.drop_duplicates(["unit", "model"]).groupby("unit")["correct"].agg(["all", "size"])
        n_models = table.groupby("seed")["model"].nunique()
        seeds = table.drop_duplicates("unit").set_index("unit")["seed"]
        common = per_unit.index[per_unit["all"] & (per_unit["size"] == seeds.loc[per_unit.index].map(n_models))]
        table["audc_common_correct"] = table["audc"].where(table["unit"].isin(set(common)))
    return table


def feature_map_size(arch: str, head: str, img_size: int) -> str:
    """``"HxW"`` of the last feature map (the resolution of CAM-type and SoftCAM maps) of ``arch``
    for a square ``img_size`` px input."""
    import torch

    from softcam_core.models import build_model

    model = build_model(arch, 2, head)
    with torch.no_grad():
        features = model.features(torch.zeros(1, 3, img_size, img_size))
    return f"{features.shape[-2]}x{features.shape[-1]}"


# ----------------------------------------------------------------------------------------------
# claims


def verdicts(result: ModalityResult, config: ReportConfig) -> list[C.Verdict]:
    """The paper's claims on one modality (:mod:`softcam_core.claims`), computed from its tables."""
    per_image, seed = result.per_image, config.seeds[0]
    out: list[C.Verdict] = []
    if per_image.empty:
        return out
    correct = per_image.drop_duplicates(["unit", "model"])[["unit", "model", "correct"]]
    out.append(C.accuracy_parity(correct, "baseline", ["dense", "lasso", "ridge"], resamples=config.resamples, seed=seed))
    diseased = per_image[per_image["label_is_diseased"]]
    topk = f"topk_precision_k{config.claim_k}"
    out.append(C.ranking_claim(diseased, topk, "SoftCAM lasso", f"sparse SoftCAM has the best top-{config.claim_k} "
                               "localization precision", resamples=config.resamples, seed=seed))
    out.append(C.ranking_claim(diseased, "activation_precision", "SoftCAM lasso",
                               "sparse SoftCAM has the best activation precision", resamples=config.resamples, seed=seed))
    out.append(C.ranking_claim(diseased, "activation_sensitivity", "SoftCAM ridge",
                               "ridge SoftCAM has the best activation sensitivity", resamples=config.resamples, seed=seed))
    out.append(C.consistency_claim(per_image, "SoftCAM lasso", resamples=config.resamples, seed=seed))
    if "audc_common_correct" in per_image:
        out.append(C.ranking_claim(per_image, "audc_common_correct", "SoftCAM lasso",
                                   "sparse SoftCAM is the most faithful (lowest AUDC, images every model classifies correctly)",
                                   higher_is_better=False, resamples=config.resamples, seed=seed))
    # the premise of every localisation claim: the models decide from the lesions (an image's drops are
    # the same on every method's row of one model, so one row per (seed, image) and model is used)
    for model in ("baseline", "lasso"):
        rows = diseased[diseased["model"] == model]
        if not rows.empty:
            out.append(C.lesion_reliance_claim(rows, resamples=config.resamples, seed=seed, unit="unit",
                                               claim=f"the {model} model's prediction depends on the annotated lesions "
                                                     "(premise of the localisation claims)"))
    shortcut = result.shortcut
    if not shortcut.empty:
        cascams = [m for m in config.methods if m.startswith("cascam:")]
        sick = shortcut[shortcut["label_is_diseased"]]
        artifact_sick = sick[sick["artifact"]]
        if not artifact_sick.empty:  # what CasCAM should uncover: lesions the shortcut model may not need
            out.append(C.lesion_reliance_claim(artifact_sick, resamples=config.resamples, seed=seed, unit="unit",
                                               claim="on the shortcut cohort's artifact images, the baseline's "
                                                     "prediction depends on the annotated lesions"))
        for cascam in cascams:
            base = cascam.split(":", 1)[1]
            out.append(C.cascam_shortcut_claim(sick, topk, row_label("baseline", cascam), row_label("baseline", base),
                                               resamples=config.resamples, seed=seed))
    return out


# ----------------------------------------------------------------------------------------------
# tables


_fmt = C.fmt_number


def headline_metrics(config: ReportConfig) -> tuple[str, ...]:
    """Columns of the explanation-metrics table, in order (every metric stays in tables/*.csv)."""
    return (f"topk_precision_k{config.claim_k}", "topk_precision_k5", "activation_precision", "activation_sensitivity",
            "activation_consistency_diseased", "activation_consistency_healthy", "pointing_game", "iou_top10", "energy_top15",
            "average_precision", "audc_common_correct", "seconds")


def metrics_table(per_image: pd.DataFrame, config: ReportConfig, rows: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per report row: ``mean ± sd over seeds [95% CI] (n)`` per headline metric.

    The mean and the interval are over all (seed, image) units where the metric is defined
    (localization on diseased images only); ``± sd`` is the standard deviation of the per-seed
    means (shown with two or more seeds). A signed-map metric that does not apply to a method
    (activation consistency of non-negative maps) reads ``n/a (non-negative map)``.
    """
    if per_image.empty:
        return pd.DataFrame()
    diseased_only = {m for m in headline_metrics(config) if m.startswith(("topk", "activation_precision",
                                                                          "activation_sensitivity", "pointing",
                                                                          "iou", "energy", "average_precision"))}
    out = []
    for row in rows or list(dict.fromkeys(per_image["row"])):
        sub = per_image[per_image["row"] == row]
        cells: dict[str, str] = {"row": row}
        for metric in headline_metrics(config):
            if metric not in sub:
                continue
            values_of = sub[sub["label_is_diseased"]] if metric in diseased_only else sub
            values = values_of[metric].to_numpy(float)
            finite = np.isfinite(values)
            if not finite.any():
                not_applicable = metric.startswith("activation_consistency") and "notes" in sub and \
                    sub["notes"].fillna("").str.contains("not applicable").any()
                cells[metric] = "n/a (non-negative map)" if not_applicable else "–"
                continue
            low, high = E.bootstrap_ci(values[finite], config.resamples, config.seeds[0])
            seed_means = values_of.assign(v=values).groupby("seed")["v"].mean().dropna()
            spread = f" ± {_fmt(seed_means.std(ddof=1))}" if seed_means.size > 1 else ""
            digits = 4 if metric == "seconds" else 3
            cells[metric] = (f"{_fmt(values[finite].mean(), digits)}{spread} [{_fmt(low, digits)}, {_fmt(high, digits)}] "
                             f"({int(finite.sum())})")
        out.append(cells)
    return pd.DataFrame(out)


def classification_table(classification: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy and AUC per model: mean ± sd over seeds, and each seed's value."""
    if classification.empty:
        return classification
    rows = []
    for model, sub in classification.groupby("model", sort=False):
        acc, auc = sub["test_accuracy"].astype(float), sub["test_auc"].astype(float)
        spread = lambda s: f" ± {_fmt(s.std(ddof=1))}" if s.notna().sum() > 1 else ""  # noqa: E731
        rows.append({"model": model, "head": sub["head"].iloc[0], "l1": sub["l1"].iloc[0], "l2": sub["l2"].iloc[0],
                     "test accuracy": f"{_fmt(acc.mean())}{spread(acc)}", "test AUC": f"{_fmt(auc.mean())}{spread(auc)}",
                     "per seed accuracy": ", ".join(_fmt(v) for v in acc), "test images": int(sub["test_n"].iloc[0] or 0),
                     "feature map": sub["feature_map"].iloc[0]})
    return pd.DataFrame(rows)


def saturation_flag(classification: pd.DataFrame, low: float = 0.80, high: float = 0.95) -> str | None:
    """A sentence when the baseline's mean test accuracy is outside [low, high]: above, the benchmark
    is saturated and cannot separate accuracies; below, the models explain a weak classifier."""
    base = classification[classification["model"] == "baseline"]["test_accuracy"].astype(float)
    if base.empty or not base.notna().any():
        return None
    acc = float(base.mean())
    if acc > high:
        return (f"Baseline test accuracy {_fmt(acc)} is above {high:g}: the task saturates, so accuracy parity "
                "cannot fail here and the benchmark cannot tell.")
    if acc < low:
        return f"Baseline test accuracy {_fmt(acc)} is below {low:g}: the maps explain a weak classifier."
    return None


def paired_table(per_image: pd.DataFrame, metrics: Sequence[str], claimed: str = "SoftCAM lasso") -> pd.DataFrame:
    """``claimed`` against every other row on ``metrics``: paired Wilcoxon over (seed, image) units,
    Holm over the comparisons of one metric (the details of the ranking claims)."""
    frames = []
    for metric in metrics:
        if metric not in per_image:
            continue
        subset = per_image if metric.startswith("audc") else per_image[per_image["label_is_diseased"]]
        verdict = C.ranking_claim(subset, metric, claimed, metric, higher_is_better=metric not in LOWER_IS_BETTER
                                  and not metric.startswith("audc"))
        if not verdict.details.empty:
            frames.append(verdict.details.assign(metric=metric))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "claimed", claimed)
    return table[["metric", "claimed", "competitor", "n", "mean_claimed", "mean_competitor", "mean_diff", "p_holm",
                  "competitor_significantly_better"]]


# ----------------------------------------------------------------------------------------------
# rendering


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(empty)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [(_fmt(v) if isinstance(v, (float, np.floating)) else str(v)).replace("|", "\\|") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(empty)</em></p>"
    return df.to_html(index=False, escape=True, float_format=lambda v: _fmt(v), na_rep="–", border=0, classes="t")


def cohort_sizes(config: ReportConfig) -> str:
    """``"240 train / 60 val / 100 test"`` for the configured cohort (the synth split rule)."""
    from softcam_core.synth import assign_labels_and_splits, BINARY_CLASSES

    _, splits = assign_labels_and_splits(config.n, BINARY_CLASSES, tuple(config.split), np.random.default_rng(0))
    counts = pd.Series(list(splits)).value_counts()
    return " / ".join(f"{int(counts.get(s, 0))} {s}" for s in ("train", "val", "test"))


def render(results: list[ModalityResult], config: ReportConfig, out: Path, command: str, wall: float,
           figures: dict) -> tuple[Path, Path]:
    """Write report.md and report.html from the modality results and the saved figures."""
    import torch

    from softcam_core import __version__
    from softcam_core.device import describe_device

    md: list[str] = []
    body: list[str] = []

    def section(title: str, level: int = 2) -> None:
        md.append(f"\n{'#' * level} {title}\n")
        body.append(f"<h{level}>{html.escape(title)}</h{level}>")

    def para(text: str) -> None:
        md.append(text + "\n")
        body.append(f"<p>{html.escape(text)}</p>")

    def bullets(lines: Sequence[str]) -> None:
        for line in lines:
            md.append(f"- {line}")
            body.append(f"<p>• {html.escape(line)}</p>")
        md.append("")

    def table(df: pd.DataFrame) -> None:
        md.append(_md_table(df))
        body.append(_html_table(df))

    title = "Can SoftCAM's claims fail? The paper's comparison on fair synthetic cohorts"
    md.append(f"# {title}\n")
    body.append(f"<h1>{html.escape(title)}</h1>")
    para(
        f"Images: {config.n} per modality ({cohort_sizes(config)}), rendered at {config.synth_size} px; models: "
        f"{config.arch} at {config.img_size} px from random weights, {config.epochs} epochs, seeds "
        f"{', '.join(map(str, config.seeds))}; lambda sweep: {config.sweep_epochs} epochs on seed {config.seeds[0]}; "
        f"deletion: top {config.deletion_steps} patches on the first {config.deletion_limit or 'all'} test images. "
        f"Wall time: {wall / 60:.1f} min of recorded steps on {describe_device()} "
        f"(softcam-review {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs visible)."
    )
    para(
        "Each paper claim gets a verdict — holds, fails, or cannot tell — computed from the tables by "
        "softcam_core.claims (rules in its docstring and docs/metrics.md): a ranking claim holds only when the "
        "claimed row is best and significantly better than every other row (paired Wilcoxon over (seed, image), "
        "Holm-corrected), fails when another row is significantly better, and otherwise the benchmark cannot "
        "tell. Model-free sanity maps (sanity:edge, sanity:random, sanity:centre) are rows of every table: "
        "a method that does not beat them has not shown that it explains the model. Post-hoc methods run on "
        "the SoftCAM nets too, so each net's own evidence maps can be compared with other explainers of the "
        "same weights."
    )
    md.append(f"Reproduce:\n\n```\n{command}\n```\n")
    body.append(f"<p>Reproduce:</p><pre>{html.escape(command)}</pre>")

    section("Claims")
    claim_rows = [dict(modality=r.modality, **v.row()) for r in results for v in r.verdicts]
    table(pd.DataFrame(claim_rows))

    section("Settings")
    table(pd.DataFrame([{"setting": k, "value": ", ".join(map(str, v)) if isinstance(v, (tuple, list)) else v}
                        for k, v in asdict(config).items()]))
    para("Cells of the metric tables read: mean ± sd of the per-seed means [95% bootstrap interval over the "
         "(seed, image) units] (n units). Localization and activation metrics use diseased test images; "
         "activation_consistency_diseased / _healthy are the class-wise activation consistency (share of pixels "
         "with A > 0 on diseased, A < 0 on healthy images; SoftCAM App. E.1); audc_common_correct is the AUDC of the "
         "paper's deletion protocol on the test images every model of the seed classifies correctly. "
         "Lower is better for AUDC and seconds.")

    for result in results:
        section({"fundus": "Fundus", "oct": "OCT", "cxr": "Chest X-ray"}.get(result.modality, result.modality))
        section("Claims", 3)
        table(pd.DataFrame([v.row() for v in result.verdicts]))
        section("Lambda sweep (validation split)", 3)
        para("Each weight trained once on the first seed for the sweep's epochs; chosen: highest validation "
             "accuracy + AUC, ties to the larger weight.")
        table(result.sweep)
        section("Classification (test split)", 3)
        flag = saturation_flag(result.classification)
        if flag:
            para(flag)
        table(classification_table(result.classification))
        section("Explanation metrics (test split)", 3)
        table(metrics_table(result.per_image, config))
        section("Sparse SoftCAM against every other row (paired, Holm-corrected)", 3)
        table(paired_table(result.per_image, [f"topk_precision_k{config.claim_k}", "activation_precision", "audc_common_correct"]))
        if not result.randomisation.empty:
            section("Model randomisation (Adebayo et al. 2018)", 3)
            para("Rank correlation between each map of the trained model and of copies whose top layers are "
                 "re-initialised (cascading, from the head down; first seed, diseased test images). A method whose "
                 "maps survive randomisation (correlation near 1, like the model-free sanity maps) does not explain "
                 "the model's weights.")
            table(result.randomisation[["row", "randomised", "layer", "images", "spearman", "spearman_abs", "ssim"]])
        if not result.shortcut.empty:
            section("Shortcut cohort (CasCAM)", 3)
            acc = result.shortcut["test_accuracy"].iloc[0]
            para(f"Baseline trained on a cohort where {config.shortcut_rate:g} of the diseased images also carry a "
                 f"burned-in artifact (test accuracy {_fmt(acc)}); diseased test images, split by the artifact.")
            sick = result.shortcut[result.shortcut["label_is_diseased"]]
            parts = []
            for flag_value, name in ((True, "with artifact"), (False, "without artifact")):
                part = metrics_table(sick[sick["artifact"] == flag_value], config)
                if not part.empty:
                    part.insert(1, "images", name)
                    parts.append(part)
            table(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())
        section("Figures", 3)
        for name, paths in figures.get(result.modality, {}).items():
            png = next((p for p in paths if p.suffix == ".png"), None)
            page = next((p for p in paths if p.suffix == ".html"), None)
            if png:
                rel = png.relative_to(out).as_posix()
                md.append(f"![{result.modality} {name}]({rel})\n")
                body.append(f'<p><img src="{html.escape(rel)}" alt="{html.escape(name)}" style="max-width:900px"></p>')
            if page:
                rel = page.relative_to(out).as_posix()
                md.append(f"[interactive {name}]({rel})\n")
                body.append(f'<p><a href="{html.escape(rel)}">interactive {html.escape(name)}</a></p>')
        para(f"Time (recorded steps): {result.seconds.get('steps', 0) / 60:.1f} min.")
    md.append("\nFull tables: `tables/<modality>_per_image.csv`, `_cohort.csv`, `_classification.csv`, `_sweep.csv`, "
              "`_claims.csv`, `_shortcut.csv`, `_deletion_curves.csv`.\n")
    body.append("<p>Full tables: tables/&lt;modality&gt;_*.csv.</p>")

    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    style = ("body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
             "table.t{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "table.t td,table.t th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
             "pre{background:#f4f4f4;padding:.6em;overflow:auto}")
    html_path = out / "report.html"
    html_path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>SoftCAM report</title>"
                         f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>", encoding="utf-8")
    return md_path, html_path


# ----------------------------------------------------------------------------------------------
# the run


def count_steps(config: ReportConfig) -> int:
    """Progress-bar length: cohort, sweep, and per seed and model a training, maps and deletion."""
    per_modality = 1 + len(config.l1_grid) + len(config.l2_grid) + 3 * 4 * len(config.seeds)
    per_modality += 4 if config.randomisation_images else 0
    per_modality += 2 if config.shortcut_rate > 0 else 0
    return per_modality * len(config.modalities)


def run_report(out: str | Path, config: ReportConfig | None = None, command: str | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Run the whole comparison and write the report into ``out``; returns the report.md path.

    Steps that an earlier run with the same settings finished (``work/steps.json``) are not
    repeated, so an interrupted run continues where it stopped.
    """
    from tqdm.auto import tqdm

    from softcam_core import plots

    config = config or ReportConfig()
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    steps = Steps(work / "steps.json", log=lambda s: tqdm.write(s))
    results, figures = [], {}
    with tqdm(total=count_steps(config), desc="report", unit="step") as bar:
        for modality in config.modalities:
            result = run_modality(modality, config, work, steps, bar)
            tables = {"per_image": result.per_image, "cohort": result.cohort, "classification": result.classification,
                      "randomisation": result.randomisation,
                      "sweep": result.sweep, "shortcut": result.shortcut, "deletion_curves": result.curves,
                      "claims": pd.DataFrame([v.row() for v in result.verdicts])}
            for name, frame in tables.items():
                frame.to_csv(out / "tables" / f"{modality}_{name}.csv", index=False)
            results.append(result)
            named = {f"{modality}_{k}": v for k, v in
                     E.cohort_figures(result.per_image, result.curves, group="row", title=modality).items()}
            saved = plots.save_figures(named, out / "figures", png=config.png, plotlyjs="cdn")
            figures[modality] = {k[len(modality) + 1:]: v for k, v in saved.items()}
    wall = sum(steps.seconds(f"{m}/") for m in config.modalities)
    md_path, _ = render(results, config, out, command or canonical_command(out, config), wall, figures)
    log(f"wrote {md_path} and {out / 'report.html'} ({wall / 60:.1f} min of recorded steps)")
    return md_path


# ----------------------------------------------------------------------------------------------
# command line


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# option -> (config field, parser); every option also appears in canonical_command
_OPTIONS = {
    "--n": ("n", int), "--epochs": ("epochs", int), "--img-size": ("img_size", int), "--synth-size": ("synth_size", int),
    "--arch": ("arch", str), "--seeds": ("seeds", _ints), "--l1-grid": ("l1_grid", _floats),
    "--l2-grid": ("l2_grid", _floats), "--sweep-epochs": ("sweep_epochs", int), "--methods": ("methods", _names),
    "--within-methods": ("within_methods", _names), "--sanity-methods": ("sanity_methods", _names),
    "--shortcut-rate": ("shortcut_rate", float), "--limit": ("eval_limit", int),
    "--deletion-limit": ("deletion_limit", int), "--deletion-steps": ("deletion_steps", int),
    "--claim-k": ("claim_k", int), "--randomisation-images": ("randomisation_images", int), "--topk": ("topk", _ints), "--split": ("split", _floats),
    "--resamples": ("resamples", int),
}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="test the SoftCAM paper's claims on fair synthetic cohorts (report.md + report.html)",
        description="Per modality: a lambda sweep, then a black-box baseline and dense / lasso / ridge SoftCAM nets "
        "for each seed; SoftCAM maps against post-hoc methods (on every model) and model-free sanity maps; a verdict "
        "per paper claim. Resumes an interrupted run in the same --out.",
    )
    defaults = ReportConfig()
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test preset (tiny cohort, 1 epoch, 64 px: the verdicts then say the benchmark cannot "
                        "tell); explicit options still win")
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of fundus,oct,cxr")
    for option, (name, _) in _OPTIONS.items():
        value = getattr(defaults, name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        parser.add_argument(option, default=None, help=f"default {shown}" + (" (0 = all)" if "limit" in option else ""))
    parser.add_argument("--no-png", action="store_true", help="skip PNG figures (HTML only)")
    parser.set_defaults(func=_cli)


def config_from_args(args: argparse.Namespace) -> ReportConfig:
    """The :class:`ReportConfig` of parsed ``softcam report`` options: explicit options, then the
    ``--quick`` preset, then the defaults. Raises ValueError on an unknown modality or method."""
    from softcam_core.explain import is_method

    modalities = _names(args.modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {', '.join(unknown)}; choose from {', '.join(MODALITIES)}")
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for option, (name, parse) in _OPTIONS.items():
        raw = getattr(args, option[2:].replace("-", "_"))
        if raw is not None:
            values[name] = parse(raw)
    for key in ("eval_limit", "deletion_limit"):
        if key in values:
            values[key] = values[key] or None  # 0 = the whole test split
    config = ReportConfig(modalities=modalities, png=not args.no_png, **values)
    bad = [m for m in config.methods + config.within_methods + config.sanity_methods if not is_method(m)]
    if bad:
        raise ValueError(f"unknown method {', '.join(bad)}")
    if not config.seeds:
        raise ValueError("--seeds needs at least one seed")
    return config


def _cli(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_report(args.out, config, command=canonical_command(args.out, config))
    return 0


def canonical_command(out: str | Path, config: ReportConfig) -> str:
    """The full ``softcam report`` command line that reproduces ``config`` (every option spelled out)."""
    parts = ["softcam", "report", "--out", str(out), "--modalities", ",".join(config.modalities)]
    for option, (name, _) in _OPTIONS.items():
        value = getattr(config, name)
        if name in ("eval_limit", "deletion_limit"):
            value = value or 0
        parts += [option, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
                  if isinstance(value, tuple) else (f"{value:g}" if isinstance(value, float) else str(value))]
    if not config.png:
        parts.append("--no-png")
    return " ".join(shlex.quote(p) for p in parts)

