"""Export a trained checkpoint and its calibration as a self-contained MONAI model-zoo bundle folder.

    python -m anofpdm_monai.apps.export_bundle --checkpoint model.pt --calibration calibration.json \\
        --bundle anofpdm_brats21 --output_dir DIR

``DIR`` gets ``configs/inference.json``, ``configs/calibrate.json`` and ``configs/evaluate.json`` (each ONE config:
the bundle's ``dataset.json`` and the shared workflow config merged as MONAI merges a list of config files, with
``bundle_root`` ``"."``: run from inside the folder, or pass ``--bundle_root``), ``configs/metadata.json`` (the
dataset bundle's, with this export's version, changelog, software versions and the checkpoint's input/output
format), ``configs/logging.conf``, ``models/model.pt``, ``models/calibration.json``, ``docs/README.md`` (the model,
its training and calibration, the run command), ``LICENSE`` and ``large_files.yml`` (sha256 of the model files).

The calibration is checked against the checkpoint with the check inference itself makes
(:meth:`~anofpdm_monai.calibration.Calibration.inference_settings`) before anything is written; the folder is
written next to ``DIR`` and renamed into place (:func:`anofpdm_monai.io.atomic_folder`). An existing non-empty
``DIR`` is refused unless ``--overwrite true``. Errors are one line (``error: ...``), exit status 2. See
docs/export.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EXPORTED_WORKFLOWS", "ExportError", "export_bundle", "merged_config", "main"]

#: the workflows exported as one merged config each (training stays in the source repository)
EXPORTED_WORKFLOWS = ("inference", "calibrate", "evaluate")
#: the exported folder's own root: MONAI model-zoo convention, the folder the command runs in
EXPORTED_ROOT = "."
#: placeholders for what the user's data gives (the dataset's ``dataset_dir`` is one already)
DATALIST_PLACEHOLDER = "/path/to/datalist.json"
#: the schema's version pattern (bundles/meta_schema.json)
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*([.+-]?[A-Za-z0-9.+-]*)?$")
#: expressions that would make an exported config read outside the exported folder
_OUTSIDE = ("bundle.bundle_root(", "/../", "repository_root(")


class ExportError(ValueError):
    """An export that cannot be made (one line naming the file, key or option)."""


# ------------------------------------------------------------------------------------------------------ the bundle
def _bundle_dir(bundle: str) -> Path:
    """``bundles/<bundle>`` of this source checkout, with its dataset.json, metadata.json and logging.conf."""
    from ..bundle import repository_root

    root = repository_root() / "bundles"
    known = (
        sorted(p.name for p in root.glob("*") if (p / "configs" / "dataset.json").is_file()) if root.is_dir() else []
    )
    if bundle not in known:
        where = f"{root}: {', '.join(known)}" if known else f"none in {root} (run from a source checkout)"
        raise ExportError(f"unknown --bundle {bundle!r} (bundles in {where})")
    folder = root / bundle
    for name in ("metadata.json", "logging.conf"):
        if not (folder / "configs" / name).is_file():
            raise ExportError(f"bundle {bundle} has no configs/{name} ({folder / 'configs' / name})")
    return folder


def merged_config(
    bundle: str, workflow: str, overrides: Mapping[str, Any] | None = None, use_ema: bool = True
) -> dict[str, Any]:
    """The config ``python -m monai.bundle run --config_file "[<dataset.json>, <common>/<workflow>.json]"`` runs,
    as one dict (MONAI's own merge, :meth:`monai.bundle.ConfigParser.load_config_files`), made self-contained:
    ``bundle_root`` is the folder the command runs in, the checkpoint and calibration are ``models/model.pt`` and
    ``models/calibration.json`` in it, the datalist a placeholder; ``overrides`` are set last.

    Raises:
        ExportError: the merged config still refers to something outside the exported folder.
    """
    from monai.bundle import ConfigParser

    from ..bundle import config_files

    merged = dict(ConfigParser.load_config_files(config_files(bundle, workflow)))
    merged["bundle_root"] = EXPORTED_ROOT
    merged["datalist"] = DATALIST_PLACEHOLDER
    merged["checkpoint"] = "$@bundle_root + '/models/model.pt'"
    merged["use_ema"] = bool(use_ema)
    if "calibration" in merged:  # inference and evaluation read the shipped calibration (calibrate writes one)
        merged["calibration"] = "$@bundle_root + '/models/calibration.json'"
    merged.update(overrides or {})
    ordered = {k: merged[k] for k in ("imports", "bundle_root") if k in merged}
    ordered.update((k, v) for k, v in merged.items() if k not in ordered)
    outside = sorted({key for key, text in _strings(ordered) if any(s in text for s in _OUTSIDE)})
    if outside:
        raise ExportError(f"{workflow} config keys {outside} refer to files outside the exported folder")
    return ordered


def _strings(obj: Any, key: str = "") -> list[tuple[str, str]]:
    """``(top-level key, string)`` of every string in a config."""
    if isinstance(obj, str):
        return [(key, obj)]
    if isinstance(obj, Mapping):
        return [s for k, v in obj.items() for s in _strings(v, key or str(k))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v, key)]
    return []


# ------------------------------------------------------------------------------------------------ the model files
def _training_info(path: Path) -> dict[str, Any]:
    """The checkpoint's scalar entries (``epoch``, ``iteration``), read without loading its tensors."""
    import torch

    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old (non-zip) file cannot be memory-mapped; load_network has read it already
        content = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in content.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _channel_names(source: Mapping[str, Any], dataset_modalities: Sequence[str]) -> dict[str, str]:
    """modality name -> its label in the dataset bundle's ``channel_def`` (``flair`` -> ``FLAIR``)."""
    channel_def = dict(source.get("channel_def") or {})
    return {m: str(channel_def.get(str(i), m.upper())) for i, m in enumerate(dataset_modalities)}


def _metadata(
    source: Mapping[str, Any],
    dataset: Mapping[str, Any],
    info: Mapping[str, Any],
    calibration: Any,
    version: str,
    note: str,
) -> dict[str, Any]:
    """The dataset bundle's metadata for this checkpoint: version and changelog, the software it was exported with,
    and the network's input/output format (channels, slice size, step range) from the checkpoint."""
    import monai
    import numpy
    import torch

    from .. import __version__

    meta = json.loads(json.dumps(source))
    previous = dict(meta.get("changelog") or {})
    entry = f"{previous[version]}; {note}" if version in previous else note
    meta["version"] = version
    meta["changelog"] = {version: entry, **{k: v for k, v in previous.items() if k != version}}
    meta["monai_version"] = monai.__version__
    meta["pytorch_version"] = torch.__version__
    meta["numpy_version"] = numpy.__version__
    # anofpdm-monai is required: the configs build every component from it. No "optional_packages_version": MONAI
    # reads it as a deprecated alias of required_packages_version and replaces the latter with it.
    packages = dict(meta.get("required_packages_version") or {})
    packages = {name: _installed(name) or pinned for name, pinned in packages.items() if name != "anofpdm-monai"}
    meta["required_packages_version"] = {"anofpdm-monai": __version__, **packages}
    meta.pop("optional_packages_version", None)

    pre = dict(info.get("preprocessing") or {})
    modalities = list(pre.get("modalities") or dataset.get("modalities") or [])
    size = int(pre.get("image_size") or 0)
    steps = int(info["schedule"].num_train_timesteps)
    formats = meta.setdefault("network_data_format", {})
    inputs, outputs = formats.setdefault("inputs", {}), formats.setdefault("outputs", {})
    names = _channel_names(inputs.get("image", {}), list(dataset.get("modalities") or []))
    labels = [names.get(m, m.upper()) for m in modalities]
    if "image" in inputs:
        inputs["image"].update(num_channels=len(modalities), channel_def={str(i): n for i, n in enumerate(labels)})
        if size:
            inputs["image"]["spatial_shape"] = [size, size]
    if "timesteps" in inputs:
        inputs["timesteps"]["value_range"] = [0, steps - 1]
    if "pred" in outputs:
        outputs["pred"].update(
            num_channels=len(modalities), channel_def={str(i): f"epsilon {n}" for i, n in enumerate(labels)}
        )
        if size:
            outputs["pred"]["spatial_shape"] = [size, size]
    maps = ", ".join(calibration.map_modalities)
    meta["description"] = (
        f"{meta.get('description', '').rstrip()} This export holds one trained checkpoint (models/model.pt, "
        f"{len(modalities)} channels {', '.join(modalities)} at {size} x {size}) and its calibration "
        f"(models/calibration.json: w* = {calibration.guidance_scale:g}, maps on {maps}); see docs/README.md."
    ).strip()
    return meta


def _large_files(entries: Sequence[tuple[str, str]]) -> str:
    """``large_files.yml`` in the MONAI model-zoo format (``url`` empty: the files are in the folder)."""
    lines = ["large_files:"]
    for path, digest in entries:
        lines += [f'  - path: "{path}"', '    url: ""', f'    hash_val: "{digest}"', '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def _grid_options(grid: Sequence[int]) -> str:
    """The calibrate options that give ``grid``: ``--t_max T --stride S`` for 0, S, ..., T, else ``--timesteps``."""
    steps = {b - a for a, b in zip(grid, grid[1:])}
    if grid and grid[0] == 0 and len(steps) <= 1:
        return f"--t_max {grid[-1]} --stride {steps.pop() if steps else 1}"
    return f"--timesteps '{json.dumps([int(t) for t in grid], separators=(',', ':'))}'"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _readme(
    folder_name: str,
    meta: Mapping[str, Any],
    info: Mapping[str, Any],
    training: Mapping[str, Any],
    calibration: Any,
    settings: Any,
    use_ema: bool,
    parameters: int,
    hashes: Mapping[str, str],
) -> str:
    """docs/README.md of the exported folder."""
    from .. import __version__

    pre = dict(info.get("preprocessing") or {})
    net = dict(info.get("network") or {})
    schedule = info["schedule"].to_dict()
    chosen = next(
        (
            c
            for c in calibration.candidates
            if abs(float(c.get("guidance_scale", -1)) - calibration.guidance_scale) < 1e-9
        ),
        {},
    )
    rows = [
        ("checkpoint digest", f"`{info['digest']}`"),
        ("weights the configs use", "EMA (`use_ema` true)" if use_ema else "raw, not EMA (`use_ema` false)"),
        *((k, str(v)) for k, v in training.items()),
        ("network", f"`AnoFPDMUNet` (MONAI `DiffusionModelUNet`), {parameters:,} parameters"),
        *((f"network `{k}`", f"`{_fmt(v)}`") for k, v in net.items()),
        *((f"preprocessing `{k}`", f"`{_fmt(v)}`") for k, v in pre.items()),
        *((f"schedule `{k}`", f"`{_fmt(v)}`") for k, v in schedule.items()),
    ]
    constants = [
        ("w* (guidance scale)", _fmt(calibration.guidance_scale)),
        (
            "M_max per map modality",
            ", ".join(f"{m}: {_fmt(v)}" for m, v in zip(calibration.map_modalities, calibration.m_max)),
        ),
        ("M_max (joint)", _fmt(calibration.m_max_joint)),
        (f"tau (threshold of `{settings.health_score}`; unhealthy iff score <= tau)", _fmt(calibration.tau)),
        (
            "map modalities (channels)",
            f"{', '.join(calibration.map_modalities)} ({_fmt(list(calibration.map_channels))})",
        ),
        ("validation slices (healthy / unhealthy)", f"{calibration.num_healthy} / {calibration.num_unhealthy}"),
        ("validation accuracy at w*", _fmt(chosen.get("accuracy"))),
        ("candidates w", _fmt([c.get("guidance_scale") for c in calibration.candidates])),
        ("validation data", f"`{calibration.datalist}`" if calibration.datalist else "not recorded"),
        ("created", calibration.created or "not recorded"),
    ]
    grid = settings.grid(int(schedule["num_train_timesteps"]))
    setting_rows = [(k, _fmt(v)) for k, v in settings.to_dict().items() if k not in ("t_max", "stride", "timesteps")]
    shown = _fmt(grid) if len(grid) <= 12 else f"{_fmt(grid[:3])[:-1]}, ..., {grid[-1]}]"
    setting_rows.insert(0, ("step grid", f"{len(grid)} steps {shown}"))

    def table(items: Sequence[tuple[str, str]]) -> list[str]:
        return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in items)]

    modalities = list(pre.get("modalities") or [])
    files = "\n".join(f"| `{p}` | `{h}` |" for p, h in hashes.items())
    lines = [
        f"# {meta.get('name') or folder_name} (exported model, version {meta['version']})",
        "",
        str(meta.get("task", "")),
        "",
        str(meta.get("description", "")),
        "",
        f"Exported by `anofpdm_monai` {__version__} (`python -m anofpdm_monai.apps.export_bundle`) on "
        f"{datetime.date.today().isoformat()}. {meta.get('intended_use', '')}",
        "",
        "## Requirements",
        "",
        f"The configs build every component from the `anofpdm_monai` package, version {__version__}: install it "
        f"(`pip install anofpdm-monai=={__version__}`, or `pip install -e .` in its source checkout) with MONAI "
        f"{meta['monai_version']} and PyTorch {meta['pytorch_version']}. `configs/metadata.json` lists every package "
        "(`required_packages_version`).",
        "",
        "## Running",
        "",
        "Inference on a folder of cases (BraTS 2021/2023 or ATLAS BIDS layout; the input modalities "
        f"{', '.join(modalities)}), run inside this folder (`bundle_root` is `.`):",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json "
        "--input_dir /path/to/cases --output_dir /path/to/output",
        "```",
        "",
        "From another folder give the root: `python -m monai.bundle run --config_file <this folder>/configs/"
        "inference.json --bundle_root <this folder> --input_dir ... --output_dir ...`. A datalist split instead of "
        "a folder: `--datalist datalist.json --dataset_dir /data --split test`. Per case the output folder gets "
        "`<case>_anomaly_map.nii.gz`, `<case>_anomaly_mask.nii.gz` (on the input's grid), `<case>_slices.csv` and "
        "`<case>_provenance.json`. `--help` lists every option.",
        "",
        "Evaluation against the baselines and recalibration on your validation split (slice labels only) need a "
        "datalist:",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/evaluate.json --datalist datalist.json --dataset_dir /data",
        "python -m monai.bundle run --config_file configs/calibrate.json --datalist datalist.json --dataset_dir /data "
        f"{_grid_options(grid)}",
        "```",
        "",
        "The calibration command repeats this calibration's step grid; give the other settings of the table below "
        "that differ from the defaults too (e.g. `--preset official`). It writes `eval/calibration.json` "
        "(`--calibration_file`); give that to inference with `--calibration eval/calibration.json`.",
        "",
        "## The checkpoint (`models/model.pt`)",
        "",
        *table(rows),
        "",
        "## The calibration (`models/calibration.json`)",
        "",
        "The constants were calibrated from slice labels of a validation split; inference refuses them for another "
        "checkpoint or setting.",
        "",
        *table(constants),
        "",
        "AnoFPDM settings of the calibration (inference uses them unless overridden):",
        "",
        *table(setting_rows),
        "",
        "## Files",
        "",
        "| file | sha256 |",
        "|---|---|",
        files,
        "",
        "`large_files.yml` lists them in the MONAI model-zoo format; `python -m monai.bundle download_large_files "
        "--bundle_path .` checks their hashes (it needs `pyyaml`). `python -m monai.bundle verify_metadata "
        "--meta_file configs/metadata.json --filepath <schema file>` checks the metadata (the `schema` URL, or "
        "`bundles/meta_schema.json` of the anofpdm_monai repository offline).",
        "",
        "## References",
        "",
        *(f"- {r}" for r in meta.get("references", [])),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- export
def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def export_bundle(
    checkpoint: str | Path,
    calibration: str | Path,
    bundle: str,
    output_dir: str | Path,
    overwrite: bool = False,
    version: str | None = None,
    changelog: str | None = None,
    use_ema: bool | None = None,
) -> Path:
    """Write the bundle folder ``output_dir`` (see the module docstring) and return it.

    Args:
        checkpoint: the trained checkpoint (``model.pt`` of the train workflow).
        calibration: its calibration file (calibrate workflow).
        bundle: the dataset bundle of this repository whose configs, metadata and licence are exported.
        output_dir: the folder to write; an existing non-empty one only with ``overwrite``.
        overwrite: replace an existing ``output_dir``.
        version: the exported bundle's version (default: the dataset bundle's).
        changelog: the changelog line of that version (default: what was exported).
        use_ema: which weights the configs use (default: those the calibration was made with).

    Raises:
        ExportError, CalibrationError, CheckpointError, OutputPathError: one line naming the file, key or option.
    """
    from ..calibration import Calibration
    from ..io import atomic_folder, sha256_file, write_json, write_text
    from ..networks import load_network

    checkpoint, calibration_path, output = Path(checkpoint), Path(calibration), Path(output_dir).expanduser()
    source = _bundle_dir(bundle)
    if version is not None and not _VERSION.match(str(version)):
        raise ExportError(f"--version {version!r} is not a version (e.g. 0.3.0)")
    target = output.resolve()
    for what, path in (("--checkpoint", checkpoint), ("--calibration", calibration_path), ("--bundle", source)):
        if path.exists() and _inside(path.resolve(), target):
            raise ExportError(f"--output_dir {output} holds {what} {path}: it would be replaced; choose another folder")
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output_dir {output} is an existing file, not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"--output_dir {output} exists and is not empty (--overwrite true replaces it)")

    # the pair is checked as inference checks it, before anything is written
    record = Calibration.load(calibration_path)
    if use_ema is None:
        use_ema = not str(record.checkpoint_digest).endswith("-model")
    network, info = load_network(checkpoint, use_ema=use_ema, use_flash_attention=False)
    settings = record.inference_settings(f"calibration {calibration_path}", info)
    parameters = sum(p.numel() for p in network.parameters())
    del network
    training = _training_info(checkpoint)

    dataset = json.loads((source / "configs" / "dataset.json").read_text())
    source_meta = json.loads((source / "configs" / "metadata.json").read_text())
    # a version per exported checkpoint: the bundle's, with the checkpoint digest as local version label
    version = str(version or f"{source_meta.get('version') or '0.1.0'}+{info['digest'][:8]}")
    modalities = list((info.get("preprocessing") or {}).get("modalities") or dataset.get("modalities") or [])
    known = list(dataset.get("modalities") or [])
    if known and not set(modalities) <= set(known):
        raise ExportError(
            f"--checkpoint {checkpoint} has modalities {modalities}, not among bundle {bundle}'s {known} "
            f"(modalities of {source / 'configs' / 'dataset.json'}); choose the checkpoint's --bundle"
        )
    overrides = {"modalities": modalities, "map_modalities": list(record.map_modalities)}
    configs = {w: merged_config(bundle, w, overrides, use_ema=use_ema) for w in EXPORTED_WORKFLOWS}
    trained = ", ".join(f"{k} {v}" for k, v in training.items())
    note = changelog or (
        f"exported checkpoint {info['digest']}" + (f" ({trained})" if trained else "") + f" with its calibration "
        f"(w* {record.guidance_scale:g}, tau {record.tau:.4g}, {settings.health_score})"
    )
    meta = _metadata(source_meta, dataset, info, record, version, note)

    with atomic_folder(output) as tmp:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        shutil.copyfile(checkpoint, tmp / "models" / "model.pt")
        shutil.copyfile(calibration_path, tmp / "models" / "calibration.json")
        hashes = {p: sha256_file(tmp / p) for p in ("models/model.pt", "models/calibration.json")}
        if not info["digest"].startswith(hashes["models/model.pt"][:16]):
            raise ExportError(f"--checkpoint {checkpoint} changed while it was exported; export again")
        for workflow, config in configs.items():
            write_json(tmp / "configs" / f"{workflow}.json", config, indent=4)
        write_json(tmp / "configs" / "metadata.json", meta, indent=4)
        shutil.copyfile(source / "configs" / "logging.conf", tmp / "configs" / "logging.conf")
        if (source / "LICENSE").is_file():
            shutil.copyfile(source / "LICENSE", tmp / "LICENSE")
        readme = _readme(output.name, meta, info, training, record, settings, use_ema, parameters, hashes)
        write_text(tmp / "docs" / "README.md", readme)
        write_text(tmp / "large_files.yml", _large_files(list(hashes.items())))
    return output


