"""``softcam explain`` (contract): maps, overlays and per-method seconds for one image.

Writes, for every method, ``DIR/<stem>.npy`` (float32, H x W of the model input, raw values as
:func:`explain` returns them) and ``DIR/<stem>.png`` (the map blended over the model input image:
diverging RdBu colours centred on 0 for signed maps, inferno for non-negative maps), where
``<stem>`` is the method name with ``:`` replaced by ``-`` (``cascam:gradcam`` ->
``cascam-gradcam``), and ``DIR/summary.json`` (prediction, class probabilities, target, seconds).

Every argument is checked before anything is written (method names, whether each method can
explain this model, the target, the image, ``--dicom``, ``--data``), and the maps are computed
before the first file is written: a refused or failed run leaves no output folder behind, and an
existing ``--out`` folder exactly as it was. Neither the input's path nor its file name reaches
any output (file names often carry patient names): ``summary.json`` names the image by
``image_id``, the SHA-256 fingerprint of its decoded (de-identified) pixels that the app also
keys the image by (:func:`softcam_core.render.image_fingerprint`). A model of one modality run on
an image of another (both known) prints a warning on stderr and lists it under ``warnings``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from softcam_core.explain.cascam import (
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_EBAYES_A,
    DEFAULT_LAMBDA,
    DEFAULT_STAGES,
    DEFAULT_THETA,
    DEFAULT_THRESHOLD,
    DEFAULT_TOPK_PERCENT,
    DEFAULT_UNITS,
    THRESHOLDS,
    UNITS,
)
from softcam_core.explain.retrain import DEFAULT_PATIENCE, DEFAULT_RETRAIN_EPOCHS
from softcam_core.explain.api import explain
from softcam_core.explain.layers import ExplainError, cam_head, resolve_target_layer
from softcam_core.explain.methods import num_classes_of
from softcam_core.explain.specs import CASCAM_PREFIX, METHODS, SPECS, file_safe_name, method_problem, method_spec

# post-hoc methods that hook the model's last feature map (softcam_core.explain.layers.resolve_target_layer)
TARGET_LAYER_METHODS = frozenset({"gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "hirescam",
                                  "eigencam", "ablationcam"})


def parse_methods(text: str) -> list[str]:
    """``"softcam, gradcam,cascam:gradcam"`` -> list of names; unknown names are a ValueError."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty; give e.g. softcam,gradcam")
    for method in methods:
        problem = method_problem(method)
        if problem is not None:
            raise ValueError(problem)
    return list(dict.fromkeys(methods))


def model_problem(model, method: str) -> str | None:
    """Why ``method`` cannot explain ``model`` (one line), found without computing a map; None when it can.

    The checks :func:`softcam_core.explain.explain` would otherwise fail on part-way through a run:
    an unknown name, a SoftCAM map of a black-box model, classic CAM without a GAP + Linear head, a
    contrast map of a one-class model, a CAM-style method without an automatic target layer;
    ``cascam:<base>`` as its base. Model-free ``sanity:*`` maps always apply.
    """
    problem = method_problem(method)
    if problem is not None:
        return problem
    base = method.removeprefix(CASCAM_PREFIX)
    spec = SPECS[base]
    if spec.model_free:
        return None
    try:
        if spec.needs_softcam:
            if not hasattr(model, "forward_with_maps"):
                raise ExplainError(f"'{base}' needs a SoftCAM net (forward_with_maps); {type(model).__name__} is a "
                                   "black box: use a post-hoc method")
            classes = num_classes_of(model)
            if base == "softcam_contrast" and classes is not None and classes < 2:
                raise ExplainError(f"a contrast map needs at least two classes; this model has {classes}")
        elif base == "cam":
            cam_head(model)
        elif base in TARGET_LAYER_METHODS:
            resolve_target_layer(model)
    except ExplainError as exc:
        return str(exc) if base == method else f"{method}: {exc}"
    return None


def check_methods(model, methods: list[str]) -> None:
    """Raise ValueError (one line) for the first method of ``methods`` that cannot explain ``model``."""
    for method in methods:
        problem = model_problem(model, method)
        if problem is not None:
            raise ValueError(problem)


def parse_target(text: str | None, classes: list[str]) -> int | None:
    """Class index or class name -> index; None stays None (the predicted class)."""
    if text is None:
        return None
    if text in classes:
        return classes.index(text)
    try:
        index = int(text)
    except ValueError:
        raise ValueError(f"--target {text!r} is neither a class index nor one of {', '.join(classes)}") from None
    if not 0 <= index < len(classes):
        raise ValueError(f"--target {index} outside 0..{len(classes) - 1} ({', '.join(classes)})")
    return index


