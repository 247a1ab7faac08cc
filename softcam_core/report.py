"""``softcam report``: the SoftCAM paper's comparison, re-run on synthetic cohorts.

For each modality (fundus, OCT, chest X-ray) it renders a synthetic cohort, trains the black-box
baseline and three SoftCAM variants — dense (l1 = l2 = 0), sparse (lasso, l1 > 0) and ridge
(l2 > 0) — with :func:`softcam_core.training.train`, evaluates every SoftCAM model's own evidence
maps and the post-hoc methods on the baseline with :func:`softcam_core.evaluate.evaluate_cohort`
on the test split, and writes ``report.md`` + ``report.html`` with tables (mean [95% CI] (n)),
paired Holm-corrected Wilcoxon tests of each SoftCAM variant against each post-hoc method, and
figures, plus the exact command, seeds, versions and timings. Numbers are reported as they come.

Layout of ``--out``: report.md, report.html, tables/*.csv, figures/*.html|png, and work/ (cohorts,
checkpoints, per-run evaluation folders; large, not meant for version control).
"""

from __future__ import annotations

import argparse
import html
import json
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from softcam_core import evaluate as E
from softcam_core.demo import DEMO_SETTINGS

# every post-hoc method the comparison can run on the baseline (the paper's set + CasCAM)
POSTHOC_METHODS = (
    "gradcam", "gradcampp", "layercam", "scorecam", "integrated_gradients", "guided_backprop", "cascam:gradcam",
)
# the default set leaves out the two that cost 10-100x the others per image on CPU (Score-CAM: one
# forward pass per feature channel; integrated gradients: one pass per path step), so that all test
# images can be evaluated; add them with --methods (best on a GPU)
DEFAULT_METHODS = ("gradcam", "gradcampp", "layercam", "guided_backprop", "cascam:gradcam")
MODALITIES = ("fundus", "oct", "cxr")
# headline metrics of the tables, in order (all per-image metrics stay in tables/*.csv)
HEADLINE = (
    "topk_precision_k5", "activation_precision", "activation_sensitivity", "activation_consistency",
    "pointing_game", "iou_top15", "energy_top15", "average_precision", "audc_diseased", "seconds",
)
LOWER_IS_BETTER = {"audc", "audc_diseased", "seconds"}
HEALTHY = "healthy"  # the synthetic cohorts' negative class


@dataclass
class ReportConfig:
    """Everything that determines the report's numbers (written into it).

    The cohort and training recipe is the demo models' (:data:`softcam_core.demo.DEMO_SETTINGS`:
    n = 300 images at 128 px split 0.5/0.15/0.35, ResNet-18 from scratch, lr 1e-2 -> 1e-4, batch 16,
    6 epochs), which reaches test accuracy >= 0.9 on all three modalities, except the input side:
    112 px instead of 80 so ResNet-18's last feature map (the CAM resolution) is 4x4, not 3x3.
    ``eval_limit=None`` evaluates the whole test split (104 images, half of them diseased).
    """

    n: int = DEMO_SETTINGS.n
    epochs: int = DEMO_SETTINGS.epochs
    seed: int = DEMO_SETTINGS.seed
    img_size: int = 112
    synth_size: int = DEMO_SETTINGS.synth_size
    split: tuple[float, float, float] = DEMO_SETTINGS.split
    arch: str = DEMO_SETTINGS.arch
    batch_size: int = DEMO_SETTINGS.batch_size
    lr: float = DEMO_SETTINGS.lr
    min_lr: float = DEMO_SETTINGS.min_lr
    l1: float = DEMO_SETTINGS.l1
    l2: float = 0.01
    modalities: tuple[str, ...] = MODALITIES
    methods: tuple[str, ...] = DEFAULT_METHODS
    eval_limit: int | None = None
    deletion_steps: int = 8
    topk: tuple[int, ...] = (1, 3, 5, 10, 15, 20)
    resamples: int = E.BOOTSTRAP_RESAMPLES
    png: bool = True

    def variants(self) -> list[tuple[str, str, float, float]]:
        """(name, head, l1, l2) of the four trained models."""
        return [
            ("baseline", "baseline", 0.0, 0.0),
            ("dense", "softcam", 0.0, 0.0),
            ("lasso", "softcam", self.l1, 0.0),
            ("ridge", "softcam", 0.0, self.l2),
        ]


