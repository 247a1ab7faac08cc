"""CasCAM's retrain-per-stage mode (the original paper's), used by ``softcam explain --cascam-retrain``.

Stage 0 is the given model. For stage k >= 1, every image of the cohort is masked with the
stage-(k-1) model's CasCAM step (base map for the image's TRUE label, normalised, thresholded,
``x <- x * exp(-theta T(map))``), the masked model inputs are written as a cohort folder
(``modality=other``: square PNGs at the model input size, so preprocessing leaves them as they
are), and a copy of the stage-(k-1) model is fine-tuned on it with
:func:`softcam_core.training.train` (``init`` = the previous stage's checkpoint, same arch, head,
input size, normalisation and penalties). The stage models then explain the test image in
:func:`softcam_core.explain.cascam.cascam` (``stage_models=``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from softcam_core.explain.cascam import ebayes_mask, normalise_positive, topk_mask
from softcam_core.explain.methods import CASCAM_PREFIX, explain, file_safe_name

MASK_BATCH = 16


def _suppress(maps: torch.Tensor, threshold: str, topk_percent: float, ebayes_a: float) -> torch.Tensor:
    normalised = normalise_positive(maps)
    if threshold == "topk":
        return topk_mask(normalised, topk_percent)
    if threshold == "ebayes":
        return ebayes_mask(normalised, ebayes_a)[0]
    return normalised


def retrain_stage_models(
    checkpoint: str | Path,
    data: str | Path,
    workdir: str | Path,
    methods: list[str],
    *,
    epochs: int = 1,
    stages: int = 3,
    theta: float = 3.0,
    threshold: str = "none",
    topk_percent: float = 10.0,
    ebayes_a: float = 0.5,
    seed: int = 0,
    batch_size: int = 16,
    show_progress: bool = True,
    **_unused: Any,
) -> dict[str, list[torch.nn.Module]]:
    """Fine-tune one model per CasCAM stage for every ``cascam:<base>`` in ``methods``.

    Returns:
        ``{method: [stage-0 model, stage-1 model, ...]}`` (``stages`` models each, eval mode).
    Raises:
        ValueError: the cohort's classes differ from the checkpoint's.
    """
    from tqdm import tqdm

    from softcam_core.data import CohortFolder
    from softcam_core.device import default_device
    from softcam_core.explain.cli import input_pixels
    from softcam_core.imaging import load_image, preprocess
    from softcam_core.models import load_checkpoint
    from softcam_core.training import train

    device = default_device()
    first_model, meta = load_checkpoint(checkpoint, map_location=device)
    cohort = CohortFolder(data)
    classes = [str(c) for c in meta["classes"]]
    if [str(c) for c in cohort.classes] != classes:
        raise ValueError(f"{data}: cohort classes {cohort.classes} differ from the checkpoint's {classes}")
    size, mean, std = int(meta["img_size"]), meta["mean"], meta["std"]
    records = list(cohort.records)
    originals = torch.stack([
        preprocess(load_image(r.path, modality=cohort.modality), size, mean, std)[0] for r in records
    ])
    labels = [r.label_index for r in records]
    workdir = Path(workdir)
    result: dict[str, list[torch.nn.Module]] = {}
    for method in methods:
        if not method.startswith(CASCAM_PREFIX):
            continue
        base = method[len(CASCAM_PREFIX):]
        models, previous_checkpoint, current = [first_model], Path(checkpoint), originals
        for stage in range(1, stages):
            masked = []
            for start in tqdm(range(0, len(records), MASK_BATCH), desc=f"{method} stage {stage}: masking",
                              disable=not show_progress):
                x = current[start:start + MASK_BATCH]
                maps = explain(models[-1], x, base, target=labels[start:start + MASK_BATCH])
                masked.append(x * torch.exp(-theta * _suppress(maps, threshold, topk_percent, ebayes_a))[:, None])
            current = torch.cat(masked)
            folder = workdir / f"{file_safe_name(method)}-stage{stage}"
            (folder / "images").mkdir(parents=True, exist_ok=True)
            with open(folder / "labels.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["image", "label", "split"])
                for record, x in zip(records, current):
                    name = f"{record.stem}.png"
                    Image.fromarray(input_pixels(x, mean, std)).save(folder / "images" / name)
                    writer.writerow([name, record.label, record.split])
            (folder / "synth_meta.json").write_text(json.dumps({"modality": "other", "classes": classes}))
            trained = train(
                folder, workdir / f"{file_safe_name(method)}-stage{stage}.pt",
                arch=meta["arch"], head=meta["head"], l1=float(meta.get("l1") or 0.0), l2=float(meta.get("l2") or 0.0),
                epochs=epochs, img_size=size, init=previous_checkpoint, batch_size=batch_size, seed=seed,
                modality="other", mean=mean, std=std, show_progress=show_progress,
            )
            previous_checkpoint = Path(trained.checkpoint)
            models.append(load_checkpoint(previous_checkpoint, map_location=device)[0])
        result[method] = models
    return result
