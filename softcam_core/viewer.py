"""Everything the Streamlit pages need that is not Streamlit: model catalogue and loading, maps with
caching, plotly overlays of maps over images, canvas <-> image box scaling, comparison export.

The pages (``app.py``, ``pages/*.py``) stay thin: they lay out widgets and call these functions,
which are plain Python and tested without a browser. This module never imports streamlit.

Coordinates: boxes are ``(x0, y0, x1, y1)`` floats in original image pixels, exclusive end, origin
top-left (DESIGN.md). Maps are float32 arrays; SoftCAM evidence stays signed.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Methods that take seconds to minutes per image on CPU (many forward passes or an optimisation);
# the Review page runs them with progress and stores their maps in the database cache.
SLOW_METHODS = frozenset({"scorecam", "integrated_gradients", "ablationcam", "fullgrad"})

# Plotly colour scales: signed SoftCAM evidence uses a diverging scale centred at 0 (red = evidence
# for the class, blue = against it); non-negative post-hoc saliency uses a sequential scale.
SIGNED_COLORSCALE = "RdBu_r"
SALIENCY_COLORSCALE = "Inferno"

# Longest side (pixels) of what the browser receives for one map; hover still reports image pixels.
DISPLAY_MAX_SIDE = 384
# CAM-type maps are upsampled from the last feature map (16 x 16 for a 512 px ResNet input): 128
# samples per side show all they hold, at a ninth of the data a 384-sample heatmap sends and draws
# (the Review page's time to maps, docs/performance.md). Pixel-level attributions keep the full side.
COARSE_MAP_MAX_SIDE = 128
PIXEL_LEVEL_METHODS = frozenset({"integrated_gradients", "guided_backprop", "fullgrad", "sanity:edge"})
# maps drawn on the diverging scale (shared with the SoftCAM evidence maps when the scale is shared)
EVIDENCE_METHODS = frozenset({"softcam", "softcam_contrast"})


def map_display_side(method: str) -> int:
    """Longest side of the heatmap sent to the browser for ``method`` (see COARSE_MAP_MAX_SIDE)."""
    return DISPLAY_MAX_SIDE if method in PIXEL_LEVEL_METHODS else COARSE_MAP_MAX_SIDE


def is_slow_method(method: str) -> bool:
    """True for methods the Review page runs in the background with progress (see :data:`SLOW_METHODS`)."""
    return method in SLOW_METHODS or method.startswith("cascam:")


def method_title(method: str) -> str:
    """Display name of a contract method name, e.g. ``"gradcampp"`` -> ``"Grad-CAM++"``."""
    names = {
        "softcam": "SoftCAM", "cam": "CAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++",
        "xgradcam": "XGrad-CAM", "layercam": "LayerCAM", "scorecam": "Score-CAM", "hirescam": "HiResCAM",
        "eigencam": "Eigen-CAM", "ablationcam": "Ablation-CAM", "fullgrad": "FullGrad",
        "integrated_gradients": "Integrated Gradients", "guided_backprop": "Guided Backprop",
        "softcam_contrast": "SoftCAM contrast", "sanity:edge": "Edge (sanity)",
        "sanity:random": "Random (sanity)", "sanity:centre": "Centre prior (sanity)",
    }
    if method.startswith("cascam:"):
        return f"CasCAM ({names.get(method.split(':', 1)[1], method.split(':', 1)[1])})"
    return names.get(method, method)


# --------------------------------------------------------------------------------------------------
# Model catalogue and loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file and the metadata it records (see ``models.save_checkpoint``)."""

    path: Path
    meta: dict
    size_mb: float
    modified: float  # POSIX seconds

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def modality(self) -> str:
        return str(self.meta.get("modality", "other"))

    @property
    def head(self) -> str:
        return str(self.meta.get("head", "?"))

    def label(self) -> str:
        """One line for select boxes: ``name — arch/head, modality, N classes``."""
        meta = self.meta
        return (f"{self.name} — {meta.get('arch', '?')}/{self.head}, {self.modality}, "
                f"{len(meta.get('classes', []))} classes")


_MODEL_CACHE: OrderedDict[tuple, tuple[Any, dict]] = OrderedDict()
_MODEL_CACHE_SIZE = 4
_MODEL_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def load_model(path: str | Path) -> tuple[Any, dict]:
    """``(model in eval mode on the default device, meta)`` for a checkpoint, cached by path and mtime.

    Loaded by :func:`softcam_core.inference.load_model` (channels-last weights on CPU: faster).

    A rewritten checkpoint (new mtime or size) is loaded afresh. Raises ``CheckpointError``.
    """
    from softcam_core import inference
    from softcam_core.models import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.name}: checkpoint not found")
    key = _file_key(path)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            _MODEL_CACHE.move_to_end(key)
            return _MODEL_CACHE[key]
    model, meta = inference.load_model(path)
    with _MODEL_LOCK:
        _MODEL_CACHE[key] = (model, meta)
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    return model, meta