# `--quick`: the pipeline end to end in a few minutes on CPU; its models are barely trained
QUICK = {"n": 40, "epochs": 1, "img_size": 64, "eval_limit": 4}


def _label(variant: str, method: str) -> str:
    """Row label in tables and figures: ``SoftCAM <variant>`` or the post-hoc method's name."""
    return f"SoftCAM {variant}" if method == "softcam" else method


@dataclass
class ModalityResult:
    modality: str
    per_image: pd.DataFrame
    curves: pd.DataFrame
    cohort: pd.DataFrame
    paired: pd.DataFrame
    classification: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)


def run_modality(
    modality: str, config: ReportConfig, work: Path, log: Callable[[str], None] = print
) -> ModalityResult:
    """Cohort, four trainings and evaluations for one modality; tables combined over models."""
    from softcam_core.models import load_checkpoint
    from softcam_core.synth import make_cohort
    from softcam_core.training import train

    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = make_cohort(modality, config.n, config.seed, work / "data" / modality, size=config.synth_size,
                       split=tuple(config.split))
    timings["synth"] = time.perf_counter() - start

    per_images, curves, classification = [], [], []
    for variant, head, l1, l2 in config.variants():
        checkpoint = work / "models" / modality / f"{variant}.pt"
        start = time.perf_counter()
        log(f"[{modality}] training {variant} ({head}, l1={l1:g}, l2={l2:g})")
        result = train(
            data, checkpoint, arch=config.arch, head=head, l1=l1, l2=l2, epochs=config.epochs,
            img_size=config.img_size, batch_size=config.batch_size, lr=config.lr, min_lr=config.min_lr, seed=config.seed,
            show_progress=False,
        )
        timings[f"train {variant}"] = time.perf_counter() - start
        test = (result.meta.get("metrics") or {}).get("test") or {}
        val = (result.meta.get("metrics") or {}).get("val") or {}
        classification.append({
            "model": variant, "head": head, "l1": l1, "l2": l2,
            "test_accuracy": test.get("accuracy"), "test_auc": test.get("auc"), "test_n": test.get("n"),
            "val_accuracy": val.get("accuracy"), "best_epoch": (result.meta.get("metrics") or {}).get("best_epoch"),
        })
        methods = list(config.methods) if head == "baseline" else ["softcam"]
        start = time.perf_counter()
        log(f"[{modality}] evaluating {variant}: {', '.join(methods)}")
        model, meta = load_checkpoint(checkpoint)
        classification[-1]["feature_map"] = feature_map_size(model, config.img_size)
        settings = E.EvalSettings(
            split="test", limit=config.eval_limit, deletion_steps=config.deletion_steps, topk=config.topk,
            resamples=config.resamples, seed=config.seed, figures=False, png=False,
        )
        evaluation = E.evaluate_cohort(model, meta, data, methods, None, work / "eval" / modality / variant,
                                       settings=settings)
        timings[f"evaluate {variant}"] = time.perf_counter() - start
        table = evaluation.per_image.copy()
        table.insert(0, "model", variant)
        table.insert(1, "model_method", [_label(variant, m) for m in table["method"]])
        per_images.append(table)
        if not evaluation.curves.empty:
            c = evaluation.curves.copy()
            c.insert(0, "model_method", [_label(variant, m) for m in c["method"]])
            curves.append(c)
    per_image = pd.concat(per_images, ignore_index=True)
    curve_table = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    cohort = E.summarise(per_image, group="model_method", resamples=config.resamples, seed=config.seed)
    paired = E.paired_tests(per_image, group="model_method")
    return ModalityResult(modality, per_image, curve_table, cohort, paired, pd.DataFrame(classification), timings)


def feature_map_size(model, img_size: int) -> str:
    """``"HxW"`` of the model's last feature map (the resolution of CAMs and SoftCAM evidence maps)
    for a square ``img_size`` px input."""
    import torch

    with torch.no_grad():
        features = model.features(torch.zeros(1, 3, img_size, img_size))
    return f"{features.shape[-2]}x{features.shape[-1]}"


