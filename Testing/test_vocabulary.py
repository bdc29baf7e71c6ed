"""What the embedded default learned each phrasing on, and the caution on prompts asked on another modality."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from voxtext import Segmenter, Volume
from voxtext.checkpoints import PACKAGE_WEIGHTS
from voxtext.errors import CheckpointError
from voxtext.training.default_model import acquired_phantom, trained_vocabulary
from voxtext.training.evaluate_default import NEAR_EMPTY_ML, OTHER_REGION_ON_CT, evaluate_phantom, summarize
from voxtext.vocabulary import TRAINED_ON_FILE, TrainedVocabulary, unit_embeddings

from conftest import SHARED


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter("default", device="cpu")


def test_the_shipped_vocabulary_is_the_recipe_s():
    shipped, recipe = TrainedVocabulary.of(PACKAGE_WEIGHTS / "esica-default"), trained_vocabulary()
    assert shipped.modalities == recipe.modalities and shipped.without_findings == recipe.without_findings
    assert shipped.modalities["brain tumor"] == ("MR",) and shipped.modalities["liver"] == ("CT",)
    # The organs whose lesions the lesion stage answers are not among those without findings.
    assert {"lungs", "pancreas", "spleen"} <= set(shipped.without_findings)
    assert not {"liver", "right kidney", "left kidney"} & set(shipped.without_findings)


def test_prompts_learned_on_another_modality_are_withheld_unless_allowed(segmenter):
    volume, _ = acquired_phantom(10_001)
    prompts = ["glioblastoma", "left hippocampus", "liver", "kidney on the left side", "liver cyst"]
    result = segmenter.segment(volume, prompts, quality="fast")
    assert set(result.cautions) == {"glioblastoma", "left hippocampus"}
    assert "on MR images only, not CT: answered empty" in result.cautions["glioblastoma"]
    volumes = result.volumes_ml()
    assert volumes["glioblastoma"] == volumes["left hippocampus"] == 0.0 and volumes["liver"] > 1000
    # Allowed, the model's own (unvalidated) answer comes back with the caution: on this abdomen, not nothing.
    allowed = segmenter.segment(volume, prompts, quality="fast", other_modalities=True)
    assert set(allowed.cautions) == {"glioblastoma", "left hippocampus"}
    assert "its answer here is unvalidated" in allowed.cautions["glioblastoma"]
    assert allowed.mask("glioblastoma").any()
    assert (allowed.masks[2:] == result.masks[2:]).all()
    on_mr = segmenter.segment(Volume(volume.array, volume.affine, "MR"), ["liver", "brain tumor"], quality="fast")
    assert list(on_mr.cautions) == ["liver"] and "'liver' on CT images only, not MR" in on_mr.cautions["liver"]


def test_ct_organs_on_a_real_mr_are_withheld_because_they_would_be_wrong(segmenter):
    """The real abdominal MR of ``../shared/data`` with TotalSegmentator's MR output for it: the default model
    learned the organs on CT only, and its answers there miss them (measured: nine organs, DSC 0.00 each, the
    liver's 1,991 voxels all on background), which is why they are withheld by default."""
    folder = SHARED / "data" / "real_ct_mr_io"
    liver = int({name: v for v, name in json.loads((folder / "class_map_total_and_total_mr.json").read_text())[
        "total_mr"].items()}["liver"])
    truth = np.asarray(nib.load(folder / "mr_case" / "example_seg_mr.nii.gz").dataobj) == liver
    volume = folder / "mr_case" / "example_mr_sm.nii.gz"
    withheld = segmenter.segment(volume, ["liver"], quality="fast")
    assert not withheld.masks.any() and "not MR: answered empty" in withheld.cautions["liver"]
    answered = segmenter.segment(volume, ["liver"], quality="fast", other_modalities=True)
    assert answered.mask("liver").sum() > 100 and (answered.mask("liver") & truth).sum() < 0.1 * truth.sum()


def test_vocabulary_file_round_trip_and_bad_files(tmp_path):
    vocabulary = TrainedVocabulary({"liver": ["CT"], "brain tumor": ["MR"]}, ["lungs"])
    vocabulary.save(tmp_path)
    loaded = TrainedVocabulary.of(tmp_path)
    assert loaded.modalities == vocabulary.modalities and loaded.without_findings == ("lungs",)
    assert loaded.findings["lungs nodule"] == "lungs"
    assert TrainedVocabulary.of(tmp_path / "missing") is None
    (tmp_path / TRAINED_ON_FILE).write_text(json.dumps({"phrasings": []}))
    with pytest.raises(CheckpointError, match="not a valid trained_on.json"):
        TrainedVocabulary.of(tmp_path)


def test_structures_the_model_never_learned_are_answered_empty(segmenter):
    """"gallbladder" was routed to the kidney-stone finder (its nearest lesion phrasing) before it was known unknown."""
    volume, _ = acquired_phantom(10_001)
    result = segmenter.segment(volume, ["prostate", "gallbladder", "liver", "splenic tissue"], quality="fast")
    assert set(result.cautions) == {"prostate", "gallbladder"}
    assert "not a structure this model learned" in result.cautions["gallbladder"]
    assert result.lesion_stage == {}
    volumes = result.volumes_ml()
    assert volumes["prostate"] == volumes["gallbladder"] == 0.0 and volumes["liver"] > 1000 and volumes[
        "splenic tissue"] > 50
    alone = segmenter.segment(volume, ["adrenal gland"], quality="fast", return_probabilities=True)
    assert not alone.masks.any() and not alone.probabilities.any() and list(alone.cautions) == ["adrenal gland"]


def test_findings_in_organs_learned_without_their_lesions_are_answered_empty(segmenter):
    """"lung nodule" was answered with the whole lungs (581 mL on each held-out phantom), "pancreatic mass" with
    the pancreas: the model learned those organs, none of their lesions. Organ paraphrases and the lesions the
    lesion stage answers are unaffected."""
    volume, _ = acquired_phantom(10_001)
    findings = ["lung nodule", "pancreatic mass", "splenic lesion", "bladder stone"]
    organs = ["lungs", "pancreatic head", "splenic tissue"]
    result = segmenter.segment(volume, findings + organs + ["liver nodule"], quality="fast")
    assert set(result.cautions) == set(findings)
    assert "reads as a finding in the lungs ('lungs nodule')" in result.cautions["lung nodule"]
    assert "not with the whole pancreas" in result.cautions["pancreatic mass"]
    volumes = result.volumes_ml()
    assert all(volumes[p] == 0.0 for p in findings)
    assert volumes["lungs"] > 100 and volumes["pancreatic head"] > 10 and volumes["splenic tissue"] > 50
    assert "liver nodule" in result.lesion_stage  # a liver lesion: the lesion stage answers it
    # The same vocabulary without the list answers the finding with its organ, as before.
    plain = TrainedVocabulary(segmenter.vocabulary.modalities)
    vectors = unit_embeddings(findings, segmenter.inferer.embed_prompts)
    withheld, _ = plain.review(findings, vectors, "CT", segmenter.inferer.embed_prompts)
    assert withheld == {}


def test_held_out_evaluation_counts_structures_of_other_regions(segmenter):
    """The model card's figure for structures of other body regions comes from ``evaluate_default``."""
    row = evaluate_phantom(segmenter, 10_001, "fast")
    volumes = row["other_region_volume_ml"]
    assert list(volumes) == OTHER_REGION_ON_CT
    assert all(volumes[p] == 0.0 for p in ("brain tumor", "peritumoral edema", "prostate", "gallbladder"))
    assert all(v == 0.0 for v in volumes.values())  # "lung nodule" too: see the test above
    on_mr = [{"case": "x", "prompt": "liver", "other_region_ml": 0.0}, {"case": "x", "prompt": "spleen",
                                                                          "other_region_ml": 2.5}]
    summary = summarize([row], on_mr)
    empty = [v < NEAR_EMPTY_ML for v in volumes.values()] + [True, False]
    assert summary["other_region_empty_rate"] == pytest.approx(sum(empty) / len(empty))
    assert summary["other_region_ml_on_ct"]["lung nodule"] == volumes["lung nodule"]
    assert summary["other_region_on_mr"] == on_mr and summary["real"] == []
