"""Boxes and Euclidean distances on 3-D masks, in physical units (mm, the voxel spacing of the grid)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

# A voxel at a distance threshold counts as within it, whatever the float rounding of the distance map.
DISTANCE_TIE_MM = 1e-3


def padded_box(mask: np.ndarray, spacing: float | Sequence[float], margin_mm: float) -> tuple[slice, ...]:
    """The bounding box of ``mask`` (not empty) grown by ``margin_mm`` on every side, within the array."""
    margin = np.ceil(margin_mm / np.broadcast_to(np.asarray(spacing, float), (mask.ndim,))).astype(int)
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return widened(tuple(box), margin, mask.shape)


def widened(box: tuple[slice, ...], voxels: int | Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` grown by ``voxels`` (one number, or one per axis) on every side, within an array of ``shape``."""
    margin = np.broadcast_to(np.asarray(voxels, int), (len(box),))
    return tuple(slice(max(s.start - int(m), 0), min(s.stop + int(m), n)) for s, m, n in zip(box, margin, shape))


def signed_distance(mask: np.ndarray, spacing: float | Sequence[float]) -> np.ndarray:
    """The signed Euclidean distance (mm, physical spacing) of every voxel to the boundary of ``mask`` (not
    empty): positive outside, negative inside (ITK's Maurer transform, multi-threaded)."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing([float(s) for s in np.broadcast_to(np.asarray(spacing, float), (mask.ndim,))[::-1]])
    signed = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(signed)


def distance_to(mask: np.ndarray, spacing: float | Sequence[float], up_to_mm: float) -> np.ndarray:
    """The Euclidean distance (mm, physical spacing) of every voxel to ``mask``: exact up to ``up_to_mm``, and
    infinite where it is certainly further. The distance map is taken on the mask's box grown by ``up_to_mm``
    only: the same answer within that distance, at a fraction of the cost."""
    distance = np.full(mask.shape, np.inf, np.float32)
    if mask.any():
        box = padded_box(mask, spacing, up_to_mm)
        distance[box] = np.maximum(signed_distance(mask[box], spacing), 0.0)
    return distance


def at_most(distance: np.ndarray, distance_mm: float) -> np.ndarray:
    """Voxels of a :func:`distance_to` map at most ``distance_mm`` away (a voxel at the threshold is within it,
    :data:`DISTANCE_TIE_MM`)."""
    return distance <= distance_mm + DISTANCE_TIE_MM


def within_distance(mask: np.ndarray, spacing: float | Sequence[float], distance_mm: float) -> np.ndarray:
    """Voxels at most ``distance_mm`` (Euclidean, physical spacing) from ``mask``."""
    return at_most(distance_to(mask, spacing, distance_mm), distance_mm)
