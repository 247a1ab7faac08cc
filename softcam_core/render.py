"""Drawing maps over images, for the app and the CLI alike: plotly overlays, PNG / NPY / one-page exports.

Colour scales follow the method registry (:func:`softcam_core.explain.method_spec`): a signed map
(SoftCAM evidence, CAM, Integrated Gradients, Guided Backprop, the random sanity map) is drawn on a
diverging scale centred at 0 (red = evidence for the class, blue = against it); a non-negative map
on a sequential scale. Boxes are ``(x0, y0, x1, y1[, label])`` in original image pixels, exclusive
end, origin top-left (DESIGN.md). No Streamlit, no database.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


def map_display_side(method: str) -> int:
    """Longest side of the heatmap sent to the browser for ``method`` (see COARSE_MAP_MAX_SIDE)."""
    from softcam_core.explain.specs import is_method, method_spec

    return DISPLAY_MAX_SIDE if is_method(method) and method_spec(method).pixel_level else COARSE_MAP_MAX_SIDE


def image_fingerprint(pixels: np.ndarray) -> str:
    """SHA-256 (hex, 16 chars) of a display array's shape, dtype and bytes: the cache key of an image."""
    digest = hashlib.sha256()
    digest.update(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()[:16]


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
_PNG_LOCK = threading.Lock()


def _png_data_uri(pixels: np.ndarray) -> str:
    """PNG data URI of a display array; the last few are kept, since every panel of a page draws the
    same image (encoding a 384 px PNG costs ~25 ms, hashing it ~1 ms)."""
    import base64

    from PIL import Image

    key = image_fingerprint(pixels)
    with _PNG_LOCK:
        if key in _PNG_URIS:
            _PNG_URIS.move_to_end(key)
            return _PNG_URIS[key]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    with _PNG_LOCK:
        _PNG_URIS[key] = uri
        while len(_PNG_URIS) > 8:
            _PNG_URIS.popitem(last=False)
    return uri


def symmetric_range(maps: Iterable[np.ndarray]) -> float:
    """Largest absolute value over ``maps`` (for a shared signed colour scale centred at 0); 1e-6 floor."""
    peak = max((float(np.nanmax(np.abs(m))) for m in maps if np.size(m)), default=0.0)
    return max(peak, 1e-6)


# a map whose values span less than this fraction of their own magnitude is drawn as one colour
MIN_RELATIVE_RANGE = 1e-6


def map_problem(values: np.ndarray) -> str | None:
    """Why a map would show nothing, in one line, or None when it has something to show.

    Degenerate: empty; any non-finite value (NaN, inf); all zero; constant; or nearly constant,
    i.e. ``max - min < MIN_RELATIVE_RANGE * max |value|`` (e.g. 1000 +- 1e-4: float noise, which a
    min-max colour scale would blow up into a pattern). Pages show the message instead of a heatmap;
    ``softcam explain`` writes it into summary.json. Pure; pinned in tests/test_service.py.
    """
    values = np.asarray(values)
    if values.size == 0:
        return "the map is empty"
    finite = np.isfinite(values)
    if not finite.all():
        return f"the map has {int((~finite).sum())} non-finite values (NaN or inf) of {values.size}"
    peak = float(np.abs(values).max())
    if peak == 0.0:
        return "the map is all zero: the method found no evidence (for gradient methods, often saturated or dead units)"
    low, high = float(values.min()), float(values.max())
    if high == low:
        return f"the map is constant ({high:.3g} everywhere): it ranks no pixel above another"
    if high - low < MIN_RELATIVE_RANGE * peak:
        return (f"the map is nearly constant ({low:.6g} to {high:.6g}: a range below {MIN_RELATIVE_RANGE:g} of its "
                "magnitude is numerical noise)")
    return None


def shared_evidence_limit(maps: Iterable[Any]) -> float | None:
    """The colour limit (+-) the SoftCAM evidence maps of one image share (one map per class, so the
    classes compare), or None without any. ``maps``: objects with ``.method`` and ``.image_map``.

    Only ``softcam`` maps share it: other signed maps (CAM, Integrated Gradients, Guided Backprop)
    are in other units and keep their own symmetric range."""
    evidence = [m.image_map for m in maps if m.method == "softcam"]
    return symmetric_range(evidence) if evidence else None


def colour_limit(result: Any, shared: float | None) -> float | None:
    """``zmax`` for one map: the shared evidence limit for a SoftCAM evidence map, else None (its own)."""
    return shared if result.method == "softcam" else None


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
    view: Sequence[int] | None = None,
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
        view: ``(x0, y0, x1, y1)`` integer image pixels to show (a zoom, exclusive end), or ``None``
            for the whole image. Only that window is sent, subsampled to at most
            :data:`DISPLAY_MAX_SIDE` pixels (so a small window is sent at native resolution); axes
            stay in image pixels. Pages pass one view to every panel, so they zoom and pan together.
    Hover shows image-pixel coordinates and the map value. Without a map, space for a colour bar is
    kept so the image lines up with the map panels beside it.
    """
    import plotly.graph_objects as go

    full_height, full_width = pixels.shape[:2]
    vx0, vy0, vx1, vy1 = (0, 0, full_width, full_height) if view is None else (int(v) for v in view[:4])
    if not (0 <= vx0 < vx1 <= full_width and 0 <= vy0 < vy1 <= full_height):
        raise ValueError(f"view {tuple(view)} is not inside the {full_width}x{full_height} image")
    height_px, width_px = vy1 - vy0, vx1 - vx0
    step = _display_step(height_px, width_px)
    shown = pixels[vy0:vy1:step, vx0:vx1:step]
    if shown.ndim == 2:
        shown = np.stack([shown] * 3, axis=-1)
    fig = go.Figure()
    fig.add_trace(go.Image(source=_png_data_uri(np.ascontiguousarray(shown)), x0=vx0, y0=vy0, dx=step, dy=step,
                           hoverinfo="skip", name="image"))
    if heat is not None:
        if heat.shape != (full_height, full_width):
            raise ValueError(f"map shape {heat.shape} does not match image shape {(full_height, full_width)}")
        values = heat[vy0:vy1, vx0:vx1].astype(np.float32)
        if crop is not None:
            outside = np.ones(values.shape, dtype=bool)
            cx0, cy0, cx1, cy1 = (int(round(v)) for v in crop[:4])
            outside[max(cy0 - vy0, 0):max(cy1 - vy0, 0), max(cx0 - vx0, 0):max(cx1 - vx0, 0)] = False
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
            z=np.round(values, 5), x0=vx0 + heat_step / 2 - 0.5, dx=heat_step, y0=vy0 + heat_step / 2 - 0.5,
            dy=heat_step,
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
        if x1 <= vx0 or x0 >= vx1 or y1 <= vy0 or y0 >= vy1:
            continue  # outside the zoomed view
        label = str(box[4]) if len(box) > 4 and box[4] and label_boxes else ""
        fig.add_shape(type="rect", x0=x0 - 0.5, y0=y0 - 0.5, x1=x1 - 0.5, y1=y1 - 0.5,
                      line=dict(color="#00e5ff", width=2), fillcolor="rgba(0,0,0,0)")
        if label:
            fig.add_annotation(x=x0 - 0.5, y=y0 - 0.5, text=label, showarrow=False, xanchor="left",
                               yanchor="bottom", font=dict(color="#00e5ff", size=11),
                               bgcolor="rgba(0,0,0,0.55)")
    # a zoomed view is the page's one zoom for every panel: a panel's own drag-zoom would leave the others
    fig.update_xaxes(visible=False, range=[vx0 - 0.5, vx1 - 0.5], constrain="domain", fixedrange=view is not None)
    fig.update_yaxes(visible=False, range=[vy1 - 0.5, vy0 - 0.5], scaleanchor="x", constrain="domain",
                     fixedrange=view is not None)
    fig.update_layout(
        title=dict(text=title, font=dict(size=13), x=0.01, y=0.98, xanchor="left", yanchor="top"),
        margin=dict(l=0, r=0 if heat is not None else 62, t=28 if title else 0, b=0), height=height,
        paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", showlegend=False,
    )
    return fig


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


def map_npy(input_map: np.ndarray) -> bytes:
    """``.npy`` bytes of a map (H, W) at the model input resolution, float32, as ``softcam explain`` writes."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(input_map, dtype=np.float32))
    return buffer.getvalue()


@dataclass
class ComparisonPage:
    """What goes on the one-page comparison export.

    ``prediction``: has ``.table()`` rows ``{"class", "probability"}`` and ``.predicted_name``;
    ``maps``: each has ``.method``, ``.image_map`` (H, W) float32 in image pixels, ``.signed``,
    ``.title`` and ``.seconds`` (``service.image_session.Prediction`` and ``MapResult``).
    """

    image_name: str
    model_name: str
    prediction: Any
    pixels: np.ndarray
    maps: list[Any]
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
    shared = shared_evidence_limit(page.maps) if page.shared_scale else None
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
                                                               opacity=opacity, zmax=colour_limit(result, shared)))))
            ax.imshow(blended)
            score = page.scores.get(result.title)
            caption = f"{result.seconds:.2f} s" + (f" · act. precision {score:.3f}" if score is not None else "")
            problem = map_problem(result.image_map)
            if problem:  # the export says so too, rather than a flat colour
                caption += "\nDEGENERATE: " + problem.split(" (")[0].split(":")[0]
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


