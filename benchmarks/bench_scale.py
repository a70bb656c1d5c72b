"""Open files and memory against the number of volumes: N tiny synthetic volumes (16 x 16 x 8, one channel) go
through the slice cache, the evaluation (calibration on a small validation split, AnoFPDM inference with a tiny
untrained network on every test volume, the intensity baseline, the report) and optionally the volume inference
(NIfTI outputs per case), under a low open-file limit (``RLIMIT_NOFILE``, 256 by default, set in each run).

    python benchmarks/bench_scale.py --volumes 100 300 1000
    python benchmarks/bench_scale.py --volumes 100 300 --volume-inference

Each N runs in a fresh process (peak RSS is per process). Printed per N: the wall time of each phase, the peak RSS
(``ru_maxrss``) and the most file descriptors open at once (``/proc/self/fd``, sampled every 10 ms and at every phase
end). The open files must stay flat in N; a run that exhausts the limit fails with ``Too many open files``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VALIDATION = 4  # validation volumes (calibration and the intensity threshold)
IMAGE_SIZE = 16


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _FdSampler:
    """The most file descriptors open at once, sampled by a thread (every ``interval`` s) and at every phase end."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = _open_fds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def sample(self) -> int:
        try:
            now = _open_fds()
        except OSError:  # at the limit listing the folder needs a descriptor itself
            now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.peak = max(self.peak, now)
        return now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(volumes: int, work: Path, fd_limit: int, volume_inference: bool, workers: int | None) -> dict:
    """One N: every phase in this process, under the open-file limit."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    import torch

    torch.set_num_threads(1)
    from anofpdm_monai.data import SliceDataset, VolumePreprocessor
    from anofpdm_monai.data.synthetic import make_dataset, phantom_anatomy
    from anofpdm_monai.evaluation import Evaluator
    from anofpdm_monai.networks import build_diffusion_unet, load_network, save_checkpoint
    from anofpdm_monai.schedule import NoiseSchedule
    from anofpdm_monai.settings import AnoFPDMSettings

    out: dict = {"volumes": volumes, "fd_limit": fd_limit, "fds_at_start": _open_fds(), "phases": {}}
    sampler = _FdSampler()

    def phase(name: str, start: float) -> None:
        out["phases"][name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "fds_after": sampler.sample(),
            "rss_mb": round(_peak_rss_mb(), 1),
        }

    start = time.perf_counter()
    anatomy = phantom_anatomy((16, 16, 8), spacing=12.0)
    splits = {"validation": VALIDATION, "test": volumes}
    datalist = make_dataset(work / "data", anatomy, splits, ["t1w"], lesion_fraction=0.6, noise=0.05)
    phase("make volumes", start)

    start = time.perf_counter()
    pre = VolumePreprocessor(["t1w"], image_size=IMAGE_SIZE)
    kwargs = {"progress": False, "require_labels": True, "num_workers": workers}
    val = SliceDataset.from_datalist(datalist, work / "data", "validation", work / "cache", pre.to_dict(), **kwargs)
    test = SliceDataset.from_datalist(datalist, work / "data", "test", work / "cache", pre.to_dict(), **kwargs)
    phase("slice cache", start)
    out["test_slices"] = len(test)

    start = time.perf_counter()
    torch.manual_seed(0)
    net = build_diffusion_unet(in_channels=1, size="tiny")
    with torch.no_grad():  # an untrained network predicts zero noise for every label: make the labels differ
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint = save_checkpoint(work / "model.pt", net, preprocessing=pre.to_dict(), schedule=NoiseSchedule())
    digest = load_network(checkpoint)[1]["digest"]
    settings = AnoFPDMSettings(t_max=100, stride=50, min_component_size=2)  # a tiny grid: timesteps 0, 50, 100
    evaluator = Evaluator(
        net,
        digest,
        ["t1w"],
        ["t1w"],
        val,
        test,
        work / "evaluation",
        methods=["anofpdm", "intensity"],
        seeds=[0],
        guidance_scales=[1.0, 3.0],
        settings=settings,
        batch_size=64,
        progress=False,
        figure_slices=2,
    )
    summary = evaluator.run()
    phase("evaluation", start)
    out["mixed_dice_anofpdm"] = summary["methods"]["anofpdm"]["metrics"].get("dice_mixed", {}).get("mean")

    if volume_inference:
        import dataclasses

        from anofpdm_monai.apps.inference import VolumeInferer
        from anofpdm_monai.calibration import Calibration
        from anofpdm_monai.data.datalist import load_datalist

        start = time.perf_counter()
        # the evaluation's calibration, with the checkpoint's preprocessing and schedule as a calibration file has
        cal = Calibration.load(work / "evaluation" / "calibration_ddim.json")
        cal = dataclasses.replace(cal, preprocessing=pre.to_dict(), schedule=NoiseSchedule().to_dict())
        cal.save(work / "calibration.json")
        inferer = VolumeInferer.from_files(checkpoint, work / "calibration.json", batch_size=64, progress=False)
        entries = load_datalist(datalist, dataset_dir=work / "data", splits=["test"])["test"]
        done = inferer.run(entries, work / "inference")
        phase("volume inference", start)
        out["inference_done"] = len(done["done"])

    sampler.stop()
    out["peak_fds"] = sampler.peak
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, nargs="+", default=[100, 300, 1000], help="numbers of test volumes")
    parser.add_argument("--fd-limit", type=int, default=256, help="RLIMIT_NOFILE of each run")
    parser.add_argument("--volume-inference", action="store_true", help="also run the volume inference (slow)")
    parser.add_argument("--workers", type=int, default=None, help="slice cache threads (default: automatic)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        result = child(args.child, args.work, args.fd_limit, args.volume_inference, args.workers)
        (args.work / "result.json").write_text(json.dumps(result))
        return 0

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    results = []
    for n in args.volumes:
        with tempfile.TemporaryDirectory(prefix=f"bench_scale_{n}_") as tmp:
            cmd = [sys.executable, __file__, "--child", str(n), "--work", tmp, "--fd-limit", str(args.fd_limit)]
            cmd += ["--volume-inference"] if args.volume_inference else []
            cmd += ["--workers", str(args.workers)] if args.workers is not None else []
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print((proc.stdout + proc.stderr)[-4000:], file=sys.stderr)
                raise SystemExit(f"{n} volumes: the run failed (exit status {proc.returncode})")
            result = json.loads((Path(tmp) / "result.json").read_text())
            result["total_seconds"] = round(time.perf_counter() - start, 1)
            results.append(result)

    phases = list(results[0]["phases"])
    print(
        f"tiny synthetic volumes 16x16x8 (1 channel), {VALIDATION} validation volumes, AnoFPDM (timesteps 0/50/100, "
        f"tiny untrained UNet) + intensity baseline, RLIMIT_NOFILE {args.fd_limit}, one process per row"
    )
    head = ["volumes", "test slices", *[f"{p} (s)" for p in phases], "peak RSS (MB)", "open fds: start / peak"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        cells = [r["volumes"], r["test_slices"], *[r["phases"][p]["seconds"] for p in phases], r["peak_rss_mb"]]
        cells.append(f"{r['fds_at_start']} / {r['peak_fds']}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