# ----------------------------------------------------------------------------------------------
# rendering


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def headline_table(
    cohort: pd.DataFrame, group: str = "model_method", accuracy: dict[str, float] | None = None
) -> pd.DataFrame:
    """``mean [ci_low, ci_high] (n)`` strings for the headline metrics, one row per model/method.

    ``accuracy`` (``{row label: test accuracy of the model whose maps the row scores}``) adds a
    ``model test acc`` column beside the method, so maps from a model that fails are visible as such.
    """
    rows = []
    for _, r in cohort.iterrows():
        row = {"method": r[group]}
        if accuracy is not None:
            row["model test acc"] = _fmt(accuracy.get(r[group], float("nan")))
        for metric in HEADLINE:
            if f"{metric}_mean" not in cohort.columns:
                continue
            digits = 4 if metric == "seconds" else 3
            row[metric] = (f"{_fmt(r[f'{metric}_mean'], digits)} [{_fmt(r[f'{metric}_ci_low'], digits)}, "
                           f"{_fmt(r[f'{metric}_ci_high'], digits)}] ({int(r[f'{metric}_n'])})")
        rows.append(row)
    return pd.DataFrame(rows)


def accuracy_by_label(per_image: pd.DataFrame, classification: pd.DataFrame) -> dict[str, float]:
    """Row label (``model_method``) -> test accuracy of the model it explains (post-hoc rows: the
    baseline's), from the per-image table's model column and the classification table."""
    if per_image.empty or classification.empty or "test_accuracy" not in classification.columns:
        return {}
    accuracy = dict(zip(classification["model"], classification["test_accuracy"]))
    pairs = per_image[["model_method", "model"]].drop_duplicates()
    return {label: float(accuracy.get(model, float("nan"))) for label, model in zip(pairs["model_method"], pairs["model"])}


def softcam_vs_posthoc(
    paired: pd.DataFrame, metrics: Sequence[str] = ("activation_precision", "topk_precision_k5", "audc_diseased")
) -> pd.DataFrame:
    """Each SoftCAM variant against each post-hoc method: mean difference and Holm p per metric."""
    a, b = "model_method_a", "model_method_b"
    rows = []
    for _, r in paired[paired["metric"].isin(metrics)].iterrows():
        first, second = r[a], r[b]
        if first.startswith("SoftCAM") == second.startswith("SoftCAM"):
            continue
        sign = 1.0 if first.startswith("SoftCAM") else -1.0
        softcam, posthoc = (first, second) if sign > 0 else (second, first)
        rows.append({"metric": r["metric"], "SoftCAM": softcam, "post-hoc": posthoc, "n": r["n"],
                     "mean diff (SoftCAM − post-hoc)": _fmt(sign * r["mean_diff"]),
                     "Holm p": _fmt(r["p_holm"], 4), "note": r["note"]})
    return pd.DataFrame(rows)


# metrics the findings rank rows by: (column, reader's name, higher is better)
FINDING_METRICS = (
    ("activation_precision", "activation precision", True),
    ("topk_precision_k5", "top-5 localization precision", True),
    ("average_precision", "pixel average precision", True),
    ("audc_diseased", "AUDC on diseased images (deletion; lower = more faithful)", False),
)


def with_diseased_audc(result: ModalityResult, config: ReportConfig) -> ModalityResult:
    """Add ``audc_diseased`` (AUDC of the diseased images; NaN on healthy ones) and recompute the
    cohort and paired tables.

    Why: the target is the disease class on every image, and on a healthy image its probability p_0
    is ~1e-5, so the curve p_s / p_0 runs into the thousands as soon as occlusion nudges p_s; those
    images would dominate a mean. The all-image ``audc`` stays in the per-image and cohort CSVs.
    """
    per_image = result.per_image
    if per_image.empty or "audc" not in per_image.columns or "label" not in per_image.columns:
        return result
    per_image = per_image.copy()
    diseased = per_image["label"].astype(str).str.lower() != HEALTHY
    per_image["audc_diseased"] = per_image["audc"].where(diseased)
    cohort = E.summarise(per_image, group="model_method", resamples=config.resamples, seed=config.seed)
    paired = E.paired_tests(per_image, group="model_method")
    return ModalityResult(result.modality, per_image, result.curves, cohort, paired, result.classification,
                          result.seconds)


