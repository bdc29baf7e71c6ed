"""A report as a DICOM Structured Report (Enhanced SR, highdicom) referencing the series it describes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DICOM_ATTRIBUTE = "DICOM.instanceUIDs"  # set by Slicer's DICOM module on volumes it loaded
HIGHDICOM = "highdicom==0.28.2"  # as in requirements.txt; installed on first use in Slicer
MANUFACTURER = "SlicerVoxText"


def instance_uids(volume_node) -> list[str]:
    """SOP Instance UIDs of the DICOM files a volume was loaded from (empty when it did not come from DICOM)."""
    return (volume_node.GetAttribute(DICOM_ATTRIBUTE) or "").split()


def write_report_sr(text: str, source_files: Sequence[str | Path], path: str | Path, model: str = "") -> Path:
    """Write ``text`` as an Enhanced SR document (one Finding per paragraph) in the source series' study.

    The source instances are recorded as evidence, so PACS viewers file the report with the images.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [_read_source(pydicom.dcmread(str(f), stop_before_pixels=True)) for f in source_files]
    if not sources:
        raise ValueError("a DICOM report needs the DICOM files of the volume it describes")
    if len({s.StudyInstanceUID for s in sources}) != 1:
        raise ValueError("the source files belong to several studies")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()] or ["(empty report)"]
    root = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"),
                                      template_id="2000")
    root.ContentSequence = [hd.sr.TextContentItem(name=codes.DCM.Finding, value=p, relationship_type="CONTAINS")
                            for p in paragraphs]
    if model:
        root.ContentSequence.append(hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"), value=f"voxtext VLM {model}",
            relationship_type="HAS OBS CONTEXT"))
    report = hd.sr.EnhancedSR(
        evidence=sources, content=root, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
    )
    path = Path(path)
    report.save_as(str(path))
    return path


def _read_source(dataset):
    """A source instance with its SOP class and instance UIDs (taken from the file meta when blanked)."""
    dataset.SOPClassUID = dataset.get("SOPClassUID") or dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.get("SOPInstanceUID") or dataset.file_meta.MediaStorageSOPInstanceUID
    missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID") if not dataset.get(key)]
    if missing:
        raise ValueError(f"the DICOM file of instance {dataset.SOPInstanceUID} has no {' or '.join(missing)} "
                         "(over-anonymized?): a report cannot be filed with its study")
    return dataset