def _dicom_source(path: Path):
    """The de-identified dataset of a DICOM input (``--dicom``): the Parametric Maps reference it and
    copy its patient / study modules, so they carry the same pseudonyms as the app's stored copy."""
    import pydicom

    from softcam_core.imaging.deid import deidentify

    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:
        raise ValueError(f"{path}: --dicom needs a DICOM image ({exc.__class__.__name__})") from None
    if "PixelData" not in dataset:
        raise ValueError(f"{path}: --dicom needs a DICOM image with pixel data")
    try:
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: --dicom: unreadable NumberOfFrames") from None
    if frames != 1:
        raise ValueError(f"{path}: --dicom supports single-frame images only (this one has {frames} frames)")
    return deidentify(dataset)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def run_explain(args: argparse.Namespace) -> int:
    """Handler of ``softcam explain``; returns the exit code.

    Order: check every argument, compute every map in memory, then create ``--out`` and write the
    files, so a refused run writes nothing (see the module docstring). Only ``--cascam-retrain``
    writes before the maps (its stage models go to ``OUT/cascam-retrain``); a folder this run
    created is removed again when it fails after that.
    """
    from tqdm import tqdm

    from softcam_core.device import default_device
    from softcam_core.imaging import denormalise
    from softcam_core.inference import modality_warning, prepared_input
    from softcam_core.models import load_checkpoint
    from softcam_core.render import image_fingerprint, map_png, map_problem

    # ---- every argument, before anything is written
    methods = parse_methods(args.methods)
    retrain = bool(args.cascam_retrain) and any(m.startswith(CASCAM_PREFIX) for m in methods)
    if args.cascam_retrain and not args.data:
        raise ValueError("--cascam-retrain needs --data DIR (the cohort to fine-tune each stage on)")
    if retrain and not Path(args.data).is_dir():
        raise ValueError(f"{args.data}: cohort folder not found (--data of --cascam-retrain)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --out must be a folder, and this is a file")
    device = default_device()
    model, meta = load_checkpoint(args.model, map_location=device)
    classes = [str(c) for c in meta["classes"]]
    target = parse_target(args.target, classes)
    check_methods(model, methods)
    x, geometry, image, own_modality = prepared_input(args.image, meta)  # as predict and the app prepare it
    dicom_source = _dicom_source(args.image) if args.dicom else None
    image_id = image_fingerprint(image.pixels)  # never the path or file name: they may carry PHI
    warnings = [w for w in [modality_warning(meta.get("modality"), own_modality, "this image")] if w]
    for warning in warnings:
        print(f"softcam explain: warning: {warning}", file=sys.stderr)

    batch = x[None]
    with torch.no_grad():
        probabilities = torch.softmax(model(batch.to(device)).float(), dim=1)[0].cpu()
    predicted = int(probabilities.argmax())
    explained = predicted if target is None else target
    pixels = denormalise(x, meta["mean"], meta["std"])
    cascam_options = {
        "stages": args.cascam_stages, "theta": args.cascam_theta, "lam": args.cascam_lambda,
        "threshold": args.cascam_threshold, "topk_percent": args.cascam_topk, "ebayes_a": args.cascam_ebayes_a,
        "units": args.cascam_units, "combine": args.cascam_combine,
    }
    created = _first_missing(out)  # the folder (and parents) this run creates, or None
    try:
        stage_models = None
        if retrain:
            from softcam_core.explain.retrain import retrain_stage_models

            out.mkdir(parents=True, exist_ok=True)
            stage_models = retrain_stage_models(
                args.model, args.data, out / "cascam-retrain", methods, epochs=args.retrain_epochs,
                patience=args.retrain_patience,
                **cascam_options,
            )
        # ---- every map, in memory
        computed = []
        for method in tqdm(methods, desc="explain", unit="method", disable=args.quiet):
            options = {}
            if method.startswith(CASCAM_PREFIX):
                options = dict(cascam_options)
                if stage_models is not None:
                    options["stage_models"] = stage_models[method]
            start = time.perf_counter()
            maps = explain(model, batch, method, target=explained, **options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            heat = maps[0].cpu().numpy().astype(np.float32)
            signed = method_spec(method).signed or bool((heat < 0).any())
            on_image = None
            if dicom_source is not None:
                on_image = geometry.map_to_image(heat)
                if not np.isfinite(on_image).all():
                    raise ValueError(f"{method}: the map has non-finite values; no Parametric Map can hold it")
            computed.append((method, heat, seconds, signed, on_image))
        # ---- the files
        out.mkdir(parents=True, exist_ok=True)
        records = {}
        for method, heat, seconds, signed, on_image in computed:
            stem = file_safe_name(method)
            np.save(out / f"{stem}.npy", heat)
            (out / f"{stem}.png").write_bytes(map_png(pixels, heat, signed=signed))
            records[method] = {
                "seconds": round(seconds, 6), "npy": f"{stem}.npy", "png": f"{stem}.png", "signed": signed,
                "min": float(heat.min()), "max": float(heat.max()),
                "problem": map_problem(heat),  # None, or why the map shows nothing (render.map_problem)
            }
            if on_image is not None:
                from softcam_core.dicom_export import parametric_map

                parametric_map(out / f"{stem}-pm.dcm", dicom_source, on_image, method=method, signed=signed)
                records[method]["dicom"] = f"{stem}-pm.dcm"
        summary = {
            "model": str(args.model),
            "image_id": image_id,
            "modality": {"model": meta.get("modality"), "image": own_modality},
            "warnings": warnings,
            "device": str(device),
            "input_size": list(batch.shape[-2:]),
            "prediction": {"index": predicted, "class": classes[predicted],
                           "probability": float(probabilities[predicted])},
            "probabilities": {name: float(p) for name, p in zip(classes, probabilities.tolist())},
            "target": {"index": explained, "class": classes[explained], "requested": args.target is not None},
            "methods": records,
            "cascam": cascam_options | {"retrain": bool(args.cascam_retrain)},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)  # only what this run made
        raise
    print(f"{len(methods)} map(s) for image {image_id} -> {out} "
          f"(predicted {classes[predicted]} p={float(probabilities[predicted]):.3f}, explained {classes[explained]})")
    return 0


def register_cli(subparsers) -> None:
    """Add ``softcam explain`` to the CLI."""
    parser = subparsers.add_parser(
        "explain",
        help="saliency maps (SoftCAM evidence, post-hoc methods, CasCAM) for one image",
        description="Explain one image with a checkpoint. Writes DIR/<method>.npy (float32 map at the model "
        "input size), DIR/<method>.png (overlay) and DIR/summary.json (prediction, probabilities, target, "
        "seconds per method). 'cascam:gradcam' files are named cascam-gradcam.*.",
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint (.pt) written by softcam train")
    parser.add_argument("--image", type=Path, required=True, help="image file (PNG/JPEG/TIFF/DICOM)")
    parser.add_argument("--methods", required=True,
                        help=f"comma-separated: {', '.join(METHODS)}, or cascam:<method> (e.g. cascam:gradcam); "
                        "sanity:* are model-free baselines")
    parser.add_argument("--target", default=None, help="class index or name to explain (default: the predicted class)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cascam-stages", type=int, default=DEFAULT_STAGES, help=f"CasCAM stages K (default {DEFAULT_STAGES})")
    parser.add_argument("--cascam-theta", type=float, default=DEFAULT_THETA, help=f"CasCAM masking strength (default {DEFAULT_THETA})")
    parser.add_argument("--cascam-lambda", type=float, default=DEFAULT_LAMBDA,
                        help=f"CasCAM stage-weight decay, w_k ~ exp(-lambda k) (default {DEFAULT_LAMBDA})")
    parser.add_argument("--cascam-threshold", choices=THRESHOLDS, default=DEFAULT_THRESHOLD,
                        help=f"CasCAM threshold (default {DEFAULT_THRESHOLD}, the paper's top-k)")
    parser.add_argument("--cascam-units", choices=UNITS, default=DEFAULT_UNITS,
                        help=f"units theta acts on: raw CAM values or [0, 1] normalised maps (default {DEFAULT_UNITS})")
    parser.add_argument("--cascam-combine", choices=COMBINES, default=DEFAULT_COMBINE,
                        help=f"sum the thresholded stage maps or the stage maps (default {DEFAULT_COMBINE})")
    parser.add_argument("--cascam-topk", type=float, default=DEFAULT_TOPK_PERCENT,
                        help=f"percent of pixels kept by the topk threshold (default {DEFAULT_TOPK_PERCENT})")
    parser.add_argument("--cascam-ebayes-a", type=float, default=DEFAULT_EBAYES_A,
                        help=f"Laplace prior scale of the ebayes threshold (default {DEFAULT_EBAYES_A})")
    parser.add_argument("--cascam-retrain", action="store_true",
                        help="the original paper's mode: fine-tune a copy of the model on masked images per stage (needs --data)")
    parser.add_argument("--data", type=Path, default=None, help="cohort folder for --cascam-retrain")
    parser.add_argument("--retrain-epochs", type=int, default=DEFAULT_RETRAIN_EPOCHS,
                        help=f"most training epochs per retrained stage (default {DEFAULT_RETRAIN_EPOCHS}; early stopping)")
    parser.add_argument("--retrain-patience", type=int, default=DEFAULT_PATIENCE,
                        help=f"stop a stage's training after this many epochs without a better validation loss "
                        f"(default {DEFAULT_PATIENCE})")
    parser.add_argument("--dicom", action="store_true",
                        help="also write each map over the image's pixels as a DICOM Parametric Map, DIR/<method>-pm.dcm "
                        "(float, signed where the method is), referencing the de-identified source image; DICOM input only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_explain)
