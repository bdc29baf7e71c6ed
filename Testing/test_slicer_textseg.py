"""The TextSeg module core on real MRML (slicer-core): segments, terminology, geometry, files, policy, worker."""

from __future__ import annotations

import shutil
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "TextSeg"))  # as Slicer does for a scripted module's folder

slicer = pytest.importorskip("slicer")
from TextSegLib import selftest  # noqa: E402
from TextSegLib.core import TextSegCore, TextSegError, numpy_to_matrix, volume_arrays  # noqa: E402
from TextSegLib.job import SegmentationJob  # noqa: E402
from TextSegLib.options import SegmentOptions, completion_candidates, parse_prompts, remember_prompts  # noqa: E402
from TextSegLib.terminology import normalize_label  # noqa: E402
from vtkmodules.vtkCommonCore import vtkObject  # noqa: E402


class PlainSlicer:
    """A scene with the application logic and the colours, volumes, terminologies and segmentations logics.

    The same set-up as Slicer's application, minus Qt. slicer-core ships no default terminology files,
    so the terminologies logic only knows the one the extension loads (its errors about the missing
    defaults are silenced here).
    """

    def __init__(self) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.app = slicer.vtkSlicerApplicationLogic()
        self.app.SetMRMLScene(self.scene)
        self.app.GetColorLogic().SetMRMLScene(self.scene)
        self.app.GetColorLogic().AddDefaultColorNodes()
        warnings = vtkObject.GetGlobalWarningDisplay()
        vtkObject.GlobalWarningDisplayOff()
        self.volumes = self._register(slicer.vtkSlicerVolumesLogic(), "Volumes")
        self.terminologies = self._register(slicer.vtkSlicerTerminologiesModuleLogic(), "Terminologies")
        self.segmentations = self._register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
        vtkObject.SetGlobalWarningDisplay(warnings)

    def _register(self, logic, name: str):
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app)
        self.app.SetModuleLogic(name, logic)
        return logic


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    return selftest.make_case()


@pytest.fixture(scope="module")
def backend(case):
    return selftest.backend_result(*case)


@pytest.fixture()
def core() -> TextSegCore:
    plain = PlainSlicer()
    return TextSegCore(plain.scene, plain.segmentations, plain.terminologies)


@pytest.fixture()
def volume_node(core, case):
    return selftest.add_volume(core.scene, *case)


def test_case_is_oblique_anisotropic_and_segmented(case, backend):
    array, affine = case
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert len(set(np.round(spacing, 3))) == 3
    assert np.count_nonzero(np.abs(affine[:3, :3]) > 1e-6) > 3  # not axis-aligned
    assert backend.masks[0].any() and backend.masks[1].any(), "the fixture needs non-empty liver and kidney masks"


def test_volume_round_trips_through_mrml(core, volume_node, case):
    array, affine = volume_arrays(volume_node)
    assert np.array_equal(array, case[0]) and np.allclose(affine, case[1])


def test_segments_names_terminology_colours_voxels(core, volume_node, backend):
    selftest.check_segments(core, volume_node, backend)


def test_seg_nrrd_round_trip_with_slicerio(core, volume_node, backend, tmp_path):
    selftest.check_seg_nrrd_round_trip(core, volume_node, backend, tmp_path)


def test_add_and_replace_policy(core, volume_node, backend):
    selftest.check_existing_segments(core, volume_node, backend)


def test_refused_results_leave_scene_unchanged(core, volume_node, backend):
    selftest.check_refusals_leave_scene(core, volume_node, backend)


def test_segmentation_under_a_transform(core, volume_node, backend):
    """A volume under a linear transform and an output under another: segments still land on its voxels in RAS."""
    shift = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume_node.SetAndObserveTransformNodeID(shift.GetID())
    shift.SetMatrixTransformToParent(numpy_to_matrix(selftest.rotation(1, 10.0)))
    output = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    result = core.apply(backend, volume_node, output)
    to_world = selftest.rotation(1, 10.0) @ backend.affine  # the volume's voxels in world RAS
    mask = selftest.mask_on_grid(output, result.segment_ids[1], to_world, backend.shape)
    assert np.array_equal(mask, backend.masks[1])


def test_worker_matches_backend(core, volume_node, backend):
    selftest.check_worker_matches_backend(core, volume_node, backend)


def test_worker_reports_the_lesion_stage(core, volume_node):
    selftest.check_lesion_stage_reported(core, volume_node)


