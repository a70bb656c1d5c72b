# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Independent verification of the AnoFPDM core algorithm (docs/method.md §3-5).

An analytic mock network with a closed-form epsilon prediction drives both the streaming implementation
(``run_forward_process`` + ``AnoFPDMInferer.postprocess``) and a naive float64 numpy reference written here from the
design alone: it loops over slices and steps, stores every intermediate prediction, and only then reduces. The two
must agree for every option combination; further tests pin the schedule, the step grid, Algorithm 1, the
post-processing primitives, the call pattern (one batched call per step), the one-pass guidance sweep, the memory
contract of the streaming aggregation, and exact DDIM inversion with a perfect model.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.networks.schedulers import DDPMScheduler
from scipy import ndimage

from anofpdm_monai.inferers.anofpdm import AnoFPDMInferer, ForwardProcessResult, run_forward_process
from anofpdm_monai.inferers.noise import slice_noise_key
from anofpdm_monai.inferers.reconstruction import ddim_decode, ddim_encode, ddpm_decode
from anofpdm_monai.networks.unet import HEALTHY, NULL, UNHEALTHY
from anofpdm_monai.postprocessing import (
    batch_quantile,
    binarize_map,
    median_filter_2d,
    quantile_level,
    remove_small_components,
)
from anofpdm_monai.schedule import NoiseSchedule, make_step_grid

# --------------------------------------------------------------------------------------------------------------------
# The schedule, computed independently in numpy float64 (docs/method.md §3.1: T = 1000, linear betas 1e-4 .. 0.02)
# --------------------------------------------------------------------------------------------------------------------

T = 1000
BETAS_NP = np.linspace(1e-4, 0.02, T)
ABAR_NP = np.cumprod(1.0 - BETAS_NP)
SCHEDULE = NoiseSchedule()

B, C, SIZE = 3, 4, 32  # slices, model modalities, image side
GUIDANCE = [0.0, 1.0, 2.0, 5.0]
STRIDED_GRID = make_step_grid(t_max=599, stride=43)  # 0, 43, ..., 559 (14 steps)
EXPLICIT_GRID = [0, 2, 7, 19, 60, 130, 222, 333, 451, 520, 599]
CHANNEL_SUBSETS = [[0], [1, 3], [3, 0, 2]]
SEED = 1234
# float32 (implementation) vs float64 (reference): x0_h = (x_t - sqrt(1 - abar) e_g) / sqrt(abar) with
# e_g = (1 + w) e_h - w e_n carries an error of about (1 + 2w) / sqrt(abar_t) * 6e-8 * |e| ~ 2e-5 at t = 599, w = 5;
# S_t = (x0_h - x0)^2 per pixel roughly doubles it, the pixel means M_t and MSE average most of it out (but not
# under the absolute value of v1 where the true difference vanishes).
CURVE_TOL = {"rtol": 1e-5, "atol": 5e-6}
MAP_RTOL, MAP_ATOL = 3e-5, 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (10x here); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------------------------
# Analytic mock network
# --------------------------------------------------------------------------------------------------------------------


def _disk(cy: float, cx: float, r: float, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float64)


def _smooth_field(rng: np.random.Generator, shape: tuple, low: float, high: float) -> np.ndarray:
    x = rng.uniform(low, high, size=shape)
    return ndimage.uniform_filter(x, size=(1, 1, 3, 3))


def make_slices(seed: int = 0, shape: tuple = (B, C, SIZE, SIZE)) -> np.ndarray:
    """Float32-representable slices in [-1, 1] with a -1 background outside a disk-shaped "brain"."""
    rng = np.random.default_rng(seed)
    size = shape[-1]
    brain = _disk((size - 1) / 2, (size - 1) / 2, 0.44 * size, size)
    x = _smooth_field(rng, shape, -0.6, 0.8) * brain - (1.0 - brain)
    return np.clip(x, -1, 1).astype(np.float32).astype(np.float64)


