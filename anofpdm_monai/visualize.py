# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""PNG figures for AnoFPDM: overlay grids, M_t / MSE curves, PR curves, reconstructions, README demo.

Every function builds a private :class:`matplotlib.figure.Figure` rendered by
:class:`matplotlib.backends.backend_agg.FigureCanvasAgg` (no pyplot global state, so calls are
thread-safe and never open a window), writes the PNG atomically (temporary file in the same
folder, then :func:`os.replace`), creates missing parent folders and returns the output path.

Conventions:
    * Slices are 2D ``(H, W)`` arrays in the model's array orientation (axis 0 = left -> right,
      axis 1 = posterior -> anterior, from RAS-reoriented volumes). :func:`display_slice` turns
      them so that anterior is up; every function displays slices through it.
    * Image intensities are in ``[-1, 1]`` and shown in gray with fixed limits ``[-1, 1]``.
    * Anomaly maps are shown with ``inferno`` (or ``hot``) from 0 to a robust maximum: the 99.5th
      percentile of the map unless given.
    * Masks are drawn over the image as a semi-transparent fill with a contour.
    * Inputs may be numpy arrays or torch tensors (any device, any float dtype).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from .io import atomic_path

__all__ = [
    "display_slice",
    "robust_vmax",
    "save_overlay_grid",
    "save_curves",
    "save_pr_curves",
    "save_reconstruction_grid",
    "save_sample_grid",
    "save_demo_figure",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]
PathLike = str | os.PathLike[str]

#: Colour of ground-truth overlays.
GT_COLOR = "#39e75f"
#: Colour of predicted-mask overlays.
PRED_COLOR = "#ff3b30"
#: Fill opacity of mask overlays.
MASK_ALPHA = 0.35
#: Percentile used for the robust upper limit of anomaly maps.
MAP_PERCENTILE = 99.5

_FONT_SMALL = 7
_FONT = 8
_FONT_TITLE = 10


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def display_slice(a: ArrayLike) -> np.ndarray:
    """Turn a slice from array orientation into display orientation (anterior up).

    The model's arrays have axis 0 = left -> right and axis 1 = posterior -> anterior. ``np.rot90``
    (counter-clockwise) puts the last index of axis 1 (anterior) on the top row and lets axis 0
    run from left to right across the columns.

    Args:
        a: 2D slice ``(H, W)`` (numpy array or torch tensor). Trailing axes (e.g. RGBA) are kept.

    Returns:
        The rotated array, ``(W, H, ...)``.
    """
    return np.rot90(_to_numpy(a, "a"))


def robust_vmax(a: ArrayLike, percentile: float = MAP_PERCENTILE) -> float:
    """Robust display maximum of an anomaly map: its ``percentile``-th percentile.

    Falls back to the finite maximum when the percentile is not positive, and to 1.0 when the map
    has no positive finite value, so that the result is always usable as ``vmax`` with ``vmin=0``.

    Args:
        a: the map (any shape).
        percentile: percentile in ``[0, 100]``.

    Returns:
        A positive float.
    """
    arr = _to_numpy(a, "a").astype(np.float64, copy=False)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return 1.0
    vmax = float(np.percentile(finite, percentile))
    if not vmax > 0:
        vmax = float(finite.max())
    return vmax if vmax > 0 else 1.0


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested sequence to a numpy array (float for floats)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"`{name}` could not be converted to an array: {e}") from e


def _array(x: Any, name: str, ndim: int | tuple[int, ...], shape_doc: str) -> np.ndarray:
    """Convert ``x`` and check its number of dimensions, with a one-line error naming ``name``."""
    arr = _to_numpy(x, name)
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in allowed:
        raise ValueError(f"`{name}` must have shape {shape_doc}, got an array of shape {tuple(arr.shape)}")
    return arr


def _float(x: Any, name: str, ndim: int | tuple[int, ...], shape_doc: str) -> np.ndarray:
    arr = _array(x, name, ndim, shape_doc)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"`{name}` must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def _mask(x: Any, name: str, ndim: int | tuple[int, ...], shape_doc: str) -> np.ndarray:
    arr = _array(x, name, ndim, shape_doc)
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"`{name}` must be a binary mask, got dtype {arr.dtype}")
    return arr > 0.5


