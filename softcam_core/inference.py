"""Classification with a trained checkpoint (``softcam predict``) and the model-loading helper.

Every image goes through :func:`softcam_core.imaging.load_image` and
:func:`softcam_core.imaging.preprocess` with the checkpoint's input size and normalisation: the same
path as training and the app.

``softcam predict`` writes ``image,pred,prob_<class>...`` (one row per readable image, in the order
given; ``pred`` is the class name, probabilities are softmax values). Unreadable files do not stop
the run: each prints one line ``softcam predict: error: <file>: <problem>`` on stderr, the CSV holds
the good images, and the exit status is 1 when any file failed (0 when all succeeded).

A model trained on one modality (checkpoint ``modality``) run on images of another (the image's
own modality: DICOM header, else inferred from the pixels) prints one warning line on stderr
(:func:`modality_warning`; nothing when either is unknown or ``other``); the run goes on, since a
researcher may do it on purpose.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from softcam_core.device import default_device
from softcam_core.models import inference_layout, load_checkpoint

PHOTO_MODALITIES = ("fundus", "oct", "cxr")
# the modalities a model or an image can be "known" to be; "other", None or anything else is unknown
KNOWN_MODALITIES = PHOTO_MODALITIES


def modality_warning(model_modality: str | None, data_modality: str | None, what: str = "the data",
                     verb: str = "is") -> str | None:
    """One line when a model of one modality is run on data of another, both known; else None.

    ``model_modality``: the checkpoint's ``modality``; ``data_modality``: the image's or cohort's;
    ``what`` / ``verb``: how the line names the data (``"this image"``, ``"cohort 'ward7'"``; ``"are"``
    for a plural). Unknown
    (None, ``"other"``) on either side gives no warning. Callers print it and go on: running a
    model on another modality can be deliberate.
    """
    if model_modality not in KNOWN_MODALITIES or data_modality not in KNOWN_MODALITIES:
        return None
    if model_modality == data_modality:
        return None
    return (f"modality mismatch: the model was trained on {model_modality} images but {what} {verb} {data_modality}; "
            "its predictions and maps may not be meaningful there")


def load_model(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint for inference: ``(model in eval mode on device, meta)``, laid out by
    :func:`softcam_core.models.inference_layout` (channels-last on CPU).

    ``device`` defaults to :func:`softcam_core.device.default_device`. Raises
    :class:`softcam_core.models.CheckpointError` naming the file when it is missing, corrupt or not ours.
    """
    device = torch.device(device) if device is not None else default_device()
    model, meta = load_checkpoint(path, map_location="cpu")
    return inference_layout(model, device), meta


def model_input(image, meta: dict):
    """One image -> ``(x (3, S, S) float32, Geometry, MedicalImage)`` for the checkpoint ``meta``.

    ``image``: a path, bytes or an already loaded :class:`softcam_core.imaging.MedicalImage`. The one
    preparation every model input goes through (predict, explain, evaluate, the Review page): the
    image takes the checkpoint's modality when that is fundus, oct or cxr, so it is cropped or
    letterboxed and windowed as in training, whatever its own modality was inferred to be.
    Raises :class:`softcam_core.imaging.ImageLoadError` for unreadable input.
    """
    x, geometry, image, _ = prepared_input(image, meta)
    return x, geometry, image


def prepared_input(image, meta: dict):
    """:func:`model_input` plus the image's own modality (DICOM header or inferred from the pixels,
    before the checkpoint's replaced it), for :func:`modality_warning`:
    ``(x, Geometry, MedicalImage, own_modality)``."""
    from softcam_core.imaging import MedicalImage, load_image, preprocess

    if not isinstance(image, MedicalImage):
        image = load_image(image)
    own = image.modality
    modality = meta.get("modality")
    if modality in PHOTO_MODALITIES and modality != own:  # as in training (load_image(..., modality=) sets only this)
        image = dataclasses.replace(image, modality=modality)
    x, geometry = preprocess(image, int(meta["img_size"]), meta["mean"], meta["std"])
    return x, geometry, image, own


@dataclass
class Prediction:
    """Result for one image: ``pred`` class name and index, ``probs`` (C,) softmax values in class order."""

    image: str
    pred: str
    pred_index: int
    probs: list[float]
    modality: str | None = None  # the image's own modality (not in the CSV)

    def row(self, classes: Sequence[str]) -> dict:
        """CSV row ``image, pred, prob_<class>...``."""
        return {"image": self.image, "pred": self.pred, **{f"prob_{c}": p for c, p in zip(classes, self.probs)}}


