"""Dice and normalised surface Dice with the CVPR BiomedSegFM conventions."""

from __future__ import annotations

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
    """Fraction of both surfaces within ``tolerance_mm`` of the other; spacing in array-axis order."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    as_tensor = lambda m: torch.from_numpy(m)[None, None].float()  # noqa: E731
    value = compute_surface_dice(as_tensor(pred), as_tensor(gt), [tolerance_mm], include_background=True,
                                 spacing=[float(s) for s in spacing])
    return float(value.item())