def deletion_endpoint(result: ModalityResult) -> float:
    """Mean over diseased images and rows of the deletion curve's last point (every cell occluded),
    as a fraction of the intact image's target probability; NaN without curves."""
    curves, per_image = result.curves, result.per_image
    if curves.empty or per_image.empty or "label" not in per_image.columns:
        return float("nan")
    steps = [c for c in curves.columns if c.startswith("s") and c[1:].isdigit()]
    if not steps:
        return float("nan")
    last = max(steps, key=lambda c: int(c[1:]))
    diseased = set(per_image.loc[per_image["label"].astype(str).str.lower() != HEALTHY, "image"].astype(str))
    values = curves.loc[curves["image"].astype(str).isin(diseased), last]
    return float(values.mean()) if values.notna().any() else float("nan")
ACCURACY_FLOOR = 0.9  # below this a model's maps are flagged as coming from a model that does not work


def findings(result: ModalityResult, alpha: float = 0.05) -> list[str]:
    """Plain-language sentences computed from one modality's tables (nothing hand-written): model
    accuracies (flagging any below :data:`ACCURACY_FLOOR`), the ranking of all rows on each
    :data:`FINDING_METRICS` metric, and sparse (lasso) vs dense SoftCAM with its Holm-corrected p."""
    lines: list[str] = []
    cls = result.classification
    if not cls.empty and "test_accuracy" in cls.columns:
        parts = [f"{r['model']} {_fmt(r['test_accuracy'])}" for _, r in cls.iterrows()]
        test_n = int(cls["test_n"].iloc[0]) if "test_n" in cls.columns and pd.notna(cls["test_n"].iloc[0]) else None
        line = f"Test accuracy{f' ({test_n} images)' if test_n else ''}: " + ", ".join(parts) + "."
        weak = [str(r["model"]) for _, r in cls.iterrows()
                if not (pd.notna(r["test_accuracy"]) and r["test_accuracy"] >= ACCURACY_FLOOR)]
        if weak:
            line += (f" Below {ACCURACY_FLOOR:g}: {', '.join(weak)} — the maps of "
                     f"{'that model' if len(weak) == 1 else 'those models'} explain a classifier that does not work.")
        lines.append(line)
    cohort = result.cohort
    for column, name, higher in FINDING_METRICS:
        mean = f"{column}_mean"
        if cohort.empty or mean not in cohort.columns:
            continue
        ranked = cohort[["model_method", mean, f"{column}_n"]].dropna(subset=[mean])
        ranked = ranked.sort_values(mean, ascending=not higher)
        if ranked.empty:
            continue
        order = ", ".join(f"{r['model_method']} {_fmt(r[mean])}" for _, r in ranked.iterrows())
        lines.append(f"{name[0].upper() + name[1:]}, best first (n = {int(ranked[f'{column}_n'].max())}): {order}.")
    endpoint = deletion_endpoint(result)
    if np.isfinite(endpoint):
        line = (f"Deletion: with every cell occluded the disease probability of a diseased image is on average "
                f"{_fmt(endpoint)} × its intact value")
        if endpoint > 0.5:
            line += (" — filling the image with the deletion baseline keeps most of the disease evidence, so AUDC "
                     "separates the methods poorly here")
        lines.append(line + ".")
    paired = result.paired
    if not paired.empty:
        for column, name, higher in FINDING_METRICS:
            rows = paired[(paired["metric"] == column)
                          & paired["model_method_a"].isin(["SoftCAM lasso", "SoftCAM dense"])
                          & paired["model_method_b"].isin(["SoftCAM lasso", "SoftCAM dense"])]
            if rows.empty:
                continue
            r = rows.iloc[0]
            diff = r["mean_diff"] if r["model_method_a"] == "SoftCAM lasso" else -r["mean_diff"]
            if not np.isfinite(diff):
                continue
            better = (diff > 0) == higher
            significant = pd.notna(r["p_holm"]) and r["p_holm"] < alpha
            verdict = (("better" if better else "worse") + (" (significant" if significant else " (not significant")
                       + f" at {alpha:g} after Holm, p = {_fmt(r['p_holm'], 4)})") if abs(diff) >= 5e-4 else "equal to 3 decimals"
            lines.append(f"Sparse vs dense SoftCAM on {name}: lasso − dense = {_fmt(diff)} over {int(r['n'])} "
                         f"paired images: lasso {verdict}.")
    return lines


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(empty)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = []
        for value in row:
            if isinstance(value, float):
                value = _fmt(value)
            cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(empty)</em></p>"
    return df.to_html(index=False, escape=True, float_format=lambda v: _fmt(v), na_rep="–", border=0, classes="t")