def _check_same_shape(ref: np.ndarray, ref_name: str, other: np.ndarray, name: str) -> None:
    if other.shape != ref.shape:
        raise ValueError(
            f"`{name}` must have the same shape as `{ref_name}` {tuple(ref.shape)}, got {tuple(other.shape)}"
        )


def _labels(labels: Sequence[str] | None, n: int, name: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise ValueError(f"`{name}` must be a sequence of {n} strings, got a single string")
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"`{name}` must have {n} entries (one per item), got {len(labels)}")
    return labels


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width=width, break_long_words=False)) or text


def _new_figure(width_in: float, height_in: float, dpi: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: PathLike, dpi: float, compress_level: int = 6) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically, free the figure and return the path.

    Args:
        fig: the figure.
        path: output path; parent folders are created.
        dpi: resolution.
        compress_level: zlib level of the PNG (1 is about twice as fast to write as the default 6).

    Returns:
        ``Path(path)``.
    """
    out = Path(path)
    try:
        with atomic_path(out, suffix=".png") as tmp, open(tmp, "wb") as fh:
            fig.savefig(
                fh, format="png", dpi=dpi, facecolor=fig.get_facecolor(), pil_kwargs={"compress_level": compress_level}
            )
    finally:
        fig.clear()
    return out


def _grid_axes(
    fig: Figure,
    nrows: int,
    ncols: int,
    panel_w: float,
    panel_h: float,
    left: float,
    top: float,
    wgap: float,
    hgap: float,
) -> list[list[Axes]]:
    """Place ``nrows x ncols`` axes of fixed size (inches) at fixed margins (inches)."""
    fw, fh = fig.get_size_inches()
    axes: list[list[Axes]] = []
    for r in range(nrows):
        row = []
        for c in range(ncols):
            x0 = left + c * (panel_w + wgap)
            y0 = fh - top - (r + 1) * panel_h - r * hgap
            row.append(fig.add_axes((x0 / fw, y0 / fh, panel_w / fw, panel_h / fh)))
        axes.append(row)
    return axes


def _blank(ax: Axes) -> None:
    """Hide ticks and spines but keep the axis labels usable (for row labels)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _show_image(ax: Axes, image: np.ndarray) -> None:
    ax.imshow(display_slice(image), cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
    _blank(ax)


def _show_mask(ax: Axes, mask: np.ndarray, color: str, alpha: float = MASK_ALPHA) -> None:
    m = display_slice(mask)
    if not m.any():
        return
    rgba = np.zeros(m.shape + (4,), dtype=np.float32)
    rgba[m] = (*to_rgb(color), alpha)
    ax.imshow(rgba, interpolation="nearest")
    if not m.all():
        ax.contour(m.astype(np.float32), levels=[0.5], colors=[color], linewidths=0.8)


def _show_map(ax: Axes, amap: np.ndarray, vmax: float | None, cmap: str, annotate: bool = True) -> AxesImage:
    vmax = robust_vmax(amap) if vmax is None else float(vmax)
    im = ax.imshow(display_slice(amap), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    _blank(ax)
    if annotate:
        ax.text(
            0.97,
            0.03,
            f"max {vmax:.2g}",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=_FONT_SMALL - 1,
            color="white",
            bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.0, "linewidth": 0},
        )
    return im


def _cmap_name(cmap: str, name: str) -> str:
    if cmap not in colormaps:
        raise ValueError(f"`{name}` must be a matplotlib colormap name, got {cmap!r}")
    return cmap


# ----------------------------------------------------------------------------------------------
# 1. overlay grid
# ----------------------------------------------------------------------------------------------
def save_overlay_grid(
    path: PathLike,
    images: ArrayLike,
    ground_truth: ArrayLike | None,
    rows: Mapping[str, Mapping[str, ArrayLike]],
    titles: str | Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    max_rows: int | None = None,
    *,
    map_vmax: float | None = None,
    map_cmap: str = "inferno",
    panel_size: float = 1.6,
    dpi: float = 100,
) -> Path:
    """Grid of example slices: input, ground truth and each method's anomaly map and mask.

    One row per example slice. Columns: ``"input"``, ``"ground truth"`` (the input with the
    ground truth overlaid; left out when ``ground_truth`` is None), then for each method in the
    order of ``rows``: ``"<method> map"`` (when it has a map) and ``"<method> mask"`` (when it has
    a mask; drawn over the input).

    Args:
        path: output PNG path; parent folders are created.
        images: ``(N, H, W)`` the displayed input channel (e.g. FLAIR) in ``[-1, 1]``.
        ground_truth: ``(N, H, W)`` binary ground truth, or None.
        rows: ordered mapping method name -> dict with optional keys ``"map"`` (``(N, H, W)``
            float) and ``"mask"`` (``(N, H, W)`` binary); at least one of the two per method.
        titles: either one string, used as the figure title, or a sequence of column headers
            replacing the defaults (one per column).
        row_labels: ``N`` per-row labels (e.g. ``"case 12, slice 80, Dice 0.71"``), shown on the
            left of each row.
        max_rows: show only the first ``max_rows`` slices.
        map_vmax: fixed upper limit for all maps; default: each map's 99.5th percentile (the
            value is printed in the map's corner).
        map_cmap: colormap of the maps (``"inferno"`` or ``"hot"``).
        panel_size: panel edge in inches.
        dpi: resolution of the PNG.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: on inconsistent shapes, unknown keys in ``rows``, wrong label counts.
    """
    imgs = _float(images, "images", 3, "(N, H, W)")
    n = imgs.shape[0]
    if n == 0:
        raise ValueError("`images` must hold at least one slice, got N = 0")
    gt = None
    if ground_truth is not None:
        gt = _mask(ground_truth, "ground_truth", 3, "(N, H, W)")
        _check_same_shape(imgs, "images", gt, "ground_truth")
    if not isinstance(rows, Mapping):
        raise ValueError(f"`rows` must be a mapping method name -> {{'map': ..., 'mask': ...}}, got {type(rows)}")
    methods: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
    for method, entry in rows.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"`rows[{method!r}]` must be a dict with keys 'map' and/or 'mask', got {type(entry)}")
        unknown = set(entry) - {"map", "mask"}
        if unknown:
            raise ValueError(f"`rows[{method!r}]` has unknown keys {sorted(unknown)}; expected 'map' and/or 'mask'")
        amap = entry.get("map")
        mask = entry.get("mask")
        if amap is None and mask is None:
            raise ValueError(f"`rows[{method!r}]` must hold a 'map' or a 'mask'")
        if amap is not None:
            amap = _float(amap, f"rows[{method!r}]['map']", 3, "(N, H, W)")
            _check_same_shape(imgs, "images", amap, f"rows[{method!r}]['map']")
        if mask is not None:
            mask = _mask(mask, f"rows[{method!r}]['mask']", 3, "(N, H, W)")
            _check_same_shape(imgs, "images", mask, f"rows[{method!r}]['mask']")
        methods.append((str(method), amap, mask))
    labels = _labels(row_labels, n, "row_labels")
    map_cmap = _cmap_name(map_cmap, "map_cmap")
    if max_rows is not None:
        if int(max_rows) < 1:
            raise ValueError(f"`max_rows` must be >= 1, got {max_rows}")
        n = min(n, int(max_rows))

    # columns: (header, kind, data)
    columns: list[tuple[str, str, np.ndarray | None]] = [("input", "input", None)]
    if gt is not None:
        columns.append(("ground truth", "gt", gt))
    for method, amap, mask in methods:
        if amap is not None:
            columns.append((f"{method} map", "map", amap))
        if mask is not None:
            columns.append((f"{method} mask", "mask", mask))
    suptitle = None
    if isinstance(titles, str):
        suptitle = titles
    elif titles is not None:
        headers = [str(t) for t in titles]
        if len(headers) != len(columns):
            raise ValueError(
                f"`titles` must be one string or {len(columns)} column headers "
                f"{[c[0] for c in columns]}, got {len(headers)}"
            )
        columns = [(h, kind, data) for h, (_, kind, data) in zip(headers, columns)]

    h, w = imgs.shape[1:]
    scale = panel_size / max(h, w)
    panel_w, panel_h = h * scale, w * scale  # displayed slices are (W, H): width h, height w
    wrap_cols = max(10, int(panel_w * 13))
    headers = [_wrap(c[0], wrap_cols) for c in columns]
    header_lines = max(hd.count("\n") + 1 for hd in headers)
    left = 0.1 + (0.45 if labels else 0.0)
    top = 0.1 + 0.15 * header_lines + (0.35 if suptitle else 0.0)
    gap = 0.04
    ncols = len(columns)
    fig_w = left + ncols * panel_w + (ncols - 1) * gap + 0.1
    fig_h = top + n * panel_h + (n - 1) * gap + 0.1
    fig = _new_figure(fig_w, fig_h, dpi)
    axes = _grid_axes(fig, n, ncols, panel_w, panel_h, left, top, gap, gap)

    for i in range(n):
        for j, (_, kind, data) in enumerate(columns):
            ax = axes[i][j]
            if kind == "map":
                _show_map(ax, data[i], map_vmax, map_cmap)
            else:
                _show_image(ax, imgs[i])
                if kind == "gt":
                    _show_mask(ax, data[i], GT_COLOR)
                elif kind == "mask":
                    _show_mask(ax, data[i], PRED_COLOR)
            if i == 0:
                ax.set_title(headers[j], fontsize=_FONT, pad=3)
        if labels:
            axes[i][0].set_ylabel(_wrap(labels[i], max(12, int(panel_h * 16))), fontsize=_FONT_SMALL, labelpad=3)
    if suptitle:
        fig.suptitle(suptitle, fontsize=_FONT_TITLE, y=1 - 0.08 / fig_h, va="top")
    return _save_figure(fig, path, dpi)


