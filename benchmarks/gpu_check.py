"""One command for a GPU machine: training, resumption, the shipped bundle commands, the inferer against the
official call pattern, volume inference of a real case, and bf16 against fp32 on a trained checkpoint, in one table.

Parts (each in its own try/except: a failing part is a row with status ``FAILED`` and the others still run):

- ``train``: the paper-size network (``build_diffusion_unet(size="paper")``) trained for a few hundred iterations at
  128 x 128 on synthetic slices, global batch 64, with the bundle's training pieces (classifier-free prepare-batch,
  class-conditioned inferer, MSE, AdamW) under AMP bf16, channels_last and SDPA attention: loss finite and falling,
  slices/s, peak memory.
- ``resume``: train N iterations, save model + optimizer + prepare-batch generator + RNG states, train M more; restore
  the saved states into a freshly built network and train M: the weights must be equal.
- ``bundle``: the shipped commands of the BraTS bundle (``python -m monai.bundle run --config_file "[dataset.json,
  common/configs/<workflow>.json, ...]"``), each a subprocess with a time limit and its own row (ok or FAILED with
  the exit status and the line naming the error, the whole command's wall seconds), on a small synthetic dataset,
  every output in a temporary folder: ``train.json`` (one epoch, capped by its ``time_limit``), ``train.json`` +
  ``multi_gpu_train.json`` under ``torchrun --standalone --nproc_per_node=1`` (nccl on GPU, gloo on CPU),
  ``calibrate.json`` on the first checkpoint written, ``inference.json`` with that calibration, and
  ``inference.json`` + ``multi_gpu_inference.json`` under torchrun (compared with the 1-process outputs). A failing
  command does not stop the later ones.
- ``inferer``: ours (``AnoFPDMInferer``) at the library's default grid and at stride 1 against the official call
  pattern re-enacted in ``bench_inferer.py`` (its functions are imported): network evaluations per slice, slices/s,
  seconds per 155-slice volume, speed-up; bf16 against fp32 map agreement (Pearson r, Dice of the Algorithm-1
  masks); optionally the network under ``torch.compile`` (its own row).
- ``volume``: volume inference end to end (NIfTI in, preprocessing, forward process, post-processing, inversion to
  the input grid, NIfTI out) of ``--case`` (a folder with the case's NIfTI files), else of a synthetic case.
- ``precision``: the ``precision`` setting bf16 against fp32 on a trained checkpoint, ``--checkpoint`` (with
  ``--calibration`` when given), else the one the bundle part trained, with its calibration: Dice of the
  Algorithm-1 masks and the relative difference of the M_t curves, on slices of ``--case`` or the synthetic cases.

Random weights in ``train``, ``inferer`` and ``volume`` (zero-initialised output layers re-drawn, as in
bench_inferer): timings and memory are real, maps are not meant to find anything. ``--smoke`` runs every part on
CPU with tiny settings in about a minute (the test ``tests/test_gpu_check.py`` runs it). The table (markdown) is
printed and written with a JSON file to ``--out`` (default ``$OUT`` when set, else ``runs/gpu_check``), with each
bundle command's log. Run from the repository root; see benchmarks/README.md for the commands on a GPU machine
without MONAI.

Usage::

    python3 benchmarks/gpu_check.py --case gpu_case/BraTS2021_00006     # GPU, sized for at most 8 minutes
    python3 benchmarks/gpu_check.py --checkpoint model.pt --calibration calibration.json   # plus a trained model
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check          # CPU, tiny settings
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import shlex
import signal
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
from anofpdm_monai.networks import build_diffusion_unet, load_checkpoint, load_network  # noqa: E402
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
    bundle_train_s: float  # the training bundles' own ``time_limit``
    bundle_timeout_s: float  # the most one bundle command may run (it is then killed and its row FAILED)
    bundle_t_max: int  # the calibration grid of the bundle commands (t_max, stride)
    bundle_stride: int
    bundle_guidance: tuple[float, ...]
    agree_slices: int  # slices of the bf16-vs-fp32 row
    agree_t_max: int | None  # its grid without a calibration (None: the library's default grid)
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
        train_max_s=90.0,
        resume_batch=16,
        resume_first=10,
        resume_more=10,
        bundle_size="paper",
        bundle_image_size=128,
        bundle_batch=16,
        bundle_train_s=30.0,
        bundle_timeout_s=150.0,
        bundle_t_max=299,
        bundle_stride=6,
        bundle_guidance=(1.0, 2.0, 3.0),
        agree_slices=32,
        agree_t_max=None,
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
        bundle_train_s=30.0,
        bundle_timeout_s=240.0,
        bundle_t_max=9,
        bundle_stride=3,
        bundle_guidance=(1.0, 3.0),
        agree_slices=6,
        agree_t_max=9,
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


def _synthetic_data(root: Path, smoke: bool, modalities: list[str] = BRATS) -> dict[str, Any]:
    """A small synthetic BraTS-like dataset (training 2, validation 1, test 1) with its datalist."""
    from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy

    shape, spacing = ((32, 40, 24), 6.0) if smoke else ((64, 72, 48), 3.0)
    anatomy = phantom_anatomy(shape=shape, spacing=spacing)
    splits = {"training": 1 if smoke else 2, "validation": 1, "test": 1}
    datalist = make_dataset(root / "data", anatomy, splits=splits, modalities=modalities)
    (root / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return {"dataset_dir": root / "data", "datalist": root / "datalist.json", "entries": datalist}


BUNDLE = "anofpdm_brats21"


def _bundle_env(device: torch.device) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    if device.type == "cuda":
        env["NCCL_DEBUG"] = "INFO"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU (gloo under torchrun) even where a GPU exists
    return env


def bundle_command(workflows: tuple[str, ...], overrides: dict[str, Any], torchrun: bool) -> list[str]:
    """``[torchrun --standalone --nproc_per_node=1] python -m monai.bundle run --config_file "[...]" --key value``
    with the shipped configs (``anofpdm_monai.bundle.config_files``: the BraTS bundle's dataset.json, then the
    common workflow configs in order)."""
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", str(config_files(BUNDLE, *workflows))]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(list(v) if isinstance(v, tuple) else v)]
    return cmd


def error_line(log: str) -> str:
    """The line of a command's output that names its error: the workflows' one-line ``error: ...``
    (``anofpdm_monai.apps.errors``), else the first ``SomeError: ...`` line, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error: "):
            return ln
    for ln in lines:
        if re.match(r"^[\w.]*(Error|Exception)\b", ln):
            if "ChildFailedError" in ln:  # torchrun's: name the worker's exit status (its own message is lost)
                code = re.search(r"exitcode\s*:\s*(-?\d+)", log)
                ln = f"{ln.rstrip(':')}: worker exit status {code.group(1) if code else '?'}, no error line from it"
            return ln
    return lines[-1] if lines else ""


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


