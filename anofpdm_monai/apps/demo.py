"""The whole AnoFPDM chain on data that needs nothing from the user: ``python -m anofpdm_monai.apps.demo``.

Data: the MNI152 2009 T1 template that ``nilearn`` ships inside its package (a real healthy brain; nothing is
downloaded), varied by random smooth deformations, bias fields and noise into several "subjects", with SYNTHETIC
lesions (dark blobs, like chronic stroke on T1w) drawn into some of them. The chain runs through the ATLAS bundle's
own configs with overrides, exactly as a user runs them:

datalist -> train (small network, a few minutes on CPU) -> calibrate (slice labels only) -> inference (NIfTI maps on
the input grid) -> evaluate (AnoFPDM against baselines) -> one PNG figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..data.datalist import write_datalist
from ..data.synthetic import make_dataset, template_anatomy
from ..io import OutputPathError, ensure_writable_dir
from ..metrics import dice_per_slice
from ..networks.unet import CONDITIONING_MODES
from ..postprocessing import scaled_min_component_size
from ..settings import AnoFPDMSettings
from ..visualize import save_demo_figure
from .workflow import run_workflow

__all__ = ["main"]

logger = logging.getLogger("anofpdm_monai.apps.demo")

BUNDLE = "anofpdm_atlas"


def _run_bundle(workflow: str, **overrides: Any) -> None:
    """The ATLAS bundle's workflow, as ``python -m monai.bundle run`` runs it, in this process."""
    run_workflow(BUNDLE, workflow, **overrides)


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def _make_data(root: Path, seed: int, subjects: Sequence[int], template_mm: int) -> Path:

    datalist_path = root / "datalist.json"
    if datalist_path.is_file():
        print(f"reusing the synthetic dataset in {root}")
        return datalist_path
    anatomy = template_anatomy(resolution=template_mm)
    datalist = make_dataset(
        root,
        anatomy,
        splits={"training": subjects[0], "validation": subjects[1], "test": subjects[2]},
        modalities=["t1w"],
        lesion_fraction=0.75,
        lesions_per_subject=2,
        lesion_radius=(20.0 / template_mm, 32.0 / template_mm),
        seed=seed,
        prefix="mni",
        deformation=6.0 / template_mm,
        noise=0.03,
    )
    datalist["description"] = (
        "MNI152 2009 T1 template (nilearn) varied into subjects; the lesions are SYNTHETIC (drawn in by the demo)"
    )
    write_datalist(datalist, datalist_path)
    return datalist_path