def render(
    results: list[ModalityResult], config: ReportConfig, out: Path, command: str, elapsed: float, figures: dict
) -> tuple[Path, Path]:
    """Write report.md and report.html from the modality results and the saved figures."""
    import torch

    from softcam_core import __version__
    from softcam_core.device import describe_device

    settings_rows = pd.DataFrame(
        [{"setting": k, "value": ", ".join(map(str, v)) if isinstance(v, (tuple, list)) else v}
         for k, v in asdict(config).items()]
    )
    md: list[str] = []
    body: list[str] = []

    def section(title: str, level: int = 2) -> None:
        md.append(f"\n{'#' * level} {title}\n")
        body.append(f"<h{level}>{html.escape(title)}</h{level}>")

    def para(text: str) -> None:
        md.append(text + "\n")
        body.append(f"<p>{html.escape(text)}</p>")

    def table(df: pd.DataFrame) -> None:
        md.append(_md_table(df))
        body.append(_html_table(df))

    md.append("# SoftCAM vs post-hoc explanations on synthetic cohorts\n")
    body.append("<h1>SoftCAM vs post-hoc explanations on synthetic cohorts</h1>")
    para(
        "The comparison of the SoftCAM paper (Djoumessi & Berens, MIDL 2026) re-run on the synthetic "
        "fundus, OCT and chest X-ray cohorts of `softcam synth`: a black-box ResNet explained post hoc "
        "against SoftCAM nets (dense, lasso, ridge) that explain themselves. Lesion masks are exact, so "
        "localization is scored against ground truth. Metric definitions: docs/metrics.md. The numbers "
        f"are what this run produced — synthetic cohorts of {config.n} images per modality, {config.epochs}-epoch "
        f"trainings from random weights at {config.img_size} px, one seed — not the paper's."
    )
    para(
        "Caveats: the cohorts are synthetic (lesions drawn by softcam_core.synth, so the task is easier and "
        "the masks exact, unlike real data); each model is one training run from random weights with one "
        "seed, so differences between SoftCAM variants include seed-to-seed variation that this report does "
        "not measure; CAM-type maps have the last feature map's resolution (the feature_map column), which "
        "caps how precisely they can localise small lesions; intervals and tests are over the images of one "
        "test split. The 'What the numbers show' lists are computed from the tables, not written by hand."
    )
    md.append(f"Reproduce:\n\n```\n{command}\n```\n")
    body.append(f"<p>Reproduce:</p><pre>{html.escape(command)}</pre>")
    para(
        f"softcam-review {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"device {describe_device()}; compute time {elapsed / 60:.1f} min (sum of the steps timed below, "
        "wall clock of this machine at the time, which other jobs shared)."
    )
    section("Settings")
    para(
        f"Seeds: cohort, training and bootstrap all use seed {config.seed}; bootstrap: {config.resamples} "
        "resamples (percentile 95% interval of the mean); paired tests: two-sided Wilcoxon signed-rank on "
        "the images both rows define, Holm-corrected over all pairs of one metric."
    )
    table(settings_rows)
    para("Cells of the metric tables read: mean [95% CI] (n images where the metric is defined). "
         "Localization metrics are defined on diseased test images (healthy ones have no lesion); "
         "activation consistency on every test image, audc_diseased (AUDC) on diseased ones (see "
         "with_diseased_audc: on healthy images the disease probability is ~0 and p_s/p_0 explodes; the all-image "
         "audc is in tables/*_per_image.csv). Lower is better for AUDC and seconds.")

    for result in results:
        section(result.modality.upper() if result.modality != "fundus" else "Fundus")
        section("What the numbers show", 3)
        for line in findings(result):
            md.append(f"- {line}")
            body.append(f"<p>• {html.escape(line)}</p>")
        md.append("")
        section("Classification (test split)", 3)
        para("Accuracy and AUC of the best-on-validation checkpoint on the whole test split, as train() "
             "recorded them; feature_map is the last feature map's size (the resolution of the CAM-type and "
             "SoftCAM maps). The explanation metrics below use "
             + ("every test image." if not config.eval_limit else f"the first {config.eval_limit} test images."))
        table(result.classification)
        section("Explanation metrics (test split)", 3)
        table(headline_table(result.cohort, accuracy=accuracy_by_label(result.per_image, result.classification)))
        section("SoftCAM against each post-hoc method (paired, Holm-corrected)", 3)
        table(softcam_vs_posthoc(result.paired))
        section("Figures", 3)
        for name, paths in figures.get(result.modality, {}).items():
            png = next((p for p in paths if p.suffix == ".png"), None)
            page = next((p for p in paths if p.suffix == ".html"), None)
            rel_png = png.relative_to(out).as_posix() if png else None
            rel_html = page.relative_to(out).as_posix() if page else None
            if rel_png:
                md.append(f"![{result.modality} {name}]({rel_png})\n")
                body.append(f'<p><img src="{html.escape(rel_png)}" alt="{html.escape(name)}" style="max-width:900px"></p>')
            if rel_html:
                md.append(f"[interactive {name}]({rel_html})\n")
                body.append(f'<p><a href="{html.escape(rel_html)}">interactive {html.escape(name)}</a></p>')
        timing = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
        para(f"Time: {timing}.")
    md.append("\nFull tables: `tables/<modality>_per_image.csv`, `_cohort.csv`, `_paired.csv`, `_classification.csv`.\n")
    body.append("<p>Full tables: tables/&lt;modality&gt;_per_image.csv, _cohort.csv, _paired.csv, _classification.csv.</p>")

    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table.t{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "table.t td,table.t th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
             "pre{background:#f4f4f4;padding:.6em;overflow:auto}")
    html_path = out / "report.html"
    html_path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>SoftCAM report</title>"
        f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>",
        encoding="utf-8",
    )
    return md_path, html_path