def run_command(cmd: list[str], env: dict[str, str], timeout: float, log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` from the repository root in its own process group (killed whole past ``timeout``: torchrun's
    worker too); its output (stdout and stderr together) goes to ``log_path``."""
    before = _files_under(REPO / "bundles")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = False
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    wall = time.perf_counter() - start
    log_path.write_text(shlex.join(cmd) + "\n\n" + log[-200_000:])
    written = sorted(_files_under(REPO / "bundles") - before)
    if timed_out:
        why = f"timed out after {timeout:.0f} s, killed"
    elif proc.returncode != 0:
        why = f"exit {proc.returncode}: {error_line(log)}"
    elif written:
        why = f"wrote into the repository's bundles/: {written[:3]}"
    else:
        why = ""
    return {"rc": proc.returncode, "wall": wall, "log": log, "why": why[:300], "log_file": log_path.name}


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {str(p.relative_to(folder)): np.asarray(nib.load(p).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def part_bundle(plan: Plan, device: torch.device, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The shipped bundle commands on the synthetic dataset, each a subprocess with a time limit, each its own row:
    train.json, train.json + multi_gpu_train.json under torchrun, calibrate.json, inference.json and inference.json +
    multi_gpu_inference.json under torchrun. A command that fails is a FAILED row (exit status and the line naming
    its error); the later commands still run (on whatever the earlier ones left)."""
    from anofpdm_monai.calibration import Calibration

    tmp = Path(ctx["tmp"])
    data = ctx.setdefault("data", _synthetic_data(tmp / "synthetic", ctx["smoke"]))
    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    env = _bundle_env(device)
    logs = Path(ctx["out"])
    common = {"dataset_dir": data["dataset_dir"], "datalist": data["datalist"], "progress": False}
    n_test = len(data["entries"]["test"])
    rows: list[dict[str, Any]] = []

    def command(
        key: str,
        item: str,
        workflows: tuple[str, ...],
        overrides: dict[str, Any],
        torchrun: bool,
        check: Callable[[dict[str, Any]], tuple[str, dict[str, Any], str]],
    ) -> None:
        """Run one command and add its row; ``check`` gives (why it is not ok or "", figures, text) of a command
        that exited 0."""
        timeout = min(plan.bundle_timeout_s, max(20.0, ctx["hard_deadline"] - time.perf_counter()))
        cmd = bundle_command(workflows, overrides, torchrun)
        res = run_command(cmd, env, timeout, logs / f"bundle_{key}_log.txt")
        figures: dict[str, Any] = {"wall_s": res["wall"], "exit_status": res["rc"]}
        why, text = res["why"], ""
        if not why:
            try:
                why, more, text = check(res)
                figures.update(more)
            except Exception as exc:  # noqa: BLE001 - a check that cannot read the outputs fails this row only
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        text = (text + ", " if text else "") + f"whole command {res['wall']:.1f} s; log {res['log_file']}"
        rows.append(
            {
                "part": "c bundle",
                "item": item,
                "ok": not why,
                "why": why,
                "figures": figures,
                "text": text,
                "seconds": res["wall"],
                "command": shlex.join(cmd),
            }
        )

    train = {
        **common,
        "cache_dir": tmp / "bundle_cache",
        "image_size": plan.bundle_image_size,
        "network_size": plan.bundle_size,
        "batch_size": plan.bundle_batch,
        "val_batch_size": 2 * plan.bundle_batch,
        "num_workers": 0,
        "num_epochs": 1,
        "time_limit": plan.bundle_train_s,
    }
    net = f"{plan.bundle_size} net, {plan.bundle_image_size}px, 1 epoch or {plan.bundle_train_s:.0f} s"

    def trained(out: Path, distributed: bool) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any], str]]:
        def check(res: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
            iterations = int(load_checkpoint(out / "model.pt").get("iteration", 0))
            finished = "Engine run finished" in res["log"]
            seen = ("NCCL INFO" in res["log"]) if (distributed and cuda) else True
            ok = iterations > 0 and finished and seen
            why = "" if ok else f"iterations {iterations}, finished {finished}, nccl seen {seen}"
            return why, {"iterations": iterations}, f"{iterations} iterations, model.pt written"

        return check

    out_train, out_ddp = tmp / "bundle_train", tmp / "bundle_train_ddp"
    command(
        "train",
        f"train.json, 1 process, {net}",
        ("train",),
        {**train, "output_dir": out_train},
        False,
        trained(out_train, False),
    )
    command(
        "train_ddp",
        f"train.json + multi_gpu_train.json, torchrun 1 process, {backend}, {net}",
        ("train", "multi_gpu_train"),
        {**train, "output_dir": out_ddp},
        True,
        trained(out_ddp, True),
    )
    checkpoint = next((d / "model.pt" for d in (out_train, out_ddp) if (d / "model.pt").is_file()), None)
    ctx["bundle_checkpoint"] = checkpoint
    checkpoint = checkpoint or out_train / "model.pt"  # none written: the commands below run and fail on it
    # a few iterations leave the EMA weights at the initial ones, whose zero output layers make every prediction 0
    # (M_max 0: calibration refuses it), so calibration and inference use the trained weights
    use_ema = False

    eval_dir = tmp / "bundle_eval"
    calibration = eval_dir / "calibration.json"
    grid = {
        "t_max": plan.bundle_t_max,
        "stride": plan.bundle_stride,
        "min_component_size": scaled_min_component_size(plan.bundle_image_size),
    }

    def calibrated(res: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
        cal = Calibration.load(calibration)
        w = float(cal.guidance_scale)
        return "", {"guidance_scale": w}, f"calibration.json written, w* = {w:g}"

    steps = len(AnoFPDMSettings(t_max=plan.bundle_t_max, stride=plan.bundle_stride).grid())
    command(
        "calibrate",
        f"calibrate.json, validation split, w in {list(plan.bundle_guidance)}, grid {steps} steps",
        ("calibrate",),
        {
            **common,
            "cache_dir": tmp / "bundle_cache",
            "checkpoint": checkpoint,
            "output_dir": eval_dir,
            "calibration_file": calibration,
            "use_ema": use_ema,
            "guidance_scales": plan.bundle_guidance,
            **grid,
        },
        False,
        calibrated,
    )
    ctx["bundle_calibration"] = calibration if calibration.is_file() else None

    def inferred(out: Path, reference: Path | None) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any], str]]:
        def check(res: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
            summary = json.loads((out / "inference_summary.json").read_text())
            done, failed = len(summary.get("done", [])), len(summary.get("failed", []))
            arrays = _arrays(out)
            figures: dict[str, Any] = {"cases_done": done, "cases_failed": failed, "nifti_written": len(arrays)}
            why = "" if done == n_test and not failed and arrays else f"done {done} of {n_test}, failed {failed}"
            text = f"{done}/{n_test} test cases, {len(arrays)} NIfTI written"
            if reference is not None and reference.is_dir():
                ref = _arrays(reference)
                if sorted(ref) != sorted(arrays):
                    why = why or "not the files the 1-process inference.json wrote"
                else:
                    diff = max((float(np.abs(arrays[k] - ref[k]).max()) for k in ref), default=0.0)
                    figures["max_abs_diff_vs_inference"] = diff
                    text += f", max abs difference to inference.json's {diff:.1e}"
            return why, figures, text

        return check

    infer = {
        **common,
        "checkpoint": checkpoint,
        "calibration": calibration,
        "use_ema": use_ema,
        "batch_size": plan.volume_batch,
    }
    out_infer, out_infer_ddp = tmp / "bundle_infer", tmp / "bundle_infer_ddp"
    command(
        "inference",
        f"inference.json, 1 process, test split ({n_test} case)",
        ("inference",),
        {**infer, "output_dir": out_infer},
        False,
        inferred(out_infer, None),
    )
    command(
        "inference_ddp",
        f"inference.json + multi_gpu_inference.json, torchrun 1 process, {backend}",
        ("inference", "multi_gpu_inference"),
        {**infer, "output_dir": out_infer_ddp},
        True,
        inferred(out_infer_ddp, out_infer),
    )
    return rows


def _slices_for(pre: Any, ctx: dict[str, Any], count: int) -> tuple[torch.Tensor, str]:
    """``count`` brain slices (evenly spread) preprocessed as the checkpoint was trained: of ``--case``, else of the
    synthetic test and validation cases (made with the checkpoint's modalities)."""
    modalities = list(pre.modalities)
    if ctx["case"] is not None:
        case = Path(ctx["case"]).resolve()
        entries, source = [_case_entry(case, modalities)], f"case {case.name}"
    else:
        tmp = Path(ctx["tmp"])
        if modalities == BRATS:
            data = ctx.setdefault("data", _synthetic_data(tmp / "synthetic", ctx["smoke"]))
        else:
            data = _synthetic_data(tmp / ("synthetic_" + "_".join(modalities)), ctx["smoke"], modalities)
        root = Path(data["dataset_dir"])
        raw = data["entries"]["test"] + data["entries"]["validation"]
        entries = [
            {"id": e["id"], "image": [str(root / p) for p in e["image"]], "label": str(root / e["label"])} for e in raw
        ]
        source = "synthetic cases " + ", ".join(str(e["id"]) for e in raw)
    images = np.concatenate([pre.slices(pre(e)).image for e in entries])
    pick = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int))
    return torch.from_numpy(images[pick]), source


def part_precision(plan: Plan, device: torch.device, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's ``precision`` setting, bf16 against fp32, on a trained checkpoint: ``--checkpoint`` (with
    ``--calibration`` when given), else the one the training bundle just wrote with the calibration the calibrate
    bundle made. The same slices and noise at both precisions; Dice of the Algorithm-1 masks (before health gating)
    with the calibration's M_max (without a calibration: the fp32 batch maximum as a stand-in), and the relative
    difference of the M_t curves."""
    from anofpdm_monai.calibration import Calibration
    from anofpdm_monai.data import VolumePreprocessor

    cuda = device.type == "cuda"
    given = ctx.get("checkpoint")
    checkpoint = Path(given) if given else ctx.get("bundle_checkpoint")
    if checkpoint is None:
        raise RuntimeError("no checkpoint: pass --checkpoint, or run the bundle part first (it trains one)")
    calibration = ctx.get("calibration") if given else ctx.get("bundle_calibration")
    # the weights the calibration was made with: the EMA ones of a given checkpoint, the trained ones of the bundle's
    net, info = load_network(checkpoint, use_ema=bool(given), map_location=device, use_flash_attention=cuda)
    net = net.to(device).eval()
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    pre = VolumePreprocessor.from_dict(info["preprocessing"])
    x, source = _slices_for(pre, ctx, plan.agree_slices)
    x = x.to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)

    if calibration is not None:
        cal = Calibration.load(calibration)

        def make(precision: str, m_max: Any = None) -> AnoFPDMInferer:
            return AnoFPDMInferer.from_calibration(cal, scheduler=info["schedule"], precision=precision)

        constants = f"calibration {Path(calibration).name} (w* {cal.guidance_scale:g})"
    else:
        settings = AnoFPDMSettings() if plan.agree_t_max is None else AnoFPDMSettings(t_max=plan.agree_t_max)
        settings = settings.replace(min_component_size=scaled_min_component_size(pre.image_size))
        channels = [pre.modalities.index(m) for m in ("flair", "t2") if m in pre.modalities] or [0]

        def make(precision: str, m_max: Any = None) -> AnoFPDMInferer:
            return AnoFPDMInferer(
                settings.replace(precision=precision),
                map_channels=channels,
                m_max=m_max,
                scheduler=info["schedule"],
            )

        constants = "no calibration: stand-in M_max = fp32 batch maximum, w 2"
    results, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        inferer = make(precision)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            results[precision] = inferer.run(x, net)
        _sync(device)
        seconds[precision] = time.perf_counter() - t0
    grid = len(inferer.settings.grid(inferer.schedule.num_train_timesteps))
    if calibration is None:
        m_max = results["fp32"].divergence_max(settings.end_step)[0].amax(dim=0).tolist()
        post = make("fp32", m_max)
    else:
        post = make("fp32")
    out = {p: post.postprocess(r) for p, r in results.items()}
    dice = float(dice_per_slice(out["bf16"].mask_ungated.cpu(), out["fp32"].mask_ungated.cpu()).mean())
    ref, low = results["fp32"].divergence[0].double().cpu(), results["bf16"].divergence[0].double().cpu()
    rel = float((low - ref).norm() / ref.norm().clamp_min(1e-30))  # over all slices, steps and map modalities
    per_slice = (low - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)
    te_equal = float((out["bf16"].end_step == out["fp32"].end_step).float().mean())
    label_equal = float((out["bf16"].pred_label == out["fp32"].pred_label).float().mean())
    pixels = int(out["fp32"].mask_ungated.sum())
    finite = all(math.isfinite(v) for v in (dice, rel, float(per_slice.max())))
    # a model trained a few iterations (the bundle's here) barely tells the class labels apart, so its guided and
    # reference predictions differ by less than bf16 rounds the network output, and M_t moves by several per cent:
    # the M_t difference is judged on a given (trained) checkpoint only, the masks on both
    judged = bool(given)
    ok = finite and dice >= 0.9 and (rel <= 0.05 or not judged)
    if ok:
        why = ""
    elif not finite:
        why = "figures not finite"
    else:
        why = f"bf16 departs from fp32 (mask Dice < 0.9{' or relative M_t difference > 0.05' if judged else ''})"
    name = "given" if given else "bundle-trained"
    return [
        {
            "part": "f precision",
            "item": f"bf16 vs fp32 (settings.precision), {name} checkpoint {checkpoint.name}, {len(x)} slices of "
            f"{source}, grid {grid} steps, {constants}",
            "ok": ok,
            "why": why,
            "figures": {
                "mask_dice": dice,
                "rel_mt_diff": rel,
                "max_slice_rel_mt_diff": float(per_slice.max()),
                "te_equal_fraction": te_equal,
                "label_equal_fraction": label_equal,
                "fp32_mask_pixels": pixels,
                "fp32_s": seconds["fp32"],
                "bf16_s": seconds["bf16"],
            },
            "text": f"mask Dice {dice:.3f} ({pixels} fp32 mask pixels), relative M_t difference {rel:.1e} "
            f"(worst slice {float(per_slice.max()):.1e}{'' if judged else ', not judged: a few-iteration model'}), "
            f"t_e equal {te_equal:.0%}, labels equal "
            f"{label_equal:.0%}, fp32 {seconds['fp32']:.1f} s, bf16 {seconds['bf16']:.1f} s",
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
        if remaining < 180:  # room for the volume and precision parts after it
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


def _case_entry(case: Path, modalities: list[str] = BRATS) -> dict[str, Any]:
    from anofpdm_monai.data.datalist import datalist_from_folder

    found = datalist_from_folder(case.parent, modalities=modalities, report_unusable=True)
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
    "precision": part_precision,
}
LABELS = {
    "train": "a train",
    "resume": "b resume",
    "bundle": "c bundle",
    "inferer": "d inferer",
    "volume": "e volume",
    "precision": "f precision",
}


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
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained model.pt for the bf16-vs-fp32 row")
    parser.add_argument("--calibration", type=Path, default=None, help="its calibration.json (optional)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="optional items are skipped past this")
    parser.add_argument("--limit-s", type=float, default=470.0, help="bundle commands are killed past this")
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
            "hard_deadline": start + args.limit_s,
            "checkpoint": args.checkpoint,
            "calibration": args.calibration,
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
                r.setdefault("seconds", seconds)
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