ANNOTATOR_COLOURS = ("#00e5ff", "#ff4081", "#ffd740", "#69f0ae", "#b388ff", "#ff6e40", "#40c4ff", "#eeff41")


def annotators_figure(pixels: np.ndarray, shapes: dict[str, dict[str, list]], proposals: Sequence[Any] = (),
                      *, height: int = 520, title: str = ""):
    """Plotly figure of an image with every annotator's shapes in their own colour (a legend entry
    each, click to hide) and the consensus proposals on top (white: numbered crosses for points,
    dashed rectangles for boxes), for adjudication. Zoom and pan are plotly's.

    Args:
        pixels: display array (H, W) or (H, W, 3) uint8, original image pixels.
        shapes: ``{annotator: {"points": [(x, y, label)], "boxes": [(x0, y0, x1, y1, label)]}}``,
            image pixels (``db.agreement.annotator_shapes`` of one image).
        proposals: objects with ``kind``, ``geometry`` (``.x/.y`` or ``.x0/.y0/.x1/.y1``) and
            ``label`` (``db.repository.Proposal``); numbered from 1 in the given order.
    """
    import plotly.graph_objects as go

    fig = overlay_figure(pixels, None, height=height, title=title)
    for k, (annotator, drawn) in enumerate(sorted(shapes.items())):
        colour = ANNOTATOR_COLOURS[k % len(ANNOTATOR_COLOURS)]
        points = drawn.get("points", [])
        boxes = drawn.get("boxes", [])
        name = f"{annotator} ({len(points) + len(boxes)})"
        if points:
            fig.add_trace(go.Scatter(
                x=[p[0] for p in points], y=[p[1] for p in points], name=name, mode="markers", legendgroup=annotator,
                marker=dict(color=colour, size=10, symbol="circle-open", line=dict(width=2)),
                text=[str(p[2] or "") for p in points],
                hovertemplate=f"{annotator}: %{{text}}<br>x %{{x:.0f}}, y %{{y:.0f}}<extra></extra>"))
        if boxes:  # closed lines: they share the annotator's legend entry and hide with it
            xs, ys = [], []
            for x0, y0, x1, y1, _ in boxes:
                xs += [x0 - 0.5, x1 - 0.5, x1 - 0.5, x0 - 0.5, x0 - 0.5, None]
                ys += [y0 - 0.5, y0 - 0.5, y1 - 0.5, y1 - 0.5, y0 - 0.5, None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, legendgroup=annotator,
                                     showlegend=not points, line=dict(color=colour, width=2), hoverinfo="skip"))
    for number, proposal in enumerate(proposals, start=1):
        g = proposal.geometry
        if proposal.kind == "point":
            fig.add_trace(go.Scatter(x=[g.x], y=[g.y], mode="markers+text", text=[str(number)], textposition="top right",
                                     marker=dict(symbol="x-thin", size=12, color="white", line=dict(width=2, color="white")),
                                     textfont=dict(color="white"), showlegend=False, name=f"proposal {number}",
                                     hovertemplate=f"proposal {number}: {proposal.label or ''}<extra></extra>"))
        else:
            fig.add_shape(type="rect", x0=g.x0 - 0.5, y0=g.y0 - 0.5, x1=g.x1 - 0.5, y1=g.y1 - 0.5,
                          line=dict(color="white", width=1, dash="dash"), fillcolor="rgba(0,0,0,0)")
            fig.add_annotation(x=g.x1 - 0.5, y=g.y0 - 0.5, text=str(number), showarrow=False, xanchor="left",
                               yanchor="bottom", font=dict(color="white", size=11), bgcolor="rgba(0,0,0,0.55)")
    fig.update_layout(showlegend=True, legend=dict(orientation="h", yanchor="top", y=-0.02, x=0))
    return fig