# ---------------------------------------------------------------------------------------------------- command line
def _flag(name: str):
    from .options import flag

    def parse(value: str) -> bool:
        try:
            return flag(value, name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anofpdm_monai.apps.export_bundle",
        description="Export a checkpoint and its calibration as a self-contained MONAI model-zoo bundle folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="the trained checkpoint (model.pt of the train workflow)")
    parser.add_argument("--calibration", required=True, help="its calibration file (calibrate workflow)")
    parser.add_argument("--bundle", required=True, help="the dataset bundle, e.g. anofpdm_brats21 or anofpdm_atlas")
    parser.add_argument("--output_dir", required=True, help="the bundle folder to write")
    parser.add_argument(
        "--overwrite", type=_flag("overwrite"), default=False, help="replace an existing output_dir (default: false)"
    )
    parser.add_argument("--version", default=None, help="the exported bundle's version (default: the bundle's)")
    parser.add_argument("--changelog", default=None, help="changelog line of that version (default: what was exported)")
    parser.add_argument(
        "--use_ema",
        type=_flag("use_ema"),
        default=None,
        help="EMA weights (default: the weights the calibration was made with)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point.

    Returns:
        0 on success; 2 on a bad option, file or pair (printed to stderr as ``error: <message>``).
    """
    from ..calibration import CalibrationError
    from ..io import OutputPathError, first_line
    from ..networks.checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    try:
        out = export_bundle(
            args.checkpoint,
            args.calibration,
            args.bundle,
            args.output_dir,
            overwrite=args.overwrite,
            version=args.version,
            changelog=args.changelog,
            use_ema=args.use_ema,
        )
    except (ExportError, CalibrationError, CheckpointError, OutputPathError, OSError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    command = "python -m monai.bundle run --config_file configs/inference.json --input_dir <cases> --output_dir <out>"
    print(f"run: cd {out} && {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