@torch.no_grad()
def predict_tensors(model: nn.Module, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Softmax probabilities (N, C) float32 on CPU for preprocessed inputs x (N, 3, S, S)."""
    device = next(model.parameters()).device
    model.eval()
    out = [torch.softmax(model(x[i : i + batch_size].to(device)).float(), dim=1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def predict(model: nn.Module, meta: dict, images: Sequence, batch_size: int = 16, names: Sequence[str] | None = None) -> list[Prediction]:
    """Classify images with a loaded checkpoint.

    Args:
        model, meta: from :func:`load_model`.
        images: paths, bytes or MedicalImages (see :func:`model_input`).
        names: what to call each image in the results (default: the path as given, else the
            MedicalImage's name).
    Returns:
        One :class:`Prediction` per image, in order.
    Raises:
        ImageLoadError for the first unreadable image (use :func:`predict_files` to skip bad files).
    """
    inputs, labels, modalities = [], [], []
    for i, image in enumerate(images):
        x, _, loaded, own = prepared_input(image, meta)
        inputs.append(x)
        labels.append(names[i] if names is not None else str(image) if isinstance(image, (str, Path)) else loaded.name)
        modalities.append(own)
    if not inputs:
        return []
    return _predictions(labels, predict_tensors(model, torch.stack(inputs), batch_size), meta["classes"], modalities)


def _predictions(names: Sequence[str], probs: torch.Tensor, classes: Sequence[str],
                 modalities: Sequence[str | None] | None = None) -> list[Prediction]:
    result = []
    for i, (name, p) in enumerate(zip(names, probs)):
        k = int(p.argmax())
        result.append(Prediction(image=name, pred=classes[k], pred_index=k, probs=[float(v) for v in p],
                                 modality=modalities[i] if modalities is not None else None))
    return result


def modality_warnings(meta: dict, predictions: Sequence[Prediction]) -> list[str]:
    """One line per other known modality among ``predictions`` (:func:`modality_warning`), naming up
    to three of its images; empty when every image matches the model or either side is unknown."""
    by_modality: dict[str, list[str]] = {}
    for p in predictions:
        if modality_warning(meta.get("modality"), p.modality) is not None:
            by_modality.setdefault(str(p.modality), []).append(p.image)
    lines = []
    for modality, names in by_modality.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(modality_warning(meta.get("modality"), modality, f"{len(names)} image(s) ({shown})", "are"))
    return lines


def predict_files(model: nn.Module, meta: dict, paths: Sequence[str | Path], batch_size: int = 16) -> tuple[list[Prediction], list[str]]:
    """Like :func:`predict` for files, but an unreadable file becomes a one-line error
    ``"<file>: <problem>"`` instead of stopping the run. Returns ``(predictions, errors)``."""
    from softcam_core.imaging import ImageLoadError

    good, errors = [], []
    for path in paths:
        try:
            x, _, _, own = prepared_input(path, meta)
            good.append((str(path), x, own))
        except ImageLoadError as exc:
            message = " ".join(str(exc).split())
            # ImageLoadError names the file by its base name; the CLI user gave a path: show that
            message = message.removeprefix(f"{Path(path).name}: ")
            errors.append(f"{path}: {message}")
    if not good:
        return [], errors
    probs = predict_tensors(model, torch.stack([x for _, x, _ in good]), batch_size)
    return _predictions([name for name, _, _ in good], probs, meta["classes"], [own for _, _, own in good]), errors


def write_predictions(path: str | Path, predictions: Sequence[Prediction], classes: Sequence[str]) -> Path:
    """Write ``image,pred,prob_<class>...`` CSV (header always, probabilities with 6 decimals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["image", "pred", *[f"prob_{c}" for c in classes]]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for p in predictions:
            row = p.row(classes)
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return path


def register_cli(subparsers) -> None:
    """Add ``softcam predict`` to the CLI."""
    parser = subparsers.add_parser(
        "predict",
        help="classify image files with a trained checkpoint",
        description="Classify PNG/JPEG/TIFF/DICOM files; writes image,pred,prob_<class>... to a CSV. Unreadable "
        "files print one error line each and make the exit status 1; the CSV still holds the good images.",
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint written by `softcam train`")
    parser.add_argument("--images", type=Path, nargs="+", required=True, metavar="FILE", help="image files")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: SOFTCAM_DEVICE or cuda when available)")
    parser.set_defaults(func=_cli_predict)


def _cli_predict(args) -> int:
    from tqdm.auto import tqdm

    model, meta = load_model(args.model, args.device)
    predictions, errors = [], []
    chunk = max(1, args.batch_size)
    files = list(args.images)
    with tqdm(total=len(files), desc="predict", unit="img", file=sys.stderr, disable=len(files) < 2) as bar:
        for start in range(0, len(files), chunk):
            good, bad = predict_files(model, meta, files[start : start + chunk], args.batch_size)
            predictions += good
            errors += bad
            bar.update(len(files[start : start + chunk]))
    write_predictions(args.out, predictions, meta["classes"])
    for warning in modality_warnings(meta, predictions):
        print(f"softcam predict: warning: {warning}", file=sys.stderr)
    for error in errors:
        print(f"softcam predict: error: {error}", file=sys.stderr)
    print(f"{len(predictions)} image(s) classified, {len(errors)} failed -> {args.out}")
    return 1 if errors else 0
