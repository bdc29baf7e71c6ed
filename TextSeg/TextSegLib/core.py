"""MRML <-> voxtext: volumes out to the worker, its masks back in as named, coded, coloured segments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR, reference
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from .job import JobEvent, SegmentationJob
from .options import DEFAULT_OPTIONS, ExistingSegments, SegmentOptions, parse_prompts
from .terminology import PromptTerminology, SegmentCode, terminology_labels

BINARY_LABELMAP = "Binary labelmap"
# Segment tag naming the organs a lesion was sought in by the model's lesion stage (kept in .seg.nrrd files).
LESION_STAGE_TAG = "VoxText.LesionStageWithin"
# Segment tag with the model's caution about an answer it was measured unreliable for (kept in .seg.nrrd files).
CAUTION_TAG = "VoxText.Caution"


class TextSegError(ValueError):
    """The scene does not allow the requested segmentation; the message says what to change."""


@dataclass
class TextSegResult:
    """What a run added to the scene: segment IDs in prompt order and optional probability volumes."""

    segmentation_node: object
    segment_ids: list[str]
    probability_nodes: list = field(default_factory=list)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    lesion_stage: dict[str, list[str]] = field(default_factory=dict)  # segment name -> organs it was sought in
    cautions: dict[str, str] = field(default_factory=dict)  # segment name -> the model's caution about it


def _tag(segment, name: str) -> str:
    value = reference("")
    return str(value) if segment.GetTag(name, value) else ""


def lesion_stage_within(segment) -> str:
    """The organs (comma-separated) a segment was sought in by the model's lesion stage; "" otherwise."""
    return _tag(segment, LESION_STAGE_TAG)


def segment_caution(segment) -> str:
    """The model's caution about a segment's answer (e.g. a lesion it rarely finds); "" otherwise."""
    return _tag(segment, CAUTION_TAG)


