"""Self-tests of the TextSeg core on a real MRML scene, shared by pytest (slicer-core) and Slicer's Test class.

Each ``check_*`` function takes a :class:`~TextSegLib.core.TextSegCore` bound to a scene, builds what it
needs and raises ``AssertionError`` with a reason when the module misbehaves.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData

from .core import TextSegCore, TextSegError, labelmap_arrays, lesion_stage_within, numpy_to_matrix, segment_caution
from .job import JobError
from .options import SegmentOptions

PROMPTS = ["liver", "right kidney", "left kidney"]
OPTIONS = SegmentOptions(model="default", device="cpu", quality="fast")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def make_case(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A 10 cm phantom CT block around the right kidney, 4 x 3 x 6 mm voxels, tilted 25 and 15 degrees.

    Returns the (i, j, k) int16 voxels and the oblique, anisotropic IJK-to-RAS matrix.
    """
    from voxtext.phantom import LABELS, generate_phantom

    case = generate_phantom(seed, spacing=(4.0, 3.0, 6.0), lesions=0)
    half = np.round(50.0 / np.asarray(case.spacing)).astype(int)
    start = np.maximum(np.round(np.argwhere(case.labels == LABELS["right kidney"]).mean(0)).astype(int) - half, 0)
    array = case.image[tuple(slice(s, s + 2 * h) for s, h in zip(start, half))]
    affine = case.affine.copy()
    affine[:3, 3] += case.affine[:3, :3] @ start
    return array, rotation(2, 25.0) @ rotation(0, 15.0) @ affine


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(4)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def backend_result(array: np.ndarray, affine: np.ndarray, prompts=PROMPTS, options: SegmentOptions = OPTIONS):
    """What voxtext itself returns for the case, computed in this process (the reference for the checks)."""
    from voxtext.api import Segmenter
    from voxtext.volume import Volume

    segmenter = Segmenter(options.model, device=options.device)
    return segmenter.segment(Volume(array, affine), prompts, quality=options.quality, return_probabilities=True)


def add_volume(scene, array: np.ndarray, affine: np.ndarray, name: str = "TextSeg test CT"):
    """A scalar volume node holding (i, j, k) ``array`` with IJK-to-RAS ``affine``."""
    image = vtkImageData()
    image.SetDimensions(*array.shape)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array.transpose(2, 1, 0)).ravel(),
                                                               deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_matrix(affine))
    node.CreateDefaultDisplayNodes()
    return node


def sample_on_grid(voxels: np.ndarray, source_to_ras: np.ndarray, target_to_ras: np.ndarray, shape) -> np.ndarray:
    """``voxels`` (a grid placed by ``source_to_ras``) read at the RAS centre of every voxel of a target grid.

    Fails unless every target centre is a source voxel centre; outside the source is False.
    """
    ijk = np.indices(shape).reshape(3, -1)
    ras = target_to_ras[:3, :3] @ ijk + target_to_ras[:3, 3:]
    index = np.linalg.solve(source_to_ras[:3, :3], ras - source_to_ras[:3, 3:])
    rounded = np.round(index).astype(int)
    assert np.abs(index - rounded).max() < 1e-3, "the segment's voxels do not sit on the volume's voxels"
    inside = np.all((rounded >= 0) & (rounded < np.reshape(voxels.shape, (3, 1))), axis=0)
    values = np.zeros(ijk.shape[1], bool)
    values[inside] = voxels[tuple(rounded[:, inside])] > 0
    return values.reshape(shape)


def mask_on_grid(segmentation_node, segment_id: str, ijk_to_ras: np.ndarray, shape) -> np.ndarray:
    """A segment of ``segmentation_node`` sampled on the volume grid ``ijk_to_ras``/``shape``."""
    mask, to_ras = labelmap_arrays(segmentation_node, segment_id)
    return sample_on_grid(mask, to_ras, ijk_to_ras, shape)


def scene_state(scene) -> list[tuple]:
    """Every node (ID, class, name) and, for segmentations, their segments: to compare before/after."""
    state = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        segments = ()
        if node.IsA("vtkMRMLSegmentationNode"):
            seg = node.GetSegmentation()
            segments = tuple((sid, seg.GetSegment(sid).GetName(), labelmap_arrays(node, sid)[0].sum())
                             for sid in seg.GetSegmentIDs())
        state.append((node.GetID(), node.GetClassName(), node.GetName(), segments))
    return state


