"""AnoFPDM inference: our streamed inferer against a faithful re-enactment of the official call pattern.

Every configuration runs on the same network and the same input batch, side by side in one run:

- ``official``: the official AnoFPDM call pattern (``calc_pred_xstart_loop``), re-enacted here: per step four
  UNBATCHED network calls (healthy and null for the guided prediction, the reference prediction again, one more call
  for the DDIM inversion step), every step's x0 predictions (guided and reference, map modalities) kept in memory,
  and M_t, t_e, the anomaly map and the cosine computed afterwards from the stored tensors. It uses the same formulas
  as the library (consistent t indexing, inclusive t_e), so at stride 1 it must agree with ours to float tolerance.
  On CPU it runs a shorter grid (``--official-steps``) and its time and memory are also scaled to ``--steps``.
- ``ours``: :class:`anofpdm_monai.inferers.AnoFPDMInferer` (``run_forward_process``): one batched call per step for
  [healthy, null], the DDIM inversion reusing the null prediction, streamed running sums / argmax / snapshots; at
  stride 1 and at every ``--strides`` value.

Reported per configuration: network evaluations per slice (counted by a wrapper module), wall time per batch
(median over ``--repeats``, configurations interleaved in every repeat), slices/s, memory (bytes of the tensors the
method holds across steps; the process RSS high-water mark, each configuration in a fresh subprocess; on CUDA
``torch.cuda.max_memory_allocated``) and accuracy against ours at stride 1 (anomaly-map mean absolute difference
relative to the map mean, Pearson r, |delta t_e| in steps, |delta cosine|, Dice of the Algorithm-1 masks).

Random weights make the maps meaningless for accuracy-vs-stride; pass ``--checkpoint`` (a trained ``model.pt``) and
``--data`` (a slice-cache folder: ``cache/<digest>/cases/<case>/image.npy``) for numbers that mean something.

Usage::

    python benchmarks/bench_inferer.py                                    # CPU defaults (small net, 64x64, batch 8)
    python benchmarks/bench_inferer.py --image-size 32 --batch 4 --official-steps 50 --repeats 3
    python benchmarks/bench_inferer.py --device cuda --size paper --image-size 128 --batch 64 --autocast bf16
    python benchmarks/bench_inferer.py --checkpoint runs/real_study/model/model.pt --data runs/real_study/cache

``--volume`` measures volume inference instead (:class:`anofpdm_monai.inferers.AnoFPDMVolumeInferer` on one
synthetic case held as a MONAI ``MetaTensor``, as the inference pipeline gives it): slices/s over ``--repeats`` runs,
each in a fresh subprocess. With ``--compare OTHER_CHECKOUT`` the same runs are made with the package of another
checkout (e.g. ``git worktree add /tmp/wt_before HEAD``), alternating which goes first in each repeat, and the
medians and their ratio are printed::

    python benchmarks/bench_inferer.py --volume --compare /tmp/wt_before --size tiny --image-size 64 --depth 16 \
        --batch 8 --steps 600 --strides 10 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ANOFPDM_BENCH_REPO: import the package from another checkout (the --compare runs of --volume)
REPO = Path(os.environ.get("ANOFPDM_BENCH_REPO") or Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(REPO))

from anofpdm_monai.inferers import AnoFPDMInferer, AnoFPDMVolumeInferer, ForwardProcessResult  # noqa: E402
from anofpdm_monai.metrics import dice_per_slice  # noqa: E402
from anofpdm_monai.networks import HEALTHY, NULL, build_diffusion_unet, load_network  # noqa: E402
from anofpdm_monai.postprocessing import scaled_min_component_size  # noqa: E402
from anofpdm_monai.schedule import NoiseSchedule  # noqa: E402

MB = 2.0**20


# ----------------------------------------------------------------------------------------------------------- setup
def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads (of {os.cpu_count()} cores), torch {torch.__version__}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CountingNetwork(nn.Module):
    """Wraps the epsilon network and counts calls and the slices pushed through it (one slice, one evaluation)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.calls = 0
        self.samples = 0

    def reset(self) -> None:
        self.calls = 0
        self.samples = 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.samples += int(x.shape[0])
        return self.network(x, timesteps=timesteps, class_labels=class_labels)


def build_network(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, str]:
    """The network: from ``--checkpoint``, or seeded random weights of the ``--size`` preset."""
    cuda = device.type == "cuda"
    if args.checkpoint:
        net, info = load_network(args.checkpoint, use_ema=not args.no_ema, use_flash_attention=cuda)
        kind = "model" if args.no_ema else "EMA"
        note = (
            f"{kind} weights from {args.checkpoint} (digest {info['digest']}, channels {info['network']['channels']})"
        )
    else:
        torch.manual_seed(args.seed)
        net = build_diffusion_unet(args.channels, args.size, use_flash_attention=cuda)
        # MONAI zero-initialises the output convolution and every block's last convolution, so an untrained network
        # predicts eps = 0 for every label and all divergences vanish; give those layers their default random init.
        for module in net.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() > 1 and not weight.detach().any():
                module.reset_parameters()
        note = f"RANDOM weights ({args.size} preset, seed {args.seed}, zero-initialised layers re-drawn)"
    net = net.to(device).eval()
    if cuda and args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, note