def matrix_to_numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_arrays(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (axes i, j, k, as voxtext wants) and the IJK-to-RAS matrix (local, before parent transforms)."""
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise TextSegError("choose an input volume (a scalar volume such as a CT or MR image)")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise TextSegError(f"volume {volume_node.GetName()!r} has no voxels loaded")
    if image.GetNumberOfScalarComponents() != 1:
        raise TextSegError(f"volume {volume_node.GetName()!r} has several values per voxel: a scalar volume is needed")
    dims = image.GetDimensions()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    matrix = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return kji.transpose(2, 1, 0), matrix_to_numpy(matrix)


def oriented_labelmap(mask: np.ndarray, image_to_world: np.ndarray):
    """A ``vtkOrientedImageData`` (0/1 uint8) of an (i, j, k) mask placed by ``image_to_world``."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*mask.shape)
    kji = np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(kji, deep=True, array_type=VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(numpy_to_matrix(image_to_world))
    return image


def labelmap_arrays(segmentation_node, segment_id: str) -> tuple[np.ndarray, np.ndarray]:
    """A segment's binary labelmap as an (i, j, k) bool array and its image-to-RAS matrix (segmentation frame)."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    extent = image.GetExtent()
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    if min(dims) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros((0, 0, 0), bool), np.eye(4)
    matrix = vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    to_world = matrix_to_numpy(matrix)
    to_world[:3, 3] += to_world[:3, :3] @ [extent[0], extent[2], extent[4]]  # index of the first voxel
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    return kji.transpose(2, 1, 0) > 0, to_world


class TextSegCore:
    """Runs text-prompted segmentations for volumes of a scene and adds the results to it.

    Needs the scene and the Segmentations and Terminologies module logics; never touches the scene
    unless a run succeeded (see :meth:`apply`).
    """

    def __init__(self, scene, segmentations_logic, terminologies_logic, python: str | None = None) -> None:
        self.scene = scene
        self.segmentations_logic = segmentations_logic
        self.terminology = PromptTerminology(terminologies_logic)
        self.python = python

    @staticmethod
    def known_structures() -> list[str]:
        """Structure names with a standard code, offered as prompt completions."""
        return terminology_labels()

    def start(self, volume_node, prompts: str | Sequence[str], options: SegmentOptions = DEFAULT_OPTIONS,
              segmentation_node=None) -> SegmentationJob:
        """Check the inputs and start the worker; the scene is not modified."""
        prompts = parse_prompts(prompts)
        if not prompts:
            raise TextSegError("type at least one target, e.g. 'liver, left kidney'")
        array, ijk_to_ras = volume_arrays(volume_node)
        if segmentation_node is not None:
            self._segmentation_frame(volume_node, segmentation_node)
        return SegmentationJob(array, ijk_to_ras, prompts, options, self.python)

    def conflicts(self, segmentation_node, prompts: str | Sequence[str]) -> list[str]:
        """Prompts that already name a segment of ``segmentation_node`` (replaced under the replace policy)."""
        if segmentation_node is None:
            return []
        segmentation = segmentation_node.GetSegmentation()
        return [p for p in parse_prompts(prompts) if segmentation.GetSegmentIdBySegmentName(p)]

    def _segmentation_frame(self, volume_node, segmentation_node) -> np.ndarray:
        """Matrix from the volume's local RAS to the segmentation's (they may sit under different transforms)."""
        if not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise TextSegError("the output must be a segmentation node")
        segmentation = segmentation_node.GetSegmentation()
        if segmentation.GetNumberOfSegments() and segmentation.GetSourceRepresentationName() != BINARY_LABELMAP:
            raise TextSegError(
                f"segmentation {segmentation_node.GetName()!r} is edited as "
                f"{segmentation.GetSourceRepresentationName().lower()}s: choose a new output segmentation"
            )
        matrix = vtkMatrix4x4()
        if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
                volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), matrix):
            raise TextSegError(
                "the volume and the output segmentation are under different non-linear transforms: "
                "choose a new output segmentation or harden the transforms first"
            )
        return matrix_to_numpy(matrix)

    def apply(self, result, volume_node, segmentation_node=None, existing: ExistingSegments = "add",
              probabilities: bool = False) -> TextSegResult:
        """Add ``result`` (a voxtext Segmentation on the volume's grid) to the scene.

        ``existing="add"`` keeps every existing segment (a new one with a taken name gets a number);
        ``"replace"`` overwrites the content of segments named exactly like a prompt. Everything is
        checked before the first change, so a refused result leaves the scene as it was.
        """
        if existing not in ("add", "replace"):
            raise TextSegError(f"existing segments must be 'add' or 'replace', got {existing!r}")
        array, ijk_to_ras = volume_arrays(volume_node)
        if volume_node.GetScene() is not self.scene:
            raise TextSegError(f"volume {volume_node.GetName()!r} is no longer in the scene")
        if tuple(array.shape) != result.shape or not np.allclose(ijk_to_ras, result.affine, atol=1e-4):
            raise TextSegError(f"volume {volume_node.GetName()!r} changed while it was being segmented: run again")
        frame = self._segmentation_frame(volume_node, segmentation_node) if segmentation_node else np.eye(4)
        labelmaps = [oriented_labelmap(mask, frame @ ijk_to_ras) for mask in result.masks]
        codes = [self.terminology.lookup(prompt) for prompt in result.prompts]

        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             f"{volume_node.GetName()} segmentation")
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
        segmentation = segmentation_node.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            segmentation.SetSourceRepresentationName(BINARY_LABELMAP)

        was_modifying = segmentation_node.StartModify()
        segment_ids = [
            self._write_segment(segmentation_node, prompt, labelmap, code, result.colors[i], existing,
                                {LESION_STAGE_TAG: ", ".join(result.lesion_stage.get(prompt, [])),
                                 CAUTION_TAG: result.cautions.get(prompt, "")})
            for i, (prompt, labelmap, code) in enumerate(zip(result.prompts, labelmaps, codes))
        ]
        segmentation_node.EndModify(was_modifying)
        segmentation_node.CreateClosedSurfaceRepresentation()
        nodes = self._probability_volumes(volume_node, result) if probabilities else []
        name = dict(zip(result.prompts, (segmentation.GetSegment(s).GetName() for s in segment_ids)))
        return TextSegResult(segmentation_node, segment_ids, nodes, self.volumes_ml(segmentation_node, segment_ids),
                             {name[p]: organs for p, organs in result.lesion_stage.items()},
                             {name[p]: caution for p, caution in result.cautions.items()})

    def _write_segment(self, segmentation_node, prompt: str, labelmap, code: SegmentCode | None,
                       fallback_color: tuple[float, float, float], existing: ExistingSegments,
                       tags: dict[str, str]) -> str:
        segmentation = segmentation_node.GetSegmentation()
        segment_id = segmentation.GetSegmentIdBySegmentName(prompt) if existing == "replace" else ""
        if not segment_id:
            segment_id = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID(prompt),
                                                      self._free_name(segmentation, prompt))
        segment = segmentation.GetSegment(segment_id)
        segment.SetColor(*(code.color if code else fallback_color))
        if code:
            segment.SetTag(segment.GetTerminologyEntryTagName(), code.entry)
        else:
            segment.RemoveTag(segment.GetTerminologyEntryTagName())
        for name, value in tags.items():  # an empty value clears what an earlier run left on a replaced segment
            if value:
                segment.SetTag(name, value)
            else:
                segment.RemoveTag(name)
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise RuntimeError(f"Slicer could not store the mask of {prompt!r} in the segmentation")
        return segment_id

    @staticmethod
    def _free_name(segmentation, prompt: str) -> str:
        name, number = prompt, 1
        while segmentation.GetSegmentIdBySegmentName(name):
            number += 1
            name = f"{prompt} ({number})"
        return name

    def _probability_volumes(self, volume_node, result) -> list:
        if result.probabilities is None:
            raise TextSegError("the result holds no probabilities: run again with probabilities on")
        nodes = []
        for prompt, probability in zip(result.prompts, result.probabilities):
            name = f"{volume_node.GetName()} {prompt} probability"
            node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            image = vtkImageData()
            image.SetDimensions(*probability.shape)
            kji = np.ascontiguousarray(probability.transpose(2, 1, 0), dtype=np.float32).ravel()
            image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(kji, deep=True))
            node.SetAndObserveImageData(image)
            node.SetIJKToRASMatrix(numpy_to_matrix(result.affine))
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().AutoWindowLevelOff()
            node.GetDisplayNode().SetWindowLevelMinMax(0.0, 1.0)
            nodes.append(node)
        return nodes

    @staticmethod
    def volumes_ml(segmentation_node, segment_ids: Sequence[str]) -> dict[str, float]:
        """Volume in mL of each segment (by name), counted on its binary labelmap."""
        volumes = {}
        for segment_id in segment_ids:
            mask, to_world = labelmap_arrays(segmentation_node, segment_id)
            name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
            volumes[name] = float(mask.sum()) * abs(float(np.linalg.det(to_world[:3, :3]))) / 1000.0
        return volumes

    def segment(self, volume_node, prompts: str | Sequence[str], segmentation_node=None,
                existing: ExistingSegments = "add", options: SegmentOptions = DEFAULT_OPTIONS,
                on_event: Callable[[JobEvent], None] | None = None) -> TextSegResult:
        """Segment and wait (console use); raises :class:`~TextSegLib.job.JobError` if the run fails."""
        with self.start(volume_node, prompts, options, segmentation_node) as job:
            job.wait(on_event)
            return self.apply(job.result(), volume_node, segmentation_node, existing, options.probabilities)