def check_segments(core: TextSegCore, volume_node, backend) -> None:
    """One segment per prompt, named after it, coded, coloured, on exactly the backend's voxels in RAS."""
    result = core.apply(backend, volume_node, probabilities=True)
    node, segmentation = result.segmentation_node, result.segmentation_node.GetSegmentation()
    assert [segmentation.GetSegment(s).GetName() for s in result.segment_ids] == backend.prompts
    assert segmentation.GetNumberOfSegments() == len(backend.prompts)
    ijk_to_ras = backend.affine
    for segment_id, prompt, mask in zip(result.segment_ids, backend.prompts, backend.masks):
        segment = segmentation.GetSegment(segment_id)
        code = core.terminology.lookup(prompt)
        assert code is not None, f"{prompt!r} has no standard code"
        assert segment.GetTerminology() == code.entry
        assert np.allclose(segment.GetColor(), code.color)
        assert np.array_equal(mask_on_grid(node, segment_id, ijk_to_ras, mask.shape), mask), f"{prompt} voxels"
    entries = {p: core.terminology.lookup(p).entry for p in backend.prompts}
    assert "SCT^10200004^Liver" in entries["liver"]
    assert "SCT^64033007^Kidney~SCT^24028007^Right" in entries["right kidney"]
    assert "SCT^64033007^Kidney~SCT^7771000^Left" in entries["left kidney"]
    expected = backend.volumes_ml()
    assert all(abs(result.volumes_ml[p] - expected[p]) < 1e-6 * max(1.0, expected[p]) for p in backend.prompts)
    assert node.GetSegmentation().ContainsRepresentation("Closed surface"), "no 3D surface"
    assert node.GetParentTransformNode() is volume_node.GetParentTransformNode()
    for probability_node, probability in zip(result.probability_nodes, backend.probabilities):
        assert np.array_equal(_volume_voxels(probability_node), probability)


def _volume_voxels(volume_node) -> np.ndarray:
    image = volume_node.GetImageData()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    return kji.transpose(2, 1, 0)


def check_seg_nrrd_round_trip(core: TextSegCore, volume_node, backend, folder: Path | None = None) -> None:
    """Saved as .seg.nrrd by Slicer, read by slicerio and by Slicer again: same names, codes, colours, voxels."""
    import slicerio

    result = core.apply(backend, volume_node)
    folder = Path(folder or tempfile.mkdtemp(prefix="textseg-"))
    path = folder / "textseg.seg.nrrd"
    storage = core.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(result.segmentation_node), "Slicer could not write the .seg.nrrd"

    segmentation = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in segmentation["segments"]}
    assert list(by_name) == backend.prompts
    seg_to_ras = np.linalg.inv(RAS_TO_LPS) @ np.asarray(segmentation["ijkToLPS"])
    for prompt, mask in zip(backend.prompts, backend.masks):
        info = by_name[prompt]
        code = core.terminology.lookup(prompt)
        assert np.allclose(info["color"], code.color, atol=1e-3)
        assert info["terminology"] == slicerio.segmentation.terminology_entry_from_string(code.entry), prompt
        region = slicerio.extract_segments(segmentation, [(prompt, 1)])
        assert np.array_equal(sample_on_grid(region["voxels"], seg_to_ras, backend.affine, mask.shape), mask), prompt

    loaded = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    storage.ReadData(loaded)
    reloaded = loaded.GetSegmentation()
    for prompt, mask in zip(backend.prompts, backend.masks):
        copy_id = reloaded.GetSegmentIdBySegmentName(prompt)
        segment = reloaded.GetSegment(copy_id)
        assert segment.GetTerminology() == core.terminology.lookup(prompt).entry
        assert np.array_equal(mask_on_grid(loaded, copy_id, backend.affine, mask.shape), mask)


def check_existing_segments(core: TextSegCore, volume_node, backend) -> None:
    """``add`` keeps every segment and numbers a taken name; ``replace`` overwrites only same-named segments."""
    first = core.apply(backend, volume_node)
    node = first.segmentation_node
    segmentation = node.GetSegmentation()
    kept_id = segmentation.AddEmptySegment("kept", "hand-drawn")
    liver_id = first.segment_ids[0]
    before = labelmap_arrays(node, liver_id)[0].sum()

    added = core.apply(backend, volume_node, node, existing="add")
    names = [segmentation.GetSegment(s).GetName() for s in added.segment_ids]
    assert names == [f"{p} (2)" for p in backend.prompts], names
    assert segmentation.GetNumberOfSegments() == 2 * len(backend.prompts) + 1
    assert labelmap_arrays(node, liver_id)[0].sum() == before, "add changed an existing segment"
    assert core.conflicts(node, backend.prompts) == backend.prompts

    emptied = type(backend)(np.zeros_like(backend.masks), backend.prompts, backend.affine, model=backend.model)
    replaced = core.apply(emptied, volume_node, node, existing="replace")
    assert replaced.segment_ids == first.segment_ids, "replace must reuse the segments named like the prompts"
    assert segmentation.GetNumberOfSegments() == 2 * len(backend.prompts) + 1
    assert labelmap_arrays(node, liver_id)[0].sum() == 0
    assert labelmap_arrays(node, added.segment_ids[0])[0].sum() == backend.masks[0].sum(), "replace touched 'liver (2)'"
    assert segmentation.GetSegment(kept_id) is not None