def _image_files(root: Path) -> list[Path]:
    if root.is_file() and root.name == "image.npy":
        return [root]
    files = sorted(root.rglob("image.npy"))
    if not files:
        raise SystemExit(f"--data {root}: no image.npy found (expected a slice cache: <digest>/cases/<case>/image.npy)")
    return files


def load_inputs(args: argparse.Namespace, in_channels: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """(B, C, S, S) float32 inputs in [-1, 1]: random (seeded), or slices picked deterministically from a cache.

    From a cache, half the batch is the slices with the largest lesions (when ``label.npy`` exists) and the rest the
    healthy slices with the most brain, taken evenly across cases.
    """
    if args.data is None:
        g = torch.Generator().manual_seed(args.seed + 1)
        x = torch.rand(args.batch, in_channels, args.image_size, args.image_size, generator=g) * 2 - 1
        return x.to(device), f"random inputs U[-1, 1], seed {args.seed + 1}"
    unhealthy, healthy = [], []
    for f in _image_files(Path(args.data)):
        img = np.load(f, mmap_mode="r")
        if img.ndim != 4 or img.shape[1] != in_channels:
            raise SystemExit(f"{f}: expected (N, {in_channels}, S, S) slices for this network, got {img.shape}")
        brain = (np.asarray(img[:, 0], dtype=np.float32) > -0.98).mean(axis=(1, 2))
        label_file = f.parent / "label.npy"
        lesion = np.load(label_file, mmap_mode="r").reshape(len(img), -1).sum(1) if label_file.exists() else None
        for i in range(len(img)):
            if brain[i] < 0.15:
                continue
            if lesion is not None and lesion[i] > 0:
                unhealthy.append((float(lesion[i]), f, i))
            else:
                healthy.append((float(brain[i]), f, i))
    unhealthy.sort(key=lambda r: -r[0])
    healthy.sort(key=lambda r: -r[0])
    n_u = min(len(unhealthy), args.batch // 2 if healthy else args.batch)
    picks = unhealthy[:n_u]
    rest = args.batch - n_u
    if rest > len(healthy):
        raise SystemExit(f"--data {args.data}: only {len(unhealthy) + len(healthy)} usable slices, need {args.batch}")
    idx = np.linspace(0, len(healthy) - 1, rest).round().astype(int) if rest else []
    picks += [healthy[i] for i in idx]
    slices = [np.asarray(np.load(f, mmap_mode="r")[i], dtype=np.float32) for _, f, i in picks]
    x = torch.from_numpy(np.stack(slices)).clamp(-1, 1)
    note = f"{len(picks)} cached slices from {args.data} ({n_u} with lesions), {tuple(x.shape[2:])} px"
    if x.shape[-1] != args.image_size:
        note += f" (--image-size {args.image_size} ignored)"
    return x.to(device), note


def map_channels_for(args: argparse.Namespace, in_channels: int) -> list[int]:
    if args.map_channels:
        return list(args.map_channels)
    return [0, 3] if in_channels == 4 else [0]


# ------------------------------------------------------------------------------------ official call pattern (ours)
@torch.no_grad()
def official_forward(
    net: nn.Module,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    grid: list[int],
    w: float,
    channels: list[int],
    reference: str = "null",
    clip: bool = True,
    eps_mode: str = "raw",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Re-enactment of the official ``calc_pred_xstart_loop`` call pattern with the library's formulas.

    Per step: (only after the first step) one call for the DDIM inversion from the previous x_t with the null label,
    then the guided prediction from two calls (null, healthy), then the reference prediction from one more call
    (null label for ``reference="null"``, healthy with w = 0 for ``"healthy"``, as the official code), each on the
    B slices alone. All x0 predictions on the map modalities are kept and stacked to (B, K, Cm, H, W), as the official
    code does. ``eps_mode="rederived"`` moves with the noise re-derived from the clipped x0 (guided-diffusion's
    ``ddim_reverse_sample``) instead of the raw null prediction (``"raw"``, the design and the library).
    """
    B = x0.shape[0]
    x0 = x0.float()
    y_h = torch.full((B,), HEALTHY, device=x0.device, dtype=torch.long)
    y_n = torch.full((B,), NULL, device=x0.device, dtype=torch.long)
    y_ref = y_n if reference == "null" else y_h
    xstart, xstart_ref = [], []
    x_t = t_prev = None
    for k, t in enumerate(grid):
        if k == 0:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = schedule.q_sample(x0, t, noise)
        else:  # the inversion call: the network again on the previous x_t (the official code recomputes it)
            e_inv = net(x_t, timesteps=torch.full((B,), t_prev, device=x0.device), class_labels=y_n).float()
            x0_inv = schedule.predict_x0(x_t, t_prev, e_inv, clip=clip)
            if eps_mode == "rederived":
                e_inv = schedule.predict_eps(x_t, t_prev, x0_inv)
            x_t = schedule.ddim_move(x0_inv, e_inv, t)
        t_b = torch.full((B,), t, device=x0.device)
        e_n = net(x_t, timesteps=t_b, class_labels=y_n).float()
        e_h = net(x_t, timesteps=t_b, class_labels=y_h).float()
        x0_g = schedule.predict_x0(x_t, t, (1.0 + w) * e_h - w * e_n, clip=clip)
        e_r = net(x_t, timesteps=t_b, class_labels=y_ref).float()
        x0_r = schedule.predict_x0(x_t, t, e_r, clip=clip)
        xstart.append(x0_g[:, channels])
        xstart_ref.append(x0_r[:, channels])
        t_prev = t
    return {"xstart": torch.stack(xstart, dim=1), "xstart_ref": torch.stack(xstart_ref, dim=1)}


def official_aggregate(stored: dict[str, torch.Tensor], x0: torch.Tensor, channels: list[int]) -> dict[str, Any]:
    """M_t, t_e, anomaly maps and the cosine from the stored predictions, afterwards (per-modality t_e, ``v2``)."""
    xs, xr = stored["xstart"], stored["xstart_ref"]  # (B, K, Cm, H, W)
    src = x0.float()[:, channels].unsqueeze(1)
    sq_g = (xs - src) ** 2  # S_t for every step, as the official code materialises it
    divergence = ((xs - xr) ** 2).mean(dim=(-2, -1))  # (B, K, Cm)
    end_index = divergence.argmax(dim=1)  # first maximum
    B, _, Cm = divergence.shape
    maps_m = torch.stack(
        [torch.stack([sq_g[b, : int(end_index[b, m]) + 1, m].mean(0) for m in range(Cm)]) for b in range(B)]
    )
    mse_g = sq_g.mean(dim=(2, 3, 4))
    mse_r = ((xr - src) ** 2).mean(dim=(2, 3, 4))
    return {
        "maps_m": maps_m,
        "anomaly_map": maps_m.mean(dim=1),
        "end_index": end_index,
        "divergence": divergence,
        "mse_guided": mse_g,
        "mse_reference": mse_r,
        "cosine": F.cosine_similarity(mse_g, mse_r, dim=-1, eps=1e-6),
    }


def ours_summary(result: ForwardProcessResult) -> dict[str, Any]:
    maps_m = result.anomaly_maps("per_modality", "mean")[0]
    return {
        "maps_m": maps_m,
        "anomaly_map": maps_m.mean(dim=1),
        "end_index": result.end_index[0],
        "divergence": result.divergence[0],
        "mse_guided": result.mse_guided[0],
        "mse_reference": result.mse_reference,
        "cosine": result.cosine()[0],
    }


def official_stored_bytes(B: int, K: int, Cm: int, H: int, W: int) -> int:
    """The two stored prediction tensors (B, K, Cm, H, W) float32."""
    return 2 * B * K * Cm * H * W * 4


def ours_state_bytes(B: int, K: int, C: int, Cm: int, H: int, W: int, n_w: int = 1) -> int:
    """Tensors ``run_forward_process`` keeps across steps: 5 map buffers (running sum, 4 snapshots), the curves,
    the running argmax, the previous null prediction (x0, eps) and the map-modality input."""
    maps = 5 * n_w * B * Cm * H * W * 4
    curves = (n_w * B * K * Cm + n_w * B * K + B * K) * 4
    argmax = (n_w * B * Cm + n_w * B) * (4 + 8)
    carry = 2 * B * C * H * W * 4 + B * Cm * H * W * 4
    return maps + curves + argmax + carry


# ------------------------------------------------------------------------------------------- one configuration run
def run_config(args: argparse.Namespace, cfg: dict[str, Any], save_tensors: bool) -> dict[str, Any]:
    """Run one configuration once (after a warm-up) in this process; returns metrics and, optionally, outputs."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    net, _ = build_network(args, device)
    in_channels = net.config["in_channels"]
    x0, _ = load_inputs(args, in_channels, device)
    if device.type == "cuda" and args.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    channels = map_channels_for(args, in_channels)
    counted = CountingNetwork(net)
    B, C, H, W = x0.shape
    with torch.no_grad():  # warm-up at both batch shapes (allocator, kernels, attention backends)
        for n in (B, 2 * B):
            xs = torch.cat([x0] * (n // B))
            counted(xs, torch.full((n,), 10, device=device), torch.full((n,), NULL, device=device))
    counted.reset()
    _sync(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)

    out: dict[str, Any] = {"name": cfg["name"]}
    post_s = None
    if cfg["kind"] == "official":
        grid = list(range(cfg["steps"]))
        schedule = NoiseSchedule()
        gen = torch.Generator(device=device).manual_seed(args.seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        stored = official_forward(
            counted, x0, schedule, grid, args.guidance, channels, args.reference, True, args.official_eps, gen
        )
        summary = official_aggregate(stored, x0, channels)
        _sync(device)
        elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        held = sum(v.numel() * v.element_size() for v in stored.values())
        del stored
        result = None
    else:
        inferer = AnoFPDMInferer(
            guidance_scale=args.guidance,
            map_channels=channels,
            t_max=cfg["steps"] - 1,
            stride=cfg["stride"],
            measure_every=cfg.get("measure_every", 1),
            reference=args.reference,
            seed=args.seed,
            precision="bf16" if args.autocast == "bf16" else "fp32",
            threshold=0.0,
        )
        grid = inferer.timesteps
        start, cpu_start = time.perf_counter(), time.process_time()
        result = inferer.forward_process(x0, counted)
        summary = ours_summary(result)
        _sync(device)
        elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        held = ours_state_bytes(B, len(grid), C, len(channels), H, W)
        t0 = time.perf_counter()
        inferer.postprocess(result)  # median filter, threshold, components: identical work for both patterns
        post_s = time.perf_counter() - t0

    out.update(
        kind=cfg["kind"],
        grid_steps=len(grid),
        calls=counted.calls,
        evals_per_slice=counted.samples / B,
        time_s=elapsed,
        cpu_s=cpu_s,
        post_s=post_s,
        held_bytes=held,
        rss_before_mb=rss_before,
        rss_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    )
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        out["cuda_delta_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_base) / MB
    if save_tensors:
        out["summary"] = {k: v.detach().cpu() for k, v in summary.items()}
        out["result"] = None if result is None else _result_fields(result)
        # the steps the end indices refer to: the measured ones (all of the grid unless measure_every > 1)
        out["timesteps"] = torch.as_tensor(grid if result is None else result.timesteps)
    return out


def _result_fields(result: ForwardProcessResult) -> dict[str, Any]:
    """The result's fields on the CPU: a plain dict, so the parent reads the child's file with weights_only=True."""
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(result).items()}


def _result_to_cpu(result: ForwardProcessResult) -> ForwardProcessResult:
    """The result with its tensors on the CPU (benchmarks/gpu_check.py keeps several runs' results)."""
    return ForwardProcessResult(**_result_fields(result))


def run_in_child(args: argparse.Namespace, cfg: dict[str, Any], save_tensors: bool, workdir: Path) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter (clean RSS high-water mark) and read its results back."""
    spec = workdir / f"{cfg['name']}.json"
    out = workdir / f"{cfg['name']}.pt"
    spec.write_text(json.dumps({"args": _jsonable(vars(args)), "cfg": cfg, "save": save_tensors}))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(spec), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {cfg['name']} failed:\n{proc.stderr[-3000:]}")
    result = torch.load(out, weights_only=True)  # tensors and plain containers only (see _result_fields)
    out.unlink()
    if result.get("result") is not None:
        result["result"] = ForwardProcessResult(**result["result"])
    return result


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def child_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    torch.save(run_config(args, spec["cfg"], spec["save"]), out_path)
    return 0


# --------------------------------------------------------------------------------------------------- volume mode
def volume_run(args: argparse.Namespace) -> dict[str, Any]:
    """One timed volume inference (after a warm-up batch) in this process: a synthetic (1, C, S, S, D) MetaTensor
    case whose every slice bears brain, cut into batches of ``--batch`` slices."""
    from monai.data import MetaTensor

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    net, _ = build_network(args, device)
    in_channels = net.config["in_channels"]
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (1, in_channels, args.image_size, args.image_size, args.depth)
    affine = torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0], dtype=torch.float64))
    image = MetaTensor((torch.rand(shape, generator=g) * 2 - 1).to(device), affine=affine)
    brain = MetaTensor(torch.ones(1, 1, *shape[2:]), affine=affine)
    inferer = AnoFPDMInferer(
        guidance_scale=args.guidance,
        map_channels=map_channels_for(args, in_channels),
        t_max=args.steps - 1,
        stride=args.strides[0],
        reference=args.reference,
        seed=args.seed,
        precision="bf16" if args.autocast == "bf16" else "fp32",
        threshold=0.0,
    )
    volume = AnoFPDMVolumeInferer(inferer, batch_size=args.batch)
    counted = CountingNetwork(net)
    with torch.no_grad():  # warm-up at the batch shape (allocator, kernels)
        n = min(args.batch, args.depth)
        counted(
            image.as_tensor()[0, ..., :n].permute(3, 0, 1, 2).repeat(2, 1, 1, 1),
            torch.full((2 * n,), 10, device=device),
            torch.full((2 * n,), NULL, device=device),
        )
    counted.reset()
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = volume(image, counted, brain=brain, case_id="bench-case")  # older checkouts ignore case_id
    _sync(device)
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "repo": str(REPO),
        "time_s": elapsed,
        "cpu_s": cpu_s,
        "slices": int(out["kept"].sum()),
        "grid_steps": len(inferer.timesteps),
        "calls": counted.calls,
        "map_mean": float(out["anomaly_map"].float().mean()),
    }


def volume_main(args: argparse.Namespace) -> int:
    """--volume: this checkout (and ``--compare``'s) in fresh subprocesses, alternating the order per repeat."""
    trees = [("this", Path(__file__).resolve().parents[1])]
    if args.compare is not None:
        trees.append(("compare", args.compare.resolve()))
    child_args = [a for a in (sys.argv[1:]) if a != "--volume"]
    if "--compare" in child_args:
        i = child_args.index("--compare")
        del child_args[i : i + 2]
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"device: {args.device} - {describe(torch.device(args.device))}")
    print(
        f"volume: 1 case, {args.depth} slices of {args.image_size}x{args.image_size}, batch {args.batch}, network "
        f"{args.size} (random weights), DDIM, grid 0..{args.steps - 1} stride {args.strides[0]}, "
        f"{args.threads} threads"
    )
    times: dict[str, list[float]] = {name: [] for name, _ in trees}
    cpu: dict[str, list[float]] = {name: [] for name, _ in trees}
    info: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_volume_") as tmp:
        for rep in range(args.repeats):
            order = trees if rep % 2 == 0 else trees[::-1]
            for name, repo in order:
                out = Path(tmp) / f"{name}-{rep}.json"
                env = {**os.environ, "ANOFPDM_BENCH_REPO": str(repo)}
                cmd = [sys.executable, str(Path(__file__).resolve()), *child_args, "--volume-child", str(out)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"volume run of {repo} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(out.read_text())
                times[name].append(r["time_s"])
                cpu[name].append(r["cpu_s"])
                info[name] = r
                print(
                    f"  repeat {rep + 1}/{args.repeats} {name:<8} {r['time_s']:7.2f} s wall {r['cpu_s']:7.2f} s CPU "
                    f"{r['slices'] / r['time_s']:7.3f} slices/s ({r['repo']})",
                    flush=True,
                )
    print()
    print(f"{'checkout':<10} {'repo':<40} {'median wall s':>13} {'median CPU s':>12} {'slices/s':>9} {'calls':>6}")
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for name, repo in trees:
        r = info[name]
        print(
            f"{name:<10} {str(repo):<40} {med[name]:>13.2f} {med_cpu[name]:>12.2f} "
            f"{r['slices'] / med[name]:>9.3f} {r['calls']:>6}"
        )
    if args.compare is not None:
        wall_ratio, cpu_ratio = med["compare"] / med["this"], med_cpu["compare"] / med_cpu["this"]
        print(f"ratio of the medians compare/this: wall {wall_ratio:.3f}x, CPU {cpu_ratio:.3f}x (> 1: this is faster)")
        # the two runs of a repeat are adjacent in time: their ratio is less exposed to other load on the machine
        paired = [c / t for c, t in zip(times["compare"], times["this"])]
        paired_cpu = [c / t for c, t in zip(cpu["compare"], cpu["this"])]
        print(
            f"median of the per-repeat ratios compare/this: wall {statistics.median(paired):.3f}x, "
            f"CPU {statistics.median(paired_cpu):.3f}x (per repeat, CPU: {[round(r, 3) for r in paired_cpu]})"
        )
    if args.json is not None:
        payload = {"command": sys.argv, "device": describe(torch.device(args.device)), "times": times, "cpu": cpu}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


# -------------------------------------------------------------------------------------------------------- accuracy
def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def accuracy(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """Per-slice agreement of ``other`` with ``ref`` (both summaries on the same inputs), averaged over the batch."""
    h_ref, h = ref["summary"]["anomaly_map"].double(), other["summary"]["anomaly_map"].double()
    rel = (h - h_ref).abs().flatten(1).mean(1) / h_ref.flatten(1).mean(1).clamp_min(1e-30)
    r = _pearson(h, h_ref)
    te_ref = ref["timesteps"][ref["summary"]["end_index"]]
    te = other["timesteps"][other["summary"]["end_index"]]
    dte = (te - te_ref).abs().float()
    dcos = (other["summary"]["cosine"].double() - ref["summary"]["cosine"].double()).abs()
    out = {
        "map_rel_mad": float(rel.mean()),
        "pearson": float(r.mean()),
        "pearson_min": float(r.min()),
        "dte_mean": float(dte.mean()),
        "dte_max": float(dte.max()),
        "dcos_mean": float(dcos.mean()),
    }
    if "mask" in ref and "mask" in other and bool(ref["mask"].any()):
        out["dice"] = float(dice_per_slice(other["mask"], ref["mask"]).mean())
    return out


def agreement(official: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    """Max differences between the official re-enactment and ours on the same grid (same formulas)."""
    a, b = official["summary"], ours["summary"]

    def maxdiff(key: str) -> tuple[float, float]:
        d = (a[key].double() - b[key].double()).abs().max()
        return float(d), float(d / a[key].double().abs().max().clamp_min(1e-30))

    out: dict[str, float] = {}
    for key in ("anomaly_map", "maps_m", "divergence", "mse_guided", "mse_reference", "cosine"):
        out[f"{key}_abs"], out[f"{key}_rel"] = maxdiff(key)
    dte = (a["end_index"] - b["end_index"]).abs()
    out["te_equal_frac"] = float((dte == 0).float().mean())
    out["te_max_diff"] = float(dte.max())
    return out


def add_masks(results: dict[str, dict[str, Any]], ref_name: str, image_size: int) -> torch.Tensor:
    """Algorithm-1 masks for every ``ours`` configuration with one stand-in calibration: M_max per modality = the
    batch maximum of M_t at stride 1 (no calibration set here); the same M_max for every stride."""
    ref = results[ref_name]["result"]
    m_max = ref.divergence_max("per_modality")[0].amax(dim=0).clamp_min(1e-12)
    for r in results.values():
        if r.get("result") is None:
            continue
        channels = list(range(r["result"].divergence.shape[-1]))
        inferer = AnoFPDMInferer(
            map_channels=channels,
            m_max=m_max.tolist(),
            t_max=1,
            stride=1,
            min_component_size=scaled_min_component_size(image_size),
        )
        r["mask"] = inferer.postprocess(r["result"]).mask_ungated
    return m_max


# ------------------------------------------------------------------------------------------------------------ main
def _fmt_mb(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    return f"{b / MB:.2f}" if b < 100 * MB else f"{b / MB:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="network preset (tiny, small, medium, paper)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4, help="input channels (random weights only)")
    parser.add_argument("--map-channels", type=int, nargs="+", default=None, help="default: 0 3 for 4 channels")
    parser.add_argument("--batch", type=int, default=None, help="slices per batch (default: 8 on CPU, 16 on CUDA)")
    parser.add_argument("--steps", type=int, default=600, help="grid 0..steps-1 (the official code: 600)")
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument(
        "--official-steps",
        type=int,
        default=None,
        help="grid length of the official re-enactment, scaled per step to --steps "
        "(default: 100 on CPU, --steps on CUDA; 0 skips it)",
    )
    parser.add_argument(
        "--official-eps",
        choices=["raw", "rederived"],
        default="raw",
        help="inversion noise of the re-enactment: raw null prediction (the library's formula, so the agreement "
        "check is exact) or re-derived from the clipped x0 (guided-diffusion's ddim_reverse_sample)",
    )
    parser.add_argument(
        "--measured",
        type=int,
        nargs=2,
        action="append",
        default=[],
        metavar=("STRIDE", "EVERY"),
        help="also ours at STRIDE with the statistics measured at every EVERY-th step (repeatable)",
    )
    parser.add_argument("--guidance", type=float, default=2.0, help="w")
    parser.add_argument("--reference", choices=["null", "healthy"], default="null")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none", help="autocast of ours (CUDA)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="CUDA only")
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained model.pt (load_network)")
    parser.add_argument("--no-ema", action="store_true", help="use the checkpoint's raw weights, not the EMA ones")
    parser.add_argument("--data", type=Path, default=None, help="slice-cache folder with cases/<case>/image.npy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--in-process", action="store_true", help="run configurations in this process (faster, no RSS figures)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--volume", action="store_true", help="measure volume inference (slices/s) instead")
    parser.add_argument("--depth", type=int, default=16, help="--volume: slices of the synthetic case")
    parser.add_argument("--compare", type=Path, default=None, help="--volume: another checkout to run side by side")
    parser.add_argument("--volume-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    if args.volume_child is not None:
        args.batch = args.batch or (8 if args.device == "cpu" else 64)
        args.volume_child.write_text(json.dumps(volume_run(args)))
        return 0
    if args.volume:
        return volume_main(args)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available")
    cpu = args.device == "cpu"
    args.batch = args.batch or (8 if cpu else 16)
    if args.official_steps is None:
        args.official_steps = min(100, args.steps) if cpu else args.steps
    if any(s < 1 for s in args.strides) or args.steps < 1 or args.official_steps < 0:
        parser.error("strides and steps must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    net, weights_note = build_network(args, device)
    in_channels = net.config["in_channels"]
    args.channels = in_channels
    x0, data_note = load_inputs(args, in_channels, device)
    channels = map_channels_for(args, in_channels)
    B, C, H, W = x0.shape
    params = sum(p.numel() for p in net.parameters()) / 1e6
    del net

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"device: {args.device} - {describe(device)}")
    print(f"network: {params:.2f}M parameters, {weights_note}")
    if not args.checkpoint:
        print("NOTE: random weights - timings and call counts are real, the accuracy columns only show how far the")
        print("      stride changes the numbers of an untrained network; use --checkpoint/--data for real accuracy.")
    print(f"inputs: {data_note}; batch {B}, {C} channels, map channels {channels}, {H}x{W}")
    print(
        f"method: DDIM forward, w={args.guidance}, reference={args.reference}, v2 divergence, per-modality t_e, "
        f"mean aggregation; grid 0..{args.steps - 1}; autocast(ours)={args.autocast}"
    )

    configs: list[dict[str, Any]] = []
    if args.official_steps:
        configs.append({"name": "official", "kind": "official", "steps": args.official_steps, "stride": 1})
        if args.official_steps != args.steps:
            configs.append({"name": "ours-official-grid", "kind": "ours", "steps": args.official_steps, "stride": 1})
    strides = sorted(set([1, *args.strides]))
    for s in strides:
        configs.append({"name": f"ours-s{s}", "kind": "ours", "steps": args.steps, "stride": s})
    for s, e in args.measured:
        configs.append({"name": f"ours-s{s}m{e}", "kind": "ours", "steps": args.steps, "stride": s, "measure_every": e})

    results: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {c["name"]: [] for c in configs}
    cpu_times: dict[str, list[float]] = {c["name"]: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="bench_inferer_") as tmp:
        for rep in range(args.repeats):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]  # rotate: no fixed position bias
            for cfg in order:
                first = rep == 0
                if args.in_process:
                    r = run_config(args, cfg, save_tensors=first)
                else:
                    r = run_in_child(args, cfg, first, Path(tmp))
                times[cfg["name"]].append(r["time_s"])
                cpu_times[cfg["name"]].append(r["cpu_s"])
                if first:
                    results[cfg["name"]] = r
                else:
                    for key in ("rss_peak_mb", "rss_before_mb", "cuda_peak_mb", "cuda_delta_mb"):
                        if key in r:
                            results[cfg["name"]][key] = max(results[cfg["name"]][key], r[key])
                print(
                    f"  repeat {rep + 1}/{args.repeats} {cfg['name']:<20} {r['time_s']:8.2f} s wall "
                    f"{r['cpu_s']:8.2f} s CPU ({r['calls']} calls)",
                    flush=True,
                )

    m_max = add_masks(results, "ours-s1", H)
    mask_px = results["ours-s1"]["mask"].flatten(1).sum(1).float()
    if float(m_max.max()) < 1e-10:
        print(
            f"WARNING: max M_t = {float(m_max.max()):.1e}: the network's prediction does not depend on the label "
            "(untrained, or EMA weights still at their zero-initialised start); t_e and the accuracy columns are noise."
        )
    ref = results["ours-s1"]
    off = results.get("official")
    scale = args.steps / args.official_steps if off else 1.0
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_times.items()}

    rows = []
    for cfg in configs:
        r = results[cfg["name"]]
        label = {
            "official": f"official pattern, {cfg['steps']} steps (measured)",
            "ours-official-grid": f"ours stride 1, {cfg['steps']} steps (official's grid)",
        }.get(cfg["name"], f"ours stride {cfg['stride']}, {args.steps} steps")
        if cfg.get("measure_every", 1) > 1:
            label = f"ours stride {cfg['stride']}, measured every {cfg['measure_every']}"
        row = {
            "config": label,
            "name": cfg["name"],
            "range": cfg["steps"],
            "grid": r["grid_steps"],
            "evals": r["evals_per_slice"],
            "time": med[cfg["name"]],
            "cpu": med_cpu[cfg["name"]],
            "times": times[cfg["name"]],
            "held": r["held_bytes"],
            "rss": r["rss_peak_mb"] if not args.in_process else None,
            "rss_delta": (r["rss_peak_mb"] - r["rss_before_mb"]) if not args.in_process else None,
            "cuda_peak_mb": r.get("cuda_peak_mb"),
            "acc": accuracy(ref, r) if cfg["name"].startswith("ours-s") else None,
        }
        rows.append(row)
        if cfg["name"] == "official" and scale != 1.0:
            rows.append(
                {
                    "config": f"official pattern, scaled to {args.steps} steps",
                    "name": "official-scaled",
                    "range": args.steps,
                    "grid": args.steps,
                    "evals": 4 * args.steps - 1,
                    "time": row["time"] * scale,
                    "cpu": row["cpu"] * scale,
                    "times": [],
                    "held": official_stored_bytes(B, args.steps, len(channels), H, W),
                    "rss": None,
                    "rss_delta": None,
                    "cuda_peak_mb": None,
                    "acc": None,
                }
            )
    # the official pattern always visits every step of its range: compare each row with the official row (measured
    # or scaled) over the same range 0..steps-1
    official_rows = {r["range"]: r for r in rows if r["name"] in ("official", "official-scaled")}

    print()
    hdr = (
        f"{'configuration':<52} {'grid':>4} {'evals/':>6} {'wall s':>8} {'CPU s':>8} {'slices/s':>8} "
        f"{'speedup':>11} {'held MB':>8} {'RSS MB':>11} | {'map rMAD':>8} {'r':>6} {'|dte|':>9} {'|dcos|':>8} "
        f"{'Dice':>5}"
    )
    print(hdr)
    print(
        f"{'':<52} {'':>4} {'slice':>6} {'/batch':>8} {'/batch':>8} {'(wall)':>8} {'wall/CPU':>11} {'':>8} "
        f"{'peak(+run)':>11} |"
    )
    print("-" * len(hdr))
    for row in rows:
        base = official_rows.get(row["range"])
        speed = f"{base['time'] / row['time']:.1f}/{base['cpu'] / row['cpu']:.1f}x" if base else "-"
        mem = "-"
        if row["cuda_peak_mb"] is not None:
            mem = f"{row['cuda_peak_mb']:.0f} (cuda)"
        elif row["rss"] is not None:
            mem = f"{row['rss']:.0f} (+{row['rss_delta']:.0f})"
        acc = row["acc"]
        if acc:
            dice = f"{acc['dice']:.3f}" if "dice" in acc else "-"
            tail = (
                f"{acc['map_rel_mad']:8.4f} {acc['pearson']:6.4f} {acc['dte_mean']:4.1f}/{acc['dte_max']:<4.0f} "
                f"{acc['dcos_mean']:8.2e} {dice:>5}"
            )
        else:
            tail = f"{'-':>8} {'-':>6} {'-':>9} {'-':>8} {'-':>5}"
        print(
            f"{row['config']:<52} {row['grid']:>4} {row['evals']:>6.0f} {row['time']:>8.2f} {row['cpu']:>8.2f} "
            f"{B / row['time']:>8.3f} {speed:>11} {_fmt_mb(row['held']):>8} {mem:>11} | {tail}"
        )
    print("-" * len(hdr))
    legend = [
        "evals/slice: network evaluations per slice (a batched [healthy, null] call counts 2).",
        "wall s / CPU s: median per batch over the repeats (CPU s = this process's CPU time over all threads,",
        "  less sensitive to other users of the machine).",
        "speedup: time of the official pattern over the same step range (all of its steps; scaled when measured",
        "  shorter) / time of this row, wall/CPU.",
        "held MB: tensors kept across steps (official: the stored x0 predictions, guided + reference; ours: the",
        "  streamed state). RSS: high-water mark of the configuration's own subprocess (growth during the run).",
        "Accuracy, against ours at stride 1 on the full grid, averaged over slices: map rMAD = mean |H - H_1| / mean",
        "  H_1; r = Pearson of the maps; |dte| = mean/max |t_e - t_e,1| in steps; |dcos| = mean |c - c_1|; Dice of",
        f"  the Algorithm-1 masks (5x5 median, components <= {scaled_min_component_size(H)} px removed: 40 px at"
        " 128x128 scaled by area)",
        f"  with a stand-in M_max = the stride-1 batch maximum per modality {[round(v, 5) for v in m_max.tolist()]};",
        f"  stride-1 masks: {mask_px.mean():.0f} px per slice on average (of {H * W}), min {mask_px.min():.0f}.",
    ]
    print("\n".join(legend))
    print("wall s per repeat: " + "; ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in times.items()))
    print("CPU s per repeat:  " + "; ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in cpu_times.items()))
    post = [r["post_s"] for r in results.values() if r.get("post_s") is not None]
    if post:
        print(f"post-processing (median filter, threshold, components; same for both): {statistics.median(post):.3f} s")

    agree = None
    if off:
        twin = results["ours-official-grid" if "ours-official-grid" in results else "ours-s1"]
        agree = agreement(off, twin)
        direct = med["official"] / med[twin["name"]]
        direct_cpu = med_cpu["official"] / med_cpu[twin["name"]]
        print()
        print(
            f"official vs ours on the same {args.official_steps}-step grid: ours {direct:.2f}x faster in wall time, "
            f"{direct_cpu:.2f}x in CPU time "
            f"({off['evals_per_slice']:.0f} vs {twin['evals_per_slice']:.0f} evaluations per slice, "
            f"{off['calls']} vs {twin['calls']} network calls)"
        )
        print(f"agreement (official re-enactment, inversion eps = {args.official_eps}, vs ours), max |difference|:")
        for key in ("anomaly_map", "maps_m", "divergence", "mse_guided", "mse_reference", "cosine"):
            print(f"  {key:<14} abs {agree[key + '_abs']:.3e}  relative to max {agree[key + '_rel']:.3e}")
        print(
            f"  t_e            equal for {agree['te_equal_frac']:.0%} of slice/modality pairs, max diff "
            f"{agree['te_max_diff']:.0f} steps"
        )
    print()
    cm = len(channels)
    for b_, s_ in ((B, H), (100, 128)):
        print(
            f"memory held at batch {b_}, {s_}x{s_}, {cm} map modalities, {args.steps} steps: official "
            f"{official_stored_bytes(b_, args.steps, cm, s_, s_) / 2**30:.2f} GiB (stored predictions) vs ours "
            f"{ours_state_bytes(b_, args.steps, C, cm, s_, s_) / MB:.1f} MiB (streamed state)"
        )

    if args.json is not None:
        payload = {
            "command": sys.argv,
            "device": describe(device),
            "weights": weights_note,
            "inputs": data_note,
            "rows": [{k: v for k, v in r.items()} for r in rows],
            "agreement": agree,
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
