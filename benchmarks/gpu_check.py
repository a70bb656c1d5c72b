"""One command for a GPU machine: training, resumption, the training bundle under torchrun, the inferer against the
official call pattern, and volume inference of a real case, in one table.

Parts (each in its own try/except: a failing part is a row with status ``FAILED`` and the others still run):

- ``train``: the paper-size network (``build_diffusion_unet(size="paper")``) trained for a few hundred iterations at
  128 x 128 on synthetic slices, global batch 64, with the bundle's training pieces (classifier-free prepare-batch,
  class-conditioned inferer, MSE, AdamW) under AMP bf16, channels_last and SDPA attention: loss finite and falling,
  slices/s, peak memory.
- ``resume``: train N iterations, save model + optimizer + prepare-batch generator + RNG states, train M more; restore
  the saved states into a freshly built network and train M: the weights must be equal.
- ``bundle``: ``train.json`` of the BraTS bundle with ``multi_gpu_train.json`` under
  ``torchrun --nproc_per_node=1`` (nccl on GPU, gloo on CPU) on a small synthetic dataset.
- ``inferer``: ours (``AnoFPDMInferer``) at the library's default grid and at stride 1 against the official call
  pattern re-enacted in ``bench_inferer.py`` (its functions are imported): network evaluations per slice, slices/s,
  seconds per 155-slice volume, speed-up; bf16 against fp32 map agreement (Pearson r, Dice of the Algorithm-1
  masks); optionally the network under ``torch.compile`` (its own row).
- ``volume``: volume inference end to end (NIfTI in, preprocessing, forward process, post-processing, inversion to
  the input grid, NIfTI out) of ``--case`` (a folder with the case's NIfTI files), else of a synthetic case.

Random weights (zero-initialised output layers re-drawn, as in bench_inferer): timings and memory are real, maps are
not meant to find anything. ``--smoke`` runs every part on CPU with tiny settings in well under a minute (the test
``tests/test_gpu_check.py`` runs it). The table (markdown) is printed and written with a JSON file to ``--out``
(default ``$OUT`` when set, else ``runs/gpu_check``). Run from the repository root; see benchmarks/README.md for the
commands on a GPU machine without MONAI.

Usage::

    python3 benchmarks/gpu_check.py --case gpu_case/BraTS2021_00006     # GPU, sized for at most 8 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check          # CPU, tiny settings
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_inferer as bi  # noqa: E402

from anofpdm_monai.bundle import config_files  # noqa: E402
from anofpdm_monai.engines import ClassConditionedDiffusionInferer, ClassifierFreePrepareBatch  # noqa: E402
from anofpdm_monai.engines.handlers import RNGState  # noqa: E402
from anofpdm_monai.inferers import AnoFPDMInferer  # noqa: E402
from anofpdm_monai.metrics import dice_per_slice  # noqa: E402
from anofpdm_monai.networks import build_diffusion_unet, load_checkpoint  # noqa: E402
from anofpdm_monai.postprocessing import scaled_min_component_size  # noqa: E402
from anofpdm_monai.schedule import NoiseSchedule  # noqa: E402
from anofpdm_monai.settings import AnoFPDMSettings  # noqa: E402

BRATS = ["flair", "t1", "t1ce", "t2"]
MAP_CHANNELS = [0, 3]  # FLAIR and T2, as the BraTS bundle
GIB = 2.0**30


@dataclass
class Plan:
    """The sizes of one run: the GPU plan or the CPU smoke plan."""

    device: str
    size: str
    image_size: int
    train_batch: int
    train_iters: int
    train_max_s: float
    resume_batch: int
    resume_first: int
    resume_more: int
    bundle_size: str
    bundle_image_size: int
    bundle_batch: int
    infer_batch: int
    t_max: int
    official_steps: int
    compile: bool
    volume_batch: int
    autocast: bool


def gpu_plan() -> Plan:
    return Plan(
        device="cuda",
        size="paper",
        image_size=128,
        train_batch=64,
        train_iters=300,
        train_max_s=150.0,
        resume_batch=16,
        resume_first=10,
        resume_more=10,
        bundle_size="paper",
        bundle_image_size=128,
        bundle_batch=16,
        infer_batch=64,
        t_max=AnoFPDMSettings().t_max,
        official_steps=50,
        compile=True,
        volume_batch=160,
        autocast=True,
    )


def smoke_plan() -> Plan:
    return Plan(
        device="cpu",
        size="tiny",
        image_size=32,
        train_batch=4,
        train_iters=6,
        train_max_s=20.0,
        resume_batch=2,
        resume_first=2,
        resume_more=2,
        bundle_size="tiny",
        bundle_image_size=32,
        bundle_batch=8,
        infer_batch=2,
        t_max=9,
        official_steps=3,
        compile=False,
        volume_batch=64,
        autocast=False,
    )


# --------------------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """Peak GPU memory since the last reset; on CPU the process's RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _amp(plan: Plan, device: torch.device) -> Any:
    if plan.autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def synthetic_slices(n: int, size: int, channels: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, C, S, S) brain-like slices in [-1, 1] (the phantom's tissue maps mixed per channel, shifted and scaled per
    slice) and random slice labels; built in torch, nothing written to disk."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    out = torch.empty(n, channels, size, size)
    for i in range(n):
        c = (torch.rand(4, generator=g) - 0.5) * 0.3
        a, b = 0.75 + 0.1 * float(c[0]), 0.85 + 0.1 * float(c[1])
        r = torch.sqrt(((xx - float(c[2])) / a) ** 2 + ((yy - float(c[3])) / b) ** 2)
        brain = ((1 - r) / 0.05).clamp(0, 1)
        cortex = (brain - ((0.85 - r) / 0.05).clamp(0, 1)).clamp(0, 1)
        vent = ((1 - torch.sqrt(((xx.abs() - 0.18) / 0.1) ** 2 + (yy / 0.35) ** 2)) / 0.2).clamp(0, 1) * brain
        white = (brain - cortex - vent).clamp(0, 1)
        for ch in range(channels):
            w = torch.rand(3, generator=g)
            img = w[0] * vent + w[1] * cortex + w[2] * white + 0.02 * torch.randn(size, size, generator=g)
            out[i, ch] = 2 * (img - img.min()) / (img.max() - img.min() + 1e-5) - 1
    labels = torch.randint(0, 2, (n,), generator=g)
    return out, labels


