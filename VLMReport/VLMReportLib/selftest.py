"""Self-tests of the VLMReport core on a real MRML scene, shared by pytest (slicer-core) and Slicer's Test class.

Each ``check_*`` function takes a :class:`~VLMReportLib.core.VLMReportCore` bound to a scene and a volume
node in it, runs the real model through the worker and raises ``AssertionError`` when the module misbehaves.
"""

from __future__ import annotations

import time
from pathlib import Path

from TextSegLib.selftest import add_volume, scene_state

from .core import REPORT_ROLE, VLMReportCore
from .options import ReportOptions

MAX_NEW_TOKENS = 48  # enough for a few report lines; keeps each run to seconds on a CPU
OPTIONS = ReportOptions(model="default", device="cpu", max_new_tokens=MAX_NEW_TOKENS)


def make_volume(scene, seed: int = 5):
    """A phantom abdominal CT (voxtext.phantom, 4 mm voxels, lesions) as a scalar volume node."""
    from voxtext.phantom import generate_phantom

    case = generate_phantom(seed, spacing=(4.0, 4.0, 4.0))
    return add_volume(scene, case.image, case.affine, name="VLMReport test CT")


def check_report_streamed_and_stored(core: VLMReportCore, volume_node, options: ReportOptions = OPTIONS) -> str:
    """The report arrives in pieces that join to the final text, stored as a text node referenced by the volume."""
    pieces: list[str] = []
    text = core.report(volume_node, options, on_text=pieces.append)
    assert text.strip(), "the model wrote an empty report"
    assert len(pieces) > 1, f"the report was not streamed: {pieces}"
    assert "".join(pieces).strip() == text, (pieces, text)
    nodes = core.reports(volume_node)
    assert len(nodes) == 1 and nodes[0].GetText() == text
    assert nodes[0].IsA("vtkMRMLTextNode") and nodes[0].GetStorageNode().IsA("vtkMRMLTextStorageNode")
    assert volume_node.GetNodeReference(REPORT_ROLE) is nodes[0]
    return text


def check_scene_round_trip(core: VLMReportCore, volume_node, application_logic, folder: Path) -> None:
    """Saved as a scene (data bundle) and loaded into a new scene: same report text, still tied to the volume."""
    import slicer

    texts = [node.GetText() for node in core.reports(volume_node)]
    assert texts, "no report to save"
    folder.mkdir(parents=True, exist_ok=True)
    assert application_logic.SaveSceneToSlicerDataBundleDirectory(str(folder), None), "the scene was not saved"
    assert list(folder.rglob("*.txt")), f"no report file in {folder}"
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(folder / f"{folder.name}.mrml"))
    assert loaded.Connect(), "the saved scene could not be loaded"
    volume = loaded.GetFirstNodeByName(volume_node.GetName())
    reloaded = VLMReportCore(loaded).reports(volume)
    assert [node.GetText() for node in reloaded] == texts


def check_second_report_kept(core: VLMReportCore, volume_node) -> None:
    """A new report is added next to the earlier ones; only ``replace`` overwrites the latest."""
    first = core.store(volume_node, "first report")
    second = core.store(volume_node, "second report")
    assert second is not first and first.GetText() == "first report"
    count = len(core.reports(volume_node))
    replaced = core.store(volume_node, "corrected report", replace=True)
    assert replaced is second and second.GetText() == "corrected report" and first.GetText() == "first report"
    assert len(core.reports(volume_node)) == count and core.reports(volume_node)[-2:] == [first, second]


def check_cancel_leaves_scene(core: VLMReportCore, volume_node, options: ReportOptions = OPTIONS) -> None:
    """Cancelling a running report ends it as cancelled and adds nothing to the scene."""
    from TextSegLib.job import JobError

    before = scene_state(core.scene)
    with core.start(volume_node, options) as job:
        while not job.finished and not any(e.kind == "status" for e in job.poll()):
            time.sleep(0.05)
        job.cancel()
        assert job.wait() == "cancelled", list(job.log)
        try:
            core.finish(job, volume_node)
        except JobError as error:
            assert error.kind == "cancelled" and "cancelled" in str(error)
        else:
            raise AssertionError("a cancelled job returned a report")
    assert scene_state(core.scene) == before


def check_conversation(core: VLMReportCore, volume_node, options: ReportOptions = OPTIONS) -> None:
    """An open and a closed question are answered, kept in order in the volume's conversation, scene unchanged."""
    before = scene_state(core.scene)
    opened = core.ask(volume_node, "What abnormality is seen in the kidneys?", options=options)
    closed = core.ask(volume_node, "Is there a kidney stone?", "yes, no", options=options)
    assert opened.text and not opened.choices and opened.index is None
    picks = (0, 1) if options.score_choices else (0, 1, None)  # scored options always pick one
    assert closed.choices == ("yes", "no") and closed.index in picks, closed
    assert core.conversation(volume_node) == [opened, closed]
    assert scene_state(core.scene) == before, "a question changed the scene"


def check_error_in_plain_words(core: VLMReportCore, volume_node, missing_model: Path) -> None:
    """A model folder without weights fails in the worker with a message saying where weights come from."""
    from TextSegLib.job import JobError

    before = scene_state(core.scene)
    try:
        core.report(volume_node, ReportOptions(model=str(missing_model), device="cpu"))
    except JobError as error:
        assert error.kind == "weights", (error.kind, str(error))
        assert "Med3DVLM-Qwen-2.5-7B" in str(error) and "config.json" in str(error), str(error)
    else:
        raise AssertionError("a missing model did not fail")
    assert scene_state(core.scene) == before


def check_refusals(core: VLMReportCore, volume_node) -> None:
    """Bad inputs are refused in words before any work."""
    for args, message in (((None,), "input volume"), ((volume_node, OPTIONS, "  "), "type a question"),
                          ((volume_node, OPTIONS, "Which side?", "left"), "at least two options")):
        try:
            core.start(*args)
        except ValueError as error:
            assert message in str(error), str(error)
        else:
            raise AssertionError(f"start{args} was accepted")

