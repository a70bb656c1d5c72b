"""Rewrite a trusted checkpoint that the safe loader refuses into a safe one.

    python -m anofpdm_monai.apps.convert_checkpoint --trust old_checkpoint.pt new_checkpoint.pt

Every checkpoint read by this package goes through ``torch.load(weights_only=True)``: tensors and plain containers
only, so a crafted file cannot run code. Training checkpoints written before that rule hold their NumPy RNG state as
an ``ndarray`` and are refused with a message pointing here. Converting unpickles the file fully, which runs any code
it holds: ``--trust`` says you know where the file comes from. The old file is not modified.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anofpdm_monai.apps.convert_checkpoint", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("source", help="the checkpoint to convert (not modified)")
    parser.add_argument("target", help="the new checkpoint file")
    parser.add_argument(
        "--trust", action="store_true", help="required: the source is unpickled fully, which runs any code it holds"
    )
    args = parser.parse_args(argv)
    if not args.trust:
        parser.error("converting unpickles the file fully and runs any code in it; add --trust if you trust its source")
    from ..networks.checkpoint import CheckpointError, convert_checkpoint

    try:
        out = convert_checkpoint(args.source, args.target)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