def _fingerprint(config: ReportConfig) -> dict:
    """The settings that determine one modality's numbers (not which modalities, not PNG output)."""
    settings = asdict(config)
    for key in ("modalities", "png"):
        settings.pop(key)
    return json.loads(json.dumps(settings))


def _load_modality(out: Path, modality: str, config: ReportConfig) -> ModalityResult | None:
    """A modality's tables from an earlier run with the same settings (so modalities can run as
    separate processes, or a stopped report continues); None when absent or made otherwise."""
    marker = out / "tables" / f"{modality}_run.json"
    if not marker.is_file():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("settings") != _fingerprint(config):
        return None

    def read(name: str) -> pd.DataFrame:
        path = out / "tables" / f"{modality}_{name}.csv"
        return pd.read_csv(path, dtype={"image": str}) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()

    return ModalityResult(modality, read("per_image"), read("deletion_curves"), read("cohort"), read("paired"),
                          read("classification"), saved.get("seconds", {}))


def run_report(
    out: str | Path, config: ReportConfig | None = None, command: str | None = None, log: Callable[[str], None] = print
) -> Path:
    """Run the whole comparison and write the report into ``out``; returns the report.md path.

    A modality whose tables an earlier run with identical settings left in ``out/tables`` is not
    recomputed (its ``<modality>_run.json`` records the settings and step timings).
    """
    from softcam_core import plots

    config = config or ReportConfig()
    out = Path(out)
    work = out / "work"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    results, figures = [], {}
    for modality in config.modalities:
        result = _load_modality(out, modality, config)
        fresh = result is None
        if fresh:
            result = run_modality(modality, config, work, log)
        else:
            log(f"[{modality}] reusing tables from an earlier run with the same settings")
        result = with_diseased_audc(result, config)
        for name, table in (("per_image", result.per_image), ("cohort", result.cohort),
                            ("paired", result.paired), ("classification", result.classification),
                            ("deletion_curves", result.curves)):
            table.to_csv(out / "tables" / f"{modality}_{name}.csv", index=False)
        if fresh:
            (out / "tables" / f"{modality}_run.json").write_text(
                json.dumps({"settings": _fingerprint(config), "seconds": result.seconds}, indent=1))
        results.append(result)
        named = {f"{modality}_{k}": v for k, v in
                 E.cohort_figures(result.per_image, result.curves, group="model_method", title=modality).items()}
        saved = plots.save_figures(named, out / "figures", png=config.png, plotlyjs="cdn")
        figures[modality] = {k[len(modality) + 1:]: v for k, v in saved.items()}
    compute = sum(sum(r.seconds.values()) for r in results)
    md_path, _ = render(results, config, out, command or "softcam report", compute, figures)
    log(f"wrote {md_path} and {out / 'report.html'} ({compute / 60:.1f} min of compute)")
    return md_path


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="re-run the SoftCAM paper's comparison on synthetic cohorts (report.md + report.html)",
        description="Trains a black-box baseline and dense / lasso / ridge SoftCAM nets per modality on "
        "synthetic cohorts, evaluates SoftCAM maps against post-hoc methods, writes a Markdown + HTML report.",
    )
    defaults = ReportConfig()
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke-test preset (n {QUICK['n']}, {QUICK['epochs']} epochs, {QUICK['img_size']} px, "
                        f"{QUICK['eval_limit']} test images; models near chance); explicit options still win")
    parser.add_argument("--n", type=int, default=None, help=f"images per synthetic cohort (default {defaults.n})")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {defaults.epochs})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of cohorts, training and bootstrap (default 0)")
    parser.add_argument("--img-size", type=int, default=None, help=f"model input side (default {defaults.img_size})")
    parser.add_argument("--arch", default=defaults.arch, help=f"backbone (default {defaults.arch})")
    parser.add_argument("--l1", type=float, default=defaults.l1, help=f"lasso weight of the sparse variant (default {defaults.l1})")
    parser.add_argument("--l2", type=float, default=defaults.l2, help=f"ridge weight of the ridge variant (default {defaults.l2})")
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of fundus,oct,cxr")
    parser.add_argument("--methods", default=",".join(defaults.methods),
                        help=f"post-hoc methods run on the baseline (default {','.join(defaults.methods)}; "
                        f"all: {','.join(POSTHOC_METHODS)})")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate the first N test images per modality; 0 = all (default 0)")
    parser.add_argument("--no-png", action="store_true", help="skip PNG figures (HTML only)")
    parser.set_defaults(func=_cli)


