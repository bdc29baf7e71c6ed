"""Volume: validation, geometry conventions (RAS vs ITK's LPS) and file round trips."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from voxtext.errors import InputError
from voxtext.volume import Volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_ct_mr_io"
DICOM_CT = DATA / "dicom_case" / "example_ct_dicom"
MR_NIFTI = DATA / "mr_case" / "example_mr_sm.nii.gz"


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def oblique_affine(spacing=(0.7, 0.9, 2.5), origin=(-31.5, 12.25, 40.0), flip_k: bool = True) -> np.ndarray:
    """Rotated 20 degrees about x and z, anisotropic, optionally left-handed (flipped k)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(0, 20) @ rotation(2, 20) @ np.diag(spacing)
    if flip_k:
        affine[:3, 2] *= -1
    affine[:3, 3] = origin
    return affine


def corners(shape) -> list[tuple[int, int, int]]:
    return list(itertools.product(*[(0, n - 1) for n in shape]))


def assert_matches_sitk(volume: Volume, image: sitk.Image) -> None:
    """Same voxels and same physical position (ITK LPS = RAS with x, y negated) of every corner."""
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).T)
    for index in corners(volume.shape):
        lps = np.asarray(image.TransformIndexToPhysicalPoint([int(i) for i in index]))
        ras = (volume.affine @ [*index, 1.0])[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-3)


@pytest.fixture
def oblique() -> Volume:
    array = np.random.default_rng(0).normal(size=(20, 24, 12)).astype(np.float32)
    return Volume(array, oblique_affine(), "MR")


# --- construction and validation -------------------------------------------------------------


def test_spacing_shape_and_repr(oblique):
    assert oblique.shape == (20, 24, 12)
    np.testing.assert_allclose(oblique.spacing, (0.7, 0.9, 2.5))
    assert "shape=(20, 24, 12)" in repr(oblique) and len(repr(oblique)) < 200


def test_from_numpy_geometry():
    volume = Volume.from_numpy(np.zeros((3, 4, 5)), spacing=(0.5, 2.0, 3.0), modality="mri")
    np.testing.assert_array_equal(volume.affine, np.diag([0.5, 2.0, 3.0, 1.0]))
    assert volume.modality == "MR"
    np.testing.assert_array_equal(Volume.from_numpy(np.zeros((3, 4, 5))).affine, np.eye(4))
    np.testing.assert_array_equal(Volume.from_numpy(np.zeros((3, 4, 5)), spacing=2.0).spacing, (2.0, 2.0, 2.0))
    affine = oblique_affine()
    np.testing.assert_array_equal(Volume.from_numpy(np.zeros((3, 4, 5)), affine=affine).affine, affine)
    with pytest.raises(InputError, match="either spacing or affine"):
        Volume.from_numpy(np.zeros((3, 4, 5)), spacing=1.0, affine=affine)


@pytest.mark.parametrize("shape", [(1, 6, 7, 8), (6, 7, 8, 1)])
def test_singleton_fourth_axis_is_squeezed(shape):
    assert Volume.from_numpy(np.ones(shape)).shape == (6, 7, 8)


def test_flipped_affine_is_accepted():
    volume = Volume(np.zeros((2, 2, 2)), np.diag([-1.0, 1.0, 1.0, 1.0]))
    assert volume.spacing == (1.0, 1.0, 1.0)


def _with_nan(n: int) -> np.ndarray:
    array = np.zeros((4, 4, 4), np.float32)
    array.flat[:n] = np.nan
    return array


@pytest.mark.parametrize(
    ("array", "affine", "message"),
    [
        (np.zeros((4, 4)), np.eye(4), r"shape \(4, 4\).*single 3-D volume"),
        (np.zeros((4, 4, 4, 3)), np.eye(4), r"shape \(4, 4, 4, 3\).*single 3-D volume"),
        (np.zeros((1, 2, 3, 4, 5)), np.eye(4), "single 3-D volume"),
        (_with_nan(3), np.eye(4), "has 3 NaN or infinite voxels"),
        (np.full((4, 4, 4), np.inf), np.eye(4), "has 64 NaN or infinite voxels"),
        (np.zeros((4, 0, 4)), np.eye(4), r"empty \(shape \(4, 0, 4\)\)"),
        (np.zeros((4, 4, 4), complex), np.eye(4), "real numbers"),
        (np.zeros((4, 4, 4)), np.diag([1.0, 0.0, 1.0, 1.0]), r"spacing \(1.0, 0.0, 1.0\) mm is outside"),
        (np.zeros((4, 4, 4)), np.diag([1.0, 1.0, 1e-5, 1.0]), "is outside"),
        (np.zeros((4, 4, 4)), np.diag([1.0, 500.0, 1.0, 1.0]), r"spacing \(1.0, 500.0, 1.0\) mm is outside"),
        (np.zeros((4, 4, 4)), np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "singular"),
        (np.zeros((4, 4, 4)), np.eye(3), r"4x4 matrix, got shape \(3, 3\)"),
        (np.zeros((4, 4, 4)), np.diag([1.0, np.nan, 1.0, 1.0]), "NaN or infinite values"),
        (np.zeros((4, 4, 4)), np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), "last row"),
    ],
)
def test_bad_input_raises(array, affine, message):
    with pytest.raises(InputError, match=message):
        Volume(array, affine)


