"""CasCAM's retrain-per-stage mode (the paper's), used by ``softcam explain --cascam-retrain``.

As in the CasCAM paper and its code (``guebin/CasCAM``, ``analyzer.py``):

* stage 0 is the given model (trained on the original cohort);
* for stage k >= 1 every image of the cohort is masked with the stage-(k-1) model's CasCAM step on
  the stage-(k-1) images (base map for the image's TRUE label, in the cascade's units,
  thresholded, ``x <- x * exp(-theta T(p))``): the masks accumulate over the stages;
* model k is trained **afresh from the same initialisation as stage 0** (the checkpoint's recorded
  ``init`` file, or random weights from its recorded ``seed``, which :func:`softcam_core.training.train`
  makes identical for the same arch and classes), not fine-tuned from model k-1, with the
  checkpoint's recipe (arch, head, penalties, input size, normalisation, lr, momentum, weight
  decay, batch size) and **early stopping** on the validation loss (at most ``epochs`` epochs,
  stop after ``patience`` epochs without a lower validation loss; the paper: 10 and 1);
* the stage models then explain the **original** test image in
  :func:`softcam_core.explain.cascam.cascam` (``stage_models=``): stage k's map is model k's map
  of the unmasked image.

The masked model inputs are written as a cohort folder (``modality=other``: square PNGs at the
model input size, so preprocessing leaves them as they are) beside each stage checkpoint, and
``<method>-stages.json`` records, per stage, the epochs run, the best epoch and its validation
metrics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from softcam_core.explain.cascam import (
    CAM_UNIT_BASES,
    DEFAULT_EBAYES_A,
    DEFAULT_STAGES,
    DEFAULT_THETA,
    DEFAULT_THRESHOLD,
    DEFAULT_TOPK_PERCENT,
    DEFAULT_UNITS,
    check_options,
    feature_positions,
    threshold_maps,
    to_units,
)
from softcam_core.explain.api import explain
from softcam_core.explain.specs import CASCAM_PREFIX, file_safe_name

MASK_BATCH = 16
DEFAULT_RETRAIN_EPOCHS = 10  # the paper's maximum per stage (early stopping usually ends sooner)
DEFAULT_PATIENCE = 1         # the paper's: stop at the first epoch whose validation loss does not improve
RECORDED = "recorded"        # init= default: the checkpoint's own recorded initialisation


class _EarlyStop(Exception):
    """Raised from the training progress callback to end a stage's training (checkpoint kept)."""


