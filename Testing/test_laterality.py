"""Laterality check: sided prompts lose components on the other side of the body, and only then."""

from __future__ import annotations

import numpy as np
import pytest

from voxtext.laterality import apply_laterality, body_midline, keep_side, prompt_side
from voxtext.preprocess import PreprocessConfig, prepare
from voxtext.volume import Volume


@pytest.mark.parametrize(
    "prompt, side",
    [("left kidney", "left"), ("Kidney on the RIGHT side", "right"), ("right-sided pleural effusion", "right"),
     ("liver", None), ("left and right kidneys", None), ("leftover", None), ("cleft palate", None)],
)
def test_prompt_side(prompt, side):
    assert prompt_side(prompt) == side


def two_blobs() -> np.ndarray:
    mask = np.zeros((10, 10, 40), bool)
    mask[3:7, 3:7, 4:10] = True  # x < midline: patient's right (LPS)
    mask[3:7, 3:7, 30:36] = True  # patient's left
    return mask


def test_keep_side_drops_the_other_side_only():
    mask = two_blobs()
    left = keep_side(mask, "left", midline=20.0, margin_voxels=2.0)
    assert left[..., 30:36].all(axis=-1)[3:7, 3:7].all() and not left[..., :20].any()
    right = keep_side(mask, "right", midline=20.0, margin_voxels=2.0)
    assert right[..., 4:10].sum() == mask[..., 4:10].sum() and not right[..., 20:].any()
    # A component within the margin of the midline is kept whatever its side.
    near = np.zeros_like(mask)
    near[3:7, 3:7, 17:21] = True
    assert np.array_equal(keep_side(near, "left", 20.0, 3.0), near)


def body_volume(x_extent: slice) -> Volume:
    """A CT block of soft tissue (i runs to the patient's left in RAS) inside air."""
    array = np.full((40, 12, 12), -1000.0, np.float32)
    array[x_extent, 2:10, 2:10] = 40.0
    return Volume(array, np.diag([-2.0, -2.0, 2.0, 1.0]), "CT")


def test_logits_of_the_wrong_side_are_suppressed_when_the_body_is_in_view():
    prepared = prepare(body_volume(slice(4, 36)), PreprocessConfig(target_spacing=2.0))
    midline = body_midline(prepared)
    assert midline == pytest.approx((prepared.image.shape[2] - 1) / 2, abs=0.5)
    logits = np.full((3, *prepared.image.shape), -5.0, np.float32)
    nx = prepared.image.shape[2]
    logits[:, 2:6, 2:6, 1:5] = 5.0  # patient's right
    logits[:, 2:6, 2:6, nx - 5 : nx - 1] = 5.0  # patient's left
    apply_laterality(logits, ["left kidney", "right kidney", "kidneys"], prepared, threshold_logit=0.0)
    assert (logits[0, ..., : nx // 2] < 0).all() and (logits[0, 2:6, 2:6, nx - 5 : nx - 1] > 0).all()
    assert (logits[1, ..., nx // 2 :] < 0).all() and (logits[1, 2:6, 2:6, 1:5] > 0).all()
    assert (logits[2] > 0).sum() == 2 * 4 * 4 * 4


def test_no_change_when_the_body_leaves_the_field_of_view_on_one_side():
    prepared = prepare(body_volume(slice(0, 30)), PreprocessConfig(target_spacing=2.0))
    assert body_midline(prepared) is None
    logits = np.full((1, *prepared.image.shape), 5.0, np.float32)
    apply_laterality(logits, ["left kidney"], prepared, threshold_logit=0.0)
    assert (logits > 0).all()


def test_a_body_cut_off_on_both_sides_is_centred_in_the_field_of_view():
    # Wider than the reconstructed field on both sides: the seen part's centre, here nearer the right edge.
    array = np.full((40, 12, 12), -1000.0, np.float32)
    array[:, 2:10, 2:10] = 40.0
    array[30:, 2:6, 2:10] = -1000.0  # less body seen on the patient's left
    prepared = prepare(Volume(array, np.diag([-2.0, -2.0, 2.0, 1.0]), "CT"), PreprocessConfig(target_spacing=2.0))
    assert prepared.geometry.crop[2] == (0, prepared.geometry.resampled_shape[2])
    midline = body_midline(prepared)
    assert midline is not None and midline < (prepared.image.shape[2] - 1) / 2 - 1
    nx = prepared.image.shape[2]
    logits = np.full((1, *prepared.image.shape), -5.0, np.float32)
    logits[0, 2:6, 2:6, 1:5] = 5.0  # patient's right
    logits[0, 2:6, 2:6, nx - 5 : nx - 1] = 5.0  # patient's left
    apply_laterality(logits, ["left kidney"], prepared, threshold_logit=0.0)
    assert (logits[0, ..., : nx // 2] < 0).all() and (logits[0, 2:6, 2:6, nx - 5 : nx - 1] > 0).all()
