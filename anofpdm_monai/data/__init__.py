"""Data: datalists, MONAI transforms, volume preprocessing, the slice cache and the output writers."""

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
