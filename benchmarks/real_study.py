"""A small AnoFPDM study on the real MRI volumes of ``shared/data``, run the way a researcher would.

Train on some tumour cases, calibrate on one held-out case with slice labels only, evaluate on another held-out
case: AnoFPDM (DDIM and DDPM forward, and its ablations) against every baseline and the FLAIR floor. Every step is
the project's own bundle config (BraTS 2021 bundle) with overrides.

Channels: FLAIR and T1ce, which every tumour case has (the BraTS 2013 cases have only these two, already z-scored
inside the brain, with brain masks). Maps on FLAIR by default.

    python benchmarks/real_study.py --data ../shared/data --output runs/real_study \
        --image-size 64 --train-minutes 60 --seed 0

On a GPU use ``--image-size 128 --network-size medium --train-minutes 20``. Stages can be run separately
(``--stages train``, then ``--stages calibrate evaluate``); training resumes from its last checkpoint, and the
evaluation reuses finished per-case results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODALITIES = ["flair", "t1ce"]


def build_datalist(data: Path, val_case: str, test_case: str) -> dict[str, Any]:
    """Datalist of the labelled cases that have FLAIR and T1ce, from the data folder's manifest.json."""
    manifest = json.loads((data / "manifest.json").read_text())
    entries = []
    for case in manifest["cases"]:
        mods = case.get("modalities", {})
        if case.get("label") is None or not all(m in mods for m in MODALITIES) or "_3mm" in case["id"]:
            continue
        entry = {"id": case["id"], "image": [mods[m] for m in MODALITIES], "label": case["label"]}
        if case.get("brain_mask"):
            entry["brain_mask"] = case["brain_mask"]
        entries.append(entry)
    ids = [e["id"] for e in entries]
    for name in (val_case, test_case):
        if name not in ids:
            raise SystemExit(f"case {name!r} is not a labelled FLAIR+T1ce case of {data}; choose from {ids}")
    return {
        "name": "shared-data real study",
        "description": "labelled tumour cases of shared/data with FLAIR and T1ce; one validation and one test case",
        "modalities": MODALITIES,
        "training": [e for e in entries if e["id"] not in (val_case, test_case)],
        "validation": [e for e in entries if e["id"] == val_case],
        "test": [e for e in entries if e["id"] == test_case],
    }


def run_bundle(workflow: str, **overrides: Any) -> None:
    from anofpdm_monai.bundle import run_workflow

    run_workflow("anofpdm_brats21", workflow, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "real_study")
    parser.add_argument("--image-size", type=int, default=64, help="64 on CPU, 128 on GPU")
    parser.add_argument("--train-minutes", type=float, default=60.0, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--network-size", default="small", help="small on CPU, medium/paper on GPU")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--t-max", type=int, default=599, help="last step of AnoFPDM's grid (official 599)")
    parser.add_argument("--stride", type=int, default=10, help="AnoFPDM step-grid stride")
    parser.add_argument("--tag", default="", help="suffix of the calibration/evaluation folders (for ablations)")
    parser.add_argument("--num-steps", type=int, default=25, help="sampling steps of the reconstruction baselines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the stochastic methods")
    parser.add_argument(
        "--noise-levels",
        type=int,
        nargs="+",
        default=[200, 400, 600],
        help="candidate t of the reconstruction baselines",
    )
    parser.add_argument("--map-modalities", nargs="+", default=["flair"])
    parser.add_argument("--methods", nargs="+", default=None, help="evaluated methods (default: the bundle's, all)")
    parser.add_argument("--val-case", default="brats_2013_pat0004_1")
    parser.add_argument("--test-case", default="BraTS2021_00006")
    parser.add_argument("--device", default=None, help="cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--stages", nargs="+", default=["train", "calibrate", "evaluate"], choices=["train", "calibrate", "evaluate"]
    )
    args = parser.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not (args.data / "manifest.json").is_file():
        raise SystemExit(f"no manifest.json in {args.data}: pass --data <shared data folder>")
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    datalist = build_datalist(args.data.resolve(), args.val_case, args.test_case)
    datalist_path = out / "datalist.json"
    datalist_path.write_text(json.dumps(datalist, indent=2))
    common: dict[str, Any] = {
        "dataset_dir": str(args.data.resolve()),
        "datalist": str(datalist_path),
        "cache_dir": str(out / "cache"),
    }
    if args.device:
        common["device"] = f"$torch.device('{args.device}')"
    checkpoint = out / "model" / "model.pt"
    from anofpdm_monai.postprocessing import scaled_min_component_size

    min_component = scaled_min_component_size(args.image_size)
    timings: dict[str, float] = {}
    print(f"training cases: {[e['id'] for e in datalist['training']]}")
    print(f"validation (calibration, slice labels only): {args.val_case}; test: {args.test_case}")

    if "train" in args.stages:
        t = time.time()
        run_bundle(
            "train",
            **common,
            output_dir=str(out / "model"),
            modalities=MODALITIES,
            image_size=args.image_size,
            network_size=args.network_size,
            dropout=0.1,
            batch_size=args.batch_size,
            num_epochs=100000,
            time_limit=int(args.train_minutes * 60),
            ema_decay=0.999,
            ema_warmup_iters=500,
            num_workers=0,
            val_interval=10,
            checkpoint_interval=10,
            preview_interval=50,
            seed=args.seed,
        )
        timings["train_s"] = time.time() - t

    if "calibrate" in args.stages:
        t = time.time()
        run_bundle(
            "calibrate",
            **common,
            checkpoint=str(checkpoint),
            output_dir=str(out),
            calibration_file=str(out / f"calibration{args.tag}.json"),
            map_modalities=args.map_modalities,
            t_max=args.t_max,
            stride=args.stride,
            guidance_scales=[0.5, 1.0, 2.0, 3.0, 5.0],
            min_component_size=min_component,
            batch_size=64,
            seed=args.seed,
        )
        timings["calibrate_s"] = time.time() - t

    if "evaluate" in args.stages:
        t = time.time()
        run_bundle(
            "evaluate",
            **common,
            checkpoint=str(checkpoint),
            calibration=str(out / f"calibration{args.tag}.json"),
            output_dir=str(out),
            evaluation_dir=str(out / f"evaluation{args.tag}"),
            map_modalities=args.map_modalities,
            intensity_modality="flair",
            seeds=args.seeds,
            noise_levels=args.noise_levels,
            **({"methods": args.methods} if args.methods else {}),
            num_steps=args.num_steps,
            batch_size=64,
        )
        timings["evaluate_s"] = time.time() - t

    report = {"args": {k: str(v) for k, v in vars(args).items()}, "timings": timings}
    if checkpoint.is_file():
        import torch

        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        report["network"] = ck["metadata"]["network"]
        report["parameters"] = int(sum(v.numel() for v in ck["model"].values()))
        report["iterations"] = ck.get("iteration")
        report["epochs"] = ck.get("epoch")
    summary = out / f"evaluation{args.tag}" / "summary.md"
    if summary.is_file():
        report["summary_md"] = summary.read_text()
    (out / f"report{args.tag}.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "summary_md"}, indent=2, default=str))
    if "summary_md" in report:
        print(report["summary_md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
