"""AnoFPDM on the real MRI volumes of ``shared/data``: a k-fold study by volume, run the way a researcher would.

Every labelled tumour volume is tested once, by a model that never saw it: the volumes are dealt into ``--folds``
folds; for fold k the model trains on the volumes of the other folds except one, which is held out for calibration
(slice labels only for AnoFPDM; its segmentation tunes the pixel-label baselines, as in the papers), and the fold's
own volumes are the test set. Every step is the project's own bundle config (BraTS 2021 bundle) with overrides, so
what is measured is what a user runs.

    python benchmarks/real_study.py --data ../shared/data --output runs/kfold --train-minutes 16
    python benchmarks/real_study.py --output runs/kfold --stages report        # tables from finished folds

Stages (``--stages``): ``train`` (resumes from the last checkpoint; the budget is wall-clock minutes per fold),
``calibrate``, ``evaluate`` (finished per-case results are reused) and ``report`` (docs tables in
``<output>/study.md`` + ``study.json``: per volume and pooled with the spread over volumes, and the health-score
table of :mod:`benchmarks.health_scores`). Rerunning a finished stage is cheap. The training budget is the
fold's total: the seconds already spent are kept in ``timings.json`` and subtracted, so a rerun with the same
budget trains no more and a larger one continues from the last checkpoint. Calibration is skipped when its file
exists, and the evaluation reuses its stored cases.

The training recipe (``--modalities``, ``--learning-rate``, ``--flip-prob``, ``--dropout``, ``--train-max-timestep``,
``--ema-decay``) is the bundle's training options; docs/real_study.md lists what each run used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("train", "classifier", "calibrate", "evaluate", "report")
STUDY_METHODS = ["anofpdm", "anofpdm_ddpm", "anofpdm_tuned", "anofpdm_last", "anoddpm", "intensity"]


def labelled_cases(data: Path, modalities: list[str]) -> list[dict[str, Any]]:
    """Datalist entries of the manifest's labelled tumour volumes that have every modality (the strided ``tiny``
    copy and the stroke case excluded)."""
    manifest = json.loads((data / "manifest.json").read_text())
    entries = []
    for case in manifest["cases"]:
        mods = case.get("modalities", {})
        if case.get("label") is None or not all(m in mods for m in modalities):
            continue
        if "_3mm" in case["id"] or "stroke" in case["id"]:
            continue
        entry = {"id": case["id"], "image": [mods[m] for m in modalities], "label": case["label"]}
        if case.get("brain_mask"):
            entry["brain_mask"] = case["brain_mask"]
        entries.append(entry)
    return entries


def record(timings_file: Path, timings: dict[str, Any], key: str, seconds: float, add: bool = False) -> None:
    """Store a stage's seconds in the fold's ``timings.json`` at once, so that a later crash does not lose them."""
    from anofpdm_monai.io import write_json

    timings[key] = (timings.get(key, 0.0) if add else 0.0) + seconds
    write_json(timings_file, timings)


_BRATS2013 = re.compile(r"^(?:brats_2013_pat0*(\d+)_\d+|Brats18_2013_(\d+)_\d+)$")


def patient_of(case_id: str) -> str:
    """The patient a case belongs to: BraTS 2013 cases are one patient across their releases (``brats_2013_pat0003_1``
    of BraTS 2013/2015 and ``Brats18_2013_3_1`` of BraTS 2018 are patient 3 of BraTS 2013); every other id is its own
    patient."""
    match = _BRATS2013.match(case_id)
    return f"brats2013_patient{int(match.group(1) or match.group(2))}" if match else case_id


def deal_folds(ids: list[str], folds: int) -> list[list[str]]:
    """Folds by patient: patients are dealt round-robin, sorted by source (case-id prefix, so that each fold mixes
    sources) then id; all cases of one patient go to one fold."""
    by_patient: dict[str, list[str]] = {}
    for case in sorted(ids):
        by_patient.setdefault(patient_of(case), []).append(case)
    if folds > len(by_patient):
        raise ValueError(f"{folds} folds for {len(by_patient)} patients: use at most {len(by_patient)} folds")
    order = sorted(by_patient, key=lambda p: (re.split(r"[_-]", by_patient[p][0])[0].lower(), by_patient[p][0]))
    return [sorted(c for p in order[k::folds] for c in by_patient[p]) for k in range(folds)]


def fold_datalist(entries: list[dict[str, Any]], folds: list[list[str]], k: int, modalities: list[str]) -> dict:
    """Fold k: its volumes are the test set; the last volume of the next fold is the calibration volume; the rest
    trains."""
    test = set(folds[k])
    calibration = folds[(k + 1) % len(folds)][-1]
    same_patient = {c for f in folds for c in f if patient_of(c) == patient_of(calibration)}
    by_id = {e["id"]: e for e in entries}
    return {
        "name": f"shared-data real study, fold {k}",
        "description": f"{len(folds)}-fold by volume; test = fold {k}, calibration volume {calibration}",
        "modalities": modalities,
        "training": [by_id[i] for i in sorted(by_id) if i not in test and i not in same_patient],
        "validation": [by_id[calibration]],
        "test": [by_id[i] for i in sorted(test)],
    }


def run_bundle(workflow: str, **overrides: Any) -> None:
    from anofpdm_monai.apps.workflow import run_workflow

    run_workflow("anofpdm_brats21", workflow, **overrides)


def calibrate_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as calibrate.json overrides (VALUE read as JSON, else as a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def checkpoint_info(checkpoint: Path) -> dict[str, Any]:
    from anofpdm_monai.networks import load_checkpoint

    ck = load_checkpoint(checkpoint)
    return {
        "iterations": ck.get("iteration"),
        "epochs": ck.get("epoch"),
        "parameters": int(sum(v.numel() for v in ck["model"].values())),
        "network": ck["metadata"]["network"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "kfold")
    parser.add_argument("--folds", type=int, default=5, help="folds by patient")
    parser.add_argument("--only-folds", type=int, nargs="+", default=None, help="run these folds only")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--modalities", nargs="+", default=["flair"], help="input channels (maps on the first)")
    parser.add_argument("--image-size", type=int, default=32, help="32 on the 2-core CPU, 128 on GPU")
    parser.add_argument("--network-size", default="small", help="small on CPU, medium/paper on GPU")
    parser.add_argument("--train-minutes", type=float, default=16.0, help="wall-clock training budget per fold")
    parser.add_argument(
        "--train-iterations",
        type=int,
        default=None,
        help="stop training at this many iterations (with the minutes as a cap): runs comparable under any load",
    )
    parser.add_argument(
        "--classifier-minutes", type=float, default=8.0, help="wall-clock budget of the ddim_clf classifier per fold"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--flip-prob", type=float, default=0.5, help="left-right flip augmentation")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument(
        "--conditioning", default="class_embed", help="how the label reaches the network (train.json conditioning)"
    )
    parser.add_argument("--train-max-timestep", type=int, default=600, help="0: all T steps")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--ema-warmup-iters", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--t-max", type=int, default=599, help="last step of AnoFPDM's grid (official 599)")
    parser.add_argument("--stride", type=int, default=20, help="AnoFPDM step-grid stride")
    parser.add_argument(
        "--divergence-baseline", default=None, choices=["none", "healthy"], help="t_e on M_t relative to healthy slices"
    )
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--methods", nargs="+", default=STUDY_METHODS)
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0], help="seeds of the stochastic methods")
    parser.add_argument("--noise-levels", type=int, nargs="+", default=[200, 400])
    parser.add_argument("--num-steps", type=int, default=20, help="sampling steps of the reconstruction baselines")
    parser.add_argument(
        "--preset",
        default="default",
        help="calibrate.json settings preset ('official': the official algorithm; --stride and --t-max still apply)",
    )
    parser.add_argument(
        "--set",
        dest="calibrate_options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="further calibrate.json options (JSON values), e.g. reference=healthy end_step_inclusive=false",
    )
    parser.add_argument("--tag", default="", help="suffix of the calibration/evaluation folders (for ablations)")
    parser.add_argument("--device", default=None, help="cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    from anofpdm_monai.io import write_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)
    fold_ids = range(args.folds) if args.only_folds is None else args.only_folds
    if any(s != "report" for s in args.stages):
        if not (args.data / "manifest.json").is_file():
            raise SystemExit(f"no manifest.json in {args.data}: pass --data <shared data folder>")
        entries = labelled_cases(args.data.resolve(), args.modalities)
        folds = deal_folds([e["id"] for e in entries], args.folds)
        # the arguments of every run by tag and stages (an ablation's calibrate/evaluate run keeps the training's)
        runs_file = out / "folds.json"
        runs = json.loads(runs_file.read_text()).get("runs", {}) if runs_file.is_file() else {}
        runs[f"{args.tag or 'main'}:{'+'.join(args.stages)}"] = {k: str(v) for k, v in vars(args).items()}
        write_json(runs_file, {"folds": folds, "args": vars(args), "runs": runs})
    for k in fold_ids:
        if not set(args.stages) & {"train", "classifier", "calibrate", "evaluate"}:
            break
        fold_dir = out / f"fold{k}"
        fold_dir.mkdir(exist_ok=True)
        datalist = fold_datalist(entries, folds, k, args.modalities)
        (fold_dir / "datalist.json").write_text(json.dumps(datalist, indent=2))
        print(
            f"fold {k}: train {[e['id'] for e in datalist['training']]}, calibrate on "
            f"{datalist['validation'][0]['id']}, test {[e['id'] for e in datalist['test']]}",
            flush=True,
        )
        common: dict[str, Any] = {
            "dataset_dir": str(args.data.resolve()),
            "datalist": str(fold_dir / "datalist.json"),
            "cache_dir": str(out / "cache"),
            "modalities": args.modalities,
            "map_modalities": args.modalities[:1],
            "progress": False,
        }
        if args.device:
            common["device"] = f"$torch.device('{args.device}')"
        checkpoint = fold_dir / "model" / "model.pt"
        timings_file = fold_dir / "timings.json"
        timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
        train_left = args.train_minutes * 60 - timings.get("train_s", 0.0)
        if "train" in args.stages and train_left < 30:
            print(f"fold {k}: the {args.train_minutes:g}-minute training budget is spent", flush=True)
        elif "train" in args.stages:
            t = time.time()
            run_bundle(
                "train",
                **common,
                output_dir=str(fold_dir / "model"),
                image_size=args.image_size,
                network_size=args.network_size,
                conditioning=args.conditioning,
                dropout=args.dropout,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                flip_prob=args.flip_prob,
                train_max_timestep=args.train_max_timestep or None,
                num_epochs=100000,
                time_limit=int(train_left),
                max_iterations=args.train_iterations,
                ema_decay=args.ema_decay,
                ema_warmup_iters=args.ema_warmup_iters,
                num_workers=0,
                val_interval=10,
                checkpoint_interval=5,
                preview_interval=100000,
                seed=args.seed + k,
            )
            record(timings_file, timings, "train_s", time.time() - t, add=True)
        classifier = fold_dir / "classifier" / "classifier.pt"
        if "classifier" in args.stages:  # the noise-conditioned classifier of ddim_clf (train_classifier.json)
            t = time.time()
            run_bundle(
                "train_classifier",
                **common,
                diffusion_checkpoint=str(checkpoint),
                output_dir=str(fold_dir / "classifier"),
                classifier_size=args.network_size,
                batch_size=args.batch_size,
                learning_rate=3e-4,
                flip_prob=args.flip_prob,
                max_timestep=args.train_max_timestep or None,
                num_epochs=100000,
                time_limit=int(args.classifier_minutes * 60),
                num_workers=0,
                val_interval=2,
                checkpoint_interval=5,
                seed=args.seed + k,
            )
            record(timings_file, timings, "classifier_s", time.time() - t, add=True)
        from anofpdm_monai.postprocessing import scaled_min_component_size

        calibration = fold_dir / f"calibration{args.tag}.json"
        if "calibrate" in args.stages and not calibration.is_file():
            t = time.time()
            options: dict[str, Any] = {
                "preset": args.preset,
                "t_max": args.t_max,
                "stride": args.stride,
                "guidance_scales": args.guidance_scales,
                "divergence_baseline": args.divergence_baseline,
                "min_component_size": scaled_min_component_size(args.image_size),
                "batch_size": 64,
                "seed": 0,
            }
            options.update(calibrate_options(args.calibrate_options))  # --set wins
            run_bundle(
                "calibrate",
                **common,
                checkpoint=str(checkpoint),
                output_dir=str(fold_dir),
                calibration_file=str(calibration),
                **options,
            )
            record(timings_file, timings, "calibrate_s", time.time() - t)
        if "evaluate" in args.stages:
            t = time.time()
            run_bundle(
                "evaluate",
                **common,
                checkpoint=str(checkpoint),
                calibration=str(calibration),
                output_dir=str(fold_dir),
                evaluation_dir=str(fold_dir / f"evaluation{args.tag}"),
                intensity_modality="flair",
                methods=args.methods,
                seeds=args.eval_seeds,
                noise_levels=args.noise_levels,
                num_steps=args.num_steps,
                classifier_checkpoint=str(classifier) if "ddim_clf" in args.methods else None,
                batch_size=64,
            )
            record(timings_file, timings, "evaluate_s", time.time() - t)
        if checkpoint.is_file():
            timings["checkpoint"] = checkpoint_info(checkpoint)
            write_json(timings_file, timings)
    if "report" in args.stages:
        from study_report import write_report

        write_report(out, tag=args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