class Trainer:
    """The training step of the bundle's ``SupervisedTrainer`` (prepare-batch, class-conditioned inferer, MSE, AdamW)
    on in-memory slices, under AMP bf16 and channels_last on CUDA; every random draw is checkpointable."""

    def __init__(self, plan: Plan, device: torch.device, batch: int, seed: int) -> None:
        from monai.networks.schedulers import DDPMScheduler

        self.plan, self.device, self.batch = plan, device, batch
        cuda = device.type == "cuda"
        torch.manual_seed(seed)
        self.net = build_diffusion_unet(4, plan.size, use_flash_attention=cuda).to(device).train()
        if cuda:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
        self.inferer = ClassConditionedDiffusionInferer(scheduler)
        self.prepare = ClassifierFreePrepareBatch(num_train_timesteps=1000, p_uncond=0.1, seed=None)
        self.prepare.generator.manual_seed(seed)
        self.sampler = torch.Generator().manual_seed(seed + 1)
        # the same data for every trainer (a dataset does not change with the run's seed)
        self.images, self.labels = synthetic_slices(max(4 * batch, 16), plan.image_size, seed=100)
        if cuda:
            self.images = self.images.pin_memory()

    def step(self) -> float:
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.sampler)
        batch = {"image": self.images[idx], "class_label": self.labels[idx]}
        cuda = self.device.type == "cuda"
        images, target, args, kwargs = self.prepare(batch, device=self.device, non_blocking=cuda)
        if cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        with _amp(self.plan, self.device):
            pred = self.inferer(images, self.net, *args, **kwargs)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "prepare_batch": self.prepare.state_dict(),
            "sampler": self.sampler.get_state(),
            "rng": RNGState().state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.prepare.load_state_dict(state["prepare_batch"])
        self.sampler.set_state(state["sampler"])
        RNGState().load_state_dict(state["rng"])


