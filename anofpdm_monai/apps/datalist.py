"""Command line: scan a dataset folder and write a datalist JSON with a deterministic patient-level split.

python -m anofpdm_monai.apps.datalist brats2021 --root /data/BraTS2021 --output data_lists/brats2021.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..data.datalist import LAYOUTS, SPLITS, DatalistError, build_datalist, patient_id, split_counts, write_datalist
from ..io import OutputPathError, ensure_writable_file

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anofpdm_monai.apps.datalist",
        description="Scan a dataset folder and write a datalist JSON with a deterministic patient-level split.",
    )
    parser.add_argument("layout", metavar="{" + ",".join(LAYOUTS) + "}", help="dataset folder layout")
    parser.add_argument("--root", required=True, help="dataset folder; datalist paths are relative to it")
    parser.add_argument("--output", required=True, help="datalist JSON file to write")
    parser.add_argument(
        "--split",
        nargs=3,
        type=float,
        default=[0.75, 0.05, 0.20],
        metavar=("TRAIN", "VAL", "TEST"),
        help="patient fractions per split, summing to 1 (default: 0.75 0.05 0.20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle (default: 0)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        help="subset/order of modalities, e.g. flair t2 (BraTS 2023 accepts t2f t1n t1c t2w too; default: all)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: build a datalist and write it.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a :class:`DatalistError` or an unwritable ``--output`` (printed to stderr as
        ``error: <message>``).
    """
    args = _parser().parse_args(argv)
    try:
        ensure_writable_file(args.output, "--output")  # before the folder scan
        datalist = build_datalist(args.layout, args.root, args.split, args.seed, args.modalities)
        write_datalist(datalist, args.output)
    except (DatalistError, OutputPathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split}: {n}" for split, n in split_counts(datalist).items())
    patients = {patient_id(args.layout, e["id"]) for split in SPLITS for e in datalist[split]}
    print(f"{counts} (patients: {len(patients)})")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
