"""Volumes and label maps as bytes: NIfTI (optionally gzipped) or NRRD in, gzipped NIfTI out.

Uploaded bytes are never trusted: the format is sniffed from the content, the decoded size is bounded
before any voxel is read, and NRRD headers that point at other files (detached data) are refused.
"""

from __future__ import annotations

import gzip
import io
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from ..errors import InputError
from ..segmentation import Segmentation
from ..volume import Volume

class TooLargeError(InputError):
    """The decoded volume would exceed the server's size limit."""


def encode_nifti(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes with the affine in both sform and qform (code 1, scanner)."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = nib.Nifti1Image(array, affine, dtype=array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1)


def encode_volume(volume: Volume) -> bytes:
    """A volume as gzipped NIfTI bytes (float16 stored as float32)."""
    array = volume.array.astype(np.float32) if volume.array.dtype == np.float16 else volume.array
    return encode_nifti(array, volume.affine)


def decode_volume(data: bytes, max_bytes: int, modality: str | None = None) -> Volume:
    """A volume from NIfTI(-gz) or NRRD bytes whose voxels take at most ``max_bytes``."""
    if data[:4] == b"NRRD":
        return _decode_nrrd(data, max_bytes, modality)
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, max_bytes + 1024 * 1024)  # voxels plus any header and extensions
    image = _nifti_image(data)
    shape, dtype = image.header.get_data_shape(), image.header.get_data_dtype()
    _check_size(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, max_bytes)
    try:
        array = np.asarray(image.dataobj)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"the NIfTI data is truncated or corrupt: {error}") from error
    return Volume(array, image.affine, modality)


def _gunzip(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise InputError(f"the gzip stream is corrupt: {error}") from error
    if len(out) > limit:
        raise TooLargeError(f"the decompressed upload exceeds the server's limit of {limit / 2**20:.0f} MiB")
    return out


def _nifti_image(data: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    """The NIfTI-1 or -2 image in ``data``, recognised by its magic string before nibabel parses it."""
    if data[344:348] in (b"n+1\0", b"ni1\0"):
        cls = nib.Nifti1Image
    elif data[4:8] in (b"n+2\0", b"ni2\0"):
        cls = nib.Nifti2Image
    else:
        raise InputError("not a NIfTI or NRRD volume: send .nii, .nii.gz or .nrrd (attached data) bytes")
    try:
        return cls.from_bytes(data)
    except (ImageFileError, HeaderDataError, WrapStructError, ValueError) as error:
        raise InputError(f"the NIfTI header is corrupt: {error}") from error


def _decode_nrrd(data: bytes, max_bytes: int, modality: str | None) -> Volume:
    try:
        header = nrrd.read_header(io.BytesIO(data))
    except (nrrd.NRRDError, ValueError, UnicodeDecodeError) as error:
        raise InputError(f"the NRRD header cannot be read: {error}") from error
    if any(key.replace(" ", "") == "datafile" for key in header):
        raise InputError("detached NRRD data ('data file') is not accepted: send the volume with attached data")
    sizes = [int(s) for s in header.get("sizes", [])]
    _check_size(int(np.prod(sizes, dtype=np.int64)) * _nrrd_item_bytes(str(header.get("type", ""))), max_bytes)
    with tempfile.TemporaryDirectory(prefix="voxtext-") as folder:
        path = Path(folder) / "upload.nrrd"
        path.write_bytes(data)
        return Volume.from_file(path, modality=modality)


def _nrrd_item_bytes(kind: str) -> int:
    """Bytes per voxel of an NRRD ``type`` (any of its spellings: uchar, signed short, int16_t, double, ...)."""
    kind = kind.lower()
    if "char" in kind or "int8" in kind:
        return 1
    if "short" in kind or "16" in kind:
        return 2
    if "double" in kind or "long" in kind or "64" in kind:
        return 8
    return 4


def _check_size(nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise TooLargeError(f"the volume's voxels take {nbytes / 2**20:.0f} MiB; this server accepts at most "
                            f"{max_bytes / 2**20:.0f} MiB")


def label_layers(segmentation: Segmentation) -> tuple[np.ndarray, list[int]]:
    """Masks packed into as few label-map layers as overlaps allow: (array (i, j, k[, L]), layer per prompt).

    Segment ``p`` has label value ``p + 1`` in layer ``layer[p]``; with no overlapping masks there is one
    layer and the array is the 3-D :meth:`Segmentation.labelmap`.
    """
    dtype = np.uint8 if len(segmentation.prompts) < 256 else np.uint16
    layers: list[np.ndarray] = []
    layer_of: list[int] = []
    for value, mask in enumerate(segmentation.masks, start=1):
        free = next((i for i, layer in enumerate(layers) if not layer[mask].any()), None)
        if free is None:
            layers.append(np.zeros(segmentation.shape, dtype))
            free = len(layers) - 1
        layers[free][mask] = value
        layer_of.append(free)
    return (layers[0] if len(layers) == 1 else np.stack(layers, axis=-1)), layer_of


def masks_from_layers(labels: np.ndarray, layer_of: list[int]) -> np.ndarray:
    """Inverse of :func:`label_layers`: bool masks (P, i, j, k)."""
    stack = labels if labels.ndim == 4 else labels[..., None]
    return np.stack([stack[..., layer] == value for value, layer in enumerate(layer_of, start=1)])
