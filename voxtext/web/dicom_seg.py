"""Segments as a DICOM Segmentation object (highdicom) on the DICOM series the volume was read from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from .files import WebError
from .terminology import parse_entry

MANUFACTURER = "SlicerVoxText"
TISSUE = ("SCT", "85756007", "Tissue")  # category and type of segments without a terminology entry


def _coded(code: tuple[str, str, str], fallback: tuple[str, str, str]):
    import highdicom as hd

    scheme, value, meaning = code if code[1] else fallback
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def write_dicom_seg(masks: np.ndarray, ijk_to_ras: np.ndarray, names: Sequence[str], entries: Sequence[str],
                    colors: Sequence[tuple[float, float, float]], source_files: Sequence[Path], path: Path,
                    model: str = "") -> Path:
    """Write ``masks`` (P, i, j, k on the volume grid, ``ijk_to_ras``) as a binary DICOM SEG referencing the sources.

    Each source image is matched to its slice of the volume by its position; the volume's columns and rows
    must be the images' (as Slicer reads a series), which is checked rather than assumed.
    """
    import highdicom as hd
    import pydicom

    sources = sorted((_with_uids(pydicom.dcmread(str(f))) for f in source_files),
                     key=lambda ds: float(np.dot(_normal(ds), [float(x) for x in ds.ImagePositionPatient])))
    ras_to_ijk = np.linalg.inv(ijk_to_ras)
    frames = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns), len(names)), np.uint8)
    for n, ds in enumerate(sources):
        origin = ras_to_ijk @ np.array([*_lps_to_ras(ds.ImagePositionPatient), 1.0])
        row_dir, col_dir = (np.array([float(x) for x in ds.ImageOrientationPatient[i:i + 3]]) for i in (0, 3))
        step_col = ras_to_ijk[:3, :3] @ (_lps_to_ras(row_dir) * float(ds.PixelSpacing[1]))  # next column
        step_row = ras_to_ijk[:3, :3] @ (_lps_to_ras(col_dir) * float(ds.PixelSpacing[0]))  # next row
        k = int(round(origin[2]))
        if not (np.allclose(origin[:2], 0, atol=0.05) and np.allclose(step_col, [1, 0, 0], atol=0.01)
                and np.allclose(step_row, [0, 1, 0], atol=0.01) and 0 <= k < masks.shape[3]
                and abs(origin[2] - k) < 0.05 and masks.shape[1:3] == (ds.Columns, ds.Rows)):
            raise WebError("the volume's voxels do not line up with the DICOM images it came from "
                           "(resampled or reoriented?): DICOM SEG is not available, download .seg.nrrd instead")
        frames[n] = masks[:, :, :, k].transpose(2, 1, 0)  # (P, i, j) -> (rows j, columns i, P)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="voxtext ESICA", family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
        version=f"{__version__} {model}".strip())
    descriptions = []
    for i, (name, entry, color) in enumerate(zip(names, entries, colors)):
        codes = parse_entry(entry)
        region = [_coded(codes["region"], TISSUE)] if codes["region"][1] else None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=name[:64],
            segmented_property_category=_coded(codes["category"], TISSUE),
            segmented_property_type=_coded(codes["type"], TISSUE),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=region,
            display_color=hd.color.CIELabColor.from_rgb(*(round(c * 255) for c in color))
            if hasattr(hd.color.CIELabColor, "from_rgb") else None,
        ))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="voxtext web", software_versions=__version__, device_serial_number="0",
        omit_empty_frames=False,
    )
    seg.save_as(str(path))
    return path


def _with_uids(ds):
    """Anonymizers sometimes blank the SOP class/instance UIDs in the data set; the file meta keeps them."""
    ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
    return ds


def _normal(ds) -> np.ndarray:
    o = [float(x) for x in ds.ImageOrientationPatient]
    return np.cross(o[:3], o[3:])


def _lps_to_ras(v) -> np.ndarray:
    v = np.array([float(x) for x in v])
    return v * [-1.0, -1.0, 1.0]
