"""Dice and normalised surface Dice with the CVPR BiomedSegFM conventions."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|); 1 when both are empty, 0 when only one is."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = pred.sum() + gt.sum()
    return 1.0 if total == 0 else 2.0 * float((pred & gt).sum()) / float(total)


def normalized_surface_dice(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0
) -> float:
    """Fraction of both surfaces' area within ``tolerance_mm`` of the other; spacing in array-axis order.

    Surfels weighted by their area, as DeepMind's surface-distance (the challenge's ``SurfaceDice.py``).
    1 when both masks are empty, 0 when only one is.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    box = joint_box(pred | gt, margin=1)
    as_tensor = lambda m: torch.from_numpy(np.ascontiguousarray(m[box]))[None, None].float()  # noqa: E731
    with warnings.catch_warnings():  # MONAI 1.5 warns about an argument it passes itself
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(as_tensor(pred), as_tensor(gt), [tolerance_mm], include_background=True,
                                     spacing=[float(s) for s in spacing], use_subvoxels=True)
    return float(value.item())


def joint_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty ``mask`` grown by ``margin`` voxels (within the array)."""
    box = []
    for axis, size in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - margin), min(size, int(hits[-1]) + 1 + margin)))
    return tuple(box)
