"""Classification with a trained checkpoint (``softcam predict``) and the model-loading helper.

Every image goes through :func:`softcam_core.imaging.load_image` and
:func:`softcam_core.imaging.preprocess` with the checkpoint's input size and normalisation: the same
path as training and the app.

``softcam predict`` writes ``image,pred,prob_<class>...`` (one row per readable image, in the order
given; ``pred`` is the class name, probabilities are softmax values). Unreadable files do not stop
the run: each prints one line ``softcam predict: error: <file>: <problem>`` on stderr, the CSV holds
the good images, and the exit status is 1 when any file failed (0 when all succeeded).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from softcam_core.device import default_device
from softcam_core.models import inference_layout, load_checkpoint

PHOTO_MODALITIES = ("fundus", "oct", "cxr")


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

    ``image``: a path, bytes or an already loaded :class:`softcam_core.imaging.MedicalImage`. Files are
    decoded with the checkpoint's modality, so they are cropped and windowed as in training.
    Raises :class:`softcam_core.imaging.ImageLoadError` for unreadable input.
    """
    from softcam_core.imaging import MedicalImage, load_image, preprocess

    if not isinstance(image, MedicalImage):
        modality = meta.get("modality")
        image = load_image(image, modality=modality if modality in PHOTO_MODALITIES else None)
    x, geometry = preprocess(image, int(meta["img_size"]), meta["mean"], meta["std"])
    return x, geometry, image


@dataclass
class Prediction:
    """Result for one image: ``pred`` class name and index, ``probs`` (C,) softmax values in class order."""

    image: str
    pred: str
    pred_index: int
    probs: list[float]

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
    inputs, labels = [], []
    for i, image in enumerate(images):
        x, _, loaded = model_input(image, meta)
        inputs.append(x)
        labels.append(names[i] if names is not None else str(image) if isinstance(image, (str, Path)) else loaded.name)
    if not inputs:
        return []
    return _predictions(labels, predict_tensors(model, torch.stack(inputs), batch_size), meta["classes"])


def _predictions(names: Sequence[str], probs: torch.Tensor, classes: Sequence[str]) -> list[Prediction]:
    result = []
    for name, p in zip(names, probs):
        k = int(p.argmax())
        result.append(Prediction(image=name, pred=classes[k], pred_index=k, probs=[float(v) for v in p]))
    return result


def predict_files(model: nn.Module, meta: dict, paths: Sequence[str | Path], batch_size: int = 16) -> tuple[list[Prediction], list[str]]:
    """Like :func:`predict` for files, but an unreadable file becomes a one-line error
    ``"<file>: <problem>"`` instead of stopping the run. Returns ``(predictions, errors)``."""
    from softcam_core.imaging import ImageLoadError

    good, errors = [], []
    for path in paths:
        try:
            good.append((str(path), model_input(path, meta)[0]))
        except ImageLoadError as exc:
            message = " ".join(str(exc).split())
            # ImageLoadError names the file by its base name; the CLI user gave a path: show that
            message = message.removeprefix(f"{Path(path).name}: ")
            errors.append(f"{path}: {message}")
    if not good:
        return [], errors
    probs = predict_tensors(model, torch.stack([x for _, x in good]), batch_size)
    return _predictions([name for name, _ in good], probs, meta["classes"]), errors


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
    for error in errors:
        print(f"softcam predict: error: {error}", file=sys.stderr)
    print(f"{len(predictions)} image(s) classified, {len(errors)} failed -> {args.out}")
    return 1 if errors else 0
