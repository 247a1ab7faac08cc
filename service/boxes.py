"""Annotation editing on a canvas: canvas <-> image pixel boxes and points, zoomed views, lesion
labels, and what a save changes.

Boxes are ``(x0, y0, x1, y1, label)`` floats in original image pixels, exclusive end (DESIGN.md);
points are ``(x, y, label)`` in the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from annotations.geometry import box_iou


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


# Zoom levels of the Annotate and Review views: canvas (screen) pixels per original image pixel, or
# None for the whole image fitted to the view.
ZOOM_LEVELS: dict[str, float | None] = {"Fit": None, "1× (native)": 1.0, "2×": 2.0, "4×": 4.0, "8×": 8.0,
                                        "16×": 16.0}


@dataclass(frozen=True)
class Viewport:
    """The part of an image a view shows: image pixels ``[left, left + width) x [top, top + height)``
    drawn at ``scale`` view pixels per image pixel (a ``round(width * scale)`` x ``round(height *
    scale)`` canvas). ``Fit`` views are the whole image with ``left = top = 0``."""

    left: int
    top: int
    width: int
    height: int
    scale: float

    @property
    def canvas_size(self) -> tuple[int, int]:
        return canvas_size(self.width, self.height, self.scale)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` image pixels shown, exclusive end."""
        return self.left, self.top, self.left + self.width, self.top + self.height

    def shows(self, box: Sequence[Any]) -> bool:
        """True when the box ``(x0, y0, x1, y1, ...)`` overlaps the view by a positive area."""
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        return x0 < self.left + self.width and x1 > self.left and y0 < self.top + self.height and y1 > self.top

    def contains(self, point: Sequence[Any]) -> bool:
        """True when the point ``(x, y, ...)`` is inside the view (left and top edges included)."""
        return self.left <= float(point[0]) < self.left + self.width and self.top <= float(point[1]) < self.top + self.height