_META_CACHE: dict[tuple, dict] = {}


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Metadata of one checkpoint without keeping its weights in memory (cached by mtime)."""
    import torch

    from softcam_core.models import CHECKPOINT_FORMAT, CheckpointError

    path = Path(path)
    key = _file_key(path)
    meta = _META_CACHE.get(key)
    if meta is None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path.name}: not a readable checkpoint ({exc.__class__.__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path.name}: not a SoftCAM Review checkpoint")
        meta = dict(payload.get("meta") or {})
        _META_CACHE[key] = meta
    stat = path.stat()
    return CheckpointInfo(path=path, meta=meta, size_mb=stat.st_size / 1e6, modified=stat.st_mtime)


def list_checkpoints(directory: str | Path | None = None) -> tuple[list[CheckpointInfo], list[str]]:
    """All checkpoints (``*.pt``) under ``directory`` (default ``models_dir()``), newest first.

    Returns ``(checkpoints, problems)`` where each problem is a one-line message for an unreadable file.
    """
    from softcam_core.paths import models_dir

    directory = Path(directory) if directory is not None else models_dir()
    found, problems = [], []
    for path in sorted(directory.rglob("*.pt")):
        if path.name.endswith(".last.pt"):  # training's resumable state beside a checkpoint, not a model
            continue
        try:
            found.append(checkpoint_info(path))
        except Exception as exc:  # one bad file must not hide the others
            problems.append(" ".join(str(exc).split()))
    found.sort(key=lambda info: info.modified, reverse=True)
    return found, problems


# --------------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------------


def image_fingerprint(pixels: np.ndarray) -> str:
    """SHA-256 (hex, 16 chars) of a display array's shape, dtype and bytes: the cache key of an image."""
    digest = hashlib.sha256()
    digest.update(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class MapResult:
    """One explanation map of one image.

    ``input_map`` is (S, S) float32 at the model input resolution (what the metrics use);
    ``image_map`` is (H, W) float32 in original image pixels (what is drawn over the image).
    """

    method: str
    target: int
    target_name: str
    input_map: np.ndarray
    image_map: np.ndarray
    seconds: float
    cached: bool = False

    @property
    def signed(self) -> bool:
        return self.method in EVIDENCE_METHODS

    @property
    def title(self) -> str:
        return f"{method_title(self.method)} · {self.target_name}"


@dataclass
class Prediction:
    """Class probabilities of one image (softmax of the logits) and the input it was computed from."""

    classes: list[str]
    probabilities: np.ndarray  # (C,) float, sums to 1
    seconds: float

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def predicted_name(self) -> str:
        return self.classes[self.predicted]

    def table(self) -> list[dict]:
        """Rows ``{"class", "probability"}`` sorted by probability, highest first."""
        order = np.argsort(-self.probabilities)
        return [{"class": self.classes[i], "probability": float(self.probabilities[i])} for i in order]


@dataclass
class CascadeStage:
    """One CasCAM stage at the model input resolution: the (masked) input it saw and its map in [0, 1]."""

    masked_input: np.ndarray  # (S, S, 3) uint8
    heat: np.ndarray          # (S, S) float32
    weight: float

    @property
    def input_pixels(self) -> np.ndarray:
        return self.masked_input


class MapStore:
    """Where computed maps persist between sessions (the database map cache); ``None`` = memory only.

    Pages pass an adapter over ``db.repository``; tests may pass a dict-backed one. Keys are
    strings built by :func:`map_key`.
    """

    def get(self, key: str) -> tuple[np.ndarray, float] | None:  # pragma: no cover - interface
        raise NotImplementedError

    def put(self, key: str, array: np.ndarray, seconds: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def map_key(model_id: str, image_id: str, method: str, target: int) -> str:
    """Cache key of one map: model identity, image identity, method and target class."""
    return f"{model_id}|{image_id}|{method}|{int(target)}"


_MAP_CACHE: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
_MAP_CACHE_SIZE = 256
# cache entries of the forward pass itself (one per model x image): the logits (C,) and the SoftCAM
# evidence maps at feature resolution (C, h, w), stored like maps so a reopened image needs no pass
FORWARD_LOGITS = "forward:logits"
FORWARD_EVIDENCE = "forward:evidence"
_MAP_LOCK = threading.Lock()
# model inputs of recently opened images: (image fingerprint, modality, size, mean, std) -> (tensor, Geometry)
_PREPARED: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()


def _memory_get(key: str) -> tuple[np.ndarray, float] | None:
    with _MAP_LOCK:
        hit = _MAP_CACHE.get(key)
        if hit is not None:
            _MAP_CACHE.move_to_end(key)
        return hit


def _memory_put(key: str, array: np.ndarray, seconds: float) -> None:
    with _MAP_LOCK:
        _MAP_CACHE[key] = (array, seconds)
        while len(_MAP_CACHE) > _MAP_CACHE_SIZE:
            _MAP_CACHE.popitem(last=False)


class ImageSession:
    """One image prepared for one model: preprocessed once, then predictions and maps on demand.

    Args:
        model: a SoftCAMNet or BaselineNet in eval mode (``load_model``).
        meta: its checkpoint metadata (classes, img_size, mean, std, ...).
        image: a ``softcam_core.imaging.MedicalImage``.
        model_id: identity of the checkpoint for cache keys (e.g. its path, mtime and size).
        store: optional persistent cache (database) for maps.
    """

    def __init__(self, model, meta: dict, image, model_id: str, store: MapStore | None = None):
        import torch

        from softcam_core.imaging import preprocess

        self.model, self.meta, self.image = model, meta, image
        self.classes = [str(c) for c in meta["classes"]]
        self.model_id = model_id
        self.image_id = image_fingerprint(image.pixels)
        self.store = store
        # a page rerun (display control, reopened image) rebuilds the session: the model input is kept
        # (the fundus crop search and resampling cost 20-60 ms per run)
        prepared_key = (self.image_id, getattr(image, "modality", None), int(meta["img_size"]),
                        tuple(meta["mean"]), tuple(meta["std"]))  # the modality picks crop vs letterbox
        with _MAP_LOCK:
            prepared = _PREPARED.get(prepared_key)
        if prepared is None:
            prepared = preprocess(image, int(meta["img_size"]), meta["mean"], meta["std"])
            with _MAP_LOCK:
                _PREPARED[prepared_key] = prepared
                while len(_PREPARED) > 16:
                    _PREPARED.popitem(last=False)
        tensor, self.geometry = prepared
        device = next(model.parameters()).device
        self.x = tensor.unsqueeze(0).to(device)
        self._torch = torch
        self._prediction: Prediction | None = None
        self._evidence: np.ndarray | None = None  # (C, S, S) SoftCAM evidence at input resolution
        self._evidence_seconds = 0.0
        self._cached_forward = False
        self._computed: set[tuple[str, int]] = set()  # (method, target) made by this session's forward pass

    @property
    def is_softcam(self) -> bool:
        return hasattr(self.model, "forward_with_maps")

    def _lookup(self, method: str, target: int) -> tuple[np.ndarray, float] | None:
        """A cached array from memory, else from the persistent store (copied into memory)."""
        key = map_key(self.model_id, self.image_id, method, target)
        hit = _memory_get(key)
        if hit is None and self.store is not None:
            hit = self.store.get(key)
            if hit is not None:
                _memory_put(key, *hit)
        return hit

    def _keep(self, method: str, target: int, array: np.ndarray, seconds: float) -> None:
        """Cache an array in memory and in the persistent store."""
        key = map_key(self.model_id, self.image_id, method, target)
        _memory_put(key, array, seconds)
        if self.store is not None:
            self.store.put(key, array, seconds)

    def predict(self, with_methods: Sequence[str] = ()) -> Prediction:
        """Class probabilities; for a SoftCAM net the same forward pass also yields the evidence maps.

        ``with_methods``: gradient-CAM methods (:data:`softcam_core.explain.fused.FUSABLE_METHODS`;
        others are ignored here) computed for the predicted class in the same forward pass and
        cached, so the page's default Grad-CAM costs no second pass. The logits and evidence maps
        are cached too (memory and store): reopening an image runs no forward pass at all.
        """
        if self._prediction is not None:
            return self._prediction
        from softcam_core.explain.fused import FUSABLE_METHODS, forward_with_cams
        from softcam_core.explain.methods import resize_to

        torch = self._torch
        logits_hit = self._lookup(FORWARD_LOGITS, 0)
        evidence_hit = self._lookup(FORWARD_EVIDENCE, 0) if self.is_softcam else None
        if logits_hit is not None and (evidence_hit is not None or not self.is_softcam):
            logits, seconds = torch.from_numpy(np.asarray(logits_hit[0], dtype=np.float32)), logits_hit[1]
            native = None if evidence_hit is None else torch.from_numpy(np.asarray(evidence_hit[0], dtype=np.float32))
            self._cached_forward = True
        else:
            fused = [m for m in dict.fromkeys(with_methods) if m in FUSABLE_METHODS]
            start = time.perf_counter()
            result = forward_with_cams(self.model, self.x, fused)
            seconds = time.perf_counter() - start
            logits = result.logits[0].cpu()
            native = None if result.maps is None else result.maps[0].cpu()
            self._keep(FORWARD_LOGITS, 0, logits.numpy(), seconds)
            if native is not None:
                self._keep(FORWARD_EVIDENCE, 0, native.numpy(), seconds)
            for method, cam in result.cams.items():  # one pass made them all: each is credited its time
                self._keep(method, result.targets[0], cam[0].cpu().numpy().astype(np.float32), seconds)
                self._computed.add((method, int(result.targets[0])))
        if native is not None:
            # (C, h, w) -> (C, S, S) with explain's own resize: identical to explain(..., "softcam")
            self._evidence = resize_to(native.float(), tuple(self.x.shape[-2:])).numpy().astype(np.float32)
        probabilities = torch.softmax(logits.float()[None], dim=1)[0].numpy()
        self._evidence_seconds = seconds
        self._prediction = Prediction(self.classes, probabilities, seconds)
        return self._prediction

    @property
    def forward_was_cached(self) -> bool:
        """True when :meth:`predict` found the logits and evidence maps cached (no forward pass ran)."""
        return self._cached_forward

    def _finish(self, method: str, target: int, input_map: np.ndarray, seconds: float, cached: bool) -> MapResult:
        input_map = np.asarray(input_map, dtype=np.float32)
        image_map = np.asarray(self.geometry.map_to_image(input_map), dtype=np.float32)
        return MapResult(method, int(target), self.classes[int(target)], input_map, image_map, seconds, cached)

    def evidence_maps(self) -> list[MapResult]:
        """SoftCAM class-evidence maps for every class (signed). Empty for a black-box model."""
        if not self.is_softcam:
            return []
        self.predict()
        assert self._evidence is not None
        return [self._finish("softcam", c, self._evidence[c], self._evidence_seconds, self._cached_forward)
                for c in range(len(self.classes))]

    def explain(self, method: str, target: int | None = None) -> MapResult:
        """One post-hoc (or SoftCAM) map for ``target`` (default: the predicted class).

        Looks in memory, then in the persistent store, then computes with ``softcam_core.explain``.
        """
        if target is None:
            target = self.predict().predicted
        if method == "softcam":
            if not self.is_softcam:
                raise ValueError("SoftCAM maps need a SoftCAM model; this checkpoint is a black-box baseline")
            return self.evidence_maps()[target]
        hit = self._lookup(method, target)
        if hit is not None:  # made by this session's own forward pass (predict) = not a cache hit
            return self._finish(method, target, hit[0], hit[1], (method, int(target)) not in self._computed)
        from softcam_core.explain import explain

        start = time.perf_counter()
        result = explain(self.model, self.x, method, target=int(target))
        array = result[0].detach().float().cpu().numpy().astype(np.float32)
        seconds = time.perf_counter() - start
        self._keep(method, target, array, seconds)
        return self._finish(method, target, array, seconds, False)

    def is_cached(self, method: str, target: int | None = None) -> bool:
        """True when ``method``'s map for ``target`` is in memory or in the store (no computing)."""
        if target is None:
            target = self.predict().predicted
        key = map_key(self.model_id, self.image_id, method, target)
        if _memory_get(key) is not None:
            return True
        return self.store is not None and self.store.get(key) is not None

    def cascam_stages(self, base: str, target: int | None = None, **options) -> list["CascadeStage"]:
        """CasCAM cascade over ``base`` for one image: every stage's masked input and normalised map.

        Also stores the combined map as ``cascam:<base>`` in the caches, so the grid shows it at once.
        """
        from softcam_core.explain.cascam import cascam

        if target is None:
            target = self.predict().predicted
        start = time.perf_counter()
        result = cascam(self.model, self.x, base, target=int(target), **options)
        seconds = time.perf_counter() - start
        combined = result.combined[0].detach().float().cpu().numpy().astype(np.float32)
        key = map_key(self.model_id, self.image_id, f"cascam:{base}", int(target))
        _memory_put(key, combined, seconds)
        if self.store is not None:
            self.store.put(key, combined, seconds)
        mean = np.asarray(self.meta["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(self.meta["std"], dtype=np.float32)[:, None, None]
        stages = []
        for stage_input, stage_map, weight in zip(result.stage_inputs, result.stage_maps, result.weights):
            shown = stage_input[0].detach().float().cpu().numpy() * std + mean  # undo the normalisation
            pixels = (np.clip(shown, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(1, 2, 0)
            stages.append(CascadeStage(pixels, stage_map[0].detach().float().cpu().numpy(), float(weight)))
        return stages

    def crop_box(self) -> tuple[float, float, float, float] | None:
        """The part of the image the model sees ``(x0, y0, x1, y1)`` in image pixels (the fundus crop),
        or None when the model sees the whole image (letterboxed OCT / CXR)."""
        g = self.geometry
        box = (max(0, g.x0), max(0, g.y0), min(g.width, g.x0 + g.side), min(g.height, g.y0 + g.side))
        if box == (0, 0, g.width, g.height):
            return None
        return tuple(float(v) for v in box)

    def input_boxes(self, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """Boxes (N, 4) xyxy in image pixels -> model input pixels (via ``Geometry.boxes_to_input``)."""
        if len(boxes) == 0:
            return np.zeros((0, 4), dtype=np.float32)
        return np.asarray(self.geometry.boxes_to_input(np.asarray(boxes, dtype=np.float32)), dtype=np.float32)


def model_identity(path: str | Path) -> str:
    """Identity of a checkpoint file for cache keys: name, mtime and size (hashing 100 MB is slow)."""
    path = Path(path)
    stat = path.stat()
    return f"{path.name}:{stat.st_mtime_ns}:{stat.st_size}"


def boxes_mask(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """Union of boxes (N, 4) xyxy -> bool mask of ``size`` (H, W); a pixel is inside when its centre is.

    Delegates to ``annotations.geometry`` so there is one rasterisation rule in the project.
    """
    from annotations.geometry import Box, boxes_to_mask

    return boxes_to_mask([Box(*map(float, b[:4])) for b in boxes], int(size[0]), int(size[1]))


def activation_precision_for(result: MapResult, session: ImageSession, boxes: Sequence[Sequence[float]]) -> float | None:
    """Activation precision of one map against lesion boxes (image pixels); ``None`` without boxes."""
    from softcam_core import metrics

    if len(boxes) == 0:
        return None
    size = result.input_map.shape
    mask = boxes_mask(session.input_boxes(boxes), size)
    if not mask.any():
        return None
    return float(metrics.activation_precision(result.input_map, mask))


# --------------------------------------------------------------------------------------------------
# Display: windowing and plotly overlays
# --------------------------------------------------------------------------------------------------


def display_pixels(image, *, center: float | None = None, width: float | None = None, invert: bool = False,
                   function: str = "LINEAR") -> np.ndarray:
    """Display array (uint8, (H, W) or (H, W, 3)) with an optional VOI window and inversion.

    ``center``/``width`` (modality-LUT units) re-window ``image.raw`` through
    ``MedicalImage.rewindow`` when the image has raw values (DICOM, 16-bit grey); otherwise the
    stored display pixels are used. The model always sees the default window, so changing the
    display never changes the maps.
    """
    pixels = image.pixels
    if center is not None and width is not None and getattr(image, "raw", None) is not None:
        from softcam_core.imaging import Window

        pixels = image.rewindow(Window(float(center), max(float(width), 1.0), "viewer", function))
    pixels = np.asarray(pixels)
    if invert:
        pixels = 255 - pixels.astype(np.uint8)
    return pixels.astype(np.uint8)


def window_presets(image) -> dict[str, Any]:
    """``{"name (centre/width)": Window}`` for the windows the image offers (file windows first, then
    the presets ``softcam_core.imaging`` adds: HU presets or percentile windows). Empty without raw values."""
    if getattr(image, "raw", None) is None:
        return {}
    return {f"{w.name} ({w.center:.6g}/{w.width:.6g})": w for w in (getattr(image, "windows", None) or [])}


def _display_step(height: int, width: int, max_side: int = DISPLAY_MAX_SIDE) -> int:
    """Integer subsampling step so the longest side sent to the browser is at most ``max_side``."""
    return max(1, int(np.ceil(max(height, width) / max_side)))


_PNG_URIS: OrderedDict[str, str] = OrderedDict()


def _png_data_uri(pixels: np.ndarray) -> str:
    """PNG data URI of a display array; the last few are kept, since every panel of a page draws the
    same image (encoding a 384 px PNG costs ~25 ms, hashing it ~1 ms)."""
    import base64

    from PIL import Image

    key = image_fingerprint(pixels)
    with _MAP_LOCK:
        if key in _PNG_URIS:
            _PNG_URIS.move_to_end(key)
            return _PNG_URIS[key]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    with _MAP_LOCK:
        _PNG_URIS[key] = uri
        while len(_PNG_URIS) > 8:
            _PNG_URIS.popitem(last=False)
    return uri


def symmetric_range(maps: Iterable[np.ndarray]) -> float:
    """Largest absolute value over ``maps`` (for a shared signed colour scale centred at 0); 1e-6 floor."""
    peak = max((float(np.nanmax(np.abs(m))) for m in maps if np.size(m)), default=0.0)
    return max(peak, 1e-6)


def overlay_figure(
    pixels: np.ndarray,
    heat: np.ndarray | None,
    *,
    title: str = "",
    signed: bool = False,
    zmax: float | None = None,
    opacity: float = 0.5,
    boxes: Sequence[Sequence[Any]] = (),
    height: int = 340,
    colorbar_title: str = "",
    crop: Sequence[float] | None = None,
    heat_max_side: int = DISPLAY_MAX_SIDE,
):
    """Interactive plotly figure: the image with a map drawn over it and annotation boxes on top.

    Args:
        pixels: display array (H, W) grey or (H, W, 3) RGB uint8, original image pixels.
        heat: map (H, W) float in the same pixels, or ``None`` for the image alone.
        signed: diverging scale centred at 0 (SoftCAM evidence); else a sequential scale from the
            map's minimum.
        zmax: colour-scale limit (signed: +-zmax; shared across maps when the caller passes one).
        opacity: map opacity 0..1.
        boxes: ``(x0, y0, x1, y1[, label])`` in image pixels; drawn as outlined rectangles.
        crop: ``(x0, y0, x1, y1)`` the model saw (fundus crop): drawn dashed; the map is transparent
            outside it, since nothing there was explained.
        heat_max_side: longest side of the heatmap sent (at most the image's display side); see
            :func:`map_display_side`.
    Hover shows image-pixel coordinates and the map value. Without a map, space for a colour bar is
    kept so the image lines up with the map panels beside it.
    """
    import plotly.graph_objects as go

    height_px, width_px = pixels.shape[:2]
    step = _display_step(height_px, width_px)
    shown = pixels[::step, ::step]
    if shown.ndim == 2:
        shown = np.stack([shown] * 3, axis=-1)
    fig = go.Figure()
    fig.add_trace(go.Image(source=_png_data_uri(np.ascontiguousarray(shown)), x0=0, y0=0, dx=step, dy=step,
                           hoverinfo="skip", name="image"))
    if heat is not None:
        if heat.shape != (height_px, width_px):
            raise ValueError(f"map shape {heat.shape} does not match image shape {(height_px, width_px)}")
        values = heat.astype(np.float32)
        if crop is not None:
            outside = np.ones(values.shape, dtype=bool)
            cx0, cy0, cx1, cy1 = (int(round(v)) for v in crop[:4])
            outside[cy0:cy1, cx0:cx1] = False
            values = np.where(outside, np.nan, values)
        heat_step = max(step, _display_step(height_px, width_px, heat_max_side))
        values = values[::heat_step, ::heat_step]
        if signed:
            limit = zmax if zmax is not None else symmetric_range([np.nan_to_num(values)])
            zmin, zmax_ = -limit, limit
            scale = SIGNED_COLORSCALE
        else:
            finite = values[np.isfinite(values)]
            zmin = float(finite.min()) if finite.size else 0.0
            zmax_ = zmax if zmax is not None else float(finite.max()) if finite.size else 1.0
            if zmax_ <= zmin:
                zmax_ = zmin + 1e-6
            scale = SALIENCY_COLORSCALE
        fig.add_trace(go.Heatmap(
            z=np.round(values, 5), x0=heat_step / 2 - 0.5, dx=heat_step, y0=heat_step / 2 - 0.5, dy=heat_step,
            zmin=zmin, zmax=zmax_, colorscale=scale, opacity=float(opacity), name="map",
            colorbar=dict(thickness=10, len=0.9, title=dict(text=colorbar_title, side="right")),
            hovertemplate="x %{x:.0f}, y %{y:.0f}<br>value %{z:.4f}<extra></extra>",
        ))
    if crop is not None:
        fig.add_shape(type="rect", x0=crop[0] - 0.5, y0=crop[1] - 0.5, x1=crop[2] - 0.5, y1=crop[3] - 0.5,
                      line=dict(color="#ffd54f", width=1, dash="dash"), fillcolor="rgba(0,0,0,0)")
    label_boxes = len(boxes) <= 4  # more labels than that hide the image; they stay in the hover text
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        label = str(box[4]) if len(box) > 4 and box[4] and label_boxes else ""
        fig.add_shape(type="rect", x0=x0 - 0.5, y0=y0 - 0.5, x1=x1 - 0.5, y1=y1 - 0.5,
                      line=dict(color="#00e5ff", width=2), fillcolor="rgba(0,0,0,0)")
        if label:
            fig.add_annotation(x=x0 - 0.5, y=y0 - 0.5, text=label, showarrow=False, xanchor="left",
                               yanchor="bottom", font=dict(color="#00e5ff", size=11),
                               bgcolor="rgba(0,0,0,0.55)")
    fig.update_xaxes(visible=False, range=[-0.5, width_px - 0.5], constrain="domain")
    fig.update_yaxes(visible=False, range=[height_px - 0.5, -0.5], scaleanchor="x", constrain="domain")
    fig.update_layout(
        title=dict(text=title, font=dict(size=13), x=0.01, y=0.98, xanchor="left", yanchor="top"),
        margin=dict(l=0, r=0 if heat is not None else 62, t=28 if title else 0, b=0), height=height,
        paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", showlegend=False,
    )
    return fig


# --------------------------------------------------------------------------------------------------
# Annotation canvas <-> image pixels
# --------------------------------------------------------------------------------------------------


def canvas_scale(image_width: int, image_height: int, max_width: int, max_height: int) -> float:
    """Canvas pixels per image pixel so the whole image fits ``max_width`` x ``max_height``, aspect kept.

    Images smaller than the box are not enlarged beyond 4x (boxes on tiny images stay drawable).
    """
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
    return float(min(max_width / image_width, max_height / image_height, 4.0))


def canvas_size(image_width: int, image_height: int, scale: float) -> tuple[int, int]:
    """``(width, height)`` canvas pixels for an image shown at ``scale`` (rounded to whole pixels)."""
    return max(1, round(image_width * scale)), max(1, round(image_height * scale))


def image_boxes_to_canvas(boxes: Sequence[Sequence[Any]], scale_x: float, scale_y: float | None = None) -> list[dict]:
    """Image-pixel boxes ``(x0, y0, x1, y1, label)`` -> canvas box dicts ``{label, left, top, width, height}``.

    The dicts feed ``streamlit_drawable_canvas.boxes_to_drawing``.
    """
    scale_y = scale_x if scale_y is None else scale_y
    out = []
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        out.append({"label": str(box[4]) if len(box) > 4 else "", "left": x0 * scale_x, "top": y0 * scale_y,
                    "width": (x1 - x0) * scale_x, "height": (y1 - y0) * scale_y})
    return out


def canvas_boxes_to_image(
    canvas_boxes: Sequence[dict],
    scale_x: float,
    scale_y: float | None,
    image_width: int,
    image_height: int,
    originals: Sequence[Sequence[Any]] = (),
    tolerance: float = 1e-3,
) -> list[tuple[float, float, float, float, str]]:
    """Canvas box dicts -> image-pixel boxes ``(x0, y0, x1, y1, label)``, clipped to the image.

    A canvas box that is (within ``tolerance`` canvas pixels) the drawing of one of ``originals`` —
    i.e. the user did not move or resize it — returns that original exactly, so a save/reload cycle
    never drifts by floating-point rounding whatever the canvas size. Boxes of zero area after
    clipping are dropped.
    """
    scale_y = scale_x if scale_y is None else scale_y
    drawn = image_boxes_to_canvas(originals, scale_x, scale_y)
    result: list[tuple[float, float, float, float, str]] = []
    for box in canvas_boxes:
        label = str(box.get("label", ""))
        match = None
        for original, as_drawn in zip(originals, drawn):
            if all(abs(float(box[k]) - as_drawn[k]) <= tolerance for k in ("left", "top", "width", "height")):
                match = original
                break
        if match is not None:
            x0, y0, x1, y1 = (float(v) for v in match[:4])
        else:
            left, top = float(box["left"]), float(box["top"])
            width, height = float(box["width"]), float(box["height"])
            if width < 0:
                left, width = left + width, -width
            if height < 0:
                top, height = top + height, -height
            x0, y0 = left / scale_x, top / scale_y
            x1, y1 = (left + width) / scale_x, (top + height) / scale_y
            x0, x1 = (round(min(max(v, 0.0), image_width), 2) for v in (x0, x1))
            y0, y1 = (round(min(max(v, 0.0), image_height), 2) for v in (y0, y1))
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            continue
        result.append((x0, y0, x1, y1, label))
    return result


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def map_png(pixels: np.ndarray, heat: np.ndarray, *, signed: bool, opacity: float = 0.5,
            zmax: float | None = None) -> bytes:
    """PNG bytes of one map blended over the image at image resolution (no axes)."""
    from matplotlib import colormaps
    from PIL import Image

    base = pixels if pixels.ndim == 3 else np.stack([pixels] * 3, axis=-1)
    base = base.astype(np.float32) / 255.0
    if signed:
        limit = zmax if zmax is not None else symmetric_range([heat])
        normed = (heat / limit + 1.0) / 2.0
        cmap = colormaps["RdBu_r"]
    else:
        low = float(heat.min())
        high = zmax if zmax is not None else float(heat.max())
        normed = (heat - low) / max(high - low, 1e-6)
        cmap = colormaps["inferno"]
    colour = cmap(np.clip(normed, 0.0, 1.0))[..., :3]
    blended = (1 - opacity) * base + opacity * colour
    buffer = io.BytesIO()
    Image.fromarray((np.clip(blended, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def map_npy(result: MapResult) -> bytes:
    """``.npy`` bytes of a map at the model input resolution (float32, H x W), as ``softcam explain`` writes."""
    buffer = io.BytesIO()
    np.save(buffer, result.input_map.astype(np.float32))
    return buffer.getvalue()


@dataclass
class ComparisonPage:
    """What goes on the one-page comparison export."""

    image_name: str
    model_name: str
    prediction: Prediction
    pixels: np.ndarray
    maps: list[MapResult]
    scores: dict[str, float | None] = field(default_factory=dict)  # map title -> activation precision
    boxes: Sequence[Sequence[Any]] = ()
    shared_scale: bool = False


def comparison_figure_bytes(page: ComparisonPage, fmt: str = "png", opacity: float = 0.5) -> bytes:
    """One-page PNG or PDF: the image, every map over it (with boxes), prediction, seconds and scores."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    if fmt not in ("png", "pdf"):
        raise ValueError(f"export format must be png or pdf, got {fmt!r}")
    panels = 1 + len(page.maps)
    columns = min(4, panels)
    rows = int(np.ceil(panels / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.5 * rows + 0.8), squeeze=False)
    shared = symmetric_range([m.image_map for m in page.maps if m.signed]) if page.shared_scale else None
    base = page.pixels if page.pixels.ndim == 3 else np.stack([page.pixels] * 3, axis=-1)
    for index, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if index >= panels:
            continue
        if index == 0:
            ax.imshow(base)
            ax.set_title(page.image_name, fontsize=9)
        else:
            result = page.maps[index - 1]
            from PIL import Image

            blended = np.asarray(Image.open(io.BytesIO(map_png(page.pixels, result.image_map, signed=result.signed,
                                                               opacity=opacity, zmax=shared if result.signed else None))))
            ax.imshow(blended)
            score = page.scores.get(result.title)
            caption = f"{result.seconds:.2f} s" + (f" · act. precision {score:.3f}" if score is not None else "")
            ax.set_title(f"{result.title}\n{caption}", fontsize=8)
        for box in page.boxes:
            x0, y0, x1, y1 = (float(v) for v in box[:4])
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="#00e5ff", linewidth=1.2))
    probabilities = ", ".join(f"{row['class']} {row['probability']:.1%}" for row in page.prediction.table())
    fig.suptitle(f"{page.image_name} · model {page.model_name} · prediction {page.prediction.predicted_name} "
                 f"({probabilities})", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Small helpers for the pages
# --------------------------------------------------------------------------------------------------


def mask_db_url(url: str) -> str:
    """Database URL with any password replaced by ``***`` (for the sidebar and logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """``(function(), seconds)``."""
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Annotation editing
# --------------------------------------------------------------------------------------------------

# Lesion labels offered per modality on the Annotate page (the first is the default).
# Names follow the synthetic cohorts' COCO categories (softcam_core.synth.LESION_KINDS) so drawn and
# generated boxes share labels.
LESION_LABELS: dict[str, tuple[str, ...]] = {
    "fundus": ("hard_exudate", "haemorrhage", "microaneurysm", "soft_exudate", "neovascularisation", "optic_disc"),
    "oct": ("drusen", "intraretinal_fluid", "subretinal_fluid", "ped", "geographic_atrophy"),
    "cxr": ("opacity", "consolidation", "nodule", "mass", "effusion", "pneumothorax", "tuberculosis"),
    "other": ("lesion",),
}


def lesion_labels(modality: str, existing: Iterable[str] = ()) -> list[str]:
    """Labels for a modality, followed by any label already used on the image (kept selectable)."""
    labels = list(LESION_LABELS.get(modality, LESION_LABELS["other"]))
    for label in existing:
        if label and label not in labels:
            labels.append(label)
    return labels


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when disjoint or empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class BoxEdits:
    """What saving a canvas means for the stored boxes of one image.

    ``create``: new boxes ``(x0, y0, x1, y1, label)``; ``update``: ``(saved id, new box)``;
    ``delete``: saved ids; ``unchanged``: saved ids kept as they are.
    """

    create: list[tuple] = field(default_factory=list)
    update: list[tuple[Any, tuple]] = field(default_factory=list)
    delete: list[Any] = field(default_factory=list)
    unchanged: list[Any] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.delete)

    def summary(self) -> str:
        parts = [f"{len(self.create)} new", f"{len(self.update)} changed", f"{len(self.delete)} deleted"]
        return ", ".join(parts)


def diff_boxes(saved: Sequence[tuple[Any, Sequence[Any]]], edited: Sequence[Sequence[Any]],
               min_iou: float = 0.05) -> BoxEdits:
    """Match the canvas's boxes to the stored ones.

    Args:
        saved: ``(id, (x0, y0, x1, y1, label))`` of the stored boxes of one image.
        edited: ``(x0, y0, x1, y1, label)`` on the canvas now (from :func:`canvas_boxes_to_image`,
            which returns untouched boxes exactly).
    An edited box equal to a stored one (coordinates and label) is unchanged; the remaining stored
    boxes are paired greedily with the remaining edited boxes by IoU (moved, resized or relabelled
    boxes become updates); stored boxes left over are deletions, edited ones left over are new.
    """
    edits = BoxEdits()
    remaining_saved = list(saved)
    remaining_edited = [tuple(box) for box in edited]
    for ident, box in list(remaining_saved):
        key = (tuple(float(v) for v in box[:4]), str(box[4]) if len(box) > 4 else "")
        for candidate in remaining_edited:
            if (tuple(float(v) for v in candidate[:4]), str(candidate[4]) if len(candidate) > 4 else "") == key:
                edits.unchanged.append(ident)
                remaining_saved.remove((ident, box))
                remaining_edited.remove(candidate)
                break
    pairs = sorted(
        ((box_iou(box[:4], candidate[:4]), i, j) for i, (_, box) in enumerate(remaining_saved)
         for j, candidate in enumerate(remaining_edited)),
        reverse=True,
    )
    used_saved, used_edited = set(), set()
    for iou, i, j in pairs:
        if iou < min_iou or i in used_saved or j in used_edited:
            continue
        used_saved.add(i)
        used_edited.add(j)
        edits.update.append((remaining_saved[i][0], remaining_edited[j]))
    edits.delete = [ident for i, (ident, _) in enumerate(remaining_saved) if i not in used_saved]
    edits.create = [box for j, box in enumerate(remaining_edited) if j not in used_edited]
    return edits


# --------------------------------------------------------------------------------------------------
# Background work (cohort metrics, training) whose progress lives in the database jobs table
# --------------------------------------------------------------------------------------------------

ProgressReport = Callable[[int, int, str], None]  # (done, total, message)


class JobCancelled(Exception):
    """Raised by a job's ``report`` callback when the job was cancelled: the worker stops there."""


def run_in_background(
    work: Callable[[ProgressReport], Any],
    *,
    report: ProgressReport,
    finish: Callable[[Any], None],
    fail: Callable[[str], None],
    min_interval: float = 0.5,
    name: str = "softcam-job",
) -> threading.Thread:
    """Run ``work(progress)`` in a daemon thread; progress, result and failure go to the callbacks.

    ``report`` (e.g. a database update of the job row) is called at most every ``min_interval``
    seconds, plus always for the last step, so a fast loop does not hammer the database.
    ``finish(result)`` runs on success; ``fail(message)`` with a one-line message on any exception
    (``finish`` raising included). A callback raising :class:`JobCancelled` ends the work quietly:
    the job was cancelled, so there is nothing to record. The page polls the job row, so the work
    survives page reloads and browser disconnects.
    """
    last = [0.0]

    def progress(done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= min_interval:
            last[0] = now
            report(int(done), int(total), str(message))

    def target() -> None:
        try:
            finish(work(progress))
        except JobCancelled:
            return
        except BaseException as exc:  # the thread must always leave the job in a final state
            try:
                fail(" ".join(str(exc).split()) or exc.__class__.__name__)
            except JobCancelled:
                return

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------------------
# Cohort folders (``softcam synth`` layout) in the database
# --------------------------------------------------------------------------------------------------


def find_cohort_folders(*roots: str | Path) -> dict[str, Path]:
    """``{name: folder}`` for every folder under ``roots`` laid out like ``softcam synth`` output
    (``images/`` and ``labels.csv``), one level deep; default roots: ``SOFTCAM_HOME/demo`` and
    ``SOFTCAM_HOME/cohorts``. Names are ``<root name>-<folder name>`` (e.g. ``demo-fundus``)."""
    from softcam_core.paths import softcam_home

    if not roots:
        roots = (softcam_home() / "demo", softcam_home() / "cohorts")
    found: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if (folder / "images").is_dir() and (folder / "labels.csv").is_file():
                found[f"{root.name}-{folder.name}"] = folder
    return found


def register_cohort_folder(session, folder: str | Path, name: str, modality: str | None = None, user=None):
    """Import a ``softcam synth``-style folder into the database as cohort ``name`` (idempotent).

    Images go through ``db.repository.import_images`` (decoded, de-identified, content-addressed),
    their class label and split come from ``labels.csv``, and ``annotations.json`` (COCO, when present)
    through ``db.repository.import_annotations``. Returns the image import result.
    """
    import csv

    from db import repository

    folder = Path(folder)
    result = repository.import_images(session, [folder / "images"], name, modality=modality)
    cohort = repository.get_cohort(session, name)
    with open(folder / "labels.csv", newline="") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    classes = list(dict.fromkeys(row["label"] for row in rows.values()))
    meta_path = folder / "synth_meta.json"
    if meta_path.is_file():
        import json

        classes = list(json.loads(meta_path.read_text()).get("classes") or classes)
    repository.set_class_labels(session, cohort, classes)
    for accepted in result.accepted:
        row = rows.get(Path(accepted.name).name) or rows.get(accepted.name)
        if row is not None:
            repository.set_image_label(session, repository.get_image(session, accepted.image_id),
                                       row["label"], row.get("split"))
    coco = folder / "annotations.json"
    if coco.is_file():
        repository.import_annotations(session, coco, "coco", cohort, user)
    return result