def _demo_figure(out: Path, dataset_dir: Path, datalist_path: Path, inference_dir: Path) -> tuple[Path, float]:
    """Figure of the test slice with the largest lesion: input, synthetic lesion, anomaly map, mask (input grid)."""

    datalist = json.loads(datalist_path.read_text())
    best: tuple[int, Any] | None = None
    for entry in datalist["test"]:
        label = np.asarray(nib.load(dataset_dir / entry["label"]).dataobj) > 0
        areas = label.sum(axis=(0, 1))
        k = int(areas.argmax())
        if areas[k] > 0 and (best is None or areas[k] > best[0]):
            best = (int(areas[k]), (entry, k))
    if best is None:
        raise RuntimeError("no test subject has a lesion")
    entry, k = best[1]
    case = entry["id"]
    image = np.asarray(nib.load(dataset_dir / entry["image"][0]).dataobj, dtype=np.float32)[:, :, k]
    label = np.asarray(nib.load(dataset_dir / entry["label"]).dataobj)[:, :, k] > 0
    amap = np.asarray(nib.load(inference_dir / case / f"{case}_anomaly_map.nii.gz").dataobj)[:, :, k]
    mask = np.asarray(nib.load(inference_dir / case / f"{case}_anomaly_mask.nii.gz").dataobj)[:, :, k] > 0
    dice = float(dice_per_slice(mask[None], label[None])[0])
    shown = 2 * image / max(float(image.max()), 1e-6) - 1
    path = save_demo_figure(
        out / "demo_figure.png",
        shown,
        label,
        amap,
        mask,
        title=f"AnoFPDM demo: {case}, axial slice {k} (input grid), slice Dice {dice:.2f}",
        lesion_label="synthetic lesion",
    )
    return path, dice


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments and an unwritable output folder before any work (argparse's one line, exit status 2)."""
    if not args.train_minutes > 0:
        parser.error(f"--train_minutes must be > 0, got {args.train_minutes}")
    if args.image_size < 16 or args.image_size % 8:
        parser.error(f"--image_size must be a multiple of 8 and >= 16, got {args.image_size}")
    if args.template_mm < 1 or args.batch_size < 1 or min(args.subjects) < 1:
        parser.error("--template_mm, --batch_size and every --subjects count must be >= 1")
    try:
        AnoFPDMSettings(t_max=args.t_max, stride=args.stride).grid()
        ensure_writable_dir(args.output_dir, "--output_dir")
    except (ValueError, OutputPathError) as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anofpdm_monai.apps.demo",
        description="Run datalist -> train -> calibrate -> inference -> evaluate on MNI152-derived subjects with "
        "synthetic lesions, through the ATLAS bundle configs.",
    )
    parser.add_argument("--output_dir", default="demo_output", help="where everything is written")
    parser.add_argument(
        "--train_iterations",
        type=int,
        default=600,
        help="training iterations: the same model on any machine (0: train for --train_minutes)",
    )
    parser.add_argument(
        "--train_minutes",
        type=float,
        default=20.0,
        help="wall-clock cap on training (it stops before --train_iterations when reached)",
    )
    parser.add_argument("--image_size", type=int, default=32, help="model resolution (32 keeps the demo CPU-cheap)")
    parser.add_argument("--template_mm", type=int, default=3, help="voxel size of the MNI template subjects")
    parser.add_argument("--network_size", default="small")
    parser.add_argument("--conditioning", default="class_embed", choices=list(CONDITIONING_MODES))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--t_max", type=int, default=300, help="last step of AnoFPDM's grid (official: 599)")
    parser.add_argument("--stride", type=int, default=20, help="step-grid stride of AnoFPDM")
    parser.add_argument("--subjects", type=int, nargs=3, default=(10, 2, 2), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train again even if a model exists")
    args = parser.parse_args(argv)
    _check_arguments(parser, args)

    start = time.time()
    out = Path(args.output_dir).resolve()
    data_dir, model_dir, cache_dir = out / "data", out / "model", out / "cache"
    inference_dir, evaluation_dir = out / "inference", out / "evaluation"

    min_component = scaled_min_component_size(args.image_size)
    common = {"dataset_dir": str(data_dir), "cache_dir": str(cache_dir)}

    t = _step("1/6 synthetic dataset (MNI152 template subjects, SYNTHETIC lesions)")
    datalist = _make_data(data_dir, args.seed, args.subjects, args.template_mm)
    common["datalist"] = str(datalist)
    print(f"datalist: {datalist} ({time.time() - t:.0f} s)")

    t = _step(
        f"2/6 training ({args.network_size} network, {args.image_size}x{args.image_size}, "
        + (f"{args.train_iterations} iterations, at most " if args.train_iterations > 0 else "")
        + f"{args.train_minutes:g} min)"
    )
    if (model_dir / "model.pt").is_file() and not args.retrain:
        print(f"reusing the trained model {model_dir / 'model.pt'} (use --retrain to train again)")
    else:
        _run_bundle(
            "train",
            **common,
            output_dir=str(model_dir),
            image_size=args.image_size,
            network_size=args.network_size,
            conditioning=args.conditioning,
            dropout=0.0,
            batch_size=args.batch_size,
            num_epochs=10000,
            time_limit=int(args.train_minutes * 60),
            max_iterations=args.train_iterations if args.train_iterations > 0 else None,
            learning_rate=2e-4,
            ema_decay=0.995,
            ema_warmup_iters=200,
            train_max_timestep=args.t_max + 20,
            num_workers=0,
            val_interval=5,
            checkpoint_interval=5,
            preview_interval=0,
            resume=not args.retrain,
            seed=args.seed,
        )
    print(f"model: {model_dir / 'model.pt'} ({time.time() - t:.0f} s)")

    checkpoint = str(model_dir / "model.pt")
    t = _step("3/6 calibration from slice labels only")
    _run_bundle(
        "calibrate",
        **common,
        checkpoint=checkpoint,
        output_dir=str(out),
        t_max=args.t_max,
        stride=args.stride,
        min_component_size=min_component,
        batch_size=128,
    )
    print(f"calibration: {out / 'calibration.json'} ({time.time() - t:.0f} s)")

    t = _step("4/6 inference on the test subjects (NIfTI maps on the input grid)")
    _run_bundle(
        "inference",
        dataset_dir=common["dataset_dir"],  # inference reads the volumes themselves: no slice cache
        datalist=common["datalist"],
        checkpoint=checkpoint,
        calibration=str(out / "calibration.json"),
        output_dir=str(inference_dir),
        batch_size=128,
    )
    print(f"maps and masks: {inference_dir} ({time.time() - t:.0f} s)")

    t = _step("5/6 evaluation against baselines")
    _run_bundle(
        "evaluate",
        **common,
        checkpoint=checkpoint,
        calibration=str(out / "calibration.json"),
        output_dir=str(out),
        evaluation_dir=str(evaluation_dir),
        methods=["anofpdm", "anofpdm_last", "intensity"],
        seeds=[0],
        noise_levels=[300],
        num_steps=20,
        batch_size=128,
    )
    print(f"evaluation: {evaluation_dir} ({time.time() - t:.0f} s)")

    t = _step("6/6 figure")
    figure, dice = _demo_figure(out, data_dir, datalist, inference_dir)
    summary = json.loads((evaluation_dir / "summary.json").read_text())
    anofpdm = summary["methods"]["anofpdm"]["metrics"]
    print(f"figure: {figure}")
    print(
        "\nDone in {:.1f} min. The lesions are SYNTHETIC, drawn into subjects derived from the MNI152 template.\n"
        "  AnoFPDM (image labels only) on {} test slices: unhealthy Dice {:.3f}, mixed Dice {:.3f}, "
        "volume Dice {:.3f}\n"
        "  NIfTI maps/masks : {}\n  metrics table    : {}\n  figures          : {}\n  demo figure      : {}".format(
            (time.time() - start) / 60,
            summary["num_test_slices"],
            anofpdm["unhealthy_dice"]["mean"],
            anofpdm["mixed_dice"]["mean"],
            anofpdm["volume_dice"]["mean"],
            inference_dir,
            evaluation_dir / "summary.md",
            evaluation_dir / "figures",
            figure,
        )
    )
    print(f"  slice shown in the demo figure: Dice {dice:.3f}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