def zoomed_viewport(image_width: int, image_height: int, zoom: float | None, centre: tuple[float, float],
                    max_width: int, max_height: int) -> Viewport:
    """The view of an image at ``zoom`` view pixels per image pixel, centred on ``centre = (x, y)``
    image pixels as far as the image allows, at most ``max_width`` x ``max_height`` view pixels.

    ``zoom=None`` fits the whole image (:func:`canvas_scale`). A zoomed view shows a whole number of
    image pixels, so each is exactly ``zoom`` view pixels wide and a view pixel maps back to the image
    without drift.
    """
    if zoom is None:
        return Viewport(0, 0, image_width, image_height, canvas_scale(image_width, image_height, max_width, max_height))
    if zoom <= 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    width = max(1, min(image_width, int(max_width // zoom)))
    height = max(1, min(image_height, int(max_height // zoom)))
    left = int(round(min(max(centre[0] - width / 2, 0), image_width - width)))
    top = int(round(min(max(centre[1] - height / 2, 0), image_height - height)))
    return Viewport(left, top, width, height, float(zoom))


def image_boxes_to_canvas(boxes: Sequence[Sequence[Any]], scale_x: float, scale_y: float | None = None,
                          offset: tuple[float, float] = (0.0, 0.0)) -> list[dict]:
    """Image-pixel boxes ``(x0, y0, x1, y1, label)`` -> canvas box dicts ``{label, left, top, width, height}``.

    ``offset`` is the image pixel at the canvas's top-left corner (a zoomed :class:`Viewport`'s
    ``(left, top)``). The dicts feed ``streamlit_drawable_canvas.boxes_to_drawing``.
    """
    scale_y = scale_x if scale_y is None else scale_y
    out = []
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box[:4])
        out.append({"label": str(box[4]) if len(box) > 4 else "", "left": (x0 - offset[0]) * scale_x,
                    "top": (y0 - offset[1]) * scale_y, "width": (x1 - x0) * scale_x, "height": (y1 - y0) * scale_y})
    return out


def canvas_boxes_to_image(
    canvas_boxes: Sequence[dict],
    scale_x: float,
    scale_y: float | None,
    image_width: int,
    image_height: int,
    originals: Sequence[Sequence[Any]] = (),
    tolerance: float = 1e-3,
    offset: tuple[float, float] = (0.0, 0.0),
) -> list[tuple[float, float, float, float, str]]:
    """Canvas box dicts -> image-pixel boxes ``(x0, y0, x1, y1, label)``, clipped to the image.

    ``offset``: the image pixel at the canvas's top-left corner, as for :func:`image_boxes_to_canvas`.

    A canvas box that is (within ``tolerance`` canvas pixels) the drawing of one of ``originals`` —
    i.e. the user did not move or resize it — returns that original exactly, so a save/reload cycle
    never drifts by floating-point rounding whatever the canvas size. Boxes of zero area after
    clipping are dropped.
    """
    scale_y = scale_x if scale_y is None else scale_y
    drawn = image_boxes_to_canvas(originals, scale_x, scale_y, offset)
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
            x0, y0 = left / scale_x + offset[0], top / scale_y + offset[1]
            x1, y1 = (left + width) / scale_x + offset[0], (top + height) / scale_y + offset[1]
            x0, x1 = (round(min(max(v, 0.0), image_width), 2) for v in (x0, x1))
            y0, y1 = (round(min(max(v, 0.0), image_height), 2) for v in (y0, y1))
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            continue
        result.append((x0, y0, x1, y1, label))
    return result


# How the canvas draws a point: a small circle centred on it (view pixels, whatever the zoom)
POINT_RADIUS, POINT_STROKE = 3.0, 2.0
_ORIGIN_FACTOR = {"left": 0.0, "top": 0.0, "center": 0.5, "right": 1.0, "bottom": 1.0}


def image_points_to_canvas(points: Sequence[Sequence[Any]], scale_x: float, scale_y: float | None = None,
                           offset: tuple[float, float] = (0.0, 0.0), *, stroke_color: str = "#ffea00",
                           fill_color: str = "rgba(255, 234, 0, 0.6)") -> list[dict]:
    """Image-pixel points ``(x, y, label)`` -> canvas circle objects for an ``initial_drawing``,
    drawn as the canvas's point tool draws them (left origin at the circle's left edge, vertical
    centre) so drawn and loaded points read back the same way (:func:`canvas_points_to_image`)."""
    scale_y = scale_x if scale_y is None else scale_y
    return [{"type": "Circle", "left": (float(p[0]) - offset[0]) * scale_x - POINT_RADIUS - POINT_STROKE / 2,
             "top": (float(p[1]) - offset[1]) * scale_y, "originX": "left", "originY": "center",
             "radius": POINT_RADIUS, "strokeWidth": POINT_STROKE, "stroke": stroke_color, "fill": fill_color,
             "scaleX": 1, "scaleY": 1, "angle": 0, "lockScalingX": True, "lockScalingY": True,
             "lockRotation": True, "hasControls": False} for p in points]


def canvas_points_to_image(
    objects: Sequence[dict],
    scale_x: float,
    scale_y: float | None,
    image_width: int,
    image_height: int,
    *,
    label: str,
    originals: Sequence[Sequence[Any]] = (),
    tolerance: float = 1e-3,
    offset: tuple[float, float] = (0.0, 0.0),
) -> list[tuple[float, float, str]]:
    """The canvas's circle objects (its ``json_data["objects"]``; other objects are skipped) ->
    image-pixel points ``(x, y, label)`` at the circles' centres.

    A circle at (within ``tolerance`` view pixels) one of ``originals`` returns that original
    exactly, label included; the canvas does not carry a point's label, so any other circle (drawn
    now, or an original that was moved) gets ``label`` here and :func:`diff_points` gives a moved
    original its old label back. Points outside the image are dropped.
    """
    scale_y = scale_x if scale_y is None else scale_y
    drawn = [(o, (float(o[0]) - offset[0]) * scale_x, (float(o[1]) - offset[1]) * scale_y) for o in originals]
    result: list[tuple[float, float, str]] = []
    for obj in objects:
        if str(obj.get("type", "")).lower() != "circle":
            continue
        width = (2 * float(obj.get("radius", 0)) + float(obj.get("strokeWidth", 0))) * float(obj.get("scaleX", 1))
        height = (2 * float(obj.get("radius", 0)) + float(obj.get("strokeWidth", 0))) * float(obj.get("scaleY", 1))
        cx = float(obj.get("left", 0)) + (0.5 - _ORIGIN_FACTOR.get(obj.get("originX", "left"), 0.0)) * width
        cy = float(obj.get("top", 0)) + (0.5 - _ORIGIN_FACTOR.get(obj.get("originY", "top"), 0.0)) * height
        match = next((o for o, ox, oy in drawn if abs(cx - ox) <= tolerance and abs(cy - oy) <= tolerance), None)
        if match is not None:
            result.append((float(match[0]), float(match[1]), str(match[2]) if len(match) > 2 else ""))
            continue
        x, y = round(cx / scale_x + offset[0], 2), round(cy / scale_y + offset[1], 2)
        if 0 <= x < image_width and 0 <= y < image_height:
            result.append((x, y, label))
    return result


POLYGON_STROKE = 2.0


def image_polygons_to_canvas(polygons: Sequence[Sequence[Any]], scale_x: float, scale_y: float | None = None,
                             offset: tuple[float, float] = (0.0, 0.0), *, stroke_color: str = "#76ff03",
                             fill_color: str = "rgba(118, 255, 3, 0.15)") -> list[dict]:
    """Image-pixel polygons ``(((x, y), ...), label)`` -> canvas Polygon objects for an
    ``initial_drawing``, placed as the canvas places a polygon it closes (its centre at the centre
    of its vertices' bounding box), so :func:`canvas_polygons_to_image` reads both back the same way."""
    scale_y = scale_x if scale_y is None else scale_y
    objects = []
    for polygon in polygons:
        points = [{"x": (float(x) - offset[0]) * scale_x, "y": (float(y) - offset[1]) * scale_y} for x, y in polygon[0]]
        xs, ys = [p["x"] for p in points], [p["y"] for p in points]
        width, height = max(xs) - min(xs), max(ys) - min(ys)
        objects.append({"type": "Polygon", "points": points, "left": min(xs) - POLYGON_STROKE / 2,
                        "top": min(ys) - POLYGON_STROKE / 2, "width": width, "height": height,
                        "originX": "left", "originY": "top", "scaleX": 1, "scaleY": 1, "angle": 0,
                        "strokeWidth": POLYGON_STROKE, "stroke": stroke_color, "fill": fill_color,
                        "lockRotation": True, "lockScalingX": True, "lockScalingY": True, "hasControls": False})
    return objects


def canvas_polygons_to_image(
    objects: Sequence[dict],
    scale_x: float,
    scale_y: float | None,
    image_width: int,
    image_height: int,
    *,
    label: str,
    originals: Sequence[Sequence[Any]] = (),
    tolerance: float = 1e-3,
    offset: tuple[float, float] = (0.0, 0.0),
) -> list[tuple[tuple[tuple[float, float], ...], str]]:
    """The canvas's Polygon objects -> image-pixel polygons ``(((x, y), ...), label)``.

    A vertex's place on the canvas is ``(point - pathOffset) * scale + centre`` (fabric's
    Polyline: ``pathOffset`` is the centre of the points' bounding box, the object's centre follows
    ``left``/``top`` and its origin; a moved polygon changes only ``left``/``top``). A polygon at
    (within ``tolerance``) one of ``originals`` returns it exactly, label included; any other gets
    ``label`` (:func:`diff_polygons` gives a moved original its label back). Vertices are clipped to
    the image; polygons with fewer than 3 distinct vertices are dropped."""
    scale_y = scale_x if scale_y is None else scale_y
    drawn = {id(o): image_polygons_to_canvas([o], scale_x, scale_y, offset)[0] for o in originals}
    result = []
    for obj in objects:
        if str(obj.get("type", "")).lower() != "polygon" or not obj.get("points"):
            continue
        points = [(float(p["x"]), float(p["y"])) for p in obj["points"]]
        sx, sy = float(obj.get("scaleX", 1)), float(obj.get("scaleY", 1))
        stroke = float(obj.get("strokeWidth", 0))
        xs, ys = [x for x, _ in points], [y for _, y in points]
        path_x, path_y = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        uniform = bool(obj.get("strokeUniform"))
        full_w = float(obj.get("width", max(xs) - min(xs))) * sx + (stroke if uniform else stroke * sx)
        full_h = float(obj.get("height", max(ys) - min(ys))) * sy + (stroke if uniform else stroke * sy)
        centre_x = float(obj.get("left", 0)) + (0.5 - _ORIGIN_FACTOR.get(obj.get("originX", "left"), 0.0)) * full_w
        centre_y = float(obj.get("top", 0)) + (0.5 - _ORIGIN_FACTOR.get(obj.get("originY", "top"), 0.0)) * full_h
        canvas_points = [((x - path_x) * sx + centre_x, (y - path_y) * sy + centre_y) for x, y in points]
        match = None
        for original in originals:
            want = [(p["x"], p["y"]) for p in drawn[id(original)]["points"]]
            if len(want) == len(canvas_points) and all(abs(a - c) <= tolerance and abs(b - d) <= tolerance
                                                       for (a, b), (c, d) in zip(want, canvas_points)):
                match = original
                break
        if match is not None:
            result.append((tuple((float(x), float(y)) for x, y in match[0]), str(match[1]) if len(match) > 1 else ""))
            continue
        vertices = tuple((round(min(max(x / scale_x + offset[0], 0.0), image_width), 2),
                          round(min(max(y / scale_y + offset[1], 0.0), image_height), 2)) for x, y in canvas_points)
        if len(set(vertices)) >= 3:
            result.append((vertices, label))
    return result


def polygon_bounds(polygon: Sequence[Any]) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of a polygon ``(((x, y), ...), label)``."""
    xs, ys = [float(x) for x, _ in polygon[0]], [float(y) for _, y in polygon[0]]
    return min(xs), min(ys), max(xs), max(ys)


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


@dataclass
class BoxEdits:
    """What saving a canvas means for the stored shapes of one image.

    ``create``: new shapes, boxes ``(x0, y0, x1, y1, label)`` or points ``(x, y, label)``;
    ``update``: ``(saved id, new shape)``; ``delete``: saved ids; ``unchanged``: saved ids kept as
    they are.
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


def diff_points(saved: Sequence[tuple[Any, Sequence[Any]]], edited: Sequence[Sequence[Any]],
                max_distance: float = 10.0) -> BoxEdits:
    """Match the canvas's points to the stored ones, as :func:`diff_boxes` does for boxes.

    ``saved``: ``(id, (x, y, label))``; ``edited``: ``(x, y, label)`` (from
    :func:`canvas_points_to_image`). Equal points are unchanged; the rest of the stored points are
    paired nearest first with the rest of the edited ones within ``max_distance`` image pixels (a
    moved point: an update that keeps its label); stored points left over are deletions, edited
    ones left over are new.
    """
    edits = BoxEdits()
    remaining_saved = list(saved)
    remaining_edited = [tuple(point) for point in edited]
    for ident, point in list(remaining_saved):
        key = (float(point[0]), float(point[1]), str(point[2]) if len(point) > 2 else "")
        for candidate in remaining_edited:
            if (float(candidate[0]), float(candidate[1]), str(candidate[2]) if len(candidate) > 2 else "") == key:
                edits.unchanged.append(ident)
                remaining_saved.remove((ident, point))
                remaining_edited.remove(candidate)
                break
    pairs = sorted((((p[0] - c[0]) ** 2 + (p[1] - c[1]) ** 2, i, j) for i, (_, p) in enumerate(remaining_saved)
                    for j, c in enumerate(remaining_edited)))
    used_saved, used_edited = set(), set()
    for squared, i, j in pairs:
        if squared > max_distance ** 2 or i in used_saved or j in used_edited:
            continue
        used_saved.add(i)
        used_edited.add(j)
        old = remaining_saved[i][1]
        moved = remaining_edited[j]
        edits.update.append((remaining_saved[i][0], (moved[0], moved[1], old[2] if len(old) > 2 else moved[2])))
    edits.delete = [ident for i, (ident, _) in enumerate(remaining_saved) if i not in used_saved]
    edits.create = [point for j, point in enumerate(remaining_edited) if j not in used_edited]
    return edits


def merge_edits(*parts: BoxEdits) -> BoxEdits:
    """One save of several edit sets (the boxes' and the points' of one image)."""
    merged = BoxEdits()
    for part in parts:
        merged.create += part.create
        merged.update += part.update
        merged.delete += part.delete
        merged.unchanged += part.unchanged
    return merged


def diff_polygons(saved: Sequence[tuple[Any, Sequence[Any]]], edited: Sequence[Sequence[Any]],
                  min_iou: float = 0.05) -> BoxEdits:
    """Match the canvas's polygons ``(((x, y), ...), label)`` to the stored ones: equal ones are
    unchanged; the rest are paired by the IoU of their bounding boxes (a moved polygon: an update
    that keeps its label); stored ones left over are deletions, edited ones left over are new."""
    def key(polygon):
        return tuple((float(x), float(y)) for x, y in polygon[0]), str(polygon[1]) if len(polygon) > 1 else ""

    edits = BoxEdits()
    remaining_saved = list(saved)
    remaining_edited = [tuple(polygon) for polygon in edited]
    for ident, polygon in list(remaining_saved):
        for candidate in remaining_edited:
            if key(candidate) == key(polygon):
                edits.unchanged.append(ident)
                remaining_saved.remove((ident, polygon))
                remaining_edited.remove(candidate)
                break
    pairs = sorted(((box_iou(polygon_bounds(p), polygon_bounds(c)), i, j) for i, (_, p) in enumerate(remaining_saved)
                    for j, c in enumerate(remaining_edited)), reverse=True)
    used_saved, used_edited = set(), set()
    for iou, i, j in pairs:
        if iou < min_iou or i in used_saved or j in used_edited:
            continue
        used_saved.add(i)
        used_edited.add(j)
        old = remaining_saved[i][1]
        edits.update.append((remaining_saved[i][0], (remaining_edited[j][0], old[1] if len(old) > 1 else "")))
    edits.delete = [ident for i, (ident, _) in enumerate(remaining_saved) if i not in used_saved]
    edits.create = [polygon for j, polygon in enumerate(remaining_edited) if j not in used_edited]
    return edits
