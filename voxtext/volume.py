"""A 3-D image with its voxel-to-RAS geometry, and its file formats (NIfTI, NRRD/MetaImage, DICOM series)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from .errors import InputError

MODALITIES = ("CT", "MR", "PET", "US")
_MODALITY_ALIASES = {"MRI": "MR", "PT": "PET"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_FORMATS = ", ".join(NIFTI_SUFFIXES + ITK_SUFFIXES)
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 100.0
# ITK works in LPS+, nibabel in RAS+: both directions flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def normalize_modality(modality: str | None) -> str | None:
    """Canonical modality name (``"CT"``, ``"MR"``, ``"PET"``, ``"US"``) or ``None``; aliases MRI and PT accepted."""
    if modality is None:
        return None
    name = str(modality).strip().upper()
    name = _MODALITY_ALIASES.get(name, name)
    if name not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)} or None")
    return name


def _as_volume_array(array: np.ndarray) -> np.ndarray:
    """A read-only 3-D view of ``array``; a singleton first or fourth axis is dropped."""
    array = np.asarray(array)
    if array.ndim == 4 and 1 in (array.shape[0], array.shape[3]):
        array = array[..., 0] if array.shape[3] == 1 else array[0]
    if array.ndim != 3:
        raise InputError(f"got an array of shape {array.shape}: a single 3-D volume (i, j, k) is needed")
    if array.size == 0:
        raise InputError(f"the volume is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise InputError(f"voxels must be real numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = array.size - np.count_nonzero(np.isfinite(array))
        if bad:
            raise InputError(f"the volume has {bad} NaN or infinite voxels of {array.size}; fill or mask them first")
    view = array.view()
    view.flags.writeable = False
    return view


def _as_affine(affine: np.ndarray) -> np.ndarray:
    """A validated read-only float64 copy of a 4x4 voxel-to-RAS affine."""
    affine = np.array(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"the affine must be a 4x4 matrix, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise InputError("the affine contains NaN or infinite values")
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"the affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise InputError(
            f"voxel spacing {tuple(spacing.round(6).tolist())} mm is outside "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm: check the image header"
        )
    # Determinant of the direction cosines: near 0 when two voxel axes are (almost) parallel.
    if abs(np.linalg.det(affine[:3, :3] / spacing)) < 1e-6:
        raise InputError("the affine is singular: two voxel axes point the same way")
    affine.flags.writeable = False
    return affine


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D image: voxels ``array[i, j, k]`` and the affine mapping ``(i, j, k, 1)`` to RAS+ millimetres.

    The array is stored as a read-only view; the caller's array is never modified.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "array", _as_volume_array(self.array))
        object.__setattr__(self, "affine", _as_affine(self.affine))
        object.__setattr__(self, "modality", normalize_modality(self.modality))

    def __repr__(self) -> str:
        spacing = tuple(round(s, 4) for s in self.spacing)
        return f"Volume(shape={self.shape}, spacing={spacing}, dtype={self.array.dtype}, modality={self.modality!r})"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @classmethod
    def from_numpy(
        cls,
        array: np.ndarray,
        spacing: float | Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        modality: str | None = None,
    ) -> Volume:
        """Wrap an (i, j, k) array; ``affine`` or else ``diag(spacing)`` (default 1 mm, RAS axes) gives the geometry."""
        if affine is not None and spacing is not None:
            raise InputError("give either spacing or affine, not both")
        if affine is None:
            sizes = np.broadcast_to(np.asarray(1.0 if spacing is None else spacing, dtype=np.float64), (3,))
            affine = np.diag([*sizes, 1.0])
        return cls(array, affine, modality)

    @classmethod
    def from_file(cls, path: str | Path, modality: str | None = None) -> Volume:
        """Load a NIfTI, NRRD or MetaImage file, or a folder holding one DICOM series.

        ``modality`` overrides the DICOM Modality tag (0008,0060) when given.
        """
        path = Path(path)
        if path.is_dir():
            return _read_dicom_series(path, modality)
        if not path.exists():
            raise InputError(f"no such file or folder: {path}")
        suffix = _suffix(path)
        if suffix not in NIFTI_SUFFIXES + ITK_SUFFIXES:
            raise InputError(f"unsupported file {path.name!r}: use {_FORMATS} or a DICOM folder")
        try:
            if suffix in NIFTI_SUFFIXES:
                image = nib.load(path)
                return cls(np.asarray(image.dataobj), image.affine, modality)
            return _from_sitk(sitk.ReadImage(str(path)), modality, path.name)
        except (RuntimeError, OSError, EOFError, ImageFileError) as error:
            raise InputError(f"cannot read {path.name}: {_last_line(error)}") from error

    def save(self, path: str | Path) -> None:
        """Write to ``.nii``/``.nii.gz`` (nibabel) or ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` (SimpleITK)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise InputError(f"cannot write {path}: folder {path.parent} does not exist")
        suffix = _suffix(path)
        if suffix in NIFTI_SUFFIXES:
            array = _writable_dtype(self.array)
            image = nib.Nifti1Image(array, self.affine, dtype=array.dtype)
            image.set_qform(self.affine, code=1)
            image.set_sform(self.affine, code=1)
            nib.save(image, path)
        elif suffix in ITK_SUFFIXES:
            sitk.WriteImage(self.to_sitk(), str(path), useCompression=True)
        else:
            raise InputError(f"unsupported output format {path.name!r}: use {_FORMATS}")

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image (LPS geometry)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(_writable_dtype(self.array).T))
        lps = LPS_TO_RAS @ self.affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
        image.SetOrigin(lps[:3, 3].tolist())
        return image

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry and modality, new voxels of the same shape."""
        if np.shape(array) != self.shape:
            raise InputError(f"new array shape {np.shape(array)} differs from the volume's {self.shape}")
        return Volume(array, self.affine, self.modality)

    def crop(self, box: tuple[slice, slice, slice]) -> Volume:
        """The sub-volume ``array[box]`` (slices with non-negative starts), in place in the same world space."""
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ [s.start or 0 for s in box] + self.affine[:3, 3]
        return Volume(self.array[box], affine, self.modality)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _last_line(error: Exception) -> str:
    """The informative last line of a reader's message (ITK puts its source location first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _writable_dtype(array: np.ndarray) -> np.ndarray:
    """``array`` in a dtype both NIfTI and ITK store: bool as uint8, float16 as float32."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def _from_sitk(image: sitk.Image, modality: str | None, name: str) -> Volume:
    """A Volume from a 3-D scalar SimpleITK image (LPS index-to-physical geometry)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        components = image.GetNumberOfComponentsPerPixel()
        raise InputError(f"{name} has {components} values per voxel: a scalar 3-D volume is needed")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{name} has size {image.GetSize()}: a single 3-D volume is needed")
    spacing = np.asarray(image.GetSpacing())
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * spacing
    lps[:3, 3] = image.GetOrigin()
    return Volume(sitk.GetArrayFromImage(image).T, LPS_TO_RAS @ lps, modality)


def _read_dicom_series(folder: Path, modality: str | None) -> Volume:
    """The DICOM series in ``folder`` (the one with most files if several); modality from tag 0008|0060."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"no DICOM series found in folder {folder}")
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read the DICOM series in {folder}: {_last_line(error)}") from error
    if modality is None and reader.HasMetaDataKey(0, "0008|0060"):
        tag = reader.GetMetaData(0, "0008|0060").strip().upper()
        modality = tag if _MODALITY_ALIASES.get(tag, tag) in MODALITIES else None
    return _from_sitk(image, modality, folder.name)
