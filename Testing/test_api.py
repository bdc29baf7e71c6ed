"""End-to-end segmentation with the embedded default model: API, CLI and bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import slicerio

from voxtext import Segmenter, Volume
from voxtext.cli import main
from voxtext.errors import InputError
from voxtext.phantom import generate_phantom


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("default", device="cpu")


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(10_007, spacing=(2.4, 2.6, 3.5), lesions=0.0)


def oblique(case) -> Volume:
    """The phantom stored with permuted, flipped axes and a rotated affine (same anatomy, other grid)."""
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0], [0, 0, 1, 0],
                    [0, 0, 0, 1]])
    image = np.flip(case.image.transpose(2, 0, 1), axis=1).astype(np.float32)
    flip = np.eye(4)[[2, 0, 1, 3]]
    flip_j = np.diag([1.0, -1.0, 1.0, 1.0])
    flip_j[1, 3] = case.image.shape[0] - 1
    affine = rot @ case.affine @ flip.T @ flip_j
    return Volume(np.ascontiguousarray(image), affine, "CT")


def test_masks_land_on_the_input_grid(segmenter, phantom):
    volume = oblique(phantom)
    original = volume.array.copy()
    result = segmenter.segment(volume, ["liver", "left kidney"])
    assert result.shape == volume.shape
    np.testing.assert_allclose(result.affine, volume.affine)
    assert np.array_equal(volume.array, original)
    # The same anatomy on its native grid gives the same masks, mapped through the axis change.
    native = segmenter.segment(Volume(phantom.image.astype(np.float32), phantom.affine, "CT"), ["liver"])
    back = np.flip(result.mask("liver"), axis=1).transpose(1, 2, 0)
    agreement = 2 * (back & native.mask("liver")).sum() / (back.sum() + native.mask("liver").sum())
    assert agreement > 0.9


def test_default_model_finds_organs_on_an_unseen_phantom(segmenter, phantom):
    volume = Volume(phantom.image.astype(np.float32), phantom.affine, "CT")
    result = segmenter.segment(volume, ["liver", "right kidney", "left kidney"])
    # Loose bounds on what the small default model does well; the model card gives the held-out figures
    # of every structure (the spleen, pancreas and lesions are among its documented weaknesses).
    for organ in result.prompts:
        truth = phantom.target_mask(organ)
        overlap = 2 * (result.mask(organ) & truth).sum() / (result.mask(organ).sum() + truth.sum())
        assert overlap > 0.5, organ
    # Laterality: the midline check removes what the raw model puts on the right kidney for "left kidney",
    # and keeps what it finds of the left one.
    left, right = phantom.target_mask("left kidney"), phantom.target_mask("right kidney")
    checked, raw = result.mask("left kidney"), segmenter.segment(volume, ["left kidney"], laterality=False).mask(
        "left kidney")
    assert (checked & right).sum() <= 0.02 * (checked & left).sum()
    assert (checked & left).sum() >= 0.95 * (raw & left).sum()


def test_default_model_on_a_held_out_brain_tumour(segmenter):
    """Re-measures the model card's real held-out figure (whole tumour on FLAIR, DSC 0.84) with a loose bound."""
    from voxtext.training.default_model import is_held_out, load_source, real_sources

    source = next(s for s in real_sources() if s.name == "brats2018/case_5")
    assert is_held_out(source.name)
    volume, labels = load_source(source)
    tumour = segmenter.segment(volume, ["brain tumor"], quality="fast").mask("brain tumor")
    truth = np.isin(labels, source.targets[0].values)
    assert 2 * (tumour & truth).sum() / (tumour.sum() + truth.sum()) > 0.7


@pytest.mark.parametrize(
    "prompts, message",
    [([], "no prompt"), (["  "], "empty"), (["liver", "liver "], "twice"), ([3], "strings")],
)
def test_bad_prompts(segmenter, phantom, prompts, message):
    with pytest.raises(InputError, match=message):
        segmenter.segment(Volume(phantom.image, phantom.affine), prompts)