def test_unknown_modality_raises():
    with pytest.raises(InputError, match="unknown modality 'XR'"):
        Volume.from_numpy(np.zeros((2, 2, 2)), modality="XR")


def test_caller_array_is_not_modified_or_exposed():
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    before = array.copy()
    volume = Volume.from_numpy(array)
    assert array.flags.writeable
    assert not volume.array.flags.writeable
    with pytest.raises(ValueError):
        volume.array[0, 0, 0] = 1.0
    np.testing.assert_array_equal(array, before)
    affine = np.eye(4)
    volume = Volume(array, affine)
    affine[0, 0] = 5.0
    assert volume.affine[0, 0] == 1.0


def test_with_array_keeps_geometry(oblique):
    mask = oblique.array > 0
    other = oblique.with_array(mask)
    np.testing.assert_array_equal(other.affine, oblique.affine)
    assert other.modality == "MR" and other.array.dtype == bool
    with pytest.raises(InputError, match=r"new array shape \(20, 24, 11\) differs"):
        oblique.with_array(mask[..., :11])


# --- files --------------------------------------------------------------------------------------


def test_nifti_round_trip(tmp_path, oblique):
    path = tmp_path / "oblique.nii.gz"
    oblique.save(path)
    loaded = Volume.from_file(path)
    np.testing.assert_array_equal(loaded.array, oblique.array)
    np.testing.assert_allclose(loaded.affine, oblique.affine, atol=1e-5)
    header = nib.load(path).header
    assert header["qform_code"] > 0 and header["sform_code"] > 0  # readers preferring either agree
    # ITK reads the same file into the same physical space (its LPS = our RAS with x, y negated).
    assert_matches_sitk(oblique, sitk.ReadImage(str(path)))


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_round_trip(tmp_path, oblique, suffix):
    path = tmp_path / f"oblique{suffix}"
    oblique.save(path)
    loaded = Volume.from_file(path)
    np.testing.assert_array_equal(loaded.array, oblique.array)
    np.testing.assert_allclose(loaded.affine, oblique.affine, atol=1e-9)
    assert_matches_sitk(oblique, sitk.ReadImage(str(path)))


@pytest.mark.parametrize(("dtype", "stored"), [(bool, np.uint8), (np.int64, np.int64), (np.int16, np.int16)])
def test_label_dtypes_are_saved(tmp_path, dtype, stored):
    volume = Volume.from_numpy((np.arange(24).reshape(2, 3, 4) % 2).astype(dtype), spacing=(1, 2, 3))
    for name in ("labels.nii.gz", "labels.nrrd"):
        volume.save(tmp_path / name)
        loaded = Volume.from_file(tmp_path / name)
        assert loaded.array.dtype == stored
        np.testing.assert_array_equal(loaded.array, volume.array)


def test_real_mr_nifti_matches_itk():
    volume = Volume.from_file(MR_NIFTI, modality="MR")
    assert volume.shape == (117, 91, 20) and volume.modality == "MR"
    np.testing.assert_allclose(volume.spacing, (3.0, 3.0, 3.0), atol=1e-4)
    assert_matches_sitk(volume, sitk.ReadImage(str(MR_NIFTI)))


def test_real_dicom_series():
    volume = Volume.from_file(DICOM_CT)
    assert volume.shape == (512, 512, 20)
    assert volume.modality == "CT"
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM_CT))
    assert_matches_sitk(volume, sitk.ReadImage(files))
    # The HU range of a CT: air at about -1000 and bone far above soft tissue.
    assert volume.array.min() <= -900 and volume.array.max() >= 500
    assert Volume.from_file(DICOM_CT, modality="PET").modality == "PET"


def test_file_errors(tmp_path, oblique):
    with pytest.raises(InputError, match="no such file or folder"):
        Volume.from_file(tmp_path / "missing.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"x")
    with pytest.raises(InputError, match=r"unsupported file 'scan.png'"):
        Volume.from_file(tmp_path / "scan.png")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="cannot read broken.nii.gz"):
        Volume.from_file(tmp_path / "broken.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series found"):
        Volume.from_file(tmp_path / "empty")
    with pytest.raises(InputError, match="unsupported output format 'out.png'"):
        oblique.save(tmp_path / "out.png")
    with pytest.raises(InputError, match="does not exist"):
        oblique.save(tmp_path / "no" / "out.nii.gz")
