"""The VLMReport module core on real MRML (slicer-core): reports as text nodes, streaming, cancel, VQA, terms, SR.

The model is the embedded default VLM (``voxtext/weights/vlm-default``) run through the worker, or the
checkpoint folder named by ``VLMREPORT_TEST_MODEL``; without either the model tests are skipped.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "TextSeg"), str(REPO / "VLMReport")]  # as Slicer does for scripted module folders

slicer = pytest.importorskip("slicer")
from test_slicer_textseg import PlainSlicer  # noqa: E402
from VLMReportLib import selftest  # noqa: E402
from VLMReportLib.core import Reply, VLMReportCore, export_text, find_structures, format_conversation  # noqa: E402
from VLMReportLib.options import ReportOptions, parse_choices  # noqa: E402

CT_SERIES = REPO.parent / "shared" / "data" / "real_ct_mr_io" / "dicom_case" / "example_ct_dicom"
MODEL = os.environ.get("VLMREPORT_TEST_MODEL", "default")


def model_available() -> bool:
    folder = REPO / "voxtext" / "weights" / "vlm-default" if MODEL == "default" else Path(MODEL)
    return (folder / "model.safetensors").is_file()


needs_model = pytest.mark.skipif(not model_available(), reason=f"VLM {MODEL!r} not available (no model.safetensors)")


@pytest.fixture()
def plain() -> PlainSlicer:
    return PlainSlicer()


@pytest.fixture()
def core(plain) -> VLMReportCore:
    return VLMReportCore(plain.scene)


@pytest.fixture()
def volume_node(core):
    return selftest.make_volume(core.scene)


@pytest.fixture(scope="module")
def options() -> ReportOptions:
    return replace(selftest.OPTIONS, model=MODEL)


@needs_model
def test_report_streamed_stored_and_saved_with_the_scene(core, plain, volume_node, options, tmp_path):
    selftest.check_report_streamed_and_stored(core, volume_node, options)
    selftest.check_scene_round_trip(core, volume_node, plain.app, tmp_path / "scene")


def test_second_report_does_not_overwrite_unless_asked(core, plain, volume_node, tmp_path):
    selftest.check_second_report_kept(core, volume_node)
    selftest.check_scene_round_trip(core, volume_node, plain.app, tmp_path / "scene")


@needs_model
def test_report_from_a_server_equals_the_local_one(core, volume_node, options, monkeypatch):
    from TextSegLib.core import volume_arrays
    from voxtext.report import Reporter
    from voxtext.server.app import ServerConfig, create_app, running
    from voxtext.server.workers import ModelSlot
    from voxtext.volume import Volume

    local = Reporter(options.model, device="cpu").report(Volume(*volume_arrays(volume_node)), greedy=options.greedy,
                                                         max_new_tokens=options.max_new_tokens)
    monkeypatch.setenv("VOXTEXT_TOKEN", "module-token")  # the worker reads the token from its environment
    slot = ModelSlot("default", "report", Reporter(options.model, device="cpu"), 1, 4)
    with running(create_app(ServerConfig(token="module-token"), {"report": slot})) as url:
        remote = selftest.check_report_streamed_and_stored(core, volume_node, replace(options, server=url))
    assert remote == local.strip()
    with pytest.raises(ValueError, match="http"):
        replace(options, server="gpu-host:8000")


@needs_model
def test_cancel_leaves_scene_unchanged(core, volume_node, options):
    selftest.check_cancel_leaves_scene(core, volume_node, options)


@needs_model
def test_open_and_closed_questions_build_a_conversation(core, volume_node, options):
    selftest.check_conversation(core, volume_node, options)
    transcript = format_conversation(core.conversation(volume_node))
    assert transcript.startswith("Q: What abnormality") and "Q: Is there a kidney stone? [yes / no]" in transcript


def test_missing_model_in_plain_words(core, volume_node, tmp_path):
    selftest.check_error_in_plain_words(core, volume_node, tmp_path / "no-model")


def test_inputs_are_checked_before_any_work(core, volume_node):
    selftest.check_refusals(core, volume_node)
    with pytest.raises(ValueError, match="precision"):
        ReportOptions(precision="int4")


def test_structure_terms_for_segment_this():
    text = ("FINDINGS:\nLeft kidney: 9 mm calculus.\nLiver: two simple cysts.\nThe bladder and IVC are normal; "
            "both kidneys enhance. Oesophagus unremarkable. No tumours. Skidney is not a word.")
    assert find_structures(text) == ["left kidney", "liver", "cyst", "urinary bladder", "inferior vena cava",
                                     "kidneys", "esophagus", "tumor"]
    assert find_structures("Right adrenal gland and right kidney") == ["right adrenal gland", "right kidney"]
    assert find_structures("No abnormality.") == [] and find_structures("") == []


def test_choices_and_transcript():
    assert parse_choices(" yes, no ") == ["yes", "no"] and parse_choices("left | right\nboth") == ["left", "right",
                                                                                                    "both"]
    assert parse_choices("  ") == []
    closed = Reply("B", "Is there a stone?", ("yes", "no"), 1)
    unparsed = Reply("maybe", "Is there a cyst?", ("yes", "no"), None)
    assert format_conversation([Reply("A cyst.", "What is seen?"), closed, unparsed]) == (
        "Q: What is seen?\nA: A cyst.\n\nQ: Is there a stone? [yes / no]\nA: no (B)\n\n"
        "Q: Is there a cyst? [yes / no]\nA: maybe")


def test_export_txt_and_md(tmp_path):
    assert export_text("Liver: normal.", tmp_path / "r.txt").read_text() == "Liver: normal.\n"
    markdown = export_text("Liver: normal.", tmp_path / "r.md", "CT report").read_text()
    assert markdown == "# CT report\n\nLiver: normal.\n"
    with pytest.raises(ValueError, match=".txt or .md"):
        export_text("x", tmp_path / "r.pdf")


def test_dicom_sr_of_the_real_ct_series(tmp_path):
    """The report as an Enhanced SR in the real CT series' study, citing its instances (highdicom)."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from pydicom.uid import generate_uid
    from VLMReportLib.sr import write_report_sr

    files = sorted(CT_SERIES.iterdir())
    with pytest.raises(ValueError, match="StudyInstanceUID"):  # the series is anonymized down to blank UIDs
        write_report_sr("x", files, tmp_path / "sr.dcm")
    study, series = generate_uid(entropy_srcs=["study"]), generate_uid(entropy_srcs=["series"])
    fixed = []
    for path in files:  # give the anonymized series the study and series UIDs a PACS would have
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.save_as(tmp_path / path.name)
        fixed.append(tmp_path / path.name)
    text = "FINDINGS:\nLiver: normal.\n\nIMPRESSION:\n- No acute abnormality."
    sr = pydicom.dcmread(write_report_sr(text, fixed, tmp_path / "sr.dcm", model="default"))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == study and sr.SeriesInstanceUID != series
    assert [item.TextValue for item in sr.ContentSequence] == [*text.split("\n\n"), "voxtext VLM default"]
    cited = {item.ReferencedSOPInstanceUID for item in
             sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence}
    assert cited == {pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in files}


def test_highdicom_pin_matches_requirements():
    from VLMReportLib.sr import HIGHDICOM

    assert HIGHDICOM in (REPO / "requirements.txt").read_text().split()
