"""Training throughput of the AnoFPDM network: slices per second of one full training step.

One step is exactly what the bundle's ``SupervisedTrainer`` does per iteration: the classifier-free prepare-batch
(timesteps, noise, null-label dropout), the class-conditioned inferer (``scheduler.add_noise`` + network), the MSE
loss, backward and an AdamW step; on CUDA under AMP (bf16 autocast with MONAI's GradScaler, as ``amp=True`` with
``amp_kwargs={"dtype": torch.bfloat16}`` in the bundle, the dtype benchmarks/gpu_check.py measures) and with SDPA
attention.
The figure is the median over the timed iterations after warm-up. ``--conditioning`` times each conditioning mode
(default ``class_embed`` and ``official``) side by side; a forward-only (``no_grad``) pass per mode is timed too.

Usage::

    python benchmarks/bench_training.py                      # CPU (2 threads), and CUDA when available
    python benchmarks/bench_training.py --device cuda --iters 50
    python benchmarks/bench_training.py --sizes small --resolutions 64 --json out.json
    python benchmarks/bench_training.py --sizes small --resolutions 32 --conditioning class_embed official
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.networks.schedulers import DDPMScheduler  # noqa: E402

from anofpdm_monai.engines import ClassConditionedDiffusionInferer, ClassifierFreePrepareBatch  # noqa: E402
from anofpdm_monai.networks import CONDITIONING_MODES, build_diffusion_unet  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, AMP bf16"
    return f"{_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    size: str,
    resolution: int,
    device: torch.device,
    batch_size: int = 16,
    channels: int = 4,
    iters: int = 10,
    warmup: int = 2,
    max_seconds: float | None = None,
    conditioning: str = "class_embed",
) -> dict[str, Any]:
    """Time ``iters`` training steps (after ``warmup``) of the ``size`` network at ``resolution``, then as many
    forward-only passes (the inferer's noising + network under ``no_grad``, eval mode, one prepared batch).

    Returns:
        dict with the configuration, the per-step times (s), the median step time and slices/s, and the median
        forward-only time and slices/s.
    """
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    net = build_diffusion_unet(channels, size, conditioning=conditioning, use_flash_attention=cuda)
    net = net.to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    inferer = ClassConditionedDiffusionInferer(scheduler)
    prepare = ClassifierFreePrepareBatch(num_train_timesteps=1000, p_uncond=0.1, seed=0)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    loss_fn = torch.nn.MSELoss()
    batch = {
        "image": torch.rand(batch_size, channels, resolution, resolution) * 2 - 1,
        "class_label": torch.randint(0, 2, (batch_size,)),
    }
    if cuda:
        batch["image"] = batch["image"].pin_memory()

    def step() -> float:
        images, target, args, kwargs = prepare(batch, device=device, non_blocking=cuda)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(inferer(images, net, *args, **kwargs), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    times: list[float] = []
    budget_start = time.perf_counter()
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if max_seconds is not None and times and time.perf_counter() - budget_start > max_seconds:
            break
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"non-finite loss for {size} at {resolution}")
    median = statistics.median(times)

    net.eval()
    images, _, args, kwargs = prepare(batch, device=device, non_blocking=cuda)
    forward_times: list[float] = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for i in range(warmup + len(times)):
            _sync(device)
            start = time.perf_counter()
            inferer(images, net, *args, **kwargs)
            _sync(device)
            if i >= warmup:
                forward_times.append(time.perf_counter() - start)
    forward_median = statistics.median(forward_times)
    result = {
        "size": size,
        "conditioning": conditioning,
        "resolution": resolution,
        "batch_size": batch_size,
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "device": device.type,
        "timed_iters": len(times),
        "step_s": [round(t, 4) for t in times],
        "median_step_s": median,
        "best_step_s": min(times),
        "slices_per_s": batch_size / median,
        "forward_median_s": forward_median,
        "forward_slices_per_s": batch_size / forward_median,
    }
    if cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, then CUDA")
    parser.add_argument("--sizes", nargs="+", default=["small", "paper"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (CPU)")
    parser.add_argument("--cuda-iters", type=int, default=30, help="timed iterations (CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--max-seconds", type=float, default=240.0, help="stop timing a configuration after this long (CPU)"
    )
    parser.add_argument(
        "--conditioning",
        nargs="+",
        choices=CONDITIONING_MODES,
        default=["class_embed", "official"],
        help="conditioning modes, timed side by side",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("CUDA is not available")
        devices.append(torch.device("cuda", 0))
    torch.set_num_threads(args.threads)

    results = []
    for device in devices:
        print(f"device: {device} - {describe(device)}", flush=True)
        print(
            f"{'size':>6} {'res':>4} {'conditioning':>15} {'batch':>5} {'params':>8} {'iters':>5} "
            f"{'median step (s)':>15} {'best step (s)':>13} {'slices/s':>9} {'fwd slices/s':>12}"
        )
        for size in args.sizes:
            for res in args.resolutions:
                for mode in args.conditioning:
                    cpu = device.type == "cpu"
                    r = bench(
                        size,
                        res,
                        device,
                        batch_size=args.batch_size,
                        iters=args.iters if cpu else args.cuda_iters,
                        warmup=args.warmup if cpu else max(args.warmup, 5),
                        max_seconds=args.max_seconds if cpu else None,
                        conditioning=mode,
                    )
                    r["device_name"] = describe(device)
                    results.append(r)
                    print(
                        f"{size:>6} {res:>4} {mode:>15} {r['batch_size']:>5} {r['params_m']:>7.1f}M "
                        f"{r['timed_iters']:>5} {r['median_step_s']:>15.3f} {r['best_step_s']:>13.3f} "
                        f"{r['slices_per_s']:>9.2f} {r['forward_slices_per_s']:>12.2f}",
                        flush=True,
                    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