# ----------------------------------------------------------------------------------------------
# 2. M_t / MSE curves
# ----------------------------------------------------------------------------------------------
def save_curves(
    path: PathLike,
    steps: ArrayLike,
    divergence: ArrayLike,
    mse_healthy: ArrayLike,
    mse_reference: ArrayLike,
    t_end: ArrayLike | None = None,
    titles: Sequence[str] | None = None,
    max_panels: int = 8,
    *,
    modality_names: Sequence[str] | None = None,
    suptitle: str | None = None,
    ncols: int = 4,
    dpi: float = 100,
) -> Path:
    """Per-slice curves of the divergence M_t and of MSE_h / MSE_ref over the step grid.

    One panel per example slice, each with two rows sharing the step axis: M_t on top (one line
    per map modality), MSE_h and MSE_ref below. The end step t_e is marked by a vertical dashed
    line on both rows (one per modality, in the modality's colour, when ``t_end`` is per modality).

    Args:
        path: output PNG path; parent folders are created.
        steps: ``(T,)`` the step grid (ints, increasing).
        divergence: ``(K, T)`` or ``(K, T, Cm)`` M_t per slice (and per map modality).
        mse_healthy: ``(K, T)`` MSE between the guided (healthy) prediction and the input.
        mse_reference: ``(K, T)`` MSE between the reference (null or unguided) prediction and the input.
        t_end: ``(K,)`` or ``(K, Cm)`` end steps t_e, values taken from ``steps``; None: not drawn.
        titles: ``K`` panel titles (e.g. ``"slice 80, c=0.97, unhealthy"``).
        max_panels: draw only the first ``max_panels`` slices.
        modality_names: ``Cm`` names for the M_t lines (``"M_t (FLAIR)"``); default
            ``"M_t (modality j)"``, or plain ``"M_t"`` for a ``(K, T)`` divergence.
        suptitle: optional figure title.
        ncols: panels per figure row.
        dpi: resolution of the PNG.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: on inconsistent shapes or t_end values not in ``steps``.
    """
    st = _float(steps, "steps", 1, "(T,)")
    t = st.shape[0]
    if t == 0:
        raise ValueError("`steps` must hold at least one step, got T = 0")
    div = _float(divergence, "divergence", (2, 3), "(K, T) or (K, T, Cm)")
    per_modality = div.ndim == 3
    if not per_modality:
        div = div[:, :, None]
    k, cm = div.shape[0], div.shape[2]
    if div.shape[1] != t:
        raise ValueError(f"`divergence` must have T = {t} steps on axis 1 (len(steps)), got shape {div.shape[:2]}")
    if k == 0:
        raise ValueError("`divergence` must hold at least one slice, got K = 0")
    mse_h = _float(mse_healthy, "mse_healthy", 2, "(K, T)")
    mse_r = _float(mse_reference, "mse_reference", 2, "(K, T)")
    for arr, name in ((mse_h, "mse_healthy"), (mse_r, "mse_reference")):
        if arr.shape != (k, t):
            raise ValueError(f"`{name}` must have shape (K, T) = {(k, t)}, got {tuple(arr.shape)}")
    te = None
    if t_end is not None:
        te = _float(t_end, "t_end", (1, 2), "(K,) or (K, Cm)")
        if te.ndim == 1:
            te = te[:, None]
        if te.shape[0] != k or te.shape[1] not in (1, cm):
            raise ValueError(f"`t_end` must have shape (K,) or (K, Cm) = {(k,)} or {(k, cm)}, got {tuple(te.shape)}")
        if not np.isin(te, st).all():
            bad = te[~np.isin(te, st)][:3].tolist()
            raise ValueError(f"`t_end` must hold steps taken from `steps` (not indices), got values such as {bad}")
    labels = _labels(titles, k, "titles")
    if modality_names is not None:
        names = [str(m) for m in modality_names]
        if len(names) != cm:
            raise ValueError(f"`modality_names` must have {cm} entries (one per map modality), got {len(names)}")
        line_names = [f"M_t ({m})" for m in names]
    else:
        line_names = [f"M_t (modality {j})" for j in range(cm)] if per_modality else ["M_t"]
    if int(max_panels) < 1:
        raise ValueError(f"`max_panels` must be >= 1, got {max_panels}")
    if int(ncols) < 1:
        raise ValueError(f"`ncols` must be >= 1, got {ncols}")
    k_shown = min(k, int(max_panels))
    nc = min(k_shown, int(ncols))
    nr = math.ceil(k_shown / nc)

    colors = [colormaps["tab10"](j % 10) for j in range(cm)]
    # fixed layout in inches (much faster than a layout engine): each panel cell is cell_w x cell_h
    cell_w, cell_h = 3.3, 3.5
    pad_l, pad_r, pad_t, pad_b, gap = 0.62, 0.12, 0.42, 0.48, 0.06
    head = 0.4 if suptitle else 0.0
    fig_w, fig_h = cell_w * nc, cell_h * nr + head
    fig = _new_figure(fig_w, fig_h, dpi)
    ax_w = cell_w - pad_l - pad_r
    ax_h = (cell_h - pad_t - pad_b - gap) / 2
    for i in range(k_shown):
        x0 = (i % nc) * cell_w + pad_l
        y_top = fig_h - head - (i // nc) * cell_h - pad_t  # upper edge of the M_t axes
        ax_m = fig.add_axes((x0 / fig_w, (y_top - ax_h) / fig_h, ax_w / fig_w, ax_h / fig_h))
        ax_e = fig.add_axes(
            (x0 / fig_w, (y_top - 2 * ax_h - gap) / fig_h, ax_w / fig_w, ax_h / fig_h),
            sharex=ax_m,
        )
        for j in range(cm):
            ax_m.plot(st, div[i, :, j], color=colors[j], lw=1.3, label=line_names[j])
        ax_e.plot(st, mse_h[i], color="#2ca02c", lw=1.3, label="MSE_h")
        ax_e.plot(st, mse_r[i], color="#9467bd", lw=1.3, ls="-.", label="MSE_ref")
        if te is not None:
            for j in range(te.shape[1]):
                color = colors[j] if te.shape[1] > 1 else "black"
                label = "t_e" if te.shape[1] == 1 else f"t_e ({line_names[j][5:-1]})"
                for ax in (ax_m, ax_e):
                    ax.axvline(float(te[i, j]), color=color, ls="--", lw=1.0, alpha=0.8, label=label)
        ax_m.set_ylabel("M_t", fontsize=_FONT)
        ax_e.set_ylabel("MSE", fontsize=_FONT)
        ax_e.set_xlabel("step t", fontsize=_FONT)
        ax_m.tick_params(labelbottom=False, labelsize=_FONT_SMALL)
        ax_e.tick_params(labelsize=_FONT_SMALL)
        for ax in (ax_m, ax_e):
            ax.grid(True, lw=0.4, alpha=0.4)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.yaxis.get_offset_text().set_fontsize(_FONT_SMALL)
        ax_m.set_xlim(float(st.min()), float(st.max()) if t > 1 else float(st.min()) + 1)
        if labels:
            ax_m.set_title(labels[i], fontsize=_FONT)
        if i == 0:
            ax_m.legend(fontsize=_FONT_SMALL - 1, loc="best", framealpha=0.8)
            handles, names_ = ax_e.get_legend_handles_labels()
            keep = [(hd, nm) for hd, nm in zip(handles, names_) if nm.startswith("MSE")]
            ax_e.legend(*zip(*keep), fontsize=_FONT_SMALL - 1, loc="best", framealpha=0.8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=_FONT_TITLE, y=1 - 0.08 / fig_h, va="top")
    return _save_figure(fig, path, dpi)


# ----------------------------------------------------------------------------------------------
# 3. PR curves
# ----------------------------------------------------------------------------------------------
def save_pr_curves(
    path: PathLike,
    curves: Mapping[str, Sequence[Any]],
    title: str | None = None,
    *,
    dpi: float = 100,
) -> Path:
    """Precision-recall curves of several methods in one plot.

    Args:
        path: output PNG path; parent folders are created.
        curves: ordered mapping method name -> ``(precision, recall)`` or
            ``(precision, recall, ap)``; precision and recall are 1D arrays of equal length (e.g.
            from ``sklearn.metrics.precision_recall_curve``). With ``ap`` the legend reads
            ``"<method> (AP 0.72)"``.
        title: optional plot title.
        dpi: resolution of the PNG.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: on an empty mapping, malformed entries or mismatched lengths.
    """
    if not isinstance(curves, Mapping) or len(curves) == 0:
        raise ValueError("`curves` must be a non-empty mapping method name -> (precision, recall[, ap])")
    parsed = []
    for name, entry in curves.items():
        if isinstance(entry, (np.ndarray, torch.Tensor)) or not isinstance(entry, Sequence) or len(entry) not in (2, 3):
            raise ValueError(f"`curves[{name!r}]` must be a tuple (precision, recall) or (precision, recall, ap)")
        precision = _float(entry[0], f"curves[{name!r}] precision", 1, "(P,)")
        recall = _float(entry[1], f"curves[{name!r}] recall", 1, "(P,)")
        if precision.shape != recall.shape:
            raise ValueError(
                f"`curves[{name!r}]` precision and recall must have the same length, "
                f"got {precision.shape[0]} and {recall.shape[0]}"
            )
        ap = None if len(entry) == 2 or entry[2] is None else float(_to_numpy(entry[2], f"curves[{name!r}] ap"))
        parsed.append((str(name), precision, recall, ap))

    fig = _new_figure(4.6, 4.4, dpi)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot(1, 1, 1)
    for j, (name, precision, recall, ap) in enumerate(parsed):
        label = name if ap is None else f"{name} (AP {ap:.2f})"
        ax.plot(recall, precision, lw=1.5, color=colormaps["tab10"](j % 10), label=label, clip_on=False)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("recall", fontsize=_FONT + 1)
    ax.set_ylabel("precision", fontsize=_FONT + 1)
    ax.tick_params(labelsize=_FONT)
    ax.grid(True, lw=0.4, alpha=0.4)
    ax.legend(fontsize=_FONT, loc="lower left", framealpha=0.85)
    if title:
        ax.set_title(title, fontsize=_FONT_TITLE)
    return _save_figure(fig, path, dpi)


# ----------------------------------------------------------------------------------------------
# 4. reconstruction grid (training-time check, fast)
# ----------------------------------------------------------------------------------------------
def save_reconstruction_grid(
    path: PathLike,
    inputs: ArrayLike,
    reconstructions: ArrayLike,
    channel_names: Sequence[str] | None = None,
    max_items: int = 8,
    *,
    dpi: float = 100,
) -> Path:
    """Training-time check: input, reconstruction and ``|difference|`` per item and channel.

    Rows are items; for each channel three columns: input and reconstruction (gray, ``[-1, 1]``)
    and ``|input - reconstruction|`` (``magma``, ``0..1``). All panels are composed into one RGB
    mosaic shown by a single ``imshow``, which keeps it fast (well under a second for 8 items of
    4 channels 64x64).

    Args:
        path: output PNG path; parent folders are created.
        inputs: ``(N, C, H, W)`` inputs in ``[-1, 1]``.
        reconstructions: ``(N, C, H, W)`` reconstructions (e.g. the x0 predictions).
        channel_names: ``C`` channel names for the column headers; default ``"ch j"``.
        max_items: show only the first ``max_items`` items.
        dpi: resolution of the PNG.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: on inconsistent shapes or a wrong number of channel names.
    """
    x = _float(inputs, "inputs", 4, "(N, C, H, W)")
    y = _float(reconstructions, "reconstructions", 4, "(N, C, H, W)")
    _check_same_shape(x, "inputs", y, "reconstructions")
    n, c, h, w = x.shape
    if n == 0 or c == 0:
        raise ValueError(f"`inputs` must hold at least one item and one channel, got shape {tuple(x.shape)}")
    if channel_names is None:
        names = [f"ch {j}" for j in range(c)]
    else:
        if isinstance(channel_names, str):
            raise ValueError(f"`channel_names` must be a sequence of {c} strings, got a single string")
        names = [str(s) for s in channel_names]
        if len(names) != c:
            raise ValueError(f"`channel_names` must have {c} entries (one per channel), got {len(names)}")
    if int(max_items) < 1:
        raise ValueError(f"`max_items` must be >= 1, got {max_items}")
    n = min(n, int(max_items))
    x, y = x[:n], y[:n]

    gray, magma = colormaps["gray"], colormaps["magma"]
    diff = np.abs(x - y)
    # display orientation: rot90 over the (H, W) axes -> (N, C, W, H)
    x_rgb = gray(np.clip((np.rot90(x, axes=(2, 3)) + 1.0) / 2.0, 0.0, 1.0))[..., :3]
    y_rgb = gray(np.clip((np.rot90(y, axes=(2, 3)) + 1.0) / 2.0, 0.0, 1.0))[..., :3]
    d_rgb = magma(np.clip(np.rot90(diff, axes=(2, 3)), 0.0, 1.0))[..., :3]
    dh, dw = w, h  # displayed panel size
    sep = max(1, dh // 32)  # thin separator between panels
    csep = 3 * sep  # wider separator between channel groups
    ncol = 3 * c
    col_x = []
    xpos = 0
    for j in range(ncol):
        col_x.append(xpos)
        if j < ncol - 1:
            xpos += dw + (csep if j % 3 == 2 else sep)
        else:
            xpos += dw
    mosaic_w = xpos
    mosaic_h = n * dh + (n - 1) * sep
    mosaic = np.ones((mosaic_h, mosaic_w, 3), dtype=np.float32)
    for i in range(n):
        y0 = i * (dh + sep)
        for ch in range(c):
            for k, src in enumerate((x_rgb, y_rgb, d_rgb)):
                x0 = col_x[3 * ch + k]
                mosaic[y0 : y0 + dh, x0 : x0 + dw] = src[i, ch]

    panel_in = max(0.8, min(1.4, dw / 64.0))  # inches per panel width
    img_w = panel_in * mosaic_w / dw
    img_h = img_w * mosaic_h / mosaic_w
    left, right, top, bottom = 0.35, 0.05, 0.42, 0.05
    fig_w, fig_h = left + img_w + right, top + img_h + bottom
    fig = _new_figure(fig_w, fig_h, dpi)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, img_w / fig_w, img_h / fig_h))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    per_in = dw / panel_in  # mosaic pixels per inch (same on both axes)
    for ch in range(c):
        for k, sub in enumerate(("input", "recon", "|diff|")):
            xc = col_x[3 * ch + k] + dw / 2
            ax.text(xc, -0.04 * per_in, sub, ha="center", va="bottom", fontsize=_FONT_SMALL)
        xc = (col_x[3 * ch] + col_x[3 * ch + 2] + dw) / 2
        ax.text(xc, -0.2 * per_in, names[ch], ha="center", va="bottom", fontsize=_FONT, weight="bold")
    for i in range(n):
        ax.text(-0.06 * per_in, i * (dh + sep) + dh / 2, str(i), ha="right", va="center", fontsize=_FONT_SMALL)
    return _save_figure(fig, path, dpi, compress_level=1)