def default_blobs(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """One textured disk per slice, a different amplitude per channel (the "anomaly" the healthy label removes)."""
    n, c, size, _ = shape
    disks = [_disk((0.3 + 0.17 * i) * size, (0.35 + 0.13 * i) * size, (0.16 + 0.02 * i) * size, size) for i in range(n)]
    amp = (0.3 + 0.4 * rng.uniform(size=c))[:, None, None]
    texture = rng.uniform(0.3, 1.0, size=shape)  # not all pixels saturate at once
    return np.stack([d[None] * amp for d in disks]) * texture


class AnalyticEpsNet(nn.Module):
    """Epsilon prediction in closed form; the sample index ``i`` of an input row is ``row % num_slices``.

    Modes (``sa = sqrt(abar_t)``, ``sb = sqrt(1 - abar_t)``):
        ``"affine"``: ``eps_y = (1 + a_y) (x_t - sa x0*_i) / sb + b_y cos(pi t / T) + c_y P
            + [y == healthy] (sa / sb) g_i(t) blob_i``: an imperfect model with different coefficients for the
            healthy and the null label, whose healthy prediction also removes a blob around a per-slice and
            per-channel noise level (``g_i(t) = exp(-((t - centre_ic) / width)^2)``, or 1 with ``bump=False``);
        ``"perfect"``: the same with ``a = b = c = 0``: the null prediction is the exact noise of ``x0*_i``
            (x0_n = x0*_i), and x0_h = x0*_i - (1 + w) g_i(t) blob_i before clipping;
        ``"plateau"``: saturated predictions, ``eps_n = -1e3 sign(P)`` and ``eps_h = +1e3 sign(P)`` for
            ``lo <= t <= hi`` (``eps_n`` elsewhere): clipped x0 predictions make M_t exactly tied on the plateau.

    Records, per call, the batch size, the labels, the timesteps, whether the two halves of the batch are equal and
    the first half of the input.
    """

    COEF = {
        "affine": {HEALTHY: (0.085, 0.01, 0.035), NULL: (0.08, -0.01, 0.04), UNHEALTHY: (0.3, 0.3, 0.3)},
        "perfect": {HEALTHY: (0.0, 0.0, 0.0), NULL: (0.0, 0.0, 0.0), UNHEALTHY: (0.0, 0.0, 0.0)},
    }

    def __init__(
        self,
        mode: str = "affine",
        x0_star: np.ndarray | None = None,
        blob: np.ndarray | None = None,
        bump: bool = True,
        plateau: tuple[int, int] = (100, 300),
        width: float = 110.0,
        seed: int = 7,
        probe: dict | None = None,
        shape: tuple = (B, C, SIZE, SIZE),
    ) -> None:
        super().__init__()
        shape = blob.shape if blob is not None else x0_star.shape if x0_star is not None else shape
        rng = np.random.default_rng(seed)
        self.mode = mode
        self.pattern = rng.uniform(-1, 1, size=shape[1:])
        self.sign = np.where(self.pattern >= 0, 1.0, -1.0)
        self.blob = default_blobs(rng, shape) if blob is None else blob
        self.x0_star = make_slices(seed + 1, shape) * 0.9 if x0_star is None else x0_star
        self.num_slices = shape[0]
        self.centres = 140.0 + 97.0 * np.arange(shape[0])[:, None] + 31.0 * np.arange(shape[1])[None, :]
        self.width = width
        self.bump = bump
        self.plateau = plateau
        self.probe = probe  # {"calls": set of call indices, "bytes": list} for the memory test
        self.calls: list[dict] = []

    def _bump(self, t: np.ndarray, index: np.ndarray) -> np.ndarray:
        """(N, C, 1, 1) exp(-((t - centre) / width)^2)."""
        if not self.bump:
            return np.ones((len(index), self.centres.shape[1], 1, 1))
        return np.exp(-(((t[:, None] - self.centres[index]) / self.width) ** 2))[..., None, None]

    def eps_numpy(self, x: np.ndarray, t: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
        """The closed form in float64: x (N, C, H, W), t, labels, index (N,)."""
        abar = ABAR_NP[t][:, None, None, None]
        sa, sb = np.sqrt(abar), np.sqrt(1.0 - abar)
        healthy = (labels == HEALTHY)[:, None, None, None]
        if self.mode == "plateau":
            on = ((t >= self.plateau[0]) & (t <= self.plateau[1]))[:, None, None, None]
            return np.where(healthy & on, 1e3, -1e3) * self.sign[None]
        coef = self.COEF[self.mode]
        a, b, c = (np.array([coef[int(y)][j] for y in labels])[:, None, None, None] for j in range(3))
        s = np.cos(np.pi * t / T)[:, None, None, None]
        exact = (x - sa * self.x0_star[index]) / sb
        return (
            (1.0 + a) * exact
            + b * s
            + c * self.pattern[None]
            + healthy * sa / sb * self._bump(t, index) * self.blob[index]
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.probe is not None and len(self.calls) in self.probe["calls"]:
            self.probe["bytes"].append(live_tensor_bytes())
        half = n // 2
        self.calls.append(
            {
                "batch": n,
                "labels": class_labels.tolist(),
                "t": sorted(set(timesteps.tolist())),
                "halves_equal": bool(n % 2 == 0 and torch.equal(x[:half], x[half:])),
                "x": x[:half].detach().clone() if self.probe is None else None,
            }
        )
        out = self.eps_numpy(
            x.detach().double().cpu().numpy(),
            timesteps.cpu().numpy().astype(np.int64),
            class_labels.cpu().numpy(),
            np.arange(n) % self.num_slices,
        )
        return torch.from_numpy(out).to(device=x.device, dtype=torch.float32)


class SplitCalls(nn.Module):
    """Calls the wrapped network once per label group instead of once for the whole batch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = x.shape[0] // 2
        top = self.inner(x[:h], timesteps=timesteps[:h], class_labels=class_labels[:h])
        bottom = self.inner(x[h:], timesteps=timesteps[h:], class_labels=class_labels[h:])
        return torch.cat([top, bottom])


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable by the garbage collector."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:  # type(): no __instancecheck__ side effects
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def forward_noises(forward: str, num_steps: int, seed: int = SEED) -> list[np.ndarray]:
    """The forward noise ``run_forward_process`` draws with one generator for the batch, seeded with ``seed``: one
    draw for DDIM, one per step for DDPM."""
    gen = torch.Generator().manual_seed(seed)
    n = num_steps if forward == "ddpm" else 1
    return [torch.randn((B, C, SIZE, SIZE), generator=gen).double().numpy() for _ in range(n)]


def reference_noise_key(seed: int, case: str, index: int) -> int:
    """The documented per-slice key, from hashlib directly: blake2b (8 bytes) of ``anofpdm-noise/v1|seed|case|index``,
    little endian, top bit cleared."""
    digest = hashlib.blake2b(f"anofpdm-noise/v1|{seed}|{case}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def positional_keys(seed: int = SEED, n: int = B) -> list[int]:
    """The keys of a batch without slice identities: positions 0 .. n-1 of the anonymous case ``""``."""
    return [reference_noise_key(seed, "", b) for b in range(n)]


def keyed_noises(forward: str, num_steps: int, keys: list[int], shape: tuple = (C, SIZE, SIZE)) -> list[np.ndarray]:
    """Per-slice forward noise: at draw k, slice b gets the k-th ``shape`` draw of a CPU generator seeded with key
    b (one draw for DDIM, one per step for DDPM); returned per draw as (B, ...) arrays."""
    n = num_steps if forward == "ddpm" else 1
    per_slice = []
    for key in keys:
        gen = torch.Generator().manual_seed(key)
        per_slice.append([torch.randn(shape, generator=gen).double().numpy() for _ in range(n)])
    return [np.stack([draws[k] for draws in per_slice]) for k in range(n)]


# --------------------------------------------------------------------------------------------------------------------
# Naive reference, from docs/method.md §3-5 only
# --------------------------------------------------------------------------------------------------------------------


def naive_idx(ratio: float) -> int:
    """Algorithm 1 index: round-half-to-even of 100 clamp(ratio, 0, 1), in float64."""
    return int(round(100.0 * min(max(ratio, 0.0), 1.0)))


def naive_median5(img: np.ndarray, k: int = 5) -> np.ndarray:
    """k x k median with replicate ('nearest') padding, by explicit windows."""
    r = k // 2
    p = np.pad(img, r, mode="edge")
    out = np.empty_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            out[i, j] = np.median(p[i : i + k, j : j + k])
    return out


def naive_components(mask: np.ndarray, max_size: int = 40) -> np.ndarray:
    """Remove 8-connected components of <= max_size pixels by flood fill."""
    keep = np.zeros_like(mask, dtype=bool)
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    for si in range(h):
        for sj in range(w):
            if not mask[si, sj] or seen[si, sj]:
                continue
            stack, comp = [(si, sj)], []
            seen[si, sj] = True
            while stack:
                i, j = stack.pop()
                comp.append((i, j))
                for di, dj in itertools.product((-1, 0, 1), repeat=2):
                    ni, nj = i + di, j + dj
                    if 0 <= ni < h and 0 <= nj < w and mask[ni, nj] and not seen[ni, nj]:
                        seen[ni, nj] = True
                        stack.append((ni, nj))
            if len(comp) > max_size:
                for i, j in comp:
                    keep[i, j] = True
    return keep


def scipy_median5(img: np.ndarray) -> np.ndarray:
    """The same median as ``naive_median5`` (checked in test_median_filter_equals_scipy), fast enough for the loop."""
    return ndimage.median_filter(img, size=5, mode="nearest")


def scipy_components(mask: np.ndarray, max_size: int = 40) -> np.ndarray:
    """The same filter as ``naive_components`` (checked in test_remove_small_components), one 2D slice at a time."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())
    return (sizes > max_size)[labels] & mask


def naive_trajectory(
    net: AnalyticEpsNet,
    x0: np.ndarray,
    noises: list[np.ndarray],
    grid: list[int],
    w: float,
    forward: str,
    reference: str,
    clip: bool,
) -> dict[str, np.ndarray]:
    """Loop over slices and steps; store x_t, x0_h, x0_ref of every step: arrays (B, K, C, H, W)."""
    cl = (lambda v: np.clip(v, -1.0, 1.0)) if clip else (lambda v: v)
    store = {"x_t": [], "x0_h": [], "x0_ref": []}
    for b in range(x0.shape[0]):
        rows = {key: [] for key in store}
        prev = None
        for k, t in enumerate(grid):
            sa, sb = np.sqrt(ABAR_NP[t]), np.sqrt(1.0 - ABAR_NP[t])
            if forward == "ddpm":
                x_t = sa * x0[b] + sb * noises[k][b]
            elif k == 0:
                x_t = sa * x0[b] + sb * noises[0][b]
            else:  # DDIM forward: clipped x0 of the null prediction at the previous step, and that prediction
                x_t = sa * prev[0] + sb * prev[1]

            def eps(label: int, x_t=x_t, t=t, b=b) -> np.ndarray:
                return net.eps_numpy(x_t[None], np.array([t]), np.array([label]), np.array([b]))[0]

            e_h, e_n = eps(HEALTHY), eps(NULL)
            e_g = (1.0 + w) * e_h - w * e_n
            x0_g = cl((x_t - sb * e_g) / sa)
            x0_n = cl((x_t - sb * e_n) / sa)
            x0_h0 = cl((x_t - sb * e_h) / sa)
            prev = (x0_n, e_n)
            rows["x_t"].append(x_t)
            rows["x0_h"].append(x0_g)
            rows["x0_ref"].append(x0_n if reference == "null" else x0_h0)
        for key in store:
            store[key].append(np.stack(rows[key]))
    return {key: np.stack(v) for key, v in store.items()}


def naive_statistics(traj: dict, x0: np.ndarray, channels: list[int], divergence: str) -> dict[str, np.ndarray]:
    """Curves and end steps of the stored trajectory."""
    xm = x0[:, None, channels]  # (B, 1, Cm, H, W)
    x0_h, x0_ref = traj["x0_h"][:, :, channels], traj["x0_ref"][:, :, channels]
    s_t = (x0_h - xm) ** 2  # (B, K, Cm, H, W)
    s_ref = (x0_ref - xm) ** 2
    diff = (x0_h - x0_ref) ** 2 if divergence == "v2" else np.abs(s_t - s_ref)
    m_t = diff.mean(axis=(-2, -1))
    mse_h, mse_r = s_t.mean(axis=(2, 3, 4)), s_ref.mean(axis=(2, 3, 4))
    cos = (mse_h * mse_r).sum(1) / (np.linalg.norm(mse_h, axis=1) * np.linalg.norm(mse_r, axis=1))
    return {
        "S": s_t,
        "M": m_t,
        "mse_h": mse_h,
        "mse_r": mse_r,
        "cos": cos,
        "te": m_t.argmax(axis=1),  # numpy: first maximum
        "te_joint": m_t.mean(axis=2).argmax(axis=1),
    }


def naive_maps(stats: dict, end_step: str, aggregation: str) -> np.ndarray:
    """(B, Cm, H, W) per-modality anomaly maps H_m."""
    s_t = stats["S"]
    n_b, _, n_m = s_t.shape[:3]
    out = np.zeros((n_b, n_m) + s_t.shape[3:])
    for b in range(n_b):
        for m in range(n_m):
            te = stats["te"][b, m] if end_step == "per_modality" else stats["te_joint"][b]
            out[b, m] = s_t[b, te, m] if aggregation == "last" else s_t[b, : te + 1, m].mean(axis=0)
    return out


def naive_divergence_max(stats: dict, end_step: str) -> np.ndarray:
    if end_step == "per_modality":
        return stats["M"].max(axis=1)
    return stats["M"].mean(axis=2).max(axis=1)[:, None]


def naive_postprocess(
    stats: dict, end_step: str, aggregation: str, m_max: np.ndarray, tau: float | None, a: float = 0.9, b: float = 0.98
) -> dict[str, np.ndarray]:
    maps_m = naive_maps(stats, end_step, aggregation)
    h = maps_m.mean(axis=1)
    m = naive_divergence_max(stats, end_step)
    idx = np.array([[naive_idx(float(m[i, j] / m_max[j])) for j in range(m.shape[1])] for i in range(m.shape[0])])
    q = b - idx * (b - a) / 100.0
    if end_step == "per_modality":
        thr = np.array(
            [np.mean([np.quantile(maps_m[i, j], q[i, j]) for j in range(m.shape[1])]) for i in range(len(h))]
        )
    else:
        thr = np.array([np.quantile(h[i], q[i, 0]) for i in range(len(h))])
    filtered = np.stack([scipy_median5(hi) for hi in h])
    ungated = np.stack([scipy_components(filtered[i] >= thr[i]) for i in range(len(h))])
    pred = np.ones(len(h), dtype=int) if tau is None else (stats["cos"] <= tau).astype(int)
    return {
        "maps_m": maps_m,
        "H": h,
        "M": m,
        "idx": idx,
        "q": q,
        "thr": thr,
        "filtered": filtered,
        "ungated": ungated,
        "mask": ungated & pred[:, None, None].astype(bool),
        "pred": pred,
    }


def _safe_m_max(m: np.ndarray) -> np.ndarray:
    """M_max per column such that the largest slice is clamped (ratio > 1) and no ratio sits within 1e-3 of a rounding
    boundary of Algorithm 1 (so float32 vs float64 cannot flip an index); 1 where M is identically 0."""
    top = m.max(axis=0)
    m_max = np.where(top > 0, 0.7 * top, 1.0)
    for _ in range(200):
        r = 100.0 * np.minimum(m / m_max, 1.0)
        frac = np.abs(r - np.floor(r) - 0.5)
        if np.all((r >= 100.0) | (frac > 1e-3)):
            return m_max
        m_max = m_max * 1.0007
    raise AssertionError("could not find a safe M_max")


def _safe_tau(cos: np.ndarray) -> float:
    """A tau in the widest gap between the slices' cosines: some slices gated, some not."""
    c = np.sort(cos)
    k = int(np.argmax(np.diff(c)))
    if c[k + 1] - c[k] > 1e-5:
        return float(0.5 * (c[k] + c[k + 1]))
    return float(c[0] - 1e-3)  # identical curves (w = 0, healthy reference): c = 1 for all, all gated


def _check_tie_margins(stats: dict, m_code: np.ndarray, label: str) -> None:
    """Sanity of the test data: the top two values of every M_t curve of the reference are further apart than twice
    the actual float32-vs-float64 error of that curve, so the argmax is decided by the data, not by rounding (a curve
    that is exactly zero, e.g. w = 0 with the healthy reference, is an exact tie in any precision and is allowed)."""
    m_ref = stats["M"]
    for b in range(m_ref.shape[0]):
        pairs = [(m_ref[b, :, j], m_code[b, :, j]) for j in range(m_ref.shape[2])]
        pairs.append((m_ref[b].mean(axis=1), m_code[b].mean(axis=1)))
        for c, c_code in pairs:
            if not c.any():
                assert not c_code.any(), label
                continue
            top = np.sort(c)[::-1]
            err = np.abs(c - c_code).max()
            assert top[0] - top[1] > 2 * err, f"{label}: near-tie in M_t {top[:2]} with float32 error {err}"


def _masks_decidable(ref: dict, filtered_code: np.ndarray, thr_code: np.ndarray) -> bool:
    """True when no pixel can change side of the threshold between the float64 reference and the float32
    implementation: |f - thr| (reference) exceeds the actual errors of the filtered map and of the threshold."""
    thr = ref["thr"][:, None, None]
    err = np.abs(filtered_code - ref["filtered"]) + np.abs(thr_code - ref["thr"])[:, None, None]
    return bool(((np.abs(ref["filtered"] - thr) > 2 * err) | (err == 0)).all())


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


# --------------------------------------------------------------------------------------------------------------------
# Streaming implementation == naive reference, for every option combination
# --------------------------------------------------------------------------------------------------------------------

TEST_CASES_STREAMING = [
    (forward, reference, divergence, mode, True)
    for forward, reference, divergence, mode in itertools.product(
        ("ddim", "ddpm"), ("null", "healthy"), ("v2", "v1"), ("affine", "perfect")
    )
] + [("ddim", "null", "v2", "affine", False), ("ddpm", "healthy", "v1", "perfect", False)]


def _net(mode: str, x0: np.ndarray) -> AnalyticEpsNet:
    star = np.clip(0.85 * x0 + 0.1 * np.sin(3.0 * x0 + 1.0), -1, 1)  # a "model error" so that MSE_ref > 0
    return AnalyticEpsNet(mode, x0_star=star)


@pytest.mark.parametrize("forward, reference, divergence, mode, clip", TEST_CASES_STREAMING)
def test_streaming_equals_naive(forward, reference, divergence, mode, clip):
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    case = TEST_CASES_STREAMING.index((forward, reference, divergence, mode, clip))
    counts = {"strict_masks": 0, "fallback_masks": 0, "nonempty_masks": 0, "gated": 0, "kept": 0, "interior_te": 0}
    for g, grid in enumerate((STRIDED_GRID, EXPLICIT_GRID)):
        channels = CHANNEL_SUBSETS[(case + g) % len(CHANNEL_SUBSETS)]
        net = _net(mode, x0_np)
        result = run_forward_process(
            net,
            x0,
            SCHEDULE,
            grid,
            GUIDANCE,
            channels,
            forward=forward,
            reference=reference,
            divergence=divergence,
            clip=clip,
            generator=torch.Generator().manual_seed(SEED),
        )
        noises = forward_noises(forward, len(grid))
        for wi, w in enumerate(GUIDANCE):
            label = f"{forward}/{reference}/{divergence}/{mode}/clip={clip}/grid{g}/w={w}/ch={channels}"
            traj = naive_trajectory(net, x0_np, noises, grid, w, forward, reference, clip)
            st = naive_statistics(traj, x0_np, channels, divergence)
            tol = {**CURVE_TOL, "err_msg": label}
            np.testing.assert_allclose(_np(result.divergence[wi]), st["M"], **tol)
            np.testing.assert_allclose(_np(result.mse_guided[wi]), st["mse_h"], **tol)
            np.testing.assert_allclose(_np(result.mse_reference), st["mse_r"], **tol)
            np.testing.assert_allclose(_np(result.cosine()[wi]), st["cos"], **tol)
            _check_tie_margins(st, _np(result.divergence[wi]), label)
            np.testing.assert_array_equal(result.end_index[wi].numpy(), st["te"], err_msg=label)
            np.testing.assert_array_equal(result.end_index_joint[wi].numpy(), st["te_joint"], err_msg=label)
            counts["interior_te"] += int(((st["te"] > 0) & (st["te"] < len(grid) - 1)).sum())
            for end_step, aggregation in itertools.product(("per_modality", "joint"), ("mean", "last")):
                lab = f"{label}/{end_step}/{aggregation}"
                m_max = _safe_m_max(naive_divergence_max(st, end_step))
                tau = _safe_tau(st["cos"])
                ref = naive_postprocess(st, end_step, aggregation, m_max, tau)
                inferer = AnoFPDMInferer(
                    guidance_scale=w,
                    map_channels=channels,
                    timesteps=grid,
                    forward=forward,
                    reference=reference,
                    divergence=divergence,
                    end_step=end_step,
                    aggregation=aggregation,
                    m_max=m_max.tolist(),
                    tau=tau,
                    clip=clip,
                    seed=SEED,
                    health_score="cosine",  # the naive reference classifies by the papers' cosine
                )
                out = inferer.postprocess(result, w_index=wi)
                tol = {"rtol": MAP_RTOL, "atol": MAP_ATOL, "err_msg": lab}
                np.testing.assert_allclose(_np(result.anomaly_maps(end_step, aggregation)[wi]), ref["maps_m"], **tol)
                np.testing.assert_allclose(_np(out.anomaly_map), ref["H"], **tol)
                np.testing.assert_allclose(_np(out.filtered_map), ref["filtered"], **tol)
                np.testing.assert_allclose(_np(out.threshold), ref["thr"], **tol)
                np.testing.assert_allclose(_np(result.divergence_max(end_step)[wi]), ref["M"], **CURVE_TOL)
                np.testing.assert_allclose(_np(out.quantile), 0.98 - ref["idx"] * 0.0008, rtol=0, atol=1e-12)
                np.testing.assert_array_equal(out.pred_label.numpy(), ref["pred"], err_msg=lab)
                te_ref = st["te"] if end_step == "per_modality" else st["te_joint"][:, None]
                np.testing.assert_array_equal(out.end_step.numpy(), np.asarray(grid)[te_ref], err_msg=lab)
                if _masks_decidable(ref, _np(out.filtered_map), _np(out.threshold)):  # the float64 masks, exactly
                    counts["strict_masks"] += 1
                    np.testing.assert_array_equal(out.mask_ungated.numpy(), ref["ungated"], err_msg=lab)
                    np.testing.assert_array_equal(out.mask.numpy(), ref["mask"], err_msg=lab)
                else:  # a pixel within float32 noise of the threshold: binarise the implementation's own values
                    counts["fallback_masks"] += 1
                    filt, thr = _np(out.filtered_map), _np(out.threshold)
                    own = np.stack([scipy_components(filt[i] >= thr[i]) for i in range(B)])
                    np.testing.assert_array_equal(out.mask_ungated.numpy(), own, err_msg=lab)
                    np.testing.assert_array_equal(out.mask.numpy(), own & ref["pred"][:, None, None].astype(bool))
                counts["nonempty_masks"] += int(out.mask_ungated.flatten(1).any(1).sum())
                counts["gated"] += int((ref["pred"] == 0).sum())
                counts["kept"] += int((ref["pred"] == 1).sum())
                assert out.guidance_scale == pytest.approx(w)
                assert out.mask.shape == out.anomaly_map.shape == (B, SIZE, SIZE)
        # the full __call__ (one w; the noise of slice b from the key of (SEED, "", b)) reproduces the numbers of a
        # run with one generator per slice seeded with those keys
        keyed = run_forward_process(
            net,
            x0,
            SCHEDULE,
            grid,
            GUIDANCE,
            channels,
            forward=forward,
            reference=reference,
            divergence=divergence,
            clip=clip,
            generator=[torch.Generator().manual_seed(k) for k in positional_keys()],
        )
        inferer = AnoFPDMInferer(
            guidance_scale=GUIDANCE[2],
            map_channels=channels,
            timesteps=grid,
            forward=forward,
            reference=reference,
            divergence=divergence,
            m_max=_safe_m_max(_np(result.divergence_max()[2])).tolist(),
            clip=clip,
            seed=SEED,
        )
        called = inferer(x0, net)
        again = inferer.postprocess(keyed, w_index=2)
        for name in ("anomaly_map", "threshold", "divergence", "mse_guided", "mse_reference", "cosine", "end_step"):
            torch.testing.assert_close(getattr(called, name), getattr(again, name), rtol=1e-6, atol=1e-7)
        assert torch.equal(called.mask, again.mask)
        assert torch.equal(called.pred_label, torch.ones(B, dtype=torch.long))  # tau None: all unhealthy
    # the comparison is not vacuous: most masks compared exactly, both gating outcomes, and with clipping (without it
    # the x0 predictions at large t explode and dominate everything) non-empty masks and interior end steps
    assert counts["strict_masks"] >= 3 * counts["fallback_masks"], counts
    assert counts["gated"] > 0 and counts["kept"] > 0, counts
    if clip:
        assert counts["nonempty_masks"] > 0 and counts["interior_te"] > 0, counts


@pytest.mark.parametrize("forward", ["ddim", "ddpm"])
def test_healthy_baseline_divides_m_t_before_the_end_step(forward):
    """``divergence_baseline="healthy"``: M_t / b_t (b a given positive (K, Cm) curve) replaces M_t everywhere: t_e is
    its first argmax, the map averages S_t up to that t_e, M = max_t M_t / b_t feeds Algorithm 1 (naive float64
    reference on the stored trajectory)."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid, channels, w = STRIDED_GRID, [0, 2], 2.0
    net = _net("affine", x0_np)
    noises = keyed_noises(forward, len(grid), positional_keys())  # what the inferer draws without noise_keys
    traj = naive_trajectory(net, x0_np, noises, grid, w, forward, "null", True)
    raw = naive_statistics(traj, x0_np, channels, "v2")
    # a baseline that grows with t like the slices' own M_t, perturbed per step so that the ratio's argmax moves
    factor = np.random.default_rng(3).uniform(0.5, 1.5, size=(len(grid), len(channels)))
    curve = raw["M"].mean(axis=0) * factor
    rel = dict(raw, M=raw["M"] / curve)
    rel["te"], rel["te_joint"] = rel["M"].argmax(axis=1), rel["M"].mean(axis=2).argmax(axis=1)
    assert (rel["te"] != raw["te"]).any(), "the baseline must move some end steps (the test would be vacuous)"
    m_max = _safe_m_max(naive_divergence_max(rel, "per_modality"))
    ref = naive_postprocess(rel, "per_modality", "mean", m_max, None)
    options = dict(guidance_scale=w, map_channels=channels, timesteps=grid, forward=forward, seed=SEED)
    inferer = AnoFPDMInferer(divergence_baseline="healthy", baseline_curve=curve, m_max=m_max.tolist(), **options)
    result = inferer.run(x0, net)
    _check_tie_margins(rel, _np(result.divergence[0]), forward)
    out = inferer.postprocess(result)
    np.testing.assert_allclose(_np(out.divergence), rel["M"], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(out.end_step.numpy(), np.asarray(grid)[rel["te"]])
    np.testing.assert_allclose(_np(out.anomaly_map), ref["H"], rtol=MAP_RTOL, atol=MAP_ATOL)
    np.testing.assert_allclose(_np(out.threshold), ref["thr"], rtol=MAP_RTOL, atol=MAP_ATOL)
    np.testing.assert_allclose(_np(result.divergence_max()[0]), ref["M"], rtol=2e-5, atol=1e-6)
    # the calibration pass asks for the raw curves; without the curve the setting is refused
    raw_run = inferer.forward_process(x0, net, relative=False)
    np.testing.assert_allclose(_np(raw_run.divergence[0]), raw["M"], **CURVE_TOL)
    with pytest.raises(ValueError, match="needs the calibrated baseline_curve"):
        AnoFPDMInferer(divergence_baseline="healthy", m_max=m_max.tolist(), **options)(x0, net)
    with pytest.raises(ValueError, match="baseline_curve must be"):
        AnoFPDMInferer(divergence_baseline="healthy", baseline_curve=curve[1:], **options)


@pytest.mark.parametrize("forward", ["ddim", "ddpm"])
def test_per_slice_noise_keys_equal_naive(forward):
    """Given noise keys of (seed, case, slice), slice b's forward noise is the stream of a generator seeded with its
    key (the hashlib formula of the docs, re-derived here), and the statistics are the naive reference's on that
    noise; without keys the positions 0 .. B-1 of the anonymous case are the keys."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid, channels, w = STRIDED_GRID, [1, 3], 2.0
    net = _net("affine", x0_np)
    inferer = AnoFPDMInferer(guidance_scale=w, map_channels=channels, timesteps=grid, forward=forward, seed=SEED)
    slices = [40, 12, 33]
    keys = inferer.noise_keys("BraTS2021_00006", slices)
    assert keys == [reference_noise_key(SEED, "BraTS2021_00006", i) for i in slices]
    assert inferer.noise_keys(["a", "b", "a"], [1, 1, 2]) == [
        reference_noise_key(SEED, c, i) for c, i in ("a1", "b1", "a2")
    ]
    assert slice_noise_key(SEED, None, 5) == reference_noise_key(SEED, "", 5) == positional_keys(n=6)[5]
    assert len(set(keys)) == 3 and all(0 <= k < 2**63 for k in keys)
    result = inferer.run(x0, net, noise_keys=keys)
    st = naive_statistics(
        naive_trajectory(net, x0_np, keyed_noises(forward, len(grid), keys), grid, w, forward, "null", True),
        x0_np,
        channels,
        "v2",
    )
    np.testing.assert_allclose(_np(result.divergence[0]), st["M"], **CURVE_TOL)
    np.testing.assert_allclose(_np(result.mse_guided[0]), st["mse_h"], **CURVE_TOL)
    np.testing.assert_allclose(_np(result.mse_reference), st["mse_r"], **CURVE_TOL)
    _check_tie_margins(st, _np(result.divergence[0]), forward)
    np.testing.assert_array_equal(result.end_index[0].numpy(), st["te"])
    # the keys matter: another case (or seed) draws other noise; the step-0 noise is small, so compare the inputs
    # the network saw at the first step
    first = net.calls[0]["x"]
    AnoFPDMInferer(map_channels=channels, timesteps=grid, forward=forward, seed=SEED).run(
        x0, net, noise_keys=inferer.noise_keys("another case", slices)
    )
    assert not torch.equal(net.calls[len(grid)]["x"], first)
    with pytest.raises(ValueError, match="noise_keys has 2 keys for a batch of 3"):
        inferer.run(x0, net, noise_keys=keys[:2])


def test_first_maximum_and_inclusive_end_step():
    """Exact ties of M_t (saturated predictions on a plateau of steps): t_e is the FIRST maximum, and the mean map
    includes t_e itself (also when t_e is the first grid step, where the official code gives NaN)."""
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    grid = [0, 50, 100, 150, 200, 250, 300, 350, 400]
    for plateau, expected in (((100, 300), 2), ((0, 300), 0), ((0, 0), 0)):
        for divergence in ("v2", "v1"):
            net = AnalyticEpsNet("plateau", plateau=plateau)
            res = run_forward_process(net, x0, SCHEDULE, grid, [0.0, 3.0], [0, 2], "ddpm", divergence=divergence)
            m = res.divergence
            on = [k for k, t in enumerate(grid) if plateau[0] <= t <= plateau[1]]
            assert torch.all(m[:, :, on] == m[:, :, on[:1]]), "the plateau must be an exact tie"
            assert torch.all(res.end_index == expected) and torch.all(res.end_index_joint == expected)
            maps = res.anomaly_maps("per_modality", "mean")
            assert torch.isfinite(maps).all()
            if expected == 0:  # first step on the plateau: H = S_{t_0}, not NaN
                sq = (-torch.from_numpy(net.sign[[0, 2]]).float() - x0[:, [0, 2]]) ** 2
                torch.testing.assert_close(maps[0], sq)
                torch.testing.assert_close(res.anomaly_maps("joint", "last")[1], sq)
            if divergence == "v2":  # saturated x0_h = -sign(P), x0_n = sign(P): M_t = 4 on the plateau
                assert torch.all(m[:, :, on] == 4.0)


def test_healthy_removes_blob_end_to_end():
    """A perfect null model up to a small pixel error, and a healthy prediction that removes a disk: with w = 0,
    S_t = (x0* - blob - x0)^2 at every step, so H is the disk squared (plus the small error), and the mask of a
    64 x 64 map thresholded at a quantile >= 0.9 (the disk covers 1.5% of the pixels) is the median-filtered disk."""
    n, c, size = 2, 2, 64
    rng = np.random.default_rng(5)
    x0_np = make_slices(3, (n, c, size, size))
    star = np.clip(x0_np + 0.02 * rng.standard_normal(x0_np.shape), -1, 1)
    disk = _disk(20.0, 37.0, 4.4, size)
    assert 55 <= disk.sum() <= 65
    blob = 0.6 * disk[None, None] * np.ones((n, c, 1, 1))
    net = AnalyticEpsNet("perfect", x0_star=star, blob=blob, bump=False)
    inferer = AnoFPDMInferer(
        guidance_scale=0.0, map_channels=(0, 1), t_max=300, stride=50, m_max=[1.0, 1.0], clip=False, seed=0
    )
    out = inferer(torch.from_numpy(x0_np).float(), net)
    expected_h = ((star - blob - x0_np) ** 2).mean(axis=1)
    np.testing.assert_allclose(_np(out.anomaly_map), expected_h, rtol=1e-5, atol=1e-6)
    core = naive_median5(disk) > 0.5  # the disk after the 5 x 5 median
    for b in range(n):
        mask = out.mask[b].numpy()
        assert core.sum() > 40 and mask[core].all()
        assert not mask[~ndimage.binary_dilation(disk > 0)].any()


# --------------------------------------------------------------------------------------------------------------------
# Streaming memory, call pattern, one-pass guidance sweep
# --------------------------------------------------------------------------------------------------------------------


def test_memory_does_not_grow_with_steps():
    x0 = torch.from_numpy(make_slices()).float()
    ws, channels = [0.0, 2.0], [0, 3]
    peaks, results = {}, {}
    for num_steps in (10, 100):
        probe = {"calls": {1, num_steps // 2, num_steps - 1}, "bytes": []}
        net = AnalyticEpsNet("affine", probe=probe)
        gc.collect()
        res = run_forward_process(
            net, x0, SCHEDULE, list(range(num_steps)), ws, channels, "ddim", generator=torch.Generator().manual_seed(0)
        )
        results[num_steps] = {f: tuple(getattr(res, f).shape) for f in ForwardProcessResult.__dataclass_fields__}
        del res  # keep no tensors of the first run alive while probing the second
        # the live tensors at every step after the first are exactly the same size: nothing accumulates per step
        assert len(set(probe["bytes"])) == 1, probe["bytes"]
        peaks[num_steps] = probe["bytes"][0]
    # between K = 10 and K = 100 only the (K,) curves grow: divergence (W,B,K,Cm), mse_guided (W,B,K), mse_ref (B,K)
    w_, cm = len(ws), len(channels)
    assert peaks[100] - peaks[10] == 4 * 90 * (w_ * B * cm + w_ * B + B)
    for name in ("end_index", "end_index_joint", "map_sum", "map_last", "map_sum_joint", "map_last_joint"):
        assert results[10][name] == results[100][name], name
    assert results[100]["divergence"] == (w_, B, 100, cm) and results[100]["mse_reference"] == (B, 100)


@pytest.mark.parametrize("forward", ["ddim", "ddpm"])
def test_one_batched_call_per_step(forward):
    x0 = torch.from_numpy(make_slices()).float()
    grid = EXPLICIT_GRID
    net = AnalyticEpsNet("affine")
    res = run_forward_process(
        net, x0, SCHEDULE, grid, GUIDANCE, [0, 1], forward, generator=torch.Generator().manual_seed(3)
    )
    # exactly one network call per grid step, on a 2B batch [healthy] * B + [null] * B of the same x_t: the DDIM
    # inversion reuses the null prediction and costs no extra call
    assert len(net.calls) == len(grid)
    for call, t in zip(net.calls, grid):
        assert call["batch"] == 2 * B
        assert call["labels"] == [HEALTHY] * B + [NULL] * B
        assert call["t"] == [t]
        assert call["halves_equal"]
    # the batched call equals two separate calls
    split = SplitCalls(AnalyticEpsNet("affine"))
    res_split = run_forward_process(
        split, x0, SCHEDULE, grid, GUIDANCE, [0, 1], forward, generator=torch.Generator().manual_seed(3)
    )
    assert len(split.inner.calls) == 2 * len(grid)
    for name in ("divergence", "mse_guided", "mse_reference", "end_index", "end_index_joint", "map_sum", "map_last"):
        torch.testing.assert_close(getattr(res, name), getattr(res_split, name), rtol=0, atol=0)


@pytest.mark.parametrize("forward, reference, divergence", [("ddim", "null", "v2"), ("ddpm", "healthy", "v1")])
def test_guidance_sweep_equals_separate_runs(forward, reference, divergence):
    x0 = torch.from_numpy(make_slices()).float()
    kwargs = {"forward": forward, "reference": reference, "divergence": divergence}
    gen = torch.Generator().manual_seed(5)
    sweep = run_forward_process(
        AnalyticEpsNet("affine"), x0, SCHEDULE, STRIDED_GRID, GUIDANCE, [3, 1], **kwargs, generator=gen
    )
    assert sweep.divergence.shape == (len(GUIDANCE), B, len(STRIDED_GRID), 2)
    for wi, w in enumerate(GUIDANCE):
        gen = torch.Generator().manual_seed(5)
        single = run_forward_process(
            AnalyticEpsNet("affine"), x0, SCHEDULE, STRIDED_GRID, [w], [3, 1], **kwargs, generator=gen
        )
        sel = sweep.select(wi)
        for f in ForwardProcessResult.__dataclass_fields__:
            torch.testing.assert_close(getattr(sel, f), getattr(single, f), rtol=1e-6, atol=1e-7, msg=f"{f} w={w}")


# --------------------------------------------------------------------------------------------------------------------
# Perfect model: DDIM inversion is exact
# --------------------------------------------------------------------------------------------------------------------


def test_ddim_forward_with_perfect_model_stays_on_q_sample():
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    blob = np.zeros((B, C, SIZE, SIZE))
    net = AnalyticEpsNet("perfect", x0_star=x0_np, blob=blob)
    grid = [0, 5, 40, 41, 200, 399, 600, 999]
    res = run_forward_process(
        net, x0, SCHEDULE, grid, [2.0], [0, 1, 2, 3], "ddim", generator=torch.Generator().manual_seed(9)
    )
    noise0 = forward_noises("ddim", 1, seed=9)[0]
    for call, t in zip(net.calls, grid):
        expected = np.sqrt(ABAR_NP[t]) * x0_np + np.sqrt(1.0 - ABAR_NP[t]) * noise0
        np.testing.assert_allclose(_np(call["x"]), expected, rtol=0, atol=2e-5, err_msg=f"t={t}")
    # perfect and identical predictions: no divergence, no reconstruction error
    assert res.divergence.abs().max() < 1e-8 and res.mse_guided.max() < 1e-8 and res.mse_reference.max() < 1e-8


@pytest.mark.parametrize("grid", [list(range(0, 401, 40)), [0, 1, 2, 3], [10, 250, 999], list(range(0, 60))])
def test_ddim_encode_decode_perfect(grid):
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    net = AnalyticEpsNet("perfect", x0_star=x0_np, blob=np.zeros_like(x0_np))
    x_t = ddim_encode(net, x0, SCHEDULE, grid)
    # encode treats x0 as the sample at grid[0]; a perfect model keeps its first noise estimate all the way
    g0, gk = grid[0], grid[-1]
    eps0 = (x0_np - np.sqrt(ABAR_NP[g0]) * x0_np) / np.sqrt(1.0 - ABAR_NP[g0])
    expected = x0_np if len(grid) == 1 else np.sqrt(ABAR_NP[gk]) * x0_np + np.sqrt(1.0 - ABAR_NP[gk]) * eps0
    np.testing.assert_allclose(_np(x_t), expected, rtol=0, atol=1e-4)
    assert len(net.calls) == len(grid) - 1 and all(c["labels"] == [NULL] * B for c in net.calls)
    rec = ddim_decode(net, x_t, SCHEDULE, grid)
    np.testing.assert_allclose(_np(rec), x0_np, rtol=0, atol=1e-5)
    rec_guided = ddim_decode(net, x_t, SCHEDULE, grid, label=HEALTHY, guidance_scale=3.0)
    np.testing.assert_allclose(_np(rec_guided), x0_np, rtol=0, atol=1e-5)


def test_ddpm_decode_perfect():
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    net = AnalyticEpsNet("perfect", x0_star=x0_np, blob=np.zeros_like(x0_np))
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for grid in (list(range(0, 301)), [0, 100, 200, 300], [57]):
        out = ddpm_decode(net, x_t, SCHEDULE, grid, label=HEALTHY, guidance_scale=2.0, generator=torch.Generator())
        np.testing.assert_allclose(_np(out), x0_np, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Schedule and step grid
# --------------------------------------------------------------------------------------------------------------------


def test_schedule_float64_matches_numpy():
    assert SCHEDULE.alphas_cumprod.dtype == torch.float64 and SCHEDULE.num_train_timesteps == T
    np.testing.assert_allclose(SCHEDULE.betas.numpy(), BETAS_NP, rtol=1e-14, atol=0)
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod.numpy(), ABAR_NP, rtol=1e-13, atol=0)
    # float32 coefficients are the float64 values rounded once, not float32 arithmetic
    like = torch.zeros(T, 1, 1, 1)
    t = torch.arange(T)
    assert torch.equal(SCHEDULE.sqrt_alpha_bar(t, like).flatten(), SCHEDULE.alphas_cumprod.sqrt().float())
    assert torch.equal(
        SCHEDULE.sqrt_one_minus_alpha_bar(t, like).flatten(), (1 - SCHEDULE.alphas_cumprod).sqrt().float()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_schedule_working_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1).to(dtype)
    noise = torch.randn(2, 3, 4, 4, generator=gen).to(dtype)
    t = torch.tensor([500, 999])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float32  # MONAI's add_noise would return (and compute in) bf16 here
    x0_64, n_64 = x0.double().numpy(), noise.double().numpy()
    sa = np.sqrt(ABAR_NP[t.numpy()])[:, None, None, None]
    exact = sa * x0_64 + np.sqrt(1 - sa**2) * n_64
    np.testing.assert_allclose(x_t.double().numpy(), exact, rtol=0, atol=1e-6)
    scalar_t = SCHEDULE.q_sample(x0, 500, noise)  # 0-dim coefficients must not demote to the input dtype either
    assert scalar_t.dtype == torch.float32
    exact_500 = np.sqrt(ABAR_NP[500]) * x0_64 + np.sqrt(1 - ABAR_NP[500]) * n_64
    np.testing.assert_allclose(scalar_t.double().numpy(), exact_500, rtol=0, atol=1e-6)
    assert SCHEDULE.predict_x0(x_t.to(dtype), t, noise, clip=False).dtype == torch.float32
    assert SCHEDULE.predict_eps(x_t.to(dtype), t, x0).dtype == torch.float32
    mean, std = SCHEDULE.ddpm_posterior(x0, x_t.to(dtype), 500, 400)
    assert mean.dtype == std.dtype == torch.float32
    assert SCHEDULE.q_sample(x0.double(), t, noise.double()).dtype == torch.float64


def test_schedule_roundtrip_and_ddim_move():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 2, 5, 5, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    x_t = SCHEDULE.q_sample(x0, t, noise)
    torch.testing.assert_close(SCHEDULE.predict_x0(x_t, t, noise, clip=False), x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(SCHEDULE.predict_eps(x_t, t, x0), noise, rtol=0, atol=1e-9)
    torch.testing.assert_close(SCHEDULE.ddim_move(x0, noise, t), x_t, rtol=0, atol=0)
    assert SCHEDULE.predict_x0(x_t * 50, t, noise).abs().max() <= 1.0


def test_schedule_from_monai_scheduler():
    ours = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    assert torch.equal(ours.alphas_cumprod, SCHEDULE.alphas_cumprod)
    other = DDPMScheduler(num_train_timesteps=500, schedule="scaled_linear_beta", beta_start=1e-4, beta_end=0.02)
    ns = NoiseSchedule.from_scheduler(other)
    assert ns.num_train_timesteps == 500
    np.testing.assert_allclose(ns.alphas_cumprod.numpy(), other.alphas_cumprod.double().numpy(), rtol=1e-5)


@pytest.mark.parametrize("t, t_prev", [(500, 437), (999, 0), (1, 0), (300, 299), (64, 3)])
def test_ddpm_posterior_textbook(t, t_prev):
    gen = torch.Generator().manual_seed(t)
    x0 = torch.rand(2, 1, 3, 3, generator=gen, dtype=torch.float64)
    x_t = torch.randn(2, 1, 3, 3, generator=gen, dtype=torch.float64)
    ab_t, ab_s = ABAR_NP[t], ABAR_NP[t_prev]
    alpha = ab_t / ab_s  # the respaced alpha of the pair
    beta = 1.0 - alpha
    mean_ref = np.sqrt(ab_s) * beta / (1 - ab_t) * x0.numpy() + np.sqrt(alpha) * (1 - ab_s) / (1 - ab_t) * x_t.numpy()
    var_ref = (1 - ab_s) / (1 - ab_t) * beta
    mean, std = SCHEDULE.ddpm_posterior(x0, x_t, t, t_prev)
    np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=1e-12, atol=1e-14)
    assert float(std) == pytest.approx(np.sqrt(var_ref), rel=1e-12)
    if t_prev == t - 1:  # consecutive steps: the textbook beta-tilde of DDPM
        assert float(std) ** 2 == pytest.approx(BETAS_NP[t] * (1 - ABAR_NP[t - 1]) / (1 - ABAR_NP[t]), rel=1e-10)
    mean0, std0 = SCHEDULE.ddpm_posterior(x0, x_t, t, -1)
    torch.testing.assert_close(mean0, x0, rtol=0, atol=1e-12)
    assert float(std0) == 0.0


TEST_CASES_GRID = [
    ((599, 1), list(range(600))),
    ((599, 43), list(range(0, 600, 43))),
    ((599, 600), [0]),
    ((0, 1), [0]),
    ((10, 3), [0, 3, 6, 9]),
    ((12, 3), [0, 3, 6, 9, 12]),
    ((999, 500), [0, 500]),
    ((999, 333), [0, 333, 666, 999]),
]


@pytest.mark.parametrize("args, expected", TEST_CASES_GRID)
def test_make_step_grid(args, expected):
    assert make_step_grid(*args) == expected
    assert AnoFPDMInferer(t_max=args[0], stride=args[1]).timesteps == expected


@pytest.mark.parametrize("grid", [[0], [3], [0, 5, 17], (np.int64(1), np.int64(998)), [999]])
def test_make_step_grid_explicit(grid):
    assert make_step_grid(timesteps=grid) == [int(t) for t in grid]


TEST_CASES_GRID_ERRORS = [
    ({"stride": 0}, "stride"),
    ({"stride": -2}, "stride"),
    ({"t_max": 1000}, "t_max"),
    ({"t_max": -1}, "t_max"),
    ({"t_max": 100, "num_train_timesteps": 100}, "t_max"),
    ({"timesteps": [5, 3]}, "ascending"),
    ({"timesteps": [0, 3, 3]}, "ascending"),
    ({"timesteps": []}, "empty"),
    ({"timesteps": [-1, 2]}, r"\[0, 1000\)"),
    ({"timesteps": [0, 1000]}, r"\[0, 1000\)"),
]


@pytest.mark.parametrize("kwargs, match", TEST_CASES_GRID_ERRORS)
def test_make_step_grid_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_step_grid(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Algorithm 1 and post-processing primitives
# --------------------------------------------------------------------------------------------------------------------


def _decimal_index(m: str, m_max: str) -> int:
    ratio = min(max(Decimal(m) / Decimal(m_max), Decimal(0)), Decimal(1))
    return int((ratio * 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


# (M, M_max) written as decimals; the expected index comes from exact decimal arithmetic with half-to-even
TEST_CASES_ALGORITHM_1 = [
    ("0", "1"),  # 0
    ("1", "1"),  # 100
    ("3", "2"),  # ratio > 1, clamped: 100
    ("2.5e-3", "2.5e-3"),  # 100
    ("0.29", "1"),  # 29
    ("0.53", "1"),  # 53; the official float32 (torch.round(0.53, decimals=2) * 100).to(int64) truncates to 52
    ("2.9", "10"),  # 29 again, through the division
    ("0.005", "1"),  # 0.5 -> 0 (half to even)
    ("0.015", "1"),  # 1.5 -> 2
    ("0.025", "1"),  # 2.5 -> 2
    ("0.035", "1"),  # 3.5 -> 4
    ("0.125", "1"),  # 12.5 -> 12
    ("0.285", "1"),  # 28.5 -> 28
    ("0.995", "1"),  # 99.5 -> 100
    ("1", "8"),  # 12.5 -> 12
    ("199", "200"),  # 99.5 -> 100
    ("0.7", "1"),  # 70.00000000000001 in float64 -> 70
    ("0.5049", "1"),  # 50.49 -> 50
]


@pytest.mark.parametrize("m, m_max", TEST_CASES_ALGORITHM_1)
def test_algorithm_1_index(m, m_max):
    idx = _decimal_index(m, m_max)
    assert idx == naive_idx(float(m) / float(m_max))
    q = quantile_level(torch.tensor([float(m)], dtype=torch.float64), float(m_max))
    expected = Fraction(98, 100) - idx * (Fraction(98, 100) - Fraction(90, 100)) / 100
    assert q.dtype == torch.float64
    assert float(q) == pytest.approx(float(expected), abs=1e-12), f"idx={idx}"
    # the reversed-linspace definition of the design gives the same level
    assert float(q) == pytest.approx(float(np.linspace(0.9, 0.98, 101)[::-1][idx]), abs=1e-12)


def test_algorithm_1_official_truncation_documented():
    # the official code's (torch.round(ratio, decimals=2) * 100).to(torch.int64) truncates in float32 (0.53 * 100 is
    # 52.999996); we deliberately take the nearest index, 53
    ratio = torch.tensor(0.53, dtype=torch.float32)
    assert int((torch.round(ratio, decimals=2) * 100).to(torch.int64)) == 52
    assert float(quantile_level(torch.tensor(0.53, dtype=torch.float64), 1.0)) == pytest.approx(0.98 - 53 * 0.0008)


def test_algorithm_1_broadcast_and_range():
    m = torch.tensor([[0.1, 0.2], [0.4, 0.9]])
    q = quantile_level(m, torch.tensor([0.2, 0.4]), a=0.8, b=0.96)
    idx = torch.tensor([[50, 50], [100, 100]], dtype=torch.float64)
    torch.testing.assert_close(q, 0.96 - idx * 0.16 / 100, rtol=0, atol=1e-12)
    assert float(quantile_level(torch.tensor(0.0), 1.0)) == pytest.approx(0.98)
    assert float(quantile_level(torch.tensor(5.0), 1.0)) == pytest.approx(0.90)


@pytest.mark.parametrize("m_max", [0.0, -1.0, [1.0, 0.0]])
def test_algorithm_1_m_max_must_be_positive(m_max):
    with pytest.raises(ValueError, match="M_max"):
        quantile_level(torch.tensor([0.1, 0.2]), torch.tensor(m_max))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_quantile_equals_torch_quantile(dtype):
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(6, 9, 13, generator=gen, dtype=torch.float64).to(dtype)
    values[2] = torch.round(values[2] * 4) / 4  # many ties
    q = torch.tensor([0.0, 1.0, 0.9, 0.98, 0.9472, 0.5], dtype=torch.float64)
    got = batch_quantile(values, q)
    assert got.dtype == dtype
    for i in range(6):
        ref = torch.quantile(values[i].flatten().double(), float(q[i]))
        assert float(got[i]) == pytest.approx(float(ref), rel=1e-6 if dtype == torch.float32 else 1e-12)
        assert float(got[i]) == pytest.approx(float(np.quantile(values[i].double().numpy(), float(q[i]))), rel=1e-6)


@pytest.mark.parametrize("kernel, shape", [(5, (3, 16, 16)), (5, (2, 9, 13)), (3, (2, 7, 7)), (5, (1, 4, 4))])
def test_median_filter_equals_scipy(kernel, shape):
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(*shape, generator=gen)
    maps[0, :3] = 0.5  # ties
    got = median_filter_2d(maps, kernel)
    for b in range(shape[0]):
        ref = ndimage.median_filter(maps[b].numpy(), size=kernel, mode="nearest")
        np.testing.assert_array_equal(got[b].numpy(), ref)
        if kernel == 5:
            np.testing.assert_array_equal(got[b].numpy(), naive_median5(maps[b].numpy()))
    assert torch.equal(median_filter_2d(maps, 1), maps)


def _component_masks() -> torch.Tensor:
    m = np.zeros((3, 16, 16), dtype=bool)
    m[0, 0:5, 0:8] = True  # 40 px: removed
    m[0, 8:13, 0:8] = True
    m[0, 13, 0] = True  # 41 px: kept
    m[1, 0:3, 0:7] = True  # 21 px
    m[1, 3:7, 7:12] = True  # 20 px touching the first only at a corner: one 8-connected component of 41 px
    m[1, 10:15, 10:14] = True  # 20 px alone: removed
    m[2, 0:5, 0:6] = True  # 33 px with the next line, on top of slice 1's pixels: slices must not connect
    m[2, 0:3, 0:7] = True
    return torch.from_numpy(m)


def test_remove_small_components():
    mask = _component_masks()
    got = remove_small_components(mask, 40)
    expected = np.zeros_like(mask.numpy())
    expected[0, 8:13, 0:8] = True
    expected[0, 13, 0] = True
    expected[1, 0:3, 0:7] = True
    expected[1, 3:7, 7:12] = True
    np.testing.assert_array_equal(got.numpy(), expected)
    for b in range(3):
        np.testing.assert_array_equal(got[b].numpy(), naive_components(mask[b].numpy(), 40))
    # 4-connectivity would have split slice 1's diagonal pair (21 + 20 px) and removed both
    four, _ = ndimage.label(mask[1].numpy())
    assert sorted(np.bincount(four.ravel())[1:].tolist()) == [20, 20, 21]
    assert torch.equal(remove_small_components(mask, 0), mask)
    assert torch.equal(remove_small_components(mask, 41)[0], torch.zeros(16, 16, dtype=torch.bool))


def test_binarize_map_uses_filtered_map_and_ge():
    maps = torch.zeros(2, 16, 16)
    maps[:, 2:10, 2:10] = 1.0  # 64 px square
    maps[:, 12, 12] = 5.0  # isolated spike, removed by the median filter
    filtered, mask = binarize_map(maps, torch.tensor([1.0, 1.0 + 1e-6]), 5, 40)
    assert filtered[0, 12, 12] == 0.0
    expected = naive_components(naive_median5(maps[0].numpy()) >= 1.0)
    np.testing.assert_array_equal(mask[0].numpy(), expected)  # ">=": values equal to the threshold are in
    assert not mask[1].any()


@pytest.mark.parametrize("score", ["cosine", "mse_gap", "divergence"])
def test_health_gating(score):
    x0_np = make_slices()
    x0 = torch.from_numpy(x0_np).float()
    net = _net("perfect", x0_np)
    base = {"guidance_scale": 2.0, "map_channels": (0, 3), "timesteps": EXPLICIT_GRID, "seed": 11}
    base["health_score"] = score
    ungated = AnoFPDMInferer(m_max=[0.05, 0.05], **base)(x0, net)
    assert torch.equal(ungated.pred_label, torch.ones(B, dtype=torch.long))
    assert torch.equal(ungated.mask, ungated.mask_ungated) and ungated.mask.any()
    if score == "cosine":
        torch.testing.assert_close(ungated.health, ungated.cosine)
    cos = ungated.health  # the gating score (low = unhealthy)
    tau = float(cos.sort().values[:2].mean())  # only the lowest-c slice stays unhealthy
    gated = AnoFPDMInferer(m_max=[0.05, 0.05], tau=tau, **base)(x0, net)
    assert torch.equal(gated.mask_ungated, ungated.mask_ungated)
    assert torch.equal(gated.pred_label, (cos <= tau).long()) and int(gated.pred_label.sum()) == 1
    for b in range(B):
        if cos[b] > tau:
            assert not gated.mask[b].any()
        else:
            assert torch.equal(gated.mask[b], ungated.mask_ungated[b])
    all_healthy = AnoFPDMInferer(m_max=[0.05, 0.05], tau=float(cos.min()) - 1.0, **base)(x0, net)
    assert not all_healthy.mask.any() and torch.equal(all_healthy.mask_ungated, ungated.mask_ungated)


def test_fixed_threshold_without_calibration():
    x0 = torch.from_numpy(make_slices()).float()
    net = AnalyticEpsNet("affine")
    inferer = AnoFPDMInferer(map_channels=(1,), timesteps=[0, 100, 200], threshold=0.01)
    out = inferer(x0, net)
    assert torch.all(out.threshold == 0.01) and torch.isnan(out.quantile).all()
    _, mask = binarize_map(out.anomaly_map, 0.01)
    assert torch.equal(out.mask_ungated, mask)
    with pytest.raises(ValueError, match="m_max"):
        AnoFPDMInferer(map_channels=(1,), timesteps=[0, 100])(x0, net)


def test_inferer_restores_training_mode():
    net = AnalyticEpsNet("affine")
    net.train()
    AnoFPDMInferer(map_channels=(0,), timesteps=[0, 10], threshold=0.1)(torch.from_numpy(make_slices()).float(), net)
    assert net.training


# --------------------------------------------------------------------------------------------------------------------
# Invalid parameters
# --------------------------------------------------------------------------------------------------------------------

X0_SMALL = torch.zeros(1, 2, 8, 8)

TEST_CASES_INVALID = [
    (lambda: AnoFPDMInferer(guidance_scale=-0.5), "guidance_scale"),
    (lambda: AnoFPDMInferer(guidance_scale=float("nan")), "guidance_scale"),
    (lambda: AnoFPDMInferer(guidance_scale=float("inf")), "guidance_scale"),
    (lambda: AnoFPDMInferer(map_channels=(0,), m_max=[0.0]), "m_max"),
    (lambda: AnoFPDMInferer(map_channels=(0,), m_max=[float("nan")]), "m_max"),
    (lambda: AnoFPDMInferer(tau=float("nan")), "tau"),
    (lambda: AnoFPDMInferer(quantile_range=(0.98, 0.9)), "quantile_range"),
    (lambda: AnoFPDMInferer(quantile_range=(0.9, 1.5)), "quantile_range"),
    (lambda: AnoFPDMInferer(stride=0), "stride"),
    (lambda: AnoFPDMInferer(t_max=1000), "t_max"),
    (lambda: AnoFPDMInferer(timesteps=[3, 1]), "ascending"),
    (lambda: AnoFPDMInferer(forward="ddpx"), "forward"),
    (lambda: AnoFPDMInferer(reference="unhealthy"), "reference"),
    (lambda: AnoFPDMInferer(divergence="v3"), "divergence"),
    (lambda: AnoFPDMInferer(end_step="global"), "end_step"),
    (lambda: AnoFPDMInferer(aggregation="max"), "aggregation"),
    (lambda: AnoFPDMInferer(map_channels=(0, 3), m_max=[1.0]), "m_max"),
    (lambda: AnoFPDMInferer(map_channels=(0, 3), m_max=[1.0, 2.0], end_step="joint"), "m_max"),
    (lambda: NoiseSchedule(schedule="cosine"), "schedule"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0, 1], [1.0, -1.0], [0]), "guidance"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0, 1], [], [0]), "guidance"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0, 1], [float("nan")], [0]), "guidance"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0, 1], [1.0], [2]), "map_channels"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0, 1], [1.0], [-1]), "map_channels"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0, 1], [1.0], []), "map_channels"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0, 1000], [1.0], [0]), r"\[0, 1000\)"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL[0], SCHEDULE, [0, 1], [1.0], [0]), "x0"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0], [1.0], [0], forward="x"), "forward"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0], [1.0], [0], reference="x"), "reference"),
    (lambda: run_forward_process(AnalyticEpsNet(), X0_SMALL, SCHEDULE, [0], [1.0], [0], divergence="x"), "divergence"),
    (
        lambda: AnoFPDMInferer(map_channels=(5,), threshold=0.1, timesteps=[0])(X0_SMALL, AnalyticEpsNet()),
        "map_channels",
    ),
    (lambda: quantile_level(torch.tensor(0.5), 1.0, a=0.99, b=0.9), "a <= b"),
]


@pytest.mark.parametrize("make, match", TEST_CASES_INVALID)
def test_invalid_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_result_without_maps():
    x0 = torch.from_numpy(make_slices()).float()
    res = run_forward_process(AnalyticEpsNet(), x0, SCHEDULE, [0, 1], [1.0], [0], need_maps=False)
    assert res.map_sum is None
    with pytest.raises(ValueError, match="need_maps"):
        res.anomaly_maps()
