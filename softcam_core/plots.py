"""Plotly figure builders for cohort results (no Streamlit: the cohort page and reports call these).

Every builder takes the tables :mod:`softcam_core.evaluate` writes (``per_image``, ``deletion``
curves, ``paired``) as pandas DataFrames and returns a ``plotly.graph_objects.Figure``.
:func:`save_figures` writes HTML (and PNG through kaleido when a Chrome/Chromium is available,
silently skipping PNG otherwise).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

log = logging.getLogger(__name__)

TOPK_COLUMN = re.compile(r"^topk_precision_k(\d+)$")
# metrics where a lower value is better (shown in axis titles so readers don't misread a plot)
LOWER_IS_BETTER = {"audc", "seconds"}
PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939",
)


def _method_colours(methods: Sequence[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def _group_column(per_image: pd.DataFrame, group: str | None) -> str:
    return group if group and group in per_image.columns else "method"


def _mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval (:func:`softcam_core.stats.bootstrap_ci`) of the finite values."""
    from softcam_core.stats import bootstrap_ci

    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan, np.nan, np.nan
    low, high = bootstrap_ci(values, resamples=1000)
    return float(values.mean()), low, high


def topk_precision_figure(per_image: pd.DataFrame, group: str | None = None, title: str | None = None) -> go.Figure:
    """Top-k localization precision against k, one line per method (the SoftCAM paper's Fig. 3).

    ``per_image`` needs ``topk_precision_k<k>`` columns; points are cohort means with 95% bootstrap
    intervals over the images where the metric is defined. ``group`` (default ``"method"``) names
    the column that separates the lines, e.g. ``"model_method"`` in reports.
    """
    group = _group_column(per_image, group)
    ks = sorted((int(m.group(1)), col) for col in per_image.columns if (m := TOPK_COLUMN.match(col)))
    fig = go.Figure()
    methods = list(dict.fromkeys(per_image[group]))
    colours = _method_colours(methods)
    for method in methods:
        rows = per_image[per_image[group] == method]
        stats = [_mean_ci(rows[col].to_numpy(dtype=float)) for _, col in ks]
        means = np.array([s[0] for s in stats])
        fig.add_trace(
            go.Scatter(
                x=[k for k, _ in ks], y=means, mode="lines+markers", name=str(method),
                line={"color": colours[method]},
                error_y={
                    "type": "data", "symmetric": False,
                    "array": np.array([s[2] for s in stats]) - means,
                    "arrayminus": means - np.array([s[1] for s in stats]),
                },
            )
        )
    fig.update_layout(
        title=title or "Top-k localization precision",
        xaxis_title="k (top positive cells)", yaxis_title="precision (mean, 95% CI)",
        yaxis_range=[0, 1.05], template="plotly_white", legend_title=group,
    )
    return fig


def deletion_figure(curves: pd.DataFrame, group: str | None = None, title: str | None = None) -> go.Figure:
    """Mean deletion curve per method: relative target probability against fraction deleted.

    ``curves`` has a ``method`` (or ``group``) column and step columns ``s0 .. sN`` (as in
    ``deletion_curves.csv``). A faster fall (lower AUDC) means a more faithful map. Shaded band:
    95% bootstrap interval of the mean at each step.
    """
    group = _group_column(curves, group)
    steps = sorted((int(c[1:]), c) for c in curves.columns if re.fullmatch(r"s\d+", c))
    x = np.array([s for s, _ in steps], dtype=float) / max(1, steps[-1][0] if steps else 1)
    fig = go.Figure()
    methods = list(dict.fromkeys(curves[group]))
    colours = _method_colours(methods)
    for method in methods:
        rows = curves[curves[group] == method]
        stats = [_mean_ci(rows[col].to_numpy(dtype=float)) for _, col in steps]
        mean = np.array([s[0] for s in stats])
        low, high = np.array([s[1] for s in stats]), np.array([s[2] for s in stats])
        colour = colours[method]
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[high, low[::-1]], fill="toself", mode="lines",
                                 line={"width": 0}, fillcolor=colour, opacity=0.15, hoverinfo="skip",
                                 showlegend=False, legendgroup=str(method)))
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=str(method), line={"color": colour},
                                 legendgroup=str(method)))
    fig.update_layout(
        title=title or "Deletion curves (lower area = more faithful)",
        xaxis_title="fraction of cells deleted (most salient first)",
        yaxis_title="target probability / intact probability", template="plotly_white", legend_title=group,
    )
    return fig