def save_sample_grid(
    path: PathLike,
    samples: ArrayLike,
    channel_names: Sequence[str] | None = None,
    max_items: int = 8,
    *,
    dpi: float = 100,
) -> Path:
    """Training-time check of generated slices: one row per sample, one gray ``[-1, 1]`` panel per channel.

    Args:
        path: output PNG path; parent folders are created.
        samples: ``(N, C, H, W)`` samples in ``[-1, 1]``.
        channel_names: ``C`` names for the column headers; default ``"ch j"``.
        max_items: show only the first ``max_items`` samples.
        dpi: resolution of the PNG.

    Raises:
        ValueError: on a wrong shape or number of channel names.
    """
    x = _float(samples, "samples", 4, "(N, C, H, W)")
    n, c, h, w = x.shape
    if n == 0 or c == 0:
        raise ValueError(f"`samples` must hold at least one item and one channel, got shape {tuple(x.shape)}")
    names = _labels(channel_names, c, "channel_names") or [f"ch {j}" for j in range(c)]
    if int(max_items) < 1:
        raise ValueError(f"`max_items` must be >= 1, got {max_items}")
    n = min(n, int(max_items))
    fig = _new_figure(0.3 + 1.2 * c, 0.35 + 1.2 * n, dpi)
    axes = fig.subplots(n, c, squeeze=False)
    for i in range(n):
        for j in range(c):
            _show_image(axes[i, j], np.clip(x[i, j], -1.0, 1.0))
            if i == 0:
                axes[i, j].set_title(names[j], fontsize=_FONT)
    return _save_figure(fig, path, dpi, compress_level=1)


