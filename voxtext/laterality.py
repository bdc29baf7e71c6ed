"""Anatomical laterality check for prompts that name a side ("left kidney", "right hippocampus").

A small text encoder barely separates "left kidney" from "right kidney", and a sliding window
often sees one kidney without the context that tells which one it is. The model grid is in
patient LPS order (``x`` index towards the patient's left), so once the body's midline is known,
connected components of a sided prompt's mask lying clearly on the other side can be removed.
The midline is the centre of the body's cross-section. It is trusted when the whole cross-section is
in the field of view, and when the body is cut off on both sides (a patient wider than the reconstructed
field, which is centred on them); when it is cut off on one side only, nothing changes.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
from scipy import ndimage

from .preprocess import PreparedVolume

Side = Literal["left", "right"]
_SIDE_WORDS = {"left": "left", "right": "right", "sinister": "left", "dexter": "right"}


def prompt_side(prompt: str) -> Side | None:
    """The side a prompt names, or ``None`` when it names none or both ("left and right kidneys")."""
    sides = {_SIDE_WORDS[w] for w in re.findall(r"[a-z]+", prompt.lower()) if w in _SIDE_WORDS}
    return sides.pop() if len(sides) == 1 else None


def body_midline(prepared: PreparedVolume) -> float | None:
    """``x`` index (model grid) of the body's midline, or ``None`` if the body leaves the field of view on one
    side only (its centre is then unknown) or there is no body."""
    x_start, x_stop = prepared.geometry.crop[2]
    if (x_start == 0) != (x_stop == prepared.geometry.resampled_shape[2]):
        return None
    columns = (prepared.image > 0).sum(axis=(0, 1)).astype(float)
    if not columns.any():  # no body at all
        return None
    return float((columns * np.arange(columns.size)).sum() / columns.sum())


def keep_side(mask: np.ndarray, side: Side, midline: float, margin_voxels: float) -> np.ndarray:
    """``mask`` (model grid, ``z, y, x``) without the components whose centre lies beyond the midline
    on the other side by more than ``margin_voxels``."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    x_centres = ndimage.center_of_mass(mask, labels, range(1, count + 1))
    offsets = np.array([c[2] for c in x_centres]) - midline  # > 0: patient's left
    wrong = offsets < -margin_voxels if side == "left" else offsets > margin_voxels
    return mask & ~np.isin(labels, np.flatnonzero(wrong) + 1)


def apply_laterality(
    logits: np.ndarray, prompts: list[str], prepared: PreparedVolume, threshold_logit: float, margin_mm: float = 10.0
) -> None:
    """Suppress (in place) wrong-side components of every sided prompt's ``(n, z, y, x)`` logits."""
    midline = body_midline(prepared)
    if midline is None:
        return
    margin = margin_mm / prepared.geometry.spacing[2]
    for i, prompt in enumerate(prompts):
        side = prompt_side(prompt)
        if side is None:
            continue
        mask = logits[i] > threshold_logit
        removed = mask & ~keep_side(mask, side, midline, margin)
        logits[i][removed] = np.minimum(logits[i][removed], threshold_logit - 10.0)