def metric_boxplots(
    per_image: pd.DataFrame, metrics: Sequence[str], group: str | None = None, title: str | None = None
) -> go.Figure:
    """Box plot per method for each metric (one panel per metric; undefined values are left out)."""
    group = _group_column(per_image, group)
    metrics = [m for m in metrics if m in per_image.columns]
    cols = 2 if len(metrics) > 1 else 1
    rows = max(1, int(np.ceil(len(metrics) / cols)))
    fig = make_subplots(
        rows=rows, cols=cols, vertical_spacing=min(0.12, 0.5 / rows),
        subplot_titles=[f"{m} ({'lower' if m in LOWER_IS_BETTER else 'higher'} is better)" for m in metrics],
    )
    methods = list(dict.fromkeys(per_image[group]))
    colours = _method_colours(methods)
    for i, metric in enumerate(metrics):
        r, c = divmod(i, cols)
        for method in methods:
            values = per_image.loc[per_image[group] == method, metric].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            fig.add_trace(
                go.Box(y=values, name=str(method), marker_color=colours[method], boxmean=True,
                       legendgroup=str(method), showlegend=i == 0),
                row=r + 1, col=c + 1,
            )
    # the legend names the methods; tick labels under every panel would overlap the next title
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title or "Per-image metrics by method", template="plotly_white",
                      height=max(350, 260 * rows), boxmode="group")
    return fig


def paired_heatmap(paired: pd.DataFrame, metric: str, title: str | None = None) -> go.Figure:
    """Holm-corrected Wilcoxon p-values between methods for one metric, as a symmetric heatmap.

    Cell text: adjusted p and the mean difference (row minus column) on the images both define.
    """
    rows = paired[paired["metric"] == metric]
    methods = list(dict.fromkeys(list(rows["method_a"]) + list(rows["method_b"])))
    index = {m: i for i, m in enumerate(methods)}
    p = np.full((len(methods), len(methods)), np.nan)
    text = np.full(p.shape, "", dtype=object)
    for _, row in rows.iterrows():
        i, j = index[row["method_a"]], index[row["method_b"]]
        p[i, j] = p[j, i] = row["p_holm"]
        diff = row["mean_diff"]
        text[i, j] = f"p={row['p_holm']:.3g}<br>Δ={diff:+.3f}"
        text[j, i] = f"p={row['p_holm']:.3g}<br>Δ={-diff:+.3f}"
    fig = go.Figure(
        go.Heatmap(z=p, x=methods, y=methods, text=text, texttemplate="%{text}", zmin=0, zmax=1,
                   colorscale="Viridis_r", colorbar={"title": "Holm p"})
    )
    fig.update_layout(title=title or f"Paired Wilcoxon tests, {metric} (Holm-corrected)", template="plotly_white",
                      yaxis_autorange="reversed")
    return fig


def save_figures(
    figures: Mapping[str, go.Figure], out_dir: str | Path, png: bool = True, plotlyjs: str | bool = "directory"
) -> dict[str, list[Path]]:
    """Write each figure as ``<name>.html`` (and ``<name>.png`` when kaleido can render).

    ``plotlyjs="directory"`` writes one ``plotly.min.js`` beside the pages so they open offline;
    ``"cdn"`` links the CDN. PNG export needs a Chrome/Chromium for kaleido 1.x; any failure only
    logs a warning (PNGs are then skipped). Returns ``{name: [written paths]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for name, fig in figures.items():
        html = out_dir / f"{name}.html"
        fig.write_html(html, include_plotlyjs=plotlyjs, full_html=True)
        written[name] = [html]
    if png and figures:
        names = list(figures)
        paths = [out_dir / f"{n}.png" for n in names]
        if _write_pngs([figures[n] for n in names], paths):
            for n, path in zip(names, paths):
                written[n].append(path)
    return written


def _write_pngs(figures: list[go.Figure], paths: list[Path]) -> bool:
    """PNG export through kaleido; retried with Debian's chromium when kaleido finds no Chrome itself."""
    import os
    import shutil

    import plotly.io as pio

    heights = [fig.layout.height or 550 for fig in figures]
    attempts = [None]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium and not os.environ.get("BROWSER_PATH"):
        attempts.append(chromium)
    for browser in attempts:
        try:
            if browser:  # kaleido 1.x (choreographer) reads the browser to drive from BROWSER_PATH
                os.environ["BROWSER_PATH"] = browser
            pio.write_images(figures, paths, width=[900] * len(figures), height=heights)
            return True
        except Exception as exc:  # no Chrome, sandbox trouble...: HTML only, never fail
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    log.warning("PNG export skipped (%s)", reason)
    return False


def rating_figure(summary: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Mean plausibility rating per method with its 95 % interval (``reader_study.rating_summary``)."""
    fig = go.Figure(go.Scatter(
        x=summary["mean"], y=summary["method"], mode="markers",
        error_x=dict(type="data", symmetric=False, array=summary["ci_high"] - summary["mean"],
                     arrayminus=summary["mean"] - summary["ci_low"]),
        text=[f"{n} ratings" for n in summary["ratings"]],
        hovertemplate="%{y}: mean %{x:.2f} (%{text})<extra></extra>"))
    fig.update_xaxes(range=[0.8, 5.2], title="plausibility (1-5)", dtick=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "Reader ratings per method (95 % bootstrap interval)", template="plotly_white",
                      height=120 + 40 * len(summary), margin=dict(l=10, r=10, t=40, b=40))
    return fig
