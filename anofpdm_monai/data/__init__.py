"""Data: datalists, MONAI transforms, volume preprocessing, the slice cache and the output writers.

The names are imported on first use (module ``__getattr__``), so that ``anofpdm_monai.data.datalist`` (the
datalist command, a folder scan) imports neither torch nor MONAI; ``from anofpdm_monai.data import X`` works as
usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as static analysers see them
    from .cache import CacheBuildError, SliceCache, SliceDataset
    from .datalist import (
        LAYOUTS,
        SPLITS,
        DatalistError,
        build_datalist,
        datalist_from_folder,
        detect_layout,
        load_datalist,
        split_counts,
        validate_datalist,
        write_datalist,
    )
    from .preprocessing import SLICE_TABLE_COLUMNS, SliceArrays, VolumePreprocessor
    from .transforms import (
        BinarizeLabeld,
        BrainMaskd,
        CaseError,
        ForegroundPercentileNormalize,
        ForegroundPercentileNormalized,
        IsotropicInPlaned,
        LoadCased,
        MinMaxScale,
        MinMaxScaled,
        SquarePad,
        SquarePadd,
    )

#: public name -> the submodule that defines it
_MODULES = {
    **dict.fromkeys(
        (
            "LAYOUTS",
            "SPLITS",
            "DatalistError",
            "build_datalist",
            "datalist_from_folder",
            "detect_layout",
            "load_datalist",
            "split_counts",
            "validate_datalist",
            "write_datalist",
        ),
        "datalist",
    ),
    **dict.fromkeys(("CacheBuildError", "SliceCache", "SliceDataset"), "cache"),
    **dict.fromkeys(("SLICE_TABLE_COLUMNS", "SliceArrays", "VolumePreprocessor"), "preprocessing"),
    **dict.fromkeys(
        (
            "BinarizeLabeld",
            "BrainMaskd",
            "CaseError",
            "ForegroundPercentileNormalize",
            "ForegroundPercentileNormalized",
            "IsotropicInPlaned",
            "LoadCased",
            "MinMaxScale",
            "MinMaxScaled",
            "SquarePad",
            "SquarePadd",
        ),
        "transforms",
    ),
}

__all__ = [
    "LAYOUTS",
    "SPLITS",
    "DatalistError",
    "build_datalist",
    "datalist_from_folder",
    "detect_layout",
    "load_datalist",
    "split_counts",
    "validate_datalist",
    "write_datalist",
    "CacheBuildError",
    "SliceCache",
    "SliceDataset",
    "SLICE_TABLE_COLUMNS",
    "SliceArrays",
    "VolumePreprocessor",
    "BinarizeLabeld",
    "BrainMaskd",
    "CaseError",
    "ForegroundPercentileNormalize",
    "ForegroundPercentileNormalized",
    "IsotropicInPlaned",
    "LoadCased",
    "MinMaxScale",
    "MinMaxScaled",
    "SquarePad",
    "SquarePadd",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
