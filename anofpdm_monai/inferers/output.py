"""Inferer outputs as MONAI-style dictionaries.

The outputs of :class:`~anofpdm_monai.inferers.AnoFPDMInferer` and the baseline inferers are dataclasses (attribute
access, type hints) that are also read-only mappings of per-slice values: every entry has the batch as its first axis,
so MONAI's ``decollate_batch`` turns an output into one dictionary per slice, and a stock ``SupervisedEvaluator`` with
``FlattenSubKeysd(keys="pred")`` and post transforms such as ``SaveImaged`` can consume it (docs/architecture.md).
In the mapping the images follow MONAI's channel-first convention: the (B, H, W) maps and masks are (B, 1, H, W).
Values that do not depend on the slice (the step grid, the guidance scale) are repeated per slice; ``None`` fields
are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["BatchOutput"]


class BatchOutput(Mapping):
    """Mixin of a dataclass of batched tensors: ``output["mask"]`` and ``dict(output)`` give the per-batch tensors.

    Subclasses are dataclasses whose first field is a tensor with the batch as its first axis; ``_shared`` names
    the fields that hold one value for the whole batch (repeated per slice in the mapping), ``_images`` the
    (B, H, W) fields that get a channel axis there.
    """

    _shared: tuple[str, ...] = ()
    _images: tuple[str, ...] = ("anomaly_map", "filtered_map", "mask", "mask_ungated")

    def _batch_size(self) -> int:
        first = getattr(self, dataclasses.fields(self)[0].name)
        return int(first.shape[0])

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        value = getattr(self, key)
        if value is None:
            raise KeyError(key)
        if key in self._shared:  # one value for the batch: repeated per slice
            b = self._batch_size()
            value = torch.as_tensor(value)
            return value.reshape(1, *value.shape).expand(b, *value.shape)
        if key in self._images:
            return value[:, None]
        return value

    # Mapping's __eq__ would compare tensors by truth value; the dataclass compares fields (identity-safe)
    __eq__ = object.__eq__
    __hash__ = None  # type: ignore[assignment]