def config_from_args(args: argparse.Namespace) -> ReportConfig:
    """The :class:`ReportConfig` of parsed ``softcam report`` options: explicit options, then the
    ``--quick`` preset, then the defaults. Raises ValueError on an unknown modality."""
    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {', '.join(unknown)}; choose from {', '.join(MODALITIES)}")
    preset = dict(QUICK) if args.quick else {}
    for key, value in (("n", args.n), ("epochs", args.epochs), ("img_size", args.img_size), ("eval_limit", args.limit)):
        if value is not None:
            preset[key] = value
    if "eval_limit" in preset:
        preset["eval_limit"] = preset["eval_limit"] or None  # 0 = the whole test split
    config = ReportConfig(
        seed=args.seed, arch=args.arch, l1=args.l1, l2=args.l2, modalities=modalities,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), png=not args.no_png, **preset,
    )
    return config


def _cli(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_report(args.out, config, command=canonical_command(args.out, config))
    return 0


def canonical_command(out: str | Path, config: ReportConfig) -> str:
    """The full ``softcam report`` command line that reproduces ``config`` (every option spelled out)."""
    parts = ["softcam", "report", "--out", str(out), "--n", str(config.n), "--epochs", str(config.epochs),
             "--seed", str(config.seed), "--img-size", str(config.img_size), "--arch", config.arch,
             "--l1", f"{config.l1:g}", "--l2", f"{config.l2:g}", "--modalities", ",".join(config.modalities),
             "--methods", ",".join(config.methods)]
    parts += ["--limit", str(config.eval_limit or 0)]
    if not config.png:
        parts.append("--no-png")
    return " ".join(shlex.quote(p) for p in parts)