def test_remote_server_option_matches_backend(core, volume_node, backend, monkeypatch):
    from voxtext.api import Segmenter
    from voxtext.server.app import ServerConfig, create_app, running
    from voxtext.server.workers import ModelSlot

    monkeypatch.setenv("VOXTEXT_TOKEN", "module-token")  # the worker reads the token from its environment
    slot = ModelSlot("default", "segmentation", Segmenter("default", device="cpu"), 1, 4)
    with running(create_app(ServerConfig(token="module-token"), {"default": slot})) as url:
        selftest.check_worker_matches_backend(core, volume_node, backend, replace(selftest.OPTIONS, server=url))
        selftest.check_lesion_stage_reported(core, volume_node, replace(selftest.OPTIONS, server=url))
    with pytest.raises(ValueError, match="http"):
        SegmentOptions(server="gpu-host:8000")
    with pytest.raises(ValueError, match="this computer"):
        SegmentOptions(server="http://gpu-host:8000", probabilities=True)


def test_cancel_leaves_scene_unchanged(core, volume_node):
    selftest.check_cancel_leaves_scene(core, volume_node)


def test_missing_weights_in_plain_words(core, volume_node, tmp_path):
    selftest.check_error_in_plain_words(core, volume_node, tmp_path)


def test_inputs_are_checked_before_any_work(core, volume_node):
    with pytest.raises(TextSegError, match="at least one target"):
        core.start(volume_node, " , \n")
    with pytest.raises(TextSegError, match="input volume"):
        core.start(None, "liver")
    with pytest.raises(ValueError, match="quality"):
        SegmentOptions(quality="best")


def test_prompt_text_helpers():
    assert parse_prompts("liver, Left  kidney\nliver;  spleen ,") == ["liver", "Left kidney", "spleen"]
    assert completion_candidates("liver, left k", ["left kidney", "liver"]) == ["liver, left kidney"]
    assert completion_candidates("sp", ["spleen", "liver"]) == ["spleen"]
    assert remember_prompts(["spleen", "liver"], ["liver", "aorta"]) == ["liver", "aorta", "spleen"]
    assert normalize_label("The Liver Tumour") == "liver tumor" and normalize_label("Bladder") == "urinary bladder"


def test_findings_are_coded_with_their_region(core):
    tumour = core.terminology.lookup("Liver tumour")
    assert "SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver" in tumour.entry
    stone = core.terminology.lookup("left kidney stones")
    assert stone.entry.endswith("SCT^56381008^Calculus~^^~Anatomic codes - DICOM master list~SCT^64033007^Kidney"
                                "~SCT^7771000^Left")
    assert stone.meaning == "Calculus in Kidney, Left"
    assert core.terminology.lookup("kidney cyst").meaning == "Cyst in Kidney"
    assert core.terminology.lookup("spleen liver") is None and core.terminology.lookup("banana") is None


def test_worker_failures_in_plain_words():
    from TextSegLib.worker import explain

    from voxtext.errors import Cancelled, InputError, WeightsNotFoundError

    for error in (MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        kind, text = explain(error)
        assert kind == "memory" and "'fast'" in text and "CPU" in text
    kind, text = explain(WeightsNotFoundError("the weights of model 'esica' are not in the Hugging Face cache"))
    assert kind == "weights" and "https://huggingface.co/MagicXin/ESICA" in text and "esica" in text
    kind, text = explain(ModuleNotFoundError("No module named 'voxtext'", name="voxtext"))
    assert kind == "dependencies" and "voxtext" in text and "accept the installation" in text
    assert explain(Cancelled("segmentation cancelled"))[0] == "cancelled"
    assert explain(InputError("the volume is empty"))[1] == "The volume is empty"


@pytest.mark.skipif(shutil.which("false") is None, reason="needs the 'false' program")
def test_crashed_worker_is_reported(tmp_path):
    """A worker that dies without a word (killed, out of memory) ends the job as failed, with advice."""
    false = shutil.which("false")
    with SegmentationJob(np.zeros((4, 4, 4)), np.eye(4), ["liver"], SegmentOptions(), python=false) as job:
        assert job.wait() == "failed"
        assert job.error.kind == "crashed" and "stopped unexpectedly" in str(job.error)
        folder = job.folder
    assert not folder.exists()


def test_worker_stops_when_cancelled(case, tmp_path):
    """The worker's own loop (run in this process) turns a cancel request into Cancelled and writes nothing."""
    from TextSegLib import worker

    from voxtext.errors import Cancelled

    worker.write_job(tmp_path, *case, ["liver"], selftest.OPTIONS.to_json())
    cancel, events = threading.Event(), []
    cancel.set()
    with pytest.raises(Cancelled):
        worker.run(tmp_path, events.append, cancel)
    assert [e["event"] for e in events] == ["status", "status"] and not (tmp_path / worker.RESULT_FILE).exists()