# ----------------------------------------------------------------------------------------------
# 5. README demo figure
# ----------------------------------------------------------------------------------------------
def save_demo_figure(
    path: PathLike,
    image: ArrayLike,
    lesion: ArrayLike | None,
    anomaly_map: ArrayLike,
    mask: ArrayLike,
    title: str | None = None,
    *,
    lesion_label: str = "synthetic lesion",
    map_vmax: float | None = None,
    map_cmap: str = "inferno",
    dpi: float = 120,
) -> Path:
    """One row of four panels for the README: input, lesion, anomaly map, predicted mask.

    Args:
        path: output PNG path; parent folders are created.
        image: ``(H, W)`` input slice in ``[-1, 1]``.
        lesion: ``(H, W)`` binary ground-truth lesion drawn over the input, or None (panel shows
            the input only).
        anomaly_map: ``(H, W)`` anomaly map, shown from 0 to ``map_vmax`` with a colour bar.
        mask: ``(H, W)`` binary predicted mask drawn over the input.
        title: short figure title; default ``"AnoFPDM: anomaly map and mask"``.
        lesion_label: header of the lesion panel.
        map_vmax: upper limit of the map; default its 99.5th percentile.
        map_cmap: colormap of the map (``"inferno"`` or ``"hot"``).
        dpi: resolution of the PNG.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: on arrays that are not 2D or do not share one shape.
    """
    img = _float(image, "image", 2, "(H, W)")
    les = None
    if lesion is not None:
        les = _mask(lesion, "lesion", 2, "(H, W)")
        _check_same_shape(img, "image", les, "lesion")
    amap = _float(anomaly_map, "anomaly_map", 2, "(H, W)")
    _check_same_shape(img, "image", amap, "anomaly_map")
    pred = _mask(mask, "mask", 2, "(H, W)")
    _check_same_shape(img, "image", pred, "mask")
    map_cmap = _cmap_name(map_cmap, "map_cmap")

    h, w = img.shape
    scale = 2.4 / max(h, w)
    pw, ph = h * scale, w * scale  # displayed slices are (W, H): width h, height w
    gaps = [0.08, 0.08, 0.55]  # wider gap after the map for its colour bar
    left, top, bottom = 0.08, 0.62, 0.08
    fig_w = left + 4 * pw + sum(gaps) + 0.08
    fig_h = top + ph + bottom
    fig = _new_figure(fig_w, fig_h, dpi)
    axes = []
    x0 = left
    for j in range(4):
        axes.append(fig.add_axes((x0 / fig_w, bottom / fig_h, pw / fig_w, ph / fig_h)))
        x0 += pw + (gaps[j] if j < 3 else 0)

    _show_image(axes[0], img)
    axes[0].set_title("input", fontsize=_FONT + 1)
    _show_image(axes[1], img)
    if les is not None:
        _show_mask(axes[1], les, GT_COLOR)
    axes[1].set_title(lesion_label, fontsize=_FONT + 1)
    im = _show_map(axes[2], amap, map_vmax, map_cmap, annotate=False)
    axes[2].set_title("anomaly map", fontsize=_FONT + 1)
    cax = axes[2].inset_axes((1.03, 0.0, 0.05, 1.0))
    cbar = fig.colorbar(im, cax=cax)
    cbar.ax.tick_params(labelsize=_FONT_SMALL)
    cbar.formatter.set_powerlimits((-2, 3))
    cbar.ax.yaxis.get_offset_text().set_fontsize(_FONT_SMALL)
    _show_image(axes[3], img)
    _show_mask(axes[3], pred, PRED_COLOR)
    axes[3].set_title("predicted mask", fontsize=_FONT + 1)
    fig.suptitle(title or "AnoFPDM: anomaly map and mask", fontsize=_FONT_TITLE + 1, y=1 - 0.1 / fig_h, va="top")
    return _save_figure(fig, path, dpi)