# ------------------------------------------------------------------------------------------------------------ parts
def part_train(plan: Plan, device: torch.device, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    trainer = Trainer(plan, device, plan.train_batch, seed=0)
    for _ in range(3 if device.type == "cuda" else 1):  # warm-up: kernels, allocator, attention backend
        trainer.step()
    _sync(device)
    _reset_peak(device)
    losses, times = [], []
    start = time.perf_counter()
    for _ in range(plan.train_iters):
        t0 = time.perf_counter()
        losses.append(trainer.step())  # float(loss) synchronises
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > plan.train_max_s:
            break
    peak = _peak_gib(device)
    n = len(losses)
    k = max(1, n // 10)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    finite = all(math.isfinite(v) for v in losses)
    falling = last < first
    params = sum(p.numel() for p in trainer.net.parameters()) / 1e6
    del trainer
    median = statistics.median(times)
    amp = "bf16 autocast, channels_last, SDPA" if device.type == "cuda" and plan.autocast else "fp32"
    return [
        {
            "part": "a train",
            "item": f"{plan.size} net ({params:.1f}M), {plan.image_size}px, batch {plan.train_batch}, {amp}",
            "ok": finite and falling,
            "why": "" if finite and falling else f"loss finite={finite}, falling={falling}",
            "figures": {
                "iterations": n,
                "loss_first": first,
                "loss_last": last,
                "slices_per_s": plan.train_batch / median,
                "median_step_s": median,
                "peak_gib": peak,
            },
            "text": f"{n} it, loss {first:.3f} -> {last:.3f}, {plan.train_batch / median:.1f} slices/s, "
            f"peak {peak:.2f} GiB{' (RSS)' if device.type == 'cpu' else ''}",
        }
    ]


def part_resume(plan: Plan, device: torch.device, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        a = Trainer(plan, device, plan.resume_batch, seed=1)
        for _ in range(plan.resume_first):
            a.step()
        saved = copy.deepcopy(a.state_dict())  # in memory, as torch.save would keep it
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(saved, Path(tmp) / "checkpoint.pt")
            saved = load_checkpoint(Path(tmp) / "checkpoint.pt", map_location=device)  # the safe loader
        for _ in range(plan.resume_more):
            a.step()
        b = Trainer(plan, device, plan.resume_batch, seed=2)  # other initial weights and streams: restore must win
        b.load_state_dict(saved)
        for _ in range(plan.resume_more):
            b.step()
        diffs = [
            float((pa.detach().float() - pb.detach().float()).abs().max())
            for pa, pb in zip(a.net.parameters(), b.net.parameters())
        ]
        moved = max(
            float((p.detach().float() - saved["model"][k].float()).abs().max()) for k, p in a.net.named_parameters()
        )
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    worst = max(diffs)
    bitwise = worst == 0.0
    ok = worst <= 1e-5 and moved > 0
    return [
        {
            "part": "b resume",
            "item": f"{plan.resume_first} it, save, {plan.resume_more} more vs restore + {plan.resume_more}",
            "ok": ok,
            "why": "" if ok else "the resumed weights differ by more than 1e-5, or nothing was trained",
            "figures": {"max_abs_weight_diff": worst, "weights_moved_after_save": moved, "bitwise_equal": bitwise},
            "text": f"max abs weight difference {worst:.1e} ({'bitwise equal' if bitwise else 'not bitwise'}), "
            f"weights moved {moved:.1e} after the save",
        }
    ]


def _synthetic_data(root: Path, smoke: bool) -> dict[str, Any]:
    """A small synthetic BraTS-like dataset (training 2, validation 1, test 1) with its datalist."""
    from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy

    shape, spacing = ((32, 40, 24), 6.0) if smoke else ((64, 72, 48), 3.0)
    anatomy = phantom_anatomy(shape=shape, spacing=spacing)
    splits = {"training": 1 if smoke else 2, "validation": 1, "test": 1}
    datalist = make_dataset(root / "data", anatomy, splits=splits, modalities=BRATS)
    (root / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return {"dataset_dir": root / "data", "datalist": root / "datalist.json", "entries": datalist}


def part_bundle(plan: Plan, device: torch.device, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    tmp = Path(ctx["tmp"])
    data = ctx.setdefault("data", _synthetic_data(tmp / "synthetic", ctx["smoke"]))
    out = tmp / "bundle_out"
    overrides = {
        "dataset_dir": data["dataset_dir"],
        "datalist": data["datalist"],
        "cache_dir": tmp / "bundle_cache",
        "output_dir": out,
        "image_size": plan.bundle_image_size,
        "network_size": plan.bundle_size,
        "batch_size": plan.bundle_batch,
        "val_batch_size": 2 * plan.bundle_batch,
        "num_workers": 0,
        "progress": False,
        "num_epochs": 1,
    }
    files = config_files("anofpdm_brats21", "train", "multi_gpu_train")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", str(files)]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    if device.type == "cuda":
        env["NCCL_DEBUG"] = "INFO"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even where a GPU exists
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    (Path(ctx["out"]) / "bundle_log.txt").write_text(log[-200_000:])
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {log.strip().splitlines()[-1] if log.strip() else ''}")
    final = load_checkpoint(out / "model.pt")
    iterations = int(final.get("iteration", 0))
    backend = "nccl" if device.type == "cuda" else "gloo"
    seen = ("NCCL INFO" in log) if device.type == "cuda" else True
    ok = iterations > 0 and "Engine run finished" in log and seen
    return [
        {
            "part": "c bundle",
            "item": f"train.json + multi_gpu_train.json, torchrun 1 process, {backend}, {plan.bundle_size} net, "
            f"{plan.bundle_image_size}px",
            "ok": ok,
            "why": "" if ok else f"iterations {iterations}, finished {'Engine run finished' in log}, nccl seen {seen}",
            "figures": {"iterations": iterations, "wall_s": wall},
            "text": f"{iterations} iterations, whole command {wall:.1f} s (start-up, cache, 1 epoch)",
        }
    ]


def _inputs(plan: Plan, device: torch.device) -> torch.Tensor:
    x, _ = synthetic_slices(plan.infer_batch, plan.image_size, seed=5)
    return x.to(device)


def part_inferer(plan: Plan, device: torch.device, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    args = argparse.Namespace(checkpoint=None, seed=0, channels=4, size=plan.size, channels_last=cuda)
    net, _ = bi.build_network(args, device)
    counted = bi.CountingNetwork(net)
    x0 = _inputs(plan, device)
    if cuda:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    B, _, H, _ = x0.shape
    default = AnoFPDMSettings(t_max=plan.t_max)
    default_grid = default.grid()
    stride_grid = AnoFPDMSettings(t_max=plan.t_max, stride=1).grid()
    with torch.no_grad():  # warm-up at both batch shapes
        for n in (B, 2 * B):
            counted(torch.cat([x0] * (n // B)), torch.full((n,), 10, device=device), torch.full((n,), 2, device=device))
    runs: dict[str, dict[str, Any]] = {}

    def ours(name: str, grid: list[int], precision: str, network: Any = counted, tf32: bool = True) -> None:
        inferer = AnoFPDMInferer(guidance_scale=2.0, map_channels=MAP_CHANNELS, timesteps=grid, precision=precision)
        allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            counted.reset()
            _sync(device)
            _reset_peak(device)
            t0 = time.perf_counter()
            result = inferer.forward_process(x0, network)
            _sync(device)
            elapsed = time.perf_counter() - t0
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
        runs[name] = {
            "result": bi._result_to_cpu(result),
            "time": elapsed,
            "evals": counted.samples / B if network is counted else 2.0 * len(grid),
            "grid": len(grid),
            "peak": _peak_gib(device),
        }

    amp = "bf16" if (cuda and plan.autocast) else "fp32"
    ours("default", default_grid, amp)
    ours("stride1", stride_grid, amp)
    ours("default_fp32", default_grid, "fp32", tf32=False)
    # the official call pattern over a shorter grid, scaled per step to the stride-1 range (it visits every step)
    counted.reset()
    _sync(device)
    _reset_peak(device)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.perf_counter()
    stored = bi.official_forward(
        counted, x0, NoiseSchedule(), list(range(plan.official_steps)), 2.0, MAP_CHANNELS, generator=gen
    )
    bi.official_aggregate(stored, x0, MAP_CHANNELS)
    _sync(device)
    official_time = (time.perf_counter() - t0) * len(stride_grid) / plan.official_steps
    official_peak = _peak_gib(device)
    official_evals = 4 * len(stride_grid) - 1
    del stored

    # bf16 against fp32 on the default grid: maps and Algorithm-1 masks (stand-in M_max = the fp32 batch maximum)
    masks = {"ref": {"result": runs["default_fp32"]["result"]}, "bf16": {"result": runs["default"]["result"]}}
    bi.add_masks(masks, "ref", H)
    maps = {k: v["result"].anomaly_maps()[0].mean(dim=1) for k, v in masks.items()}
    pearson = float(bi._pearson(maps["bf16"], maps["ref"]).mean())
    dice = (
        float(dice_per_slice(masks["bf16"]["mask"], masks["ref"]["mask"]).mean()) if masks["ref"]["mask"].any() else 1.0
    )
    te_equal = float((runs["default"]["result"].end_index == runs["default_fp32"]["result"].end_index).float().mean())

    rows = []
    unit = "GPU peak GiB" if cuda else "RSS GiB"
    dtype_name = amp

    def row(
        item: str, time_s: float, evals: float, grid: int, peak: float, extra: dict[str, Any] | None = None
    ) -> None:
        sps = B / time_s
        figures = {
            "evals_per_slice": evals,
            "grid_steps": grid,
            "slices_per_s": sps,
            "s_per_155_slice_volume": 155 / sps,
            "speedup_vs_official": official_time / time_s,
            "peak_gib": peak,
        }
        figures.update(extra or {})
        rows.append(
            {
                "part": "d inferer",
                "item": item,
                "ok": True,
                "why": "",
                "figures": figures,
                "text": f"{evals:.0f} evals/slice, {sps:.2f} slices/s, {155 / sps:.1f} s/volume, "
                f"{official_time / time_s:.1f}x official, {unit} {peak:.2f}",
            }
        )

    row(
        f"ours, default grid 0..{default_grid[-1]} ({len(default_grid)} steps), {dtype_name}",
        runs["default"]["time"],
        runs["default"]["evals"],
        len(default_grid),
        runs["default"]["peak"],
    )
    row(
        f"ours, stride 1 ({len(stride_grid)} steps), {dtype_name}",
        runs["stride1"]["time"],
        runs["stride1"]["evals"],
        len(stride_grid),
        runs["stride1"]["peak"],
    )
    row(
        "ours, default grid, fp32 (no TF32)",
        runs["default_fp32"]["time"],
        runs["default_fp32"]["evals"],
        len(default_grid),
        runs["default_fp32"]["peak"],
    )
    row(
        f"official pattern (4 unbatched calls/step), {plan.official_steps} steps scaled to {len(stride_grid)}",
        official_time,
        official_evals,
        len(stride_grid),
        official_peak,
    )
    ok = pearson > 0.99 and dice > 0.9
    rows.append(
        {
            "part": "d inferer",
            "item": f"{dtype_name} vs fp32 agreement, default grid, batch {B}",
            "ok": ok,
            "why": "" if ok else "maps differ more than expected (r <= 0.99 or Dice <= 0.9)",
            "figures": {"map_pearson_r": pearson, "mask_dice": dice, "te_equal_fraction": te_equal},
            "text": f"map Pearson r {pearson:.4f}, mask Dice {dice:.3f}, t_e equal for {te_equal:.0%}",
        }
    )
    if plan.compile:
        remaining = ctx["deadline"] - time.perf_counter()
        if remaining < 120:
            rows.append(
                {
                    "part": "d inferer",
                    "item": "ours + torch.compile",
                    "ok": True,
                    "why": "",
                    "figures": {},
                    "text": f"skipped: {remaining:.0f} s left of the time budget",
                }
            )
        else:
            try:
                t0 = time.perf_counter()
                compiled = torch.compile(net, dynamic=False)
                with torch.no_grad():
                    compiled(
                        torch.cat([x0, x0]),
                        torch.full((2 * B,), 10, device=device),
                        torch.full((2 * B,), 2, device=device),
                    )
                _sync(device)
                compile_s = time.perf_counter() - t0
                ours("compiled", default_grid, amp, network=compiled)
                speed = runs["default"]["time"] / runs["compiled"]["time"]
                row(
                    f"ours, default grid, {dtype_name}, torch.compile (compile {compile_s:.0f} s not counted)",
                    runs["compiled"]["time"],
                    2.0 * len(default_grid),
                    len(default_grid),
                    runs["compiled"]["peak"],
                    {"compile_s": compile_s, "speedup_vs_eager": speed},
                )
                rows[-1]["text"] += f", {speed:.2f}x eager"
            except Exception as exc:  # noqa: BLE001 - optional: its failure must not hide the rows above
                rows.append(
                    {
                        "part": "d inferer",
                        "item": "ours + torch.compile",
                        "ok": False,
                        "why": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                        "figures": {},
                        "text": "",
                    }
                )
    ctx["inferer_net"] = net
    return rows


def _case_entry(case: Path) -> dict[str, Any]:
    from anofpdm_monai.data.datalist import datalist_from_folder

    found = datalist_from_folder(case.parent, modalities=BRATS, report_unusable=True)
    entries = [e for e in found["test"] if str(e["id"]) == case.name]
    if not entries:
        reason = found["unusable"].get(case.name, "not found")
        raise RuntimeError(f"case {case}: {reason}")
    return entries[0]


def part_volume(plan: Plan, device: torch.device, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    import nibabel as nib

    from anofpdm_monai.apps.inference import VolumeInferer
    from anofpdm_monai.data import VolumePreprocessor

    cuda = device.type == "cuda"
    if ctx["case"] is not None:
        case = Path(ctx["case"]).resolve()
        entry = _case_entry(case)
        source = f"case {case.name}"
    else:
        data = ctx.setdefault("data", _synthetic_data(Path(ctx["tmp"]) / "synthetic", ctx["smoke"]))
        raw = data["entries"]["test"][0]
        root = Path(data["dataset_dir"])
        entry = {"id": raw["id"], "image": [str(root / p) for p in raw["image"]], "label": str(root / raw["label"])}
        source = f"synthetic case {raw['id']}"
    net = ctx.get("inferer_net")
    if net is None:
        args = argparse.Namespace(checkpoint=None, seed=0, channels=4, size=plan.size, channels_last=cuda)
        net, _ = bi.build_network(args, device)
    counted = bi.CountingNetwork(net)
    settings = AnoFPDMSettings(t_max=plan.t_max, min_component_size=scaled_min_component_size(plan.image_size))
    inferer = AnoFPDMInferer(
        settings,
        map_channels=MAP_CHANNELS,
        m_max=[1e-3, 1e-3],  # stand-in calibration: random weights
        precision="bf16" if (cuda and plan.autocast) else "fp32",
    )
    pre = VolumePreprocessor(modalities=BRATS, image_size=plan.image_size)
    runner = VolumeInferer(counted, inferer, pre, batch_size=plan.volume_batch, device=device, progress=False)
    out_dir = Path(ctx["tmp"]) / "volume_out"
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    summary = runner.run([entry], out_dir, raise_on_failure=True)
    _sync(device)
    wall = time.perf_counter() - t0
    written = sorted(p for p in out_dir.rglob("*.nii.gz"))
    depth = int(nib.load(entry["image"][0]).shape[-1])
    kept = counted.samples / max(1, 2 * len(settings.grid()))
    ok = bool(summary.get("done")) and not summary.get("failed") and bool(written)
    return [
        {
            "part": "e volume",
            "item": f"{source}: NIfTI in -> maps/masks out, {plan.image_size}px, grid {len(settings.grid())} steps, "
            f"batch {plan.volume_batch}",
            "ok": ok,
            "why": "" if ok else f"summary {summary}",
            "figures": {
                "wall_s": wall,
                "axial_slices": depth,
                "brain_slices": kept,
                "s_per_brain_slice": wall / max(kept, 1),
                "peak_gib": _peak_gib(device),
            },
            "text": f"{wall:.2f} s end to end, {kept:.0f} of {depth} slices through the network, "
            f"{len(written)} NIfTI written",
        }
    ]


PARTS: dict[str, Callable[[Plan, torch.device, dict[str, Any]], list[dict[str, Any]]]] = {
    "train": part_train,
    "resume": part_resume,
    "bundle": part_bundle,
    "inferer": part_inferer,
    "volume": part_volume,
}
LABELS = {"train": "a train", "resume": "b resume", "bundle": "c bundle", "inferer": "d inferer", "volume": "e volume"}


# ------------------------------------------------------------------------------------------------------------- main
def describe(device: torch.device) -> str:
    return bi.describe(device)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| part | check | status | figures | s |", "|---|---|---|---|---|"]
    for r in rows:
        status = "ok" if r["ok"] else "FAILED"
        text = r["text"] + (f" ({r['why']})" if r["why"] else "")
        lines.append(f"| {r['part']} | {r['item']} | {status} | {text.replace('|', '/')} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny settings (what the test runs)")
    parser.add_argument("--case", type=Path, default=None, help="folder with one BraTS case's NIfTI files")
    default_out = os.environ.get("OUT") or str(REPO / "runs" / "gpu_check")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="where the table and JSON go")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="optional items are skipped past this")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    plan = smoke_plan() if args.smoke else gpu_plan()
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke for the CPU check")
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)  # the smoke run: 1 thread (shared CI cores)
    device = torch.device(plan.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    header = [
        f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
        f"device: {describe(device)}",
        f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, "
        f"monai {__import__('monai').__version__}, ignite {__import__('ignite').__version__}",
        f"plan: {json.dumps(asdict(plan))}",
    ]
    print("\n".join(header), flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx: dict[str, Any] = {
            "tmp": tmp,
            "out": str(args.out),
            "smoke": args.smoke,
            "case": args.case,
            "deadline": start + args.budget_s,
        }
        for name in args.parts:
            t0 = time.perf_counter()
            try:
                new = PARTS[name](plan, device, ctx)
            except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
                detail = traceback.format_exc()
                (args.out / f"{name}_error.txt").write_text(detail)
                new = [
                    {
                        "part": LABELS[name],
                        "item": name,
                        "ok": False,
                        "why": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                        "figures": {},
                        "text": "",
                    }
                ]
            seconds = time.perf_counter() - t0
            for r in new:
                r["seconds"] = seconds
                r["status"] = "ok" if r["ok"] else "FAILED"
            rows.extend(new)
            print(f"{name}: {'ok' if all(r['ok'] for r in new) else 'FAILED'} ({seconds:.1f} s)", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    total = time.perf_counter() - start
    table = markdown(rows)
    print()
    print(table)
    print(f"\ntotal {total:.0f} s; {sum(r['ok'] for r in rows)}/{len(rows)} rows ok")
    (args.out / "gpu_check.md").write_text("\n".join(header) + "\n\n" + table + f"\n\ntotal {total:.0f} s\n")
    payload = {"header": header, "plan": asdict(plan), "total_s": total, "rows": rows}
    (args.out / "gpu_check.json").write_text(json.dumps(payload, indent=1, default=str))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
