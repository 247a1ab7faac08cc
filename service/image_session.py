"""One image opened with one model: prediction, SoftCAM evidence maps and post-hoc maps, cached.

:class:`ImageSession` preprocesses once, predicts (the SoftCAM evidence maps and the fast Grad-CAMs
come out of that one forward pass), and computes any other map on demand; every map is kept in
memory and, through a :class:`MapStore`, in the database, keyed by model, image, method and
target class. The selected class (``target``) is part of every key and every title.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from softcam_core.explain.specs import is_method, method_spec, method_title
from softcam_core.render import image_fingerprint


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
        """Drawn on a diverging scale centred at 0: the method's spec says its maps keep a sign."""
        return is_method(self.method) and method_spec(self.method).signed

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


class DatabaseMapStore(MapStore):
    """The database map cache (``cached_maps``, ``db.repository.cache_map``) for one model and one
    stored image; each get and put is its own short transaction on ``engine``."""

    def __init__(self, engine, model_row, image_row):
        self.engine, self.model_row, self.image_row = engine, model_row, image_row

    @staticmethod
    def _parse(key: str) -> tuple[str, int]:
        _, _, method, target = key.split("|")
        return method, int(target)

    def get(self, key: str) -> tuple[np.ndarray, float] | None:
        from db import repository
        from db.session import session_scope

        method, target = self._parse(key)
        with session_scope(self.engine, readonly=True) as s:
            hit = repository.get_cached_map(s, self.model_row, self.image_row, method, target)
        if hit is None:
            return None
        return hit[0], float(hit[1] or 0.0)

    def put(self, key: str, array: np.ndarray, seconds: float) -> None:
        from db import repository
        from db.session import session_scope

        method, target = self._parse(key)
        with session_scope(self.engine) as s:
            repository.cache_map(s, self.model_row, self.image_row, method, target, array, seconds=seconds)


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
        memory: also use this process's in-memory map cache (off for batch work that must fill the
            store itself and should not evict the maps of the images people are looking at).
    """

    def __init__(self, model, meta: dict, image, model_id: str, store: MapStore | None = None, *,
                 memory: bool = True):
        import torch

        from softcam_core.inference import model_input

        self.model, self.meta, self.image = model, meta, image
        self.classes = [str(c) for c in meta["classes"]]
        self.model_id = model_id
        self.image_id = image_fingerprint(image.pixels)
        self.store, self.memory = store, memory
        # a page rerun (display control, reopened image) rebuilds the session: the model input is kept
        # (the fundus crop search and resampling cost 20-60 ms per run)
        prepared_key = (self.image_id, getattr(image, "modality", None), meta.get("modality"), int(meta["img_size"]),
                        tuple(meta["mean"]), tuple(meta["std"]))  # the modality picks crop vs letterbox
        with _MAP_LOCK:
            prepared = _PREPARED.get(prepared_key)
        if prepared is None:
            prepared = model_input(image, meta)[:2]  # the one preparation predict, explain and evaluate use
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
        hit = _memory_get(key) if self.memory else None
        if hit is None and self.store is not None:
            hit = self.store.get(key)
            if hit is not None and self.memory:
                _memory_put(key, *hit)
        return hit

    def _keep(self, method: str, target: int, array: np.ndarray, seconds: float) -> None:
        """Cache an array in memory and in the persistent store."""
        key = map_key(self.model_id, self.image_id, method, target)
        if self.memory:
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
        """True when ``method``'s map for ``target`` is in memory (with ``memory``) or in the store (no computing)."""
        if target is None:
            target = self.predict().predicted
        key = map_key(self.model_id, self.image_id, method, target)
        if self.memory and _memory_get(key) is not None:
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
        from softcam_core.imaging import denormalise

        stages = []
        for stage_input, stage_map, weight in zip(result.stage_inputs, result.stage_maps, result.weights):
            pixels = denormalise(stage_input[0], self.meta["mean"], self.meta["std"])  # what stage k saw
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