@pytest.mark.parametrize(
    "array, message",
    [(np.zeros((8, 8)), "3-D"), (np.zeros((4, 8, 8, 8)), "3-D"), (np.full((8, 8, 8), np.nan), "NaN")],
)
def test_bad_arrays(segmenter, array, message):
    with pytest.raises(InputError, match=message):
        segmenter.segment(array, ["liver"])


@pytest.mark.parametrize(
    "options, message",
    [({"quality": "best"}, "quality"), ({"threshold": 1.5}, "threshold"), ({"roi": [(0, 0), (0, 5), (0, 5)]}, "empty"),
     ({"overlap": 1.0}, "overlap")],
)
def test_bad_options(segmenter, phantom, options, message):
    with pytest.raises(InputError, match=message):
        segmenter.segment(Volume(phantom.image, phantom.affine), ["liver"], **options)


def test_roi_limits_the_result(segmenter, phantom):
    volume = Volume(phantom.image.astype(np.float32), phantom.affine, "CT")
    roi = [(0, volume.shape[0] // 2), (0, volume.shape[1]), (0, volume.shape[2])]
    result = segmenter.segment(volume, ["liver"], roi=roi)
    assert result.shape == volume.shape
    assert not result.mask("liver")[volume.shape[0] // 2 :].any()


def test_cli_writes_label_map_sidecar_and_seg_nrrd(tmp_path, phantom, capsys):
    phantom.save(tmp_path / "case")
    out = tmp_path / "out" / "seg.nii.gz"
    args = ["segment", str(tmp_path / "case" / "image.nii.gz"), "-p", "liver", "-p", "left kidney", "-o", str(out), "-q"]
    assert main(args) == 0
    labels = nib.load(out)
    np.testing.assert_allclose(labels.affine, phantom.affine)
    assert labels.shape == phantom.image.shape
    sidecar = json.loads((out.parent / "seg.json").read_text())
    assert sidecar["labels"] == {"1": "liver", "2": "left kidney"}
    assert sidecar["refined_by_attenuation"] == ["liver", "left kidney"]
    assert main([*args, "--overwrite", "--no-refine"]) == 0
    assert json.loads((out.parent / "seg.json").read_text())["refined_by_attenuation"] == []
    seg = slicerio.read_segmentation(str(out.parent / "seg.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["liver", "left kidney"]
    assert "embedded default model" in capsys.readouterr().err
    assert main(args) == 2  # existing results are not overwritten without --overwrite
    assert "already exist" in capsys.readouterr().err


def test_cli_withholds_prompts_learned_on_other_modalities_unless_allowed(tmp_path, phantom, capsys):
    """'brain tumor' was learned on MR only: on this CT it is answered empty with a caution, unless allowed."""
    phantom.save(tmp_path / "case")
    out = tmp_path / "out" / "seg.nii.gz"
    args = ["segment", str(tmp_path / "case" / "image.nii.gz"), "-p", "brain tumor", "-o", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "brain tumor: 0.0 mL" in printed and "not CT: answered empty" in printed
    assert "answered empty" in json.loads((out.parent / "seg.json").read_text())["cautions"]["brain tumor"]
    assert main([*args, "--overwrite", "--other-modalities"]) == 0
    printed = capsys.readouterr().out
    assert "brain tumor: 0.0 mL" not in printed and "its answer here is unvalidated" in printed


def test_cli_reports_missing_input(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "none.nii.gz"), "-p", "liver", "-o", str(tmp_path / "s.nii.gz")]) == 2
    assert "error" in capsys.readouterr().err


def test_memory_guard_refuses_impossible_jobs():
    from voxtext.api import check_memory

    with pytest.raises(InputError, match="GiB"):
        check_memory((2000, 2000, 2000), 50, (4000, 4000, 2000), True)
    check_memory((100, 100, 100), 5, (200, 200, 100), True)  # an ordinary job passes


def test_cli_lists_segmentation_and_report_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    segmentation, report = out.split("report/VQA")
    assert "esica-lite" in segmentation and "med3dvlm" not in segmentation
    assert "med3dvlm" in report and "default" in report
