# Copyright (c) anofpdm_monai contributors
# Licensed under the Apache License, Version 2.0
"""Benchmark of the slice cache on one full BraTS 2021 case (240 x 240 x 155, FLAIR/T1/T1ce/T2 + segmentation).

Measures:

- preprocessing time per case (NIfTI decoding + the whole MONAI chain + writing the cache), median of repeats;
- cache size on disk per case (MB);
- slices/s served by :class:`SliceDataset` through a torch ``DataLoader`` (batch 64, shuffle) for each number of
  workers, median over epochs (workers are persistent, so the start-up cost is paid once and shown apart);
- slices/s of the naive alternative: decode the NIfTI files and preprocess the volume for every sample.

Usage::

    python benchmarks/bench_slice_cache.py [--data ../shared/data] [--image-size 128] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from anofpdm_monai.data import SliceCache, SliceDataset, VolumePreprocessor  # noqa: E402

CASE = "BraTS2021_00006"
MODALITIES = ["flair", "t1", "t1ce", "t2"]


def _entry(data_dir: Path) -> dict:
    case_dir = data_dir / "brats2021" / CASE
    if not case_dir.is_dir():
        raise SystemExit(f"case folder not found: {case_dir} (pass --data)")
    return {
        "id": CASE,
        "image": [str(case_dir / f"{CASE}_{m}.nii.gz") for m in MODALITIES],
        "label": str(case_dir / f"{CASE}_seg.nii.gz"),
    }


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _loader_epochs(dataset: SliceDataset, workers: int, epochs: int, batch_size: int) -> tuple[float, list[float]]:
    """(seconds of the first epoch, slices/s of each later epoch)."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    rates, first = [], 0.0
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        count = 0
        for batch in loader:
            count += int(batch["image"].shape[0])
        elapsed = time.perf_counter() - start
        assert count == len(dataset)
        if epoch == 0:
            first = elapsed
        else:
            rates.append(count / elapsed)
    return first, rates


def _naive_rates(pre: VolumePreprocessor, entry: dict, samples: int, seed: int = 0) -> list[float]:
    """Slices/s when every sample decodes its case and preprocesses the volume (one random slice kept)."""
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(samples):
        start = time.perf_counter()
        out = pre.slices(pre(entry))
        k = int(rng.integers(len(out.table)))
        _ = torch.from_numpy(out.image[k]), int(out.table["label"].iloc[k])
        rates.append(1.0 / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data", help="shared data folder")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--epochs", type=int, default=20, help="timed epochs per worker count (after a warm-up)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="cache builds timed from scratch")
    parser.add_argument("--naive-samples", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where to build (default: a temporary folder)")
    args = parser.parse_args(argv)

    entry = _entry(args.data)
    params = {"modalities": MODALITIES, "image_size": args.image_size}
    work = Path(tempfile.mkdtemp(prefix="bench_slice_cache_", dir=args.cache_dir))
    try:
        build_times = []
        for r in range(args.repeats):
            cache = SliceCache(work / f"build{r}", params)
            start = time.perf_counter()
            table = cache.build([entry], progress=False)
            build_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        table = cache.build([entry], progress=False)  # everything current: the reuse check only
        reuse = time.perf_counter() - start
        size_mb = _folder_mb(cache.case_dir(CASE))
        dataset = SliceDataset(cache, table)

        loader_rows = []
        for workers in args.workers:
            first, rates = _loader_epochs(dataset, workers, args.epochs, args.batch_size)
            loader_rows.append((workers, first, statistics.median(rates), min(rates), max(rates)))
        naive = _naive_rates(VolumePreprocessor(**params), entry, args.naive_samples)
        naive_median = statistics.median(naive)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def row(name: str, value: str, note: str = "") -> None:
        print(f"{name:<48}{value:>12}" + (f"   {note}" if note else ""))

    print(f"case {CASE}: 4 modalities 240x240x155 -> {len(table)} brain slices at {args.image_size}x{args.image_size}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DataLoader batch {args.batch_size}, shuffle")
    print()
    row("measure", "value")
    print("-" * 60)
    row("preprocess + write cache, s/case", f"{statistics.median(build_times):.2f}", f"median of {args.repeats}")
    row("reuse check of a cached case, ms", f"{reuse * 1000:.2f}")
    row("cache size on disk, MB/case", f"{size_mb:.2f}")
    row("cache size on disk, KB/slice", f"{size_mb * 1024 / len(table):.1f}")
    for workers, first, med, lo, hi in loader_rows:
        note = f"median of {args.epochs} epochs (min {lo:.0f}, max {hi:.0f}); first epoch {first:.2f} s"
        row(f"SliceDataset+DataLoader workers={workers}, slices/s", f"{med:.0f}", note)
    row("naive decode+preprocess per sample, slices/s", f"{naive_median:.3f}", f"median of {args.naive_samples}")
    best = max(r[2] for r in loader_rows)
    row("cache speed-up (best worker count), x", f"{best / naive_median:.0f}")


if __name__ == "__main__":
    main()
