"""The procedural CT phantom: deterministic by seed, anatomically sided, labels and findings in agreement."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from voxtext.cli import main
from voxtext.phantom import LABELS, generate_phantom

LESION_LABELS = {v for name, v in LABELS.items() if name.endswith(("cyst", "tumor", "stone"))}


def test_same_seed_same_case_other_seed_other_case():
    a, b = generate_phantom(3, shape=(48, 48, 32)), generate_phantom(3, shape=(48, 48, 32))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.findings == b.findings and a.report == b.report and a.qa == b.qa
    assert not np.array_equal(generate_phantom(4, shape=(48, 48, 32)).labels, a.labels)


@pytest.mark.parametrize("seed", [10_001, *range(20)])
def test_every_lesion_in_the_labels_is_a_finding_and_back(seed):
    """Seed 10001 at its acquired spacing once held a one-voxel stone label that no finding reported."""
    rng = np.random.default_rng(seed)
    spacing = (float(rng.uniform(1.5, 3.0)),) * 2 + (float(rng.uniform(1.5, 4.5)),)
    case = generate_phantom(seed, spacing=spacing, lesions=0.6)
    in_labels = {int(v) for v in np.unique(case.labels)} & LESION_LABELS
    assert in_labels == {f["label"] for f in case.findings}
    for finding in case.findings:  # a lesion painted later may cover part of an earlier one
        voxels = int((case.labels == finding["label"]).sum())
        assert voxels >= 2 and voxels * np.prod(spacing) / 1000 <= finding["volume_ml"] + 0.01


def test_left_organs_lie_on_the_patients_left():
    case = generate_phantom(5, spacing=(2.0, 2.0, 3.0), lesions=0.0)

    def ras_x(name: str) -> float:
        centre = np.argwhere(case.labels == LABELS[name]).mean(0)
        return float((case.affine @ np.append(centre, 1.0))[0])

    # RAS: +x points to the patient's right.
    assert ras_x("right kidney") > 0 > ras_x("left kidney")
    assert ras_x("liver") > 0 > ras_x("spleen")
    liver = case.image[case.labels == LABELS["liver"]]
    assert 30 < np.median(liver) < 160  # soft-tissue Hounsfield units in any contrast phase


def test_cli_writes_image_labels_and_case(tmp_path, capsys):
    assert main(["phantom", "--seed", "7", "--out", str(tmp_path / "case")]) == 0
    image = nib.load(tmp_path / "case" / "image.nii.gz")
    labels = np.asarray(nib.load(tmp_path / "case" / "labels.nii.gz").dataobj)
    meta = json.loads((tmp_path / "case" / "case.json").read_text())
    assert labels.shape == image.shape and np.allclose(image.affine, nib.load(tmp_path / "case" / "labels.nii.gz").affine)
    assert {int(k) for k in meta["structures"]} == {int(v) for v in np.unique(labels) if v}
    assert meta["structures"][str(LABELS["left kidney"])][0] == "left kidney"
    assert meta["report"] and meta["qa"]
