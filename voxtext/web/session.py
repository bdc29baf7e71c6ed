"""The web app's state without any UI: one scene, its volume, its segments, its report and the running job.

Everything that segments or writes reports is the Slicer module cores' (``TextSegCore``, ``VLMReportCore``)
and the backend's; this class only loads files, keeps track of what the page shows and writes downloads.
It needs a trame-slicer ``SlicerApp`` (scene, logics, views) and runs on the thread that owns the scene.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cores import add_cores_to_path
from .files import WebError, file_stem, is_dicom, is_volume_file, safe_extract, volume_files
from .terminology import type_meaning

add_cores_to_path()

import slicer  # noqa: E402
from TextSegLib.core import (TextSegCore, TextSegError, labelmap_arrays, lesion_stage_within,  # noqa: E402
                             segment_caution)
from TextSegLib.job import JobError, JobEvent, WorkerJob  # noqa: E402
from TextSegLib.options import ExistingSegments, SegmentOptions, parse_prompts  # noqa: E402
from VLMReportLib.core import Reply, VLMReportCore, export_text, format_conversation  # noqa: E402
from VLMReportLib.options import ReportOptions  # noqa: E402

# name -> (window, level) in the volume's units; "Auto" uses Slicer's automatic window/level.
WINDOW_PRESETS: dict[str, tuple[float, float] | None] = {
    "Auto": None,
    "CT abdomen": (400.0, 40.0),
    "CT lung": (1500.0, -600.0),
    "CT bone": (2000.0, 400.0),
    "CT brain": (80.0, 40.0),
}
EXPORTS = {"seg.nrrd": "Slicer segmentation (.seg.nrrd)", "nii.gz": "label map (.nii.gz, labels in the .json)",
           "zip": "label map + label table (.zip)", "dcm": "DICOM SEG (.dcm)"}
REPORT_EXPORTS = ("txt", "md", "dcm")


@dataclass
class Running:
    """The job in progress: what it is, its last status and progress, and the text streamed so far."""

    kind: str  # "segment", "report" or "ask"
    job: WorkerJob
    volume_id: str
    prompts: list[str] = field(default_factory=list)
    status: str = "starting"
    done: int = 0
    total: int = 0
    text: str = ""


@dataclass(frozen=True)
class Finished:
    """What :meth:`WebSession.poll` reports once a job has ended: ``ok`` or an error message."""

    kind: str
    ok: bool
    message: str
    cancelled: bool = False


def _color_hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(min(max(c, 0.0), 1.0) * 255):02x}" for c in rgb[:3])


class WebSession:
    """The scene of one ``voxtext web`` process and what the page does with it."""

    def __init__(self, slicer_app, seg_options: SegmentOptions | None = None,
                 report_options: ReportOptions | None = None, python: str | None = None) -> None:
        self.app = slicer_app
        self.scene = slicer_app.scene
        self.seg_core = TextSegCore(self.scene, slicer_app.segmentations_logic, slicer_app.terminologies_logic,
                                    python)
        self.report_core = VLMReportCore(self.scene, python)
        self.seg_options = seg_options or SegmentOptions(quality="fast")
        self.report_options = report_options or ReportOptions()
        self.volume_node = None
        self.segmentation_node = None
        self.dicom_files: list[Path] = []
        self.report_text = ""
        self.running: Running | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="voxtext-web-"))
        self._uploads = 0

    # --- volumes -------------------------------------------------------------------------------------

    def load(self, path: str | Path) -> object:
        """Load a NIfTI/NRRD/MetaImage file, a DICOM folder, a DICOM file's series or a zip of either."""
        path = Path(path)
        if not path.exists():
            raise WebError(f"{path} does not exist")
        return self.load_files(volume_files(path) if path.is_dir() else [path], name=path.name)

    def load_files(self, files: Sequence[Path], name: str = "") -> object:
        """Load uploaded or local files as the volume to work on (the previous one and its results go)."""
        files = [Path(f) for f in files]
        if self.running is not None:
            raise WebError("wait for the running job to finish (or cancel it) before opening another volume")
        if len(files) == 1 and files[0].suffix.lower() == ".zip":
            self._uploads += 1
            files = safe_extract(files[0], self.workdir / f"zip{self._uploads}", 8 * 2**30)
        if not files:
            raise WebError("no files given: choose a NIfTI or NRRD file, or the files (or a zip) of a DICOM series")
        volume_files = [f for f in files if is_volume_file(f)]
        if volume_files:
            if len(volume_files) > 1:
                raise WebError("open one volume at a time (several NIfTI/NRRD files were given)")
            nodes, dicom = self.app.io_manager.load_volumes([str(volume_files[0])]), []
        else:
            dicom = [f for f in files if is_dicom(f)]
            if not dicom:
                raise WebError("no volume found: give a .nii/.nii.gz/.nrrd/.mha file, or the files of a DICOM "
                               "series (several files, a folder or a zip)")
            nodes = self.app.io_manager.load_volumes([str(f) for f in dicom])
        nodes = [n for n in nodes if n is not None and n.GetImageData() is not None]
        if not nodes:
            raise WebError(f"could not read a volume from {name or files[0].name}")
        volume = max(nodes, key=lambda n: np.prod(n.GetImageData().GetDimensions()))
        for node in nodes:
            if node is not volume:
                self.scene.RemoveNode(node)
        self._clear()
        self.volume_node = volume
        if name:
            volume.SetName(name.removesuffix(".gz").removesuffix(".nii").removesuffix(".nrrd") or volume.GetName())
        elif volume.GetName().startswith("None: "):  # DICOM without a patient name
            volume.SetName(volume.GetName().removeprefix("None: "))
        self.dicom_files = self._series_files(volume, dicom)
        if volume.GetDisplayNode() is None:
            volume.CreateDefaultDisplayNodes()
        self.app.display_manager.show_volume_in_slice_background(volume)
        self.app.display_manager.show_volume_in_slice_foreground(None)
        self.set_window(self.default_window())
        self.app.display_manager.reset_views()
        return volume

    def _series_files(self, volume, dicom: list[Path]) -> list[Path]:
        """The DICOM files the volume was read from (kept for DICOM SEG and SR), with their instance UIDs."""
        if not dicom:
            return []
        import pydicom

        series = {}
        for f in dicom:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)
            if "PixelData" in ds or ds.get("Rows"):
                series.setdefault(ds.get("SeriesInstanceUID", ""), []).append((f, ds))
        files = max(series.values(), key=len) if series else []
        kept = self.workdir / f"dicom{len(list(self.workdir.glob('dicom*')))}"
        kept.mkdir()
        out = []
        for i, (f, _) in enumerate(files):
            target = kept / f"{i:05d}.dcm"
            shutil.copyfile(f, target)
            out.append(target)
        volume.SetAttribute("DICOM.instanceUIDs", " ".join(str(ds.SOPInstanceUID) for _, ds in files))
        return out

    def _clear(self) -> None:
        """Remove the previous volume, its segmentation and its reports from the scene."""
        nodes = [self.segmentation_node, self.volume_node]
        if self.volume_node is not None:
            nodes += self.report_core.reports(self.volume_node)
        for node in nodes:
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.volume_node = self.segmentation_node = None
        self.report_text = ""
        self.dicom_files = []

    def default_window(self) -> str:
        """CT abdomen for CT-like values (air at about -1000), else automatic."""
        low, high = self.volume_node.GetImageData().GetScalarRange()
        return "CT abdomen" if low <= -500 and high >= 100 else "Auto"

    def set_window(self, preset: str) -> None:
        if preset not in WINDOW_PRESETS:
            raise WebError(f"unknown window preset {preset!r}: choose one of {', '.join(WINDOW_PRESETS)}")
        display = self._volume().GetDisplayNode()
        values = WINDOW_PRESETS[preset]
        if values is None:
            display.AutoWindowLevelOn()
        else:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*values)

    def window(self) -> tuple[float, float]:
        display = self._volume().GetDisplayNode()
        return display.GetWindow(), display.GetLevel()

    def _volume(self):
        if self.volume_node is None or self.volume_node.GetScene() is not self.scene:
            raise WebError("open a volume first (NIfTI, NRRD or a DICOM series)")
        return self.volume_node

    def volume_info(self) -> dict:
        if self.volume_node is None:
            return {}
        image = self.volume_node.GetImageData()
        return {"name": self.volume_node.GetName(), "dimensions": list(image.GetDimensions()),
                "spacing": [round(s, 3) for s in self.volume_node.GetSpacing()], "dicom": bool(self.dicom_files)}

    # --- jobs ----------------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self.running is not None:
            raise WebError(f"a {self.running.kind} job is running: wait for it or cancel it")

    def start_segmentation(self, prompts: str | Sequence[str]) -> Running:
        self._check_idle()
        targets = parse_prompts(prompts)
        job = self.seg_core.start(self._volume(), targets, self.seg_options, self._segmentation_for_start())
        return self._run("segment", job, targets)

    def start_report(self) -> Running:
        self._check_idle()
        return self._run("report", self.report_core.start(self._volume(), self.report_options))

    def start_question(self, question: str, choices: str = "") -> Running:
        self._check_idle()
        job = self.report_core.start(self._volume(), self.report_options, question, choices)
        return self._run("ask", job)

    def _segmentation_for_start(self):
        node = self.segmentation_node
        return node if node is not None and node.GetScene() is self.scene else None

    def _run(self, kind: str, job: WorkerJob, prompts: list[str] | None = None) -> Running:
        if self.running is not None:
            job.close()
            raise WebError(f"a {self.running.kind} job is running: wait for it or cancel it")
        self.running = Running(kind, job, self.volume_node.GetID(), prompts or [])
        return self.running

    def cancel(self) -> None:
        if self.running is not None:
            self.running.job.cancel()

    def poll(self, existing: ExistingSegments = "replace") -> Finished | None:
        """Take the running job's events; once it ended, apply its result. None while it runs (or none runs)."""
        run = self.running
        if run is None:
            return None
        for event in run.job.poll():
            self._take(run, event)
        if not run.job.finished:
            return None
        self.running = None
        try:
            with run.job:
                if run.job.state != "done":
                    raise run.job.error or JobError("internal", "the job ended without a result")
                volume = self.scene.GetNodeByID(run.volume_id)
                if volume is None or volume is not self.volume_node:
                    raise WebError("the volume changed while the job ran: its result was dropped")
                return Finished(run.kind, True, self._finish(run, volume, existing))
        except (JobError, TextSegError, WebError, ValueError) as error:
            return Finished(run.kind, False, str(error), getattr(error, "kind", "") == "cancelled")

    @staticmethod
    def _take(run: Running, event: JobEvent) -> None:
        if event.kind == "token":
            run.text += event.message
        elif event.kind in ("status", "progress") and event.message:
            run.status = event.message
        if event.kind == "progress" and event.total:
            run.done, run.total = event.done, event.total

    def _finish(self, run: Running, volume, existing: ExistingSegments) -> str:
        if run.kind == "segment":
            result = self.seg_core.apply(run.job.result(), volume, self._segmentation_for_start(), existing)
            self.segmentation_node = result.segmentation_node
            self._style_segmentation()
            sizes = ", ".join(f"{name} {ml:.0f} mL" for name, ml in result.volumes_ml.items())
            return f"Segmented {sizes}."
        reply, _ = self.report_core.finish(run.job, volume)
        if run.kind == "report":
            self.report_text = reply.text
            return "Report written."
        return "Answered."

    def _style_segmentation(self) -> None:
        display = self.segmentation_node.GetDisplayNode()
        display.SetVisibility(True)
        display.SetVisibility2DFill(True)
        display.SetVisibility2DOutline(True)
        display.SetVisibility3D(True)
        display.SetOpacity2DFill(0.5)

    # --- segments ------------------------------------------------------------------------------------

    def segments(self) -> list[dict]:
        """The legend: one entry per segment with its name, colour, visibility, opacity, volume, the organs the
        model's lesion stage sought it in ("" when the main model answered) and the model's caution ("" if none)."""
        node = self._segmentation_for_start()
        if node is None:
            return []
        segmentation, display = node.GetSegmentation(), node.GetDisplayNode()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        volumes = self.seg_core.volumes_ml(node, ids)
        out = []
        for segment_id in ids:
            segment = segmentation.GetSegment(segment_id)
            name = segment.GetName()
            out.append({"id": segment_id, "name": name, "color": _color_hex(segment.GetColor()),
                        "visible": bool(display.GetSegmentVisibility(segment_id)),
                        "opacity": round(display.GetSegmentOpacity3D(segment_id), 2),
                        "ml": round(volumes.get(name, 0.0), 1), "code": type_meaning(segment),
                        "within": lesion_stage_within(segment), "caution": segment_caution(segment)})
        return out

    def _segment(self, segment_id: str):
        node = self._segmentation_for_start()
        if node is None or node.GetSegmentation().GetSegment(segment_id) is None:
            raise WebError(f"no segment {segment_id!r}")
        return node

    def set_visible(self, segment_id: str, visible: bool) -> None:
        self._segment(segment_id).GetDisplayNode().SetSegmentVisibility(segment_id, bool(visible))

    def set_opacity(self, segment_id: str, opacity: float) -> None:
        node = self._segment(segment_id)
        node.GetDisplayNode().SetSegmentOpacity(segment_id, float(min(max(opacity, 0.0), 1.0)))

    def delete(self, segment_id: str) -> None:
        self._segment(segment_id).GetSegmentation().RemoveSegment(segment_id)

    def masks(self) -> tuple[list[str], np.ndarray, list[tuple[float, float, float]]]:
        """Names, masks on the volume's voxel grid (P, i, j, k) and colours of the segments, in order."""
        node, volume = self._segmentation_for_start(), self._volume()
        if node is None or node.GetSegmentation().GetNumberOfSegments() == 0:
            raise WebError("there are no segments to download yet: type a prompt first")
        dims = volume.GetImageData().GetDimensions()
        ras_to_ijk = np.linalg.inv(_ijk_to_ras(volume))
        segmentation = node.GetSegmentation()
        names, masks, colors = [], [], []
        for i in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(i)
            mask, to_world = labelmap_arrays(node, segment_id)
            full = np.zeros(dims, bool)
            if mask.size:
                to_volume = ras_to_ijk @ to_world  # segment voxel -> volume voxel (same grid, shifted)
                if not np.allclose(to_volume[:3, :3], np.eye(3), atol=1e-3):
                    raise WebError("the segmentation is not on the volume's grid; it cannot be exported here")
                offset = np.rint(to_volume[:3, 3]).astype(int)
                lo = np.maximum(offset, 0)
                hi = np.minimum(offset + mask.shape, dims)
                if np.all(hi > lo):
                    full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = mask[
                        lo[0] - offset[0]:hi[0] - offset[0], lo[1] - offset[1]:hi[1] - offset[1],
                        lo[2] - offset[2]:hi[2] - offset[2]]
            segment = segmentation.GetSegment(segment_id)
            names.append(segment.GetName())
            masks.append(full)
            colors.append(tuple(segment.GetColor()))
        return names, np.stack(masks), colors

    # --- downloads -----------------------------------------------------------------------------------

    def export_segmentation(self, kind: str) -> Path:
        """Write the segments as ``seg.nrrd``, ``nii.gz`` (+ .json beside it, both zipped as ``zip``) or ``dcm``."""
        if kind not in EXPORTS:
            raise WebError(f"unknown download {kind!r}: choose one of {', '.join(EXPORTS)}")
        volume = self._volume()
        base = file_stem(volume.GetName()) + "_segmentation"
        folder = Path(tempfile.mkdtemp(dir=self.workdir, prefix="export-"))
        if kind == "seg.nrrd":
            path = folder / f"{base}.seg.nrrd"
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(path))
            if not storage.WriteData(self._segmentation_for_start()) or not path.exists():
                raise WebError("Slicer could not write the .seg.nrrd file")
            return path
        from ..segmentation import Segmentation

        names, masks, colors = self.masks()
        ijk_to_ras = _ijk_to_ras(volume)
        result = Segmentation(masks, names, ijk_to_ras, model=self.seg_options.model, colors=colors)
        if kind == "dcm":
            return self._write_dicom_seg(names, masks, colors, folder / f"{base}.dcm")
        nifti, sidecar = result.save_nifti(folder / f"{base}.nii.gz")
        if kind == "nii.gz":
            return nifti
        path = folder / f"{base}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.write(nifti, nifti.name)
            zf.write(sidecar, sidecar.name)
        return path

    def _write_dicom_seg(self, names, masks, colors, path: Path) -> Path:
        if not self.dicom_files:
            raise WebError("DICOM SEG needs a DICOM series as input (this volume came from a NIfTI/NRRD file): "
                           "download .seg.nrrd or NIfTI instead")
        from .dicom_seg import write_dicom_seg

        node = self._segmentation_for_start()
        segmentation = node.GetSegmentation()
        entries = [segmentation.GetNthSegment(i).GetTerminology()
                   or "" for i in range(segmentation.GetNumberOfSegments())]
        return write_dicom_seg(masks, _ijk_to_ras(self._volume()), names, entries, colors, self.dicom_files, path,
                               model=self.seg_options.model)

    def conversation(self) -> list[Reply]:
        return self.report_core.conversation(self.volume_node) if self.volume_node is not None else []

    def export_report(self, kind: str) -> Path:
        """The report (and the questions asked) as ``txt``, ``md`` or a DICOM SR (``dcm``, DICOM input only)."""
        if kind not in REPORT_EXPORTS:
            raise WebError(f"unknown report download {kind!r}: choose one of {', '.join(REPORT_EXPORTS)}")
        volume = self._volume()
        if not self.report_text:
            raise WebError("there is no report yet: press Generate report first")
        folder = Path(tempfile.mkdtemp(dir=self.workdir, prefix="report-"))
        stem = file_stem(volume.GetName()) + "_report"
        if kind == "dcm":
            if not self.dicom_files:
                raise WebError("a DICOM SR report needs a DICOM series as input: download .txt or .md instead")
            from VLMReportLib.sr import write_report_sr

            return write_report_sr(self.report_text, self.dicom_files, folder / f"{stem}.dcm",
                                   model=self.report_options.model)
        text = self.report_text
        if self.conversation():
            text += "\n\nQuestions\n\n" + format_conversation(self.conversation())
        return export_text(text, folder / f"{stem}.{kind}", title=f"Report of {volume.GetName()}")

    def close(self) -> None:
        if self.running is not None:
            self.running.job.close()
            self.running = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _ijk_to_ras(volume) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    matrix = vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
