"""Volume preprocessing shared by the slice cache (training, calibration, evaluation) and volume inference.

One :class:`VolumePreprocessor` holds every parameter of the chain; its :meth:`~VolumePreprocessor.to_dict` is
stored in checkpoints and calibration files so that inference preprocesses exactly as training did.

The in-plane resampling to square pixels (:class:`~anofpdm_monai.data.transforms.IsotropicInPlaned`) has no
parameter in that dict: it is the identity for inputs whose two in-plane voxel sizes agree within 1 % (every volume
models were trained on so far), so checkpoints, calibrations and slice caches made before it keep their meaning,
and a checkpoint's dict stays loadable (and resumable: training compares the dicts for equality).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscreted, Compose, Invertd, Orientationd, Resized

from .transforms import (
    BinarizeLabeld,
    BrainMaskd,
    CaseError,
    ForegroundPercentileNormalized,
    IsotropicInPlaned,
    LoadCased,
    MinMaxScaled,
    SquarePadd,
)

__all__ = [
    "VolumePreprocessor",
    "SliceArrays",
    "SLICE_TABLE_COLUMNS",
    "brain_slice_range",
    "source_axial_index",
    "unwrap_transform_error",
]

#: columns of the per-slice table (one row per kept axial slice)
SLICE_TABLE_COLUMNS = (
    "case_id",
    "row",
    "slice_index",
    "source_index",
    "label",
    "lesion_area",
    "brain_area",
)


def unwrap_transform_error(exc: BaseException, case: str, stage: str = "preprocessing") -> BaseException:
    """The exception to raise for a failure inside the MONAI chain.

    ``monai.transforms.apply_transform`` re-raises every error as ``RuntimeError("applying transform <...>")``
    (nested once per ``Compose`` level). Returns the :class:`CaseError` in the cause chain if there is one (its
    message is the one-line reason naming the file), else a one-line ``RuntimeError`` naming the case, the
    transform and the root cause (chained to ``exc``).
    """
    root: BaseException = exc
    transform = None
    while str(root).startswith("applying transform") and root.__cause__ is not None:
        transform = str(root)[len("applying transform ") :].strip("<>").split(" object at ")[0].rsplit(".", 1)[-1]
        root = root.__cause__
    if isinstance(root, CaseError):
        return root
    if root is exc:
        return exc
    lines = str(root).strip().splitlines()
    reason = lines[0] if lines else ""
    err = RuntimeError(f"case {case}: {stage} failed in {transform}: {type(root).__name__}: {reason}")
    err.__cause__ = root
    return err


def brain_slice_range(brain: torch.Tensor | np.ndarray, min_brain_pixels: int = 0, case: str = "<case>") -> np.ndarray:
    """The kept axial slices of a (S, S, D) brain mask: from the first to the last slice with more than
    ``min_brain_pixels`` brain pixels (one-line :class:`CaseError` when there is none)."""
    area = np.asarray(torch.as_tensor(brain).bool().sum(dim=(0, 1)))
    bearing = np.nonzero(area > int(min_brain_pixels))[0]
    if bearing.size == 0:
        raise CaseError(f"case {case}: no axial slice contains brain at model resolution")
    return np.arange(bearing[0], bearing[-1] + 1)


def source_axial_index(image: MetaTensor) -> tuple[int, np.ndarray]:
    """Map RAS axial indices of a preprocessed image to the input file's voxel indices.

    Returns:
        ``(axis, index)``: the input file's voxel axis that is axial, and for each RAS slice k its index along that
        axis.
    """
    original = np.asarray(image.meta.get("original_affine", image.affine))
    depth = int(image.shape[-1])
    ornt = nib.orientations.io_orientation(original)  # input axis i -> (RAS axis, flip)
    axis = int(np.nonzero(ornt[:, 0] == 2)[0][0])
    index = np.arange(depth)
    if ornt[axis, 1] < 0:
        index = depth - 1 - index
    return axis, index


@dataclass
class SliceArrays:
    """The brain-bearing axial slices of one preprocessed case, at model resolution.

    Attributes:
        image: (N, C, S, S) float32 in [-1, 1].
        label: (N, S, S) uint8 anomaly mask (all zero when the case has no label).
        brain: (N, S, S) uint8 brain mask.
        table: one row per slice, columns :data:`SLICE_TABLE_COLUMNS`; ``slice_index`` is the index along the
            RAS axial axis, ``source_index`` the index along the input file's own axial axis, ``label`` the slice
            label (1 iff a lesion pixel survives resizing; -1 when the case has no label).
        has_label: whether the case came with a segmentation.
    """

    image: np.ndarray
    label: np.ndarray
    brain: np.ndarray
    table: pd.DataFrame
    has_label: bool = True


@dataclass
class VolumePreprocessor:
    """Preprocessing of one case from NIfTI files to model-resolution axial slices.

    Args:
        modalities: ordered channel names (as in the datalist); the model's input channels.
        image_size: side of the square model resolution (128 in the papers).
        percentile: foreground percentile mapped to 1 before min-max scaling.
        scaling: ``"slice"`` (per-slice min-max as the official code) or ``"volume"``.
        square_pad: pad the axial plane to a square before resizing (keeps the aspect ratio).
        min_brain_pixels: a slice is brain-bearing when its brain mask has more pixels than this at model
            resolution; the kept range runs from the first to the last brain-bearing slice.
    """

    modalities: Sequence[str] = field(default_factory=lambda: ["flair", "t1", "t1ce", "t2"])
    image_size: int = 128
    percentile: float = 99.0
    scaling: str = "slice"
    square_pad: bool = True
    min_brain_pixels: int = 0

    def __post_init__(self) -> None:
        self.modalities = [str(m) for m in self.modalities]
        if not self.modalities:
            raise ValueError("modalities must name at least one channel")
        if self.scaling not in ("slice", "volume"):
            raise ValueError(f"scaling must be 'slice' or 'volume', got {self.scaling!r}")
        if int(self.image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        self.image_size = int(self.image_size)
        self._transform: Compose | None = None

    # ------------------------------------------------------------------ configuration
    def to_dict(self) -> dict[str, Any]:
        """Parameters as a JSON-serialisable dict (stored in checkpoints and calibration files)."""
        out = asdict(self)
        out["modalities"] = list(self.modalities)
        return out

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], source: str = "preprocessing") -> VolumePreprocessor:
        """The preprocessing of a :meth:`to_dict` dict (from a checkpoint or a calibration file).

        Raises:
            ValueError: one line naming ``source`` for a key this version does not know (a dict written by a newer
                version: preprocessing it differently would silently change what the model sees) or a bad value.
        """
        if not isinstance(params, Mapping):
            raise ValueError(f"{source}: expected a mapping of preprocessing parameters, got {type(params).__name__}")
        unknown = sorted(str(k) for k in params if k not in cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"{source}: unknown preprocessing key(s) {unknown} (written by a newer anofpdm_monai?); known: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        try:
            return cls(**dict(params))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def check_modalities(self, modalities: Sequence[str], source: str = "datalist") -> None:
        """Raise a one-line error when ``modalities`` differ from the channels this preprocessing expects."""
        if [str(m) for m in modalities] != list(self.modalities):
            raise ValueError(
                f"{source} has modalities {list(modalities)} but the model expects {list(self.modalities)} "
                "(same names, same order)"
            )

    @property
    def transform(self) -> Compose:
        """The MONAI volume-level chain (dictionary transforms on keys image, label, brain_mask, brain)."""
        if self._transform is None:
            spatial = ["image", "label", "brain"]
            size = (self.image_size, self.image_size, -1)
            steps = [
                LoadCased(keys=("image", "label", "brain_mask"), modality_names=self.modalities),
                Orientationd(
                    keys=["image", "label", "brain_mask"], axcodes="RAS", labels=None, allow_missing_keys=True
                ),
                BinarizeLabeld(keys="label", allow_missing_keys=True),
                BrainMaskd(image_key="image", mask_key="brain_mask", output_key="brain"),
                # square pixels in the axial plane before the square pad and the resize (identity when isotropic)
                IsotropicInPlaned(
                    keys=["image", "label", "brain_mask", "brain"],
                    mode=["bilinear", "bilinear", "nearest", "bilinear"],
                    allow_missing_keys=True,
                ),
            ]
            if self.square_pad:
                steps.append(SquarePadd(keys=["image", "label", "brain_mask", "brain"], allow_missing_keys=True))
            steps += [
                ForegroundPercentileNormalized(keys="image", mask_key="brain_mask", percentile=self.percentile),
                # trilinear with the slice axis kept at its size is exactly bilinear within each axial plane
                Resized(keys=spatial, spatial_size=size, mode="trilinear", allow_missing_keys=True),
                AsDiscreted(keys=["label", "brain"], threshold=0.5, allow_missing_keys=True),
                MinMaxScaled(keys="image", per_slice=self.scaling == "slice"),
            ]
            self._transform = Compose(steps)
        return self._transform

    # ------------------------------------------------------------------ application
    def __call__(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Preprocess one datalist entry (absolute paths) into volumes at model resolution.

        Returns:
            dict with ``image`` (C, S, S, D) MetaTensor in [-1, 1] carrying the applied operations for inversion,
            ``brain`` (1, S, S, D), ``label`` (1, S, S, D) when the entry has one, and ``id``.
        """
        data = {k: v for k, v in entry.items() if k in ("id", "image", "label", "brain_mask") and v is not None}
        try:
            out = self.transform(data)
        except RuntimeError as exc:
            # MONAI's Compose wraps every failure as RuntimeError("applying transform <object at 0x...>"): surface the
            # one-line CaseError that names the file, or at least the transform and the underlying message.
            err = unwrap_transform_error(exc, str(data.get("id", "<case>")))
            if err is exc:
                raise
            raise err from err.__cause__
        out.pop("brain_mask", None)
        return out

    def source_axial_index(self, data: Mapping[str, Any]) -> tuple[int, np.ndarray]:
        """:func:`source_axial_index` of a preprocessed case's image."""
        return source_axial_index(data["image"])

    def slices(self, data: Mapping[str, Any]) -> SliceArrays:
        """Cut a preprocessed case into its brain-bearing axial slices with slice-level labels."""
        case = str(data.get("id", "<case>"))
        image = torch.as_tensor(data["image"]).detach().cpu()
        brain = torch.as_tensor(data["brain"])[0].detach().cpu() > 0.5
        has_label = data.get("label") is not None
        label = torch.as_tensor(data["label"])[0].detach().cpu() > 0.5 if has_label else torch.zeros_like(brain)
        brain_area = brain.sum(dim=(0, 1)).numpy()
        keep = brain_slice_range(brain, self.min_brain_pixels, case)
        _, source_index = self.source_axial_index(data)
        lesion_area = label.sum(dim=(0, 1)).numpy()
        table = pd.DataFrame(
            {
                "case_id": case,
                "row": np.arange(keep.size),
                "slice_index": keep,
                "source_index": source_index[keep],
                "label": (lesion_area[keep] > 0).astype(np.int64) if has_label else -1,
                "lesion_area": lesion_area[keep].astype(np.int64),
                "brain_area": brain_area[keep].astype(np.int64),
            },
            columns=list(SLICE_TABLE_COLUMNS),
        )
        # (C, S, S, D) -> (N, C, S, S)
        img = image[..., keep].permute(3, 0, 1, 2).contiguous().numpy().astype(np.float32)
        lab = label[..., keep].permute(2, 0, 1).numpy().astype(np.uint8)
        brn = brain[..., keep].permute(2, 0, 1).numpy().astype(np.uint8)
        return SliceArrays(image=img, label=lab, brain=brn, table=table, has_label=has_label)

    def invert(self, volume: torch.Tensor, data: Mapping[str, Any], interpolate: bool = True) -> MetaTensor:
        """Map a (1, S, S, D) volume at model resolution (RAS) back onto the input file's grid.

        Args:
            volume: e.g. the anomaly map assembled from slices (zero outside the brain range).
            data: the preprocessed case (its ``image`` carries the applied operations).
            interpolate: bilinear (True) or nearest (False) interpolation when undoing the resize.

        Returns:
            MetaTensor of shape (1, *input spatial shape) whose ``affine`` is the input file's affine.
        """
        ref = data["image"]
        vol = MetaTensor(torch.as_tensor(volume, dtype=torch.float32).detach().cpu(), meta=dict(ref.meta))
        vol.applied_operations = [dict(op) for op in ref.applied_operations]
        inverter = Invertd(
            keys="volume", transform=self.transform, orig_keys="image", nearest_interp=not interpolate, to_tensor=True
        )
        out = inverter({"volume": vol, "image": ref})["volume"]
        return out
