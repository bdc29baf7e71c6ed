"""Volume preparation for Med3DVLM, as its training data were made (reference ``m3d_cap_data_prepare_128.py``).

Canonical orientation first (our addition; the reference works on JPEG slice stacks and ignores
geometry): the volume is reoriented by axis permutations and flips only, as
:func:`voxtext.preprocess.prepare` does, to the array order ``(D, H, W)`` = SimpleITK's ``(z, y, x)``
of an LPS image: D runs inferior -> superior, H anterior -> posterior (image rows top to bottom),
W patient right -> left (columns left to right), i.e. axial slices in radiological display, as the
training JPEGs were shown. Then, as the reference: min-max to ``[0, 1]``, crop to the bounding box
of voxels > 0 (MONAI ``CropForeground``, margin 0) and trilinear resize (``align_corners=False``) to
128 x 256 x 256, whatever the voxel spacing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import io_orientation, ornt_transform

from ...errors import InputError
from ...preprocess import _CANONICAL_ORNT, _foreground_box, _to_zyx
from ...volume import Volume

IMAGE_SIZE = (128, 256, 256)  # (D, H, W) the published weights need (projector input sizes are fixed)


def canonical_array(volume: Volume) -> np.ndarray:
    """The voxels reoriented to the canonical ``(D, H, W)`` order (a view; see the module docstring)."""
    return _canonical(volume.array, volume.affine)


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return _to_zyx(array, ornt_transform(io_orientation(affine), _CANONICAL_ORNT))


def prepare_volume(
    volume: Volume | np.ndarray,
    size: tuple[int, int, int] = IMAGE_SIZE,
    window: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``(1, 1, *size)`` float32 model input from a :class:`Volume` or an already canonical ``(D, H, W)`` array.

    ``window`` (e.g. a CT display window in HU) clips the values before the min-max scaling; the
    training JPEGs were already windowed for display, the reference itself does no clipping.
    """
    image, box = _scaled_and_box(volume, window)
    return F.interpolate(image[box][None, None], size=size, mode="trilinear", align_corners=False)


def prepare_volume_and_labels(
    volume: Volume, labels: np.ndarray, size: tuple[int, int, int], window: tuple[float, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prepare_volume`'s input and a label map on the same voxels: ``(1, 1, *size)`` float32 and
    ``(*size,)`` int64 (``labels`` on ``volume``'s grid, reoriented and cropped alike, nearest-neighbour resized)."""
    if labels.shape != volume.array.shape:
        raise InputError(f"label map shape {labels.shape} differs from the volume's {volume.array.shape}")
    image, box = _scaled_and_box(volume, window)
    label_map = torch.from_numpy(np.array(_canonical(labels, volume.affine), dtype=np.int64))
    resized = F.interpolate(label_map[box][None, None].float(), size=size, mode="nearest")[0, 0].long()
    return F.interpolate(image[box][None, None], size=size, mode="trilinear", align_corners=False), resized


def _scaled_and_box(volume: Volume | np.ndarray, window: tuple[float, float] | None
                    ) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Canonical voxels windowed and min-max scaled to [0, 1], and the crop of the voxels > 0 (margin 0)."""
    array = canonical_array(volume) if isinstance(volume, Volume) else np.asarray(volume)
    if array.ndim != 3 or min(array.shape) < 1:
        raise InputError(f"expected a 3-D volume, got an array of shape {array.shape}")
    image = torch.from_numpy(np.array(array, dtype=np.float32))
    if not torch.isfinite(image).all():
        raise InputError("the volume holds NaN or infinite values")
    if window is not None:
        image = image.clamp(*window)
    image = image - image.min()
    image = image / image.max().clamp_min(1e-8)
    return image, tuple(slice(a, b) for a, b in _foreground_box(image, 0))