def check_refusals_leave_scene(core: TextSegCore, volume_node, backend) -> None:
    """A result that no longer fits the volume, or a bad policy, changes nothing."""
    before = scene_state(core.scene)
    shifted = backend.affine.copy()
    shifted[:3, 3] += 1.0
    moved = type(backend)(backend.masks, backend.prompts, shifted, model=backend.model)
    for result, existing in ((moved, "add"), (backend, "overwrite")):
        try:
            core.apply(result, volume_node, existing=existing)
        except TextSegError:
            pass
        else:
            raise AssertionError(f"apply accepted {existing!r} with a mismatching result")
        assert scene_state(core.scene) == before, "a refused result changed the scene"


def check_worker_matches_backend(core: TextSegCore, volume_node, backend, options: SegmentOptions = OPTIONS) -> None:
    """The background worker's segments (computed here or on ``options.server``) are the backend's masks,
    with progress reported on the way."""
    events = []
    result = core.segment(volume_node, ", ".join(backend.prompts), options=options, on_event=events.append)
    kinds = [e.kind for e in events]
    assert "status" in kinds and "progress" in kinds and kinds[-1] == "done", kinds
    for segment_id, mask in zip(result.segment_ids, backend.masks):
        assert np.array_equal(mask_on_grid(result.segmentation_node, segment_id, backend.affine, mask.shape), mask)


def check_lesion_stage_reported(core: TextSegCore, volume_node, options: SegmentOptions = OPTIONS) -> None:
    """A lesion prompt answered by the model's lesion stage says so, and one the embedded default finds by
    attenuation, not by its model (kidney stones), carries that caution (in the result and as segment tags that
    .seg.nrrd keeps); others do not."""
    result = core.segment(volume_node, "right kidney cyst, right kidney stone, right kidney", options=options)
    assert result.lesion_stage == {"right kidney cyst": ["right kidney"], "right kidney stone": ["right kidney"]}, \
        result.lesion_stage
    assert list(result.cautions) == ["right kidney stone"], result.cautions
    segmentation = result.segmentation_node.GetSegmentation()
    tags = [lesion_stage_within(segmentation.GetSegment(s)) for s in result.segment_ids]
    assert tags == ["right kidney", "right kidney", ""], tags
    cautions = [segment_caution(segmentation.GetSegment(s)) for s in result.segment_ids]
    assert cautions == ["", result.cautions["right kidney stone"], ""], cautions
    storage = core.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(Path(tempfile.mkdtemp(prefix="textseg-")) / "lesion.seg.nrrd"))
    assert storage.WriteData(result.segmentation_node), "Slicer could not write the .seg.nrrd"
    loaded = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    storage.ReadData(loaded)
    reloaded = loaded.GetSegmentation()
    assert lesion_stage_within(reloaded.GetSegment(reloaded.GetSegmentIdBySegmentName("right kidney cyst"))) == \
        "right kidney", "the lesion-stage tag did not survive .seg.nrrd"
    stone = reloaded.GetSegment(reloaded.GetSegmentIdBySegmentName("right kidney stone"))
    assert segment_caution(stone) == result.cautions["right kidney stone"], "the caution tag did not survive .seg.nrrd"


def check_cancel_leaves_scene(core: TextSegCore, volume_node) -> None:
    """Cancelling a running job ends it as cancelled and adds nothing to the scene."""
    before = scene_state(core.scene)
    with core.start(volume_node, PROMPTS, OPTIONS) as job:
        while not job.finished and not any(e.kind == "status" for e in job.poll()):
            time.sleep(0.05)
        job.cancel()
        assert job.wait() == "cancelled", job.log
        assert job.error.kind == "cancelled"
        try:
            job.result()
        except JobError:
            pass
        else:
            raise AssertionError("a cancelled job returned a result")
    assert scene_state(core.scene) == before


def check_error_in_plain_words(core: TextSegCore, volume_node, missing_model: Path) -> None:
    """A model folder without weights fails with a message saying where weights come from; scene unchanged."""
    before = scene_state(core.scene)
    try:
        core.segment(volume_node, PROMPTS, options=SegmentOptions(model=str(missing_model), device="cpu"))
    except JobError as error:
        assert error.kind == "weights", (error.kind, str(error))
        assert "huggingface.co/MagicXin/ESICA" in str(error) and "config.json" in str(error), str(error)
    else:
        raise AssertionError("a missing model did not fail")
    assert scene_state(core.scene) == before
