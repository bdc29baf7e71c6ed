"""Segmentation results: label map, volumes, NIfTI + JSON sidecar and .seg.nrrd files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import slicerio

from voxtext.errors import InputError
from voxtext.postprocess import OverlapResolver, clean_mask
from voxtext.segmentation import Segmentation

AFFINE = np.array([[0.0, 0.0, 2.5, -10.0], [-0.8, 0.0, 0.0, 20.0], [0.0, 0.7, 0.0, -5.0], [0, 0, 0, 1]])


def two_overlapping_masks():
    masks = np.zeros((2, 12, 10, 8), dtype=bool)
    masks[0, 2:6, 2:6, 2:6] = True
    masks[1, 4:9, 4:9, 1:4] = True  # overlaps the first on [4:6, 4:6, 2:4]
    return Segmentation(masks, ["liver", "left kidney"], AFFINE, model="test")


def test_volumes_use_voxel_size():
    seg = two_overlapping_masks()
    voxel_ml = 0.8 * 0.7 * 2.5 / 1000
    assert seg.volumes_ml()["liver"] == pytest.approx(64 * voxel_ml)
    assert seg.volumes_ml()["left kidney"] == pytest.approx(75 * voxel_ml)


def test_nifti_and_sidecar(tmp_path):
    seg = two_overlapping_masks()
    written = seg.save(tmp_path / "seg.nii.gz")
    img = nib.load(written[0])
    np.testing.assert_allclose(img.affine, AFFINE)
    labels = np.asarray(img.dataobj)
    assert labels.shape == seg.shape
    assert np.array_equal(labels == 2, seg.masks[1])  # the later prompt wins where masks overlap
    assert np.array_equal(labels == 1, seg.masks[0] & ~seg.masks[1])
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["labels"] == {"1": "liver", "2": "left kidney"}


def test_seg_nrrd_round_trip_keeps_overlaps_and_geometry(tmp_path):
    seg = two_overlapping_masks()
    path = seg.save(tmp_path / "seg.seg.nrrd")[0]
    back = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in back["segments"]] == ["liver", "left kidney"]
    np.testing.assert_allclose(back["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ AFFINE, atol=1e-6)
    for name, mask in zip(seg.prompts, seg.masks):
        segment = slicerio.segment_from_name(back, name)
        assert np.array_equal(slicerio.segment_mask(back, segment), mask)  # overlap survives (layers)


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(InputError, match="unsupported"):
        two_overlapping_masks().save(tmp_path / "seg.png")


def test_argmax_policy_gives_disjoint_masks():
    a = np.array([0.9, 0.6, 0.2, 0.7], dtype=np.float32)
    b = np.array([0.8, 0.7, 0.3, 0.1], dtype=np.float32)
    independent = OverlapResolver("independent", 0.5, a.shape, 2)
    argmax = OverlapResolver("argmax", 0.5, a.shape, 2)
    for i, p in enumerate((a, b)):
        independent.add(i, p)
        argmax.add(i, p)
    assert independent.finish().tolist() == [[True, True, False, True], [True, True, False, False]]
    assert argmax.finish().tolist() == [[True, False, False, True], [False, True, False, False]]


def test_clean_mask_keeps_largest_and_fills_holes():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:12, 2:12, 2:12] = True
    mask[6, 6, 6] = False  # a hole
    mask[16:18, 16:18, 16:18] = True  # a small island
    cleaned = clean_mask(mask, keep_largest=True, fill_holes=True)
    assert cleaned[6, 6, 6] and not cleaned[16:18, 16:18, 16:18].any()
    assert cleaned.sum() == 1000
    assert mask[16, 16, 16] and not mask[6, 6, 6]  # input untouched
