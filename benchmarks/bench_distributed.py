"""Wall time of calibration and volume inference in one process against ``torchrun`` with N processes (gloo on
CPU, one thread each), on the same synthetic cases, run alternately; prints the median times and the median of the
pairwise ratios.

    python benchmarks/bench_distributed.py --cases 6 --repeats 3 --nproc 2

The whole bundle command is timed (process start, imports and MONAI config parsing included), as a user runs it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from anofpdm_monai.bundle import config_files  # noqa: E402
from anofpdm_monai.calibration import Calibration  # noqa: E402
from anofpdm_monai.data import VolumePreprocessor  # noqa: E402
from anofpdm_monai.data.datalist import write_datalist  # noqa: E402
from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy  # noqa: E402
from anofpdm_monai.networks import build_diffusion_unet, load_network, save_checkpoint  # noqa: E402
from anofpdm_monai.schedule import NoiseSchedule  # noqa: E402
from anofpdm_monai.settings import AnoFPDMSettings  # noqa: E402

BUNDLE = "anofpdm_atlas"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _command(workflow: str, overrides: dict, nproc: int) -> list[str]:
    workflows = (workflow,) if nproc == 1 else (workflow, f"multi_gpu_{workflow}")
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    args = [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
    return [*prefix, "-m", "monai.bundle", "run", "--config_file", str(config_files(BUNDLE, *workflows)), *args]


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit((proc.stdout + proc.stderr)[-3000:])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="test cases (inference) = validation cases (calibration)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--network-size", default="tiny")
    parser.add_argument("--stride", type=int, default=20, help="grid 0..200 with this stride")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    splits = {"validation": args.cases, "test": args.cases}
    dl = make_dataset(root / "data", phantom_anatomy((48, 56, 40), spacing=4.0), splits, ["t1w"], lesion_fraction=0.7)
    write_datalist(dl, root / "datalist.json")
    torch.manual_seed(0)
    net = build_diffusion_unet(in_channels=1, size=args.network_size)
    with torch.no_grad():  # an untrained network predicts zero noise for every label
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pre = VolumePreprocessor(["t1w"], image_size=args.image_size)
    ckpt = save_checkpoint(root / "model.pt", net, preprocessing=pre.to_dict(), schedule=NoiseSchedule())
    info = load_network(ckpt)[1]
    settings = AnoFPDMSettings(t_max=200, stride=args.stride).with_grid()
    Calibration(
        settings=settings,
        guidance_scale=2.0,
        m_max=[0.05],
        m_max_joint=0.05,
        tau=0.9,
        map_modalities=["t1w"],
        map_channels=[0],
        checkpoint_digest=info["digest"],
        preprocessing=pre.to_dict(),
        schedule=NoiseSchedule().to_dict(),
    ).save(root / "calibration.json")
    common = {
        "dataset_dir": root / "data",
        "datalist": root / "datalist.json",
        "cache_dir": root / "cache",
        "checkpoint": ckpt,
        "batch_size": args.batch_size,
        "progress": False,
    }
    workloads = {
        "calibration": (
            "calibrate",
            {**common, "output_dir": root, "t_max": 200, "stride": args.stride, "guidance_scales": "[1.0,2.0]"},
        ),
        "inference": ("inference", {**common, "calibration": root / "calibration.json", "overwrite": True}),
    }
    print(
        f"{args.cases} cases, {args.image_size}x{args.image_size}, {args.network_size} network, grid 0..200 stride "
        f"{args.stride}, batch {args.batch_size}; 1 process vs torchrun {args.nproc} processes, 1 thread each; "
        f"{args.repeats} pairs after one warm-up each"
    )
    n = args.nproc
    print(f"| workload | 1 process (s, median) | {n} processes (s, median) | ratio 1/{n} (median of pairs) |")
    print("|---|---|---|---|")
    for name, (workflow, overrides) in workloads.items():
        one, many = [], []
        for i in range(args.repeats + 1):
            t1 = _timed(_command(workflow, {**overrides, "output_dir": root / f"{name}_1"}, 1))
            tn = _timed(_command(workflow, {**overrides, "output_dir": root / f"{name}_n"}, args.nproc))
            if i > 0:  # the first pair warms the caches (slice cache, file system)
                one.append(t1)
                many.append(tn)
        ratios = [a / b for a, b in zip(one, many)]
        row = [statistics.median(one), statistics.median(many), statistics.median(ratios)]
        print(f"| {name} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
