"""Model-input preparation: orientation, resampling, intensities, cropping and the exact inverse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from voxtext.errors import InputError
from voxtext.preprocess import (
    PreprocessConfig,
    guess_modality,
    prepare,
    prepare_with_labels,
    restore,
    to_model_grid,
)
from voxtext.volume import Volume

from test_volume import oblique_affine

DICOM_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct_mr_io" / "dicom_case" / "example_ct_dicom"
KEEP_GRID = PreprocessConfig(target_spacing=None, crop_foreground=False)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # an LPS-stored array: the model grid is its plain transpose
OBJECT_RADII = (14.0, 12.0, 18.0)  # mm


def world(affine: np.ndarray, shape) -> np.ndarray:
    """RAS coordinates (..., 3) of every voxel centre of a grid."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def ellipsoid(points: np.ndarray, centre, radii) -> np.ndarray:
    return (((points - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def object_centre(affine: np.ndarray, shape) -> np.ndarray:
    return (affine @ [*(np.asarray(shape) / 2), 1.0])[:3] + [2.0, -1.0, 3.0]


def phantom(affine: np.ndarray, shape=(80, 72, 28)) -> tuple[Volume, np.ndarray]:
    """A CT: air, a soft-tissue body (40 HU) and a dense object (200 HU), both defined in world mm."""
    points = world(affine, shape)
    body = ellipsoid(points, object_centre(affine, shape) - [2.0, -1.0, 3.0], (22, 24, 30))
    target = ellipsoid(points, object_centre(affine, shape), OBJECT_RADII)
    array = np.where(body, 40, -1000).astype(np.int16)
    array[target] = 200
    return Volume(array, affine, "CT"), target


# --- geometry ---------------------------------------------------------------------------------------


def test_shape_after_resampling_keeps_extent():
    volume = Volume.from_numpy(np.zeros((60, 50, 20), np.float32), spacing=(0.7, 0.9, 2.5), modality="MR")
    prepared = prepare(volume, PreprocessConfig(crop_foreground=False))
    # (z, y, x) = (k, j, i): round(20 * 2.5 / 1.5), round(50 * 0.9 / 1.5), round(60 * 0.7 / 1.5)
    assert prepared.image.shape == (33, 30, 28)
    assert prepared.image.dtype == np.float32 and prepared.image.flags.c_contiguous
    np.testing.assert_allclose(prepared.geometry.spacing, (50 / 33, 1.5, 42 / 28))
    extent = np.asarray(prepared.image.shape) * prepared.geometry.spacing
    np.testing.assert_allclose(extent, (50.0, 45.0, 42.0))


def test_oblique_grid_picks_the_closest_axes():
    volume = Volume(np.zeros((60, 50, 20), np.float32), oblique_affine())
    geometry = prepare(volume, PreprocessConfig(crop_foreground=False, modality="MR")).geometry
    # The k axis (2.5 mm, flipped) is still mostly superior-inferior, so it becomes z.
    assert geometry.shape == (33, 30, 28)
    assert geometry.oriented_shape == (20, 50, 60)


def test_marker_at_left_anterior_superior_corner():
    array = np.full((10, 12, 14), -100.0, np.float32)
    array[0, 11, 13] = 200.0  # RAS storage: i=0 is the left-most, j=11 anterior, k=13 superior
    volume = Volume.from_numpy(array, spacing=(1.0, 1.0, 1.0), modality="CT")
    prepared = prepare(volume, KEEP_GRID)
    assert prepared.image.shape == (14, 12, 10)
    # z grows to superior, y to posterior, x to the patient's left.
    assert np.unravel_index(prepared.image.argmax(), prepared.image.shape) == (13, 0, 9)
    np.testing.assert_allclose(prepared.geometry.model_affine() @ [13, 0, 9, 1], volume.affine @ [0, 11, 13, 1])


def test_same_anatomy_in_any_storage_order():
    affine = np.diag([0.7, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    volume, _ = phantom(affine)
    a = volume.array
    # b[p, q, r] = a[n0 - 1 - q, r, p]: axes permuted and the first one flipped, same world points.
    b = np.flip(a, 0).transpose(2, 0, 1)
    index_b_to_a = np.array([[0, -1, 0, a.shape[0] - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    other = Volume(b, volume.affine @ index_b_to_a, "CT")
    first, second = prepare(volume), prepare(other)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_allclose(first.geometry.model_affine(), second.geometry.model_affine(), atol=1e-9)
    values = np.random.default_rng(1).random(first.image.shape).astype(np.float32)
    restored_a, restored_b = restore(first, values, "linear"), restore(second, values, "linear")
    np.testing.assert_allclose(np.flip(restored_a, 0).transpose(2, 0, 1), restored_b, atol=1e-6)


def test_round_trip_lands_on_the_object():
    volume, target = phantom(oblique_affine())
    prepared = prepare(volume)
    assert np.prod(prepared.image.shape) < 0.7 * np.prod(prepared.geometry.resampled_shape)  # cropped to the body
    # The object drawn directly on the model grid from its world definition ...
    model_points = world(prepared.geometry.model_affine(), prepared.image.shape)
    on_model = ellipsoid(model_points, object_centre(volume.affine, volume.shape), OBJECT_RADII)
    assert dice(on_model, prepared.image > 0.85) > 0.9
    # ... comes back onto exactly the input grid over the original object.
    restored = restore(prepared, on_model, "nearest")
    assert restored.shape == volume.shape and restored.dtype == bool
    assert dice(restored, target) > 0.95
    # And the forward mapping of the input mask agrees with the world definition.
    assert dice(to_model_grid(prepared.geometry, target), on_model) > 0.95


def test_restore_constant_probability_fills_the_crop():
    volume, _ = phantom(oblique_affine())
    prepared = prepare(volume)
    geometry = prepared.geometry
    ones = torch.ones((2, *prepared.image.shape))
    restored = restore(prepared, ones, "linear")
    assert restored.shape == (2, *volume.shape) and restored.dtype == np.float32
    # Model-grid coordinates of each input voxel, relative to the crop; edges of the full grid clamp.
    to_model = np.linalg.inv(geometry.model_affine()) @ volume.affine
    coords = world(to_model, volume.shape)
    start = np.asarray([s for s, _ in geometry.crop])
    low = np.where(start == 0, -np.inf, 0.0)
    high = np.where(np.asarray([e for _, e in geometry.crop]) == geometry.resampled_shape, np.inf, geometry.shape) - 1
    inside = np.all((coords >= low - 1e-3) & (coords <= high + 1e-3), axis=-1)
    outside = np.any((coords <= low - 1 - 1e-3) | (coords >= high + 1 + 1e-3), axis=-1)
    assert inside.sum() > 0.1 * inside.size and outside.sum() > 0.1 * outside.size
    np.testing.assert_allclose(restored[:, inside], 1.0, atol=1e-5)
    np.testing.assert_array_equal(restored[:, outside], 0.0)
    assert restored.min() >= 0.0 and restored.max() <= 1.0 + 1e-6


def test_prepare_with_labels_and_real_dicom():
    volume = Volume.from_file(DICOM_CT)
    labels = (volume.array > 100).astype(np.uint8)
    prepared, grid_labels = prepare_with_labels(volume, labels)
    assert prepared.modality == "CT"
    assert grid_labels.shape == prepared.image.shape == prepared.geometry.shape
    assert prepared.image.shape[0] == 27  # 20 slices of 2 mm at 1.5 mm
    assert grid_labels.dtype == np.uint8 and set(np.unique(grid_labels)) == {0, 1}
    # Dense voxels (> 100 HU) are bright in the windowed image.
    assert prepared.image[grid_labels == 1].mean() > 0.7 > prepared.image[grid_labels == 0].mean()
    restored = restore(prepared, grid_labels, "nearest")
    assert restored.shape == volume.shape and dice(restored == 1, labels == 1) > 0.8


# --- intensities ----------------------------------------------------------------------------------


def test_ct_window():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0, -60.0], np.float32).reshape(1, 2, 3)
    prepared = prepare(Volume(hu, LPS, "CT"), KEEP_GRID)
    np.testing.assert_allclose(prepared.image, np.array([0.0, 0.0, 0.5, 1.0, 1.0, 0.25]).reshape(1, 2, 3).T, atol=1e-6)


def test_mr_percentiles_over_nonzero_voxels():
    rng = np.random.default_rng(0)
    array = rng.gamma(2.0, 100.0, (20, 16, 12)).astype(np.float32)
    array[:5] = 0.0
    prepared = prepare(Volume(array, LPS, "MR"), KEEP_GRID)
    low, high = np.percentile(array[array > 0], [0.5, 99.5])
    expected = np.clip((array - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(prepared.image, expected.T, atol=1e-6)
    assert np.all(prepared.image.T[:5] == 0.0)


def test_z_scored_mr_keeps_a_zero_background_and_crops_to_it():
    array = np.zeros((30, 30, 30), np.float32)
    array[5:20, 8:25, 10:18] = np.random.default_rng(0).normal(size=(15, 17, 8))
    prepared = prepare(Volume(array, LPS, "MR"), PreprocessConfig(target_spacing=None))
    assert prepared.geometry.crop == ((10, 18), (8, 25), (5, 20))
    assert prepared.image.min() == 0.0 and prepared.image.max() == 1.0
    margin = prepare(Volume(array, LPS, "MR"), PreprocessConfig(target_spacing=None, margin=3)).geometry.crop
    assert margin == ((7, 21), (5, 28), (2, 23))


@pytest.mark.parametrize("value", [0.0, 7.0, -1000.0])
def test_constant_image_gives_zeros_and_no_crop(value):
    volume = Volume.from_numpy(np.full((8, 10, 10), value, np.float32), modality="MR")
    prepared = prepare(volume, PreprocessConfig(target_spacing=2.0))
    assert prepared.image.shape == prepared.geometry.resampled_shape == (5, 5, 4)
    assert not prepared.image.any()


def test_modality_guess_and_precedence():
    rng = np.random.default_rng(0)
    ct = np.where(rng.random((20, 20, 20)) < 0.3, -1000, 40).astype(np.int16)
    mr = rng.gamma(2.0, 100.0, (20, 20, 20)).astype(np.float32)
    assert guess_modality(ct) == "CT" and guess_modality(mr) == "MR"
    assert guess_modality(np.where(rng.random((20, 20, 20)) < 0.001, -1000, 40)) == "MR"  # a stray low voxel
    fat_no_air = np.where(rng.random((20, 20, 20)) < 0.2, -100, 50) + rng.normal(0, 15, (20, 20, 20))
    assert guess_modality(fat_no_air) == "CT"  # an abdominal crop: fat, no air
    assert guess_modality(rng.normal(0, 1, (20, 20, 20))) == "MR"  # z-scored MR, as BraTS 2015's
    assert prepare(Volume.from_numpy(ct), KEEP_GRID).modality == "CT"
    assert prepare(Volume.from_numpy(ct, modality="MR"), KEEP_GRID).modality == "MR"
    assert prepare(Volume.from_numpy(ct, modality="MR"), PreprocessConfig(modality="ct")).modality == "CT"


# --- bad input and side effects -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_spacing": 0.0}, "target_spacing must be between"),
        ({"target_spacing": -1.5}, "target_spacing must be between"),
        ({"ct_window": (240.0, -160.0)}, "lower < upper"),
        ({"ct_window": (-160.0, float("inf"))}, "ct_window must be finite"),
        ({"percentiles": (99.0, 1.0)}, "0 <= lower < upper <= 100"),
        ({"percentiles": (0.0, 101.0)}, "0 <= lower < upper <= 100"),
        ({"margin": -1}, "non-negative"),
        ({"margin": 1.5}, "non-negative"),
        ({"modality": "XR"}, "unknown modality"),
    ],
)
def test_bad_config_raises(options, message):
    with pytest.raises(InputError, match=message):
        PreprocessConfig(**options)


def test_bad_values_raise():
    volume, target = phantom(oblique_affine(), shape=(20, 16, 8))
    prepared = prepare(volume)
    with pytest.raises(InputError, match="do not end with the model grid shape"):
        restore(prepared, np.zeros((3, 3, 3)), "linear")
    with pytest.raises(InputError, match="mode must be 'linear' or 'nearest'"):
        restore(prepared, prepared.image, "cubic")
    with pytest.raises(InputError, match="do not end with the input grid shape"):
        to_model_grid(prepared.geometry, target[:-1])
    with pytest.raises(InputError, match="labels of shape"):
        prepare_with_labels(volume, target[..., :-1])


def test_inputs_are_not_modified():
    array = np.linspace(-1000, 1000, 8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    before = array.copy()
    volume = Volume(array, LPS, "CT")
    prepared = prepare(volume, KEEP_GRID)
    np.testing.assert_array_equal(array, before)
    assert not np.shares_memory(prepared.image, array)
    assert prepared.image.flags.writeable  # usable by torch.from_numpy without copying
    values = prepared.image.copy()
    restored = restore(prepared, prepared.image, "linear")
    np.testing.assert_array_equal(prepared.image, values)
    assert not np.shares_memory(restored, prepared.image)
    # Restoring the unresampled, uncropped image gives back the windowed input exactly.
    np.testing.assert_allclose(restored, np.clip((before + 160) / 400, 0, 1), atol=1e-6)
