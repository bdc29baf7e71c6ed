"""Preparation of a volume for the ESICA model and the exact inverse mapping of its outputs.

The model works on CVPR-BiomedSegFM style arrays: SimpleITK's ``(z, y, x)`` order of an LPS
image, resampled to 1.5 mm isotropic voxels, intensities in ``[0, 1]``, cropped to the
foreground. :func:`prepare` builds that array and a :class:`GridMapping`; :func:`restore`
brings model outputs back onto exactly the input grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from .errors import InputError
from .volume import Volume, normalize_modality

Mode = Literal["linear", "nearest"]
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

# Canonical voxel axes (i, j, k) point to patient Left, Posterior, Superior: their (k, j, i)
# transpose is SimpleITK's GetArrayFromImage order of an LPS image, i.e. the model's (z, y, x).
CANONICAL_AXES = ("L", "P", "S")
_CANONICAL_ORNT = axcodes2ornt(CANONICAL_AXES)
# Hounsfield-unit signature used to recognise CT: at least CT_LOW_FRACTION of the voxels at or below CT_LOW_HU
# (fat, lung, air, padding; a crop of the abdomen without air still holds fat). MR, PET and US intensities are
# non-negative, or z-scores a few units either side of 0.
CT_LOW_HU = -50.0
CT_LOW_FRACTION = 0.05


@dataclass(frozen=True)
class PreprocessConfig:
    """How a volume is turned into the model input.

    ``modality`` overrides :attr:`Volume.modality`, which otherwise overrides a guess from the values.
    CT is clipped to the HU ``ct_window``; other modalities to the ``percentiles`` of their nonzero voxels.
    """

    target_spacing: float | None = 1.5
    modality: str | None = None
    ct_window: tuple[float, float] = (-160.0, 240.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    margin: int = 0

    def __post_init__(self) -> None:
        if self.target_spacing is not None and not 1e-3 <= self.target_spacing <= 100.0:
            raise InputError(f"target_spacing must be between 0.001 and 100 mm (or None), got {self.target_spacing}")
        low, high = self.ct_window
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InputError(f"ct_window must be finite (lower, upper) HU with lower < upper, got {self.ct_window}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise InputError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles}")
        if int(self.margin) != self.margin or self.margin < 0:
            raise InputError(f"margin must be a non-negative number of voxels, got {self.margin}")
        object.__setattr__(self, "modality", normalize_modality(self.modality))


@dataclass(frozen=True, eq=False)
class GridMapping:
    """Relation between the input grid ``(i, j, k)`` and the model grid ``(z, y, x)``.

    The input is reoriented to :data:`CANONICAL_AXES` (axis permutations and flips only),
    transposed to ``(z, y, x)``, resampled to ``resampled_shape`` (voxel centres as
    ``F.interpolate(align_corners=False)``) and cropped to ``crop`` (start, stop per axis).
    """

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    input_ornt: np.ndarray  # nibabel io_orientation of input_affine
    resampled_shape: tuple[int, int, int]
    crop: Box

    @property
    def to_canonical(self) -> np.ndarray:
        return ornt_transform(self.input_ornt, _CANONICAL_ORNT)

    @property
    def from_canonical(self) -> np.ndarray:
        return ornt_transform(_CANONICAL_ORNT, self.input_ornt)

    @property
    def oriented_shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` shape of the reoriented input, before resampling."""
        ijk = [0, 0, 0]
        for size, (axis, _) in zip(self.input_shape, self.to_canonical):
            ijk[int(axis)] = size
        return tuple(ijk[::-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` shape of the model input."""
        return tuple(stop - start for start, stop in self.crop)

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(start, stop) for start, stop in self.crop)

    def canonical_affine(self) -> np.ndarray:
        """4x4 affine of the reoriented input grid (canonical ``i, j, k``) to RAS mm."""
        return self.input_affine @ inv_ornt_aff(self.to_canonical, self.input_shape)

    def model_affine(self) -> np.ndarray:
        """4x4 affine of the model grid index ``(z, y, x)`` to RAS mm."""
        scale = np.asarray(self.oriented_shape, float) / np.asarray(self.resampled_shape, float)
        start = np.asarray([start for start, _ in self.crop], float)
        model_to_oriented = np.diag([*scale, 1.0])
        model_to_oriented[:3, 3] = (start + 0.5) * scale - 0.5
        zyx_to_ijk = np.eye(4)[[2, 1, 0, 3]]
        return self.canonical_affine() @ zyx_to_ijk @ model_to_oriented

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Model grid voxel size in mm along ``(z, y, x)``."""
        return tuple(float(s) for s in np.linalg.norm(self.model_affine()[:3, :3], axis=0))


@dataclass(frozen=True, eq=False)
class PreparedVolume:
    """The model input (float32 ``(z, y, x)`` in ``[0, 1]``) and how to map results back."""

    image: np.ndarray
    geometry: GridMapping
    modality: str


def guess_modality(array: np.ndarray) -> str:
    """``"CT"`` when the values look like Hounsfield units (>= 5 % of the voxels at or below -50: fat, lung, air),
    else ``"MR"``."""
    return "CT" if np.count_nonzero(array <= CT_LOW_HU) >= CT_LOW_FRACTION * array.size else "MR"


def normalize_intensity(array: np.ndarray, modality: str, config: PreprocessConfig) -> np.ndarray:
    """A new float32 C-ordered array scaled to ``[0, 1]``.

    CT: clip to ``config.ct_window``. Others: clip to ``config.percentiles`` of the nonzero voxels;
    voxels that were exactly zero (background of skull-stripped or masked images) stay zero.
    A constant image gives zeros.
    """
    image = np.array(array, dtype=np.float32, order="C", copy=True)
    if modality == "CT":
        low, high = config.ct_window
        zero = None
    else:
        zero = image == 0
        nonzero = image[~zero]
        if nonzero.size == 0:
            return np.zeros_like(image)
        low, high = (float(v) for v in np.percentile(nonzero, config.percentiles))
    if high <= low:
        return np.zeros_like(image)
    image -= low
    image /= high - low
    np.clip(image, 0.0, 1.0, out=image)
    if zero is not None:
        image[zero] = 0.0
    return image


def prepare(volume: Volume, config: PreprocessConfig = PreprocessConfig()) -> PreparedVolume:
    """Reorient, normalise, resample and crop ``volume`` into the model input (see the module docstring)."""
    modality = config.modality or volume.modality or guess_modality(volume.array)
    input_ornt = io_orientation(volume.affine)
    zyx = _to_zyx(volume.array, ornt_transform(input_ornt, _CANONICAL_ORNT))
    image = torch.from_numpy(normalize_intensity(zyx, modality, config))

    unresampled = GridMapping(volume.shape, volume.affine, input_ornt, zyx.shape, _full_box(zyx.shape))
    resampled_shape = _target_shape(zyx.shape, unresampled.spacing, config.target_spacing)
    image = _resample(image[None], resampled_shape, "linear")[0]
    crop = _foreground_box(image, config.margin) if config.crop_foreground else _full_box(resampled_shape)

    geometry = GridMapping(volume.shape, volume.affine, input_ornt, resampled_shape, crop)
    return PreparedVolume(image[geometry.slices].contiguous().numpy(), geometry, modality)


def to_model_grid(geometry: GridMapping, values: np.ndarray, mode: Mode = "nearest") -> np.ndarray:
    """Input-grid values ``(..., i, j, k)`` on the model grid ``(..., z, y, x)``, mapped as the image is."""
    values = np.asarray(values)
    if values.shape[-3:] != geometry.input_shape:
        raise InputError(f"values of shape {values.shape} do not end with the input grid shape {geometry.input_shape}")
    zyx = _to_zyx(values, geometry.to_canonical)
    lead = zyx.shape[:-3]
    tensor = torch.from_numpy(np.array(zyx, dtype=np.float32, order="C")).reshape(-1, *zyx.shape[-3:])
    tensor = _resample(tensor, geometry.resampled_shape, mode)[(slice(None), *geometry.slices)]
    return tensor.reshape(*lead, *geometry.shape).numpy().astype(_output_dtype(values.dtype, mode), copy=False)


def prepare_with_labels(
    volume: Volume, labels: np.ndarray, config: PreprocessConfig = PreprocessConfig()
) -> tuple[PreparedVolume, np.ndarray]:
    """:func:`prepare` plus the label map of ``volume`` (same shape) on the model grid (nearest neighbour)."""
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise InputError(f"labels of shape {labels.shape} do not match the volume's {volume.shape}")
    prepared = prepare(volume, config)
    return prepared, to_model_grid(prepared.geometry, labels, "nearest")


def restore(
    prepared: PreparedVolume | GridMapping, values: np.ndarray | torch.Tensor, mode: Mode = "linear"
) -> np.ndarray:
    """Model-grid values ``(..., z, y, x)`` back on exactly the input grid ``(..., i, j, k)``.

    Outside the crop the result is 0. ``"linear"`` (probabilities) returns float32; ``"nearest"``
    (labels) keeps integer and boolean dtypes.
    """
    geometry = prepared.geometry if isinstance(prepared, PreparedVolume) else prepared
    if mode not in ("linear", "nearest"):
        raise InputError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    tensor = torch.as_tensor(values).detach().cpu()
    if tuple(tensor.shape[-3:]) != geometry.shape:
        raise InputError(f"values of shape {tuple(tensor.shape)} do not end with the model grid shape {geometry.shape}")
    lead = tuple(tensor.shape[:-3])
    dtype = np.float32 if tensor.dtype.is_floating_point else _output_dtype(tensor[:0].numpy().dtype, mode)

    padded = torch.zeros((math.prod(lead), *geometry.resampled_shape), dtype=torch.float32)
    padded[(slice(None), *geometry.slices)] = tensor.reshape(-1, *geometry.shape)
    # Resampled in canonical (i, j, k) order (each axis on its own, as in z, y, x), so that the whole-volume result
    # needs no transposing copy: the copy of a 512 x 512 x 300 CT costs three times the interpolation.
    ijk = _resample(padded.permute(0, 3, 2, 1), geometry.oriented_shape[::-1], mode).numpy()
    array = _reorient(ijk, geometry.from_canonical)
    return np.ascontiguousarray(array.reshape(*lead, *geometry.input_shape), dtype=dtype)


def _reorient(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """nibabel's apply_orientation on the last three axes of ``array`` (a view)."""
    lead = array.ndim - 3
    moved = np.moveaxis(array, range(lead), range(3, 3 + lead))
    return np.moveaxis(apply_orientation(moved, transform), range(3, 3 + lead), range(lead))


def _to_zyx(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """``(..., i, j, k)`` reoriented to canonical axes and transposed to ``(..., z, y, x)`` (a view)."""
    return np.swapaxes(_reorient(array, transform), -1, -3)


def _target_shape(shape: Sequence[int], spacing: Sequence[float], target: float | None) -> tuple[int, int, int]:
    """Grid size keeping the physical extent at ``target`` mm (unchanged when ``target`` is None)."""
    if target is None:
        return tuple(shape)
    return tuple(max(1, math.floor(n * s / target + 0.5)) for n, s in zip(shape, spacing))


def _resample(values: torch.Tensor, size: tuple[int, int, int], mode: Mode) -> torch.Tensor:
    """Channels ``(C, z, y, x)`` resampled to ``size``; voxel centres as ``align_corners=False``."""
    if tuple(values.shape[-3:]) == tuple(size):
        return values
    if mode == "linear":
        return F.interpolate(values[None], size=size, mode="trilinear", align_corners=False)[0]
    # "nearest-exact" picks the voxel whose centre is closest, consistent with the linear grid.
    return F.interpolate(values[None], size=size, mode="nearest-exact")[0]


def _full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def _foreground_box(image: torch.Tensor, margin: int) -> Box:
    """Bounding box of ``image > 0`` grown by ``margin`` voxels; the whole grid when nothing is foreground."""
    mask = (image > 0).numpy()
    box = []
    for axis, size in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return _full_box(mask.shape)
        box.append((max(0, int(hits[0]) - margin), min(size, int(hits[-1]) + 1 + margin)))
    return tuple(box)


def _output_dtype(dtype: np.dtype, mode: Mode) -> np.dtype:
    """float32 for linear interpolation and float inputs; integer and boolean labels keep their dtype."""
    if mode == "linear" or np.issubdtype(dtype, np.floating):
        return np.dtype(np.float32)
    return np.dtype(dtype)
