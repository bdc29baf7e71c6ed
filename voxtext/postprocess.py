"""Turning per-prompt probabilities into clean binary masks."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from monai.transforms import FillHoles, KeepLargestConnectedComponent

OverlapPolicy = Literal["independent", "argmax"]


def clean_mask(mask: np.ndarray, keep_largest: bool = False, fill_holes: bool = False) -> np.ndarray:
    """Optionally keep the largest connected component and fill enclosed holes of a 3-D bool mask."""
    if not (keep_largest or fill_holes) or not mask.any():
        return mask
    tensor = torch.from_numpy(mask[None].astype(np.uint8))
    if keep_largest:
        tensor = KeepLargestConnectedComponent(applied_labels=[1], connectivity=3)(tensor)
    if fill_holes:
        tensor = FillHoles(applied_labels=[1])(tensor)
    return np.asarray(tensor[0], dtype=bool)


class OverlapResolver:
    """Accumulates per-prompt probability maps and yields final masks.

    ``independent``: each prompt's mask is its own ``p > threshold`` (masks may overlap).
    ``argmax``: as the BiomedSegFM challenge, each voxel goes to the prompt with the highest
    probability if that probability exceeds the threshold, so masks are disjoint.
    """

    def __init__(self, policy: OverlapPolicy, threshold: float, shape: tuple[int, ...], count: int) -> None:
        if policy not in ("independent", "argmax"):
            raise ValueError(f"overlap policy must be 'independent' or 'argmax', got {policy!r}")
        self.policy, self.threshold = policy, threshold
        self.masks = np.zeros((count, *shape), dtype=bool)
        if policy == "argmax":
            self._best = np.full(shape, threshold, dtype=np.float32)
            self._owner = np.full(shape, -1, dtype=np.int16)

    def add(self, index: int, probability: np.ndarray) -> None:
        if self.policy == "independent":
            self.masks[index] = probability > self.threshold
            return
        better = probability > self._best
        self._best[better] = probability[better]
        self._owner[better] = index

    def finish(self) -> np.ndarray:
        if self.policy == "argmax":
            for i in range(len(self.masks)):
                self.masks[i] = self._owner == i
        return self.masks
