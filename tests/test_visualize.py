# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Tests of anofpdm_monai.visualize: valid PNGs, atomic writes, orientation, input checks."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from anofpdm_monai import visualize
from anofpdm_monai.visualize import (
    display_slice,
    robust_vmax,
    save_curves,
    save_demo_figure,
    save_overlay_grid,
    save_pr_curves,
    save_reconstruction_grid,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
H, W = 24, 32  # non-square on purpose: displayed panels are (W, H)
N, K, T, CM = 3, 3, 12, 2
STEPS = np.arange(0, 5 * T, 5)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _images(n: int = N) -> np.ndarray:
    rng = _rng()
    yy, xx = np.mgrid[0:H, 0:W]
    brain = ((yy - H / 2) / (0.4 * H)) ** 2 + ((xx - W / 2) / (0.4 * W)) ** 2 < 1
    return np.stack([np.where(brain, 0.2 * rng.standard_normal((H, W)), -1.0) for _ in range(n)]).astype(np.float32)


def _lesions(n: int = N) -> np.ndarray:
    les = np.zeros((n, H, W), dtype=bool)
    for i in range(n):
        les[i, 8 + i : 14 + i, 10:17] = True
    return les


def _maps(n: int = N) -> np.ndarray:
    return (_lesions(n) * 0.05 + 0.005 * _rng().random((n, H, W))).astype(np.float32)


def _curves(per_modality: bool) -> dict[str, Any]:
    t = STEPS / STEPS.max()
    base = np.stack([np.exp(-((t - 0.3 - 0.1 * k) ** 2) / 0.02) * 1e-3 for k in range(K)])
    div = np.stack([base, 0.8 * base], axis=-1) if per_modality else base
    t_end = STEPS[np.argmax(div, axis=1)]
    return {
        "steps": STEPS,
        "divergence": div,
        "mse_healthy": np.stack([0.1 * t**1.5] * K),
        "mse_reference": np.stack([0.09 * t**1.5] * K),
        "t_end": t_end,
    }


def _tensorize(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, dict):
        return {k: _tensorize(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_tensorize(v) for v in x)
    return x


# --- one call per function: (name, function, kwargs builder, expected width / height of the PNG) ---
def _overlay_kwargs() -> dict[str, Any]:
    maps = _maps()
    return {
        "images": _images(),
        "ground_truth": _lesions(),
        "rows": {"AnoFPDM": {"map": maps, "mask": maps > 0.02}, "baseline": {"map": maps * 2}},
        "titles": "examples",
        "row_labels": [f"case {i}, slice 80, Dice 0.7" for i in range(N)],
    }


def _curves_kwargs() -> dict[str, Any]:
    return {**_curves(per_modality=True), "titles": [f"slice {80 + k}" for k in range(K)]}


def _pr_kwargs() -> dict[str, Any]:
    recall = np.linspace(1.0, 0.0, 50)
    return {
        "curves": {"AnoFPDM": (1 - 0.5 * recall**3, recall, 0.72), "baseline": (1 - 0.6 * recall, recall)},
        "title": "PR",
    }


def _recon_kwargs() -> dict[str, Any]:
    x = np.stack([_images(4)] * 2, axis=1)  # (4, 2, H, W)
    return {"inputs": x, "reconstructions": x + 0.1, "channel_names": ["FLAIR", "T2"]}


def _demo_kwargs() -> dict[str, Any]:
    maps = _maps(1)
    return {
        "image": _images(1)[0],
        "lesion": _lesions(1)[0],
        "anomaly_map": maps[0],
        "mask": maps[0] > 0.02,
        "title": "demo",
    }


# overlay: 5 columns (input, gt, 2 + 1 method columns) of (W x H)-shaped panels over 3 rows
CASES: list[tuple[str, Callable[..., Path], Callable[[], dict[str, Any]], float]] = [
    ("overlay", save_overlay_grid, _overlay_kwargs, 5 * H / (N * W)),
    ("curves", save_curves, _curves_kwargs, 3 * 3.3 / 3.5),
    ("pr", save_pr_curves, _pr_kwargs, 1.0),
    ("recon", save_reconstruction_grid, _recon_kwargs, 6 * H / (4 * W)),
    ("demo", save_demo_figure, _demo_kwargs, 4 * H / W),
]
CASE_IDS = [c[0] for c in CASES]


def _check_png(path: Path, aspect: float | None = None) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 100
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert float(np.ptp(img[..., :3])) > 0.1, "figure is a single uniform colour"
    if aspect is not None:
        ratio = img.shape[1] / img.shape[0]
        assert aspect / 1.6 < ratio < aspect * 1.6, f"aspect {ratio:.2f}, expected about {aspect:.2f}"
    return img


@pytest.mark.parametrize("name,func,make_kwargs,aspect", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_writes_valid_png(tmp_path, name, func, make_kwargs, aspect, as_tensor):
    kwargs = make_kwargs()
    if as_tensor:
        kwargs = _tensorize(kwargs)
    out = tmp_path / "missing" / "sub" / f"{name}.png"
    result = func(out, **kwargs)
    assert isinstance(result, Path) and result == out
    _check_png(out, aspect)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "temporary files left behind"


@pytest.mark.parametrize("name,func,make_kwargs,aspect", CASES, ids=CASE_IDS)
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, name, func, make_kwargs, aspect):
    out = tmp_path / f"{name}.png"
    out.write_bytes(b"old")

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(visualize.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        func(str(out), **make_kwargs())
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_overwrites_existing_file(tmp_path):
    out = tmp_path / "demo.png"
    out.write_bytes(b"old")
    save_demo_figure(out, **_demo_kwargs())
    _check_png(out)


def test_concurrent_calls_from_threads(tmp_path):
    kwargs = _demo_kwargs()
    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda i: save_demo_figure(tmp_path / f"d{i}.png", **kwargs), range(3)))
    for p in paths:
        _check_png(p)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.png", "d1.png", "d2.png"]


def test_display_slice_puts_anterior_up():
    a = np.arange(6).reshape(2, 3)  # axis 0: left -> right (2), axis 1: posterior -> anterior (3)
    d = display_slice(a)
    assert d.shape == (3, 2)
    np.testing.assert_array_equal(d[0], a[:, -1])  # top row: last index of axis 1 (anterior)
    np.testing.assert_array_equal(d[-1], a[:, 0])  # bottom row: posterior
    np.testing.assert_array_equal(d[:, 0], a[0, ::-1])  # axis 0 runs left -> right across columns
    np.testing.assert_array_equal(display_slice(torch.from_numpy(a)), d)


def test_robust_vmax():
    m = np.zeros((10, 100), dtype=np.float32)
    m[0, :10] = 1.0
    m[0, 0] = 1000.0  # a single outlier does not set the scale
    assert robust_vmax(m) == pytest.approx(1.0)
    assert robust_vmax(np.zeros((4, 4))) == 1.0
    assert robust_vmax(np.full((4, 4), np.nan)) == 1.0


@pytest.mark.parametrize(
    "per_modality,t_end_per_modality,names",
    [(False, False, None), (True, False, None), (True, True, None), (True, True, ["FLAIR", "T2"])],
)
def test_curves_shapes(tmp_path, per_modality, t_end_per_modality, names):
    data = _curves(per_modality)
    if per_modality and not t_end_per_modality:
        data["t_end"] = data["t_end"][:, 0]
    out = save_curves(tmp_path / "c.png", **data, modality_names=names, max_panels=2)
    _check_png(out, 2 * 3.3 / 3.5)


def test_curves_without_t_end_and_titles(tmp_path):
    data = _curves(True)
    data["t_end"] = None
    _check_png(save_curves(tmp_path / "c.png", **data, suptitle="curves"))


def test_overlay_grid_variants(tmp_path):
    # no ground truth, column headers as a sequence, max_rows, hot colormap, fixed vmax
    maps = _maps()
    out = save_overlay_grid(
        tmp_path / "o.png",
        _images(),
        None,
        {"AnoFPDM": {"map": maps, "mask": maps > 0.02}},
        titles=["FLAIR", "H", "mask"],
        max_rows=1,
        map_vmax=0.05,
        map_cmap="hot",
    )
    _check_png(out, 3 * H / W)


def _overlay(**override: Any) -> Callable[[Path], Path]:
    def call(path: Path) -> Path:
        return save_overlay_grid(path, **{**_overlay_kwargs(), **override})

    return call


def _curves_call(**override: Any) -> Callable[[Path], Path]:
    def call(path: Path) -> Path:
        return save_curves(path, **{**_curves(True), **override})

    return call


BAD_INPUTS = [
    ("images_vs_ground_truth_n", _overlay(ground_truth=_lesions(N + 1)), "ground_truth"),
    ("images_1d", _overlay(images=np.zeros(5), ground_truth=None), "images"),
    ("method_map_shape", _overlay(rows={"m": {"map": _maps(N + 1)}}), "rows['m']['map']"),
    ("method_unknown_key", _overlay(rows={"m": {"masks": _lesions()}}), "rows['m']"),
    ("method_empty", _overlay(rows={"m": {}}), "rows['m']"),
    ("row_labels_count", _overlay(row_labels=["a"]), "row_labels"),
    ("column_titles_count", _overlay(titles=["a", "b"]), "titles"),
    ("curves_divergence_1d", _curves_call(divergence=np.zeros(T)), "divergence"),
    ("curves_divergence_t", _curves_call(divergence=np.zeros((K, T + 1))), "divergence"),
    ("curves_mse_shape", _curves_call(mse_healthy=np.zeros((K + 1, T))), "mse_healthy"),
    ("curves_t_end_index", _curves_call(t_end=np.array([1, 2, 3])), "t_end"),
    ("curves_t_end_shape", _curves_call(t_end=np.zeros((K, 3))), "t_end"),
    ("curves_names", _curves_call(modality_names=["FLAIR"]), "modality_names"),
    ("curves_titles", _curves_call(titles=["a"]), "titles"),
    ("pr_lengths", lambda p: save_pr_curves(p, {"m": (np.ones(3), np.ones(4))}), "curves['m']"),
    ("pr_empty", lambda p: save_pr_curves(p, {}), "curves"),
    ("pr_entry", lambda p: save_pr_curves(p, {"m": np.ones((2, 3))}), "curves['m']"),
    (
        "recon_shape",
        lambda p: save_reconstruction_grid(p, np.zeros((2, 1, 8, 8)), np.zeros((2, 1, 8, 9))),
        "reconstructions",
    ),
    ("recon_3d", lambda p: save_reconstruction_grid(p, np.zeros((2, 8, 8)), np.zeros((2, 8, 8))), "inputs"),
    (
        "recon_names",
        lambda p: save_reconstruction_grid(p, np.zeros((2, 2, 8, 8)), np.zeros((2, 2, 8, 8)), ["a"]),
        "channel_names",
    ),
    ("demo_3d_image", lambda p: save_demo_figure(p, **{**_demo_kwargs(), "image": _images(2)}), "image"),
    ("demo_mask_shape", lambda p: save_demo_figure(p, **{**_demo_kwargs(), "mask": np.zeros((H, W + 1))}), "mask"),
]


@pytest.mark.parametrize("call,argument", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_one_line_error(tmp_path, call, argument):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError) as info:
        call(out)
    message = str(info.value)
    assert "\n" not in message
    assert f"`{argument}" in message, message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