def early_stopping(patience: int):
    """``progress`` callback for :func:`softcam_core.training.train`: raises :class:`_EarlyStop`
    after ``patience`` epochs in a row without a lower validation loss.

    The checkpoint train() wrote up to then (its best epoch by ``selection_key``) stays the result.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    state = {"best": float("inf"), "bad": 0, "epochs": 0}

    def progress(epoch: int, step: int, metrics: dict) -> None:
        if metrics.get("phase") != "epoch":
            return
        state["epochs"] = epoch + 1
        loss = float(metrics["val_loss"])
        if loss < state["best"]:
            state["best"], state["bad"] = loss, 0
            return
        state["bad"] += 1
        if state["bad"] >= patience:
            raise _EarlyStop(epoch + 1)

    progress.state = state  # type: ignore[attr-defined]
    return progress


def mask_step(
    model: torch.nn.Module, x: torch.Tensor, base: str, labels: list[int], *, theta: float, threshold: str,
    topk_percent: float, ebayes_a: float, units: str, positions: int | None,
) -> torch.Tensor:
    """One cascade step on training images (B, 3, H, W): ``x * exp(-theta T(U(base(model, x))))``."""
    maps = explain(model, x, base, target=labels)
    positive = to_units(model, x, maps, base, units, labels, positions)
    suppressed, _ = threshold_maps(positive, threshold, topk_percent, ebayes_a)
    return x * torch.exp(-theta * suppressed)[:, None]


def stage_initialisation(checkpoint: str | Path, meta: dict, init: Any) -> str | None:
    """The weights file stage 0 started from (None = random weights from its seed).

    Raises:
        ValueError: the recorded file no longer exists (pass ``init=`` to say what to use).
    """
    if init != RECORDED:
        return None if init is None else str(init)
    recorded = meta.get("init")
    if recorded and not Path(recorded).is_file():
        raise ValueError(f"{checkpoint}: stage 0 was initialised from {recorded}, which is missing; "
                         "pass init= (a local weights file, or None for random weights)")
    return str(recorded) if recorded else None


def retrain_stage_models(
    checkpoint: str | Path,
    data: str | Path,
    workdir: str | Path,
    methods: list[str],
    *,
    epochs: int = DEFAULT_RETRAIN_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    stages: int = DEFAULT_STAGES,
    theta: float = DEFAULT_THETA,
    threshold: str = DEFAULT_THRESHOLD,
    topk_percent: float = DEFAULT_TOPK_PERCENT,
    ebayes_a: float = DEFAULT_EBAYES_A,
    units: str = DEFAULT_UNITS,
    init: Any = RECORDED,
    seed: int | None = None,
    batch_size: int | None = None,
    show_progress: bool = True,
    **_unused: Any,
) -> dict[str, list[torch.nn.Module]]:
    """Train one model per CasCAM stage (afresh, same initialisation, early stopping) for every
    ``cascam:<base>`` in ``methods``.

    Args:
        checkpoint: stage 0's checkpoint (trained on the original images of ``data``).
        data: cohort folder (train/val splits) with the checkpoint's classes.
        workdir: where the masked cohorts and stage checkpoints go.
        epochs: at most this many epochs per stage; patience: early-stopping patience (epochs).
        stages, theta, threshold, topk_percent, ebayes_a, units: as in :func:`cascam` (the same
            values must be passed to it for the test image).
        init: stage k's starting weights: ``"recorded"`` (stage 0's, from the checkpoint), a
            file, or None (random). seed: default the checkpoint's. batch_size: default the
            checkpoint's.
    Returns:
        ``{method: [stage-0 model, stage-1 model, ...]}`` (``stages`` models each, eval mode).
    Raises:
        ValueError: the cohort's classes differ from the checkpoint's; bad options.
    """
    from tqdm import tqdm

    from softcam_core.data import CohortFolder
    from softcam_core.device import default_device
    from softcam_core.imaging import denormalise, load_image, preprocess
    from softcam_core.models import load_checkpoint
    from softcam_core.training import train

    check_options(stages, theta, threshold, units, "thresholded", topk_percent)
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = default_device()
    first_model, meta = load_checkpoint(checkpoint, map_location=device)
    cohort = CohortFolder(data)
    classes = [str(c) for c in meta["classes"]]
    if [str(c) for c in cohort.classes] != classes:
        raise ValueError(f"{data}: cohort classes {cohort.classes} differ from the checkpoint's {classes}")
    start_weights = stage_initialisation(checkpoint, meta, init)
    seed = int(meta.get("seed") or 0) if seed is None else int(seed)
    recipe = {key: meta[key] for key in ("lr", "momentum", "weight_decay", "min_lr", "balanced") if meta.get(key) is not None}
    batch_size = int(batch_size or meta.get("batch_size") or 16)
    size, mean, std = int(meta["img_size"]), meta["mean"], meta["std"]
    records = list(cohort.records)
    originals = torch.stack([
        preprocess(load_image(r.path, modality=cohort.modality), size, mean, std)[0] for r in records
    ])
    labels = [r.label_index for r in records]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, list[torch.nn.Module]] = {}
    for method in methods:
        if not method.startswith(CASCAM_PREFIX):
            continue
        base = method[len(CASCAM_PREFIX):]
        needs_positions = units == "cam" and CAM_UNIT_BASES.get(base, True)
        positions = feature_positions(first_model, originals[:1]) if needs_positions else None
        models, current, log = [first_model], originals, []
        for stage in range(1, int(stages)):
            masked = []
            for start in tqdm(range(0, len(records), MASK_BATCH), desc=f"{method} stage {stage}: masking",
                              disable=not show_progress):
                masked.append(mask_step(
                    models[-1], current[start:start + MASK_BATCH], base, labels[start:start + MASK_BATCH],
                    theta=theta, threshold=threshold, topk_percent=topk_percent, ebayes_a=ebayes_a, units=units,
                    positions=positions,
                ))
            current = torch.cat(masked)
            folder = workdir / f"{file_safe_name(method)}-stage{stage}"
            (folder / "images").mkdir(parents=True, exist_ok=True)
            with open(folder / "labels.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["image", "label", "split"])
                for record, x in zip(records, current):
                    name = f"{record.stem}.png"
                    Image.fromarray(denormalise(x, mean, std)).save(folder / "images" / name)
                    writer.writerow([name, record.label, record.split])
            (folder / "synth_meta.json").write_text(json.dumps({"modality": "other", "classes": classes}))
            out = workdir / f"{file_safe_name(method)}-stage{stage}.pt"
            stopper = early_stopping(patience)
            try:
                train(
                    folder, out, arch=meta["arch"], head=meta["head"], l1=float(meta.get("l1") or 0.0),
                    l2=float(meta.get("l2") or 0.0), epochs=int(epochs), img_size=size, init=start_weights,
                    batch_size=batch_size, seed=seed, modality="other", mean=mean, std=std,
                    show_progress=show_progress, progress=stopper, **recipe,
                )
            except _EarlyStop:
                pass  # train() has written the best epoch so far to `out`
            stage_model, stage_meta = load_checkpoint(out, map_location=device)
            models.append(stage_model)
            log.append({"stage": stage, "epochs_run": stopper.state["epochs"], "max_epochs": int(epochs),
                        "stopped_early": stopper.state["epochs"] < int(epochs),
                        "best_epoch": (stage_meta.get("metrics") or {}).get("best_epoch"),
                        "val": (stage_meta.get("metrics") or {}).get("val"), "init": start_weights, "seed": seed})
        (workdir / f"{file_safe_name(method)}-stages.json").write_text(json.dumps(log, indent=2, default=str))
        result[method] = models
    return result
