"""Evaluation against hand-computed values: DSC, NSD, instance F1, folder scoring and ``voxtext eval-seg``."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from voxtext.cli import main
from voxtext.errors import InputError
from voxtext.evaluation.instances import connected_components, instance_f1
from voxtext.evaluation.metrics import dice, normalized_surface_dice
from voxtext.evaluation.segmentation_eval import evaluate_case, evaluate_folders
from voxtext.segmentation import Segmentation
from voxtext.training.cases import Target
from voxtext.volume import Volume

SHAPE = (24, 24, 24)


def cube(start, size=10, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_dice_of_offset_cubes_and_empty_masks():
    a = cube((2, 2, 2))
    assert dice(a, cube((4, 2, 2))) == pytest.approx(2 * 800 / 2000)  # 8 x 10 x 10 overlap
    assert dice(a, cube((4, 4, 4))) == pytest.approx(2 * 512 / 2000)  # 8^3 overlap
    empty = np.zeros(SHAPE, bool)
    assert dice(empty, empty) == 1.0 and normalized_surface_dice(empty, empty, (1.0, 1.0, 1.0)) == 1.0
    assert dice(a, empty) == 0.0 and normalized_surface_dice(a, empty, (1.0, 1.0, 1.0)) == 0.0  # FP on an absent class


def nsd_of_unit_shift(s0: float) -> float:
    """Surfel NSD at 2 mm of a 10^3 cube and its copy shifted one voxel along axis 0 (spacing s0, 1, 1).

    Surfels sit between voxels; a flat cell has the area of a voxel face, an edge cell the diagonal plane
    through its 4 edge midpoints, a corner cell the triangle through its 3. Out of tolerance (s0 > 2):
    the whole bottom layer (face, 4 edges, 4 corners) and the top face's cells farther than 2 mm from the
    shifted side walls (the central 5 x 5); the same for the other cube, mirrored.
    """
    face, side = 81 * 1.0, 81 * s0
    vertical_edge, horizontal_edge = 9 * s0 * math.sqrt(0.5), 9 * math.hypot(s0 / 2, 0.5)
    corner = math.sqrt(1 + 2 * s0**2) / 8
    total = 2 * face + 4 * side + 4 * vertical_edge + 8 * horizontal_edge + 8 * corner
    out = face + 4 * horizontal_edge + 4 * corner + 25 * 1.0
    return 1 - out / total


def test_nsd_of_a_shift_under_and_over_tolerance_on_anisotropic_spacing():
    a, shifted = cube((5, 5, 5)), cube((6, 5, 5))
    assert normalized_surface_dice(a, shifted, (2.0, 1.0, 1.0)) == pytest.approx(1.0)  # shift 2.0 mm <= 2 mm
    assert normalized_surface_dice(a, shifted, (1.5, 4.0, 4.0)) == pytest.approx(1.0)  # spacing in array order
    over = normalized_surface_dice(a, shifted, (2.01, 1.0, 1.0))
    assert over == pytest.approx(nsd_of_unit_shift(2.01), abs=1e-5) and over < 0.85
    assert normalized_surface_dice(a, shifted, (4.0, 1.5, 1.5), tolerance_mm=4.0) == pytest.approx(1.0)
    # A cube 3 voxels inside another (3 mm and 2.4 mm apart) overlaps but has no surface within 2 mm.
    inner = cube((8, 8, 8), size=4)
    assert normalized_surface_dice(a, inner, (1.0, 0.8, 0.8)) == 0.0 and dice(a, inner) > 0.1


def test_instance_f1_two_matched_one_missed_one_spurious():
    gt = np.zeros((20, 20, 20), np.int16)
    gt[1:5, 1:5, 1:5] = 7  # matched exactly
    gt[1:5, 10:14, 1:5] = 3  # matched with IoU 48/64 = 0.75
    gt[12:16, 12:16, 12:16] = 9  # missed
    pred = np.zeros(gt.shape, bool)
    pred[1:5, 1:5, 1:5] = True
    pred[1:4, 10:14, 1:5] = True
    pred[12:16, 1:5, 12:16] = True  # spurious
    score = instance_f1(connected_components(pred), gt)
    assert (score.true_positives, score.predicted, score.reference) == (3 - 1, 3, 3)
    assert score.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert score.dsc_tp == pytest.approx((1.0 + 2 * 48 / (64 + 48)) / 2)
    # IoU 0.25 < 0.5 is no match; 6-connectivity keeps diagonal neighbours apart.
    assert instance_f1(connected_components(cube((1, 1, 1), 2, gt.shape)), cube((1, 1, 1), 4, gt.shape)).f1 == 0.0
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 0] = True
    assert connected_components(diagonal).max() == 2
    empty = np.zeros(gt.shape, np.int16)
    assert instance_f1(empty, empty).f1 == 1.0 and instance_f1(empty, gt).f1 == 0.0


TARGETS = [Target(("liver", "hepatic parenchyma"), (1,)), Target(("spleen",), (2,))]
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def write_ground_truth(root, cases: dict[str, np.ndarray], prompts: dict) -> None:
    (root / "labels").mkdir(parents=True)
    for name, labels in cases.items():
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), AFFINE), str(root / "labels" / f"{name}.nii.gz"))
    (root / "prompts.json").write_text(json.dumps(prompts))


def write_prediction(root, name: str, masks: dict[str, np.ndarray]) -> None:
    root.mkdir(exist_ok=True)
    Segmentation(np.stack(list(masks.values())), list(masks), AFFINE).save_nifti(root / f"{name}.nii.gz")


def semantic_folders(tmp_path):
    """Case a: liver off by 2 voxels (DSC 0.8), spleen absent but predicted (0). Case b: both exact (1, 1)."""
    liver, spleen = cube((2, 2, 2)), cube((14, 14, 14), 6)
    write_ground_truth(tmp_path / "gt", {"a": liver.astype(np.uint8), "b": liver + 2 * spleen},
                       {"1": ["liver", "hepatic parenchyma"], "2": ["spleen"]})
    write_prediction(tmp_path / "pred", "a", {"Hepatic parenchyma": cube((4, 2, 2)), "spleen": cube((16, 16, 16), 4)})
    write_prediction(tmp_path / "pred", "b", {"liver": liver, "spleen": spleen})
    return tmp_path / "pred", tmp_path / "gt"


def test_eval_seg_cli_writes_csv_summary_and_plot(tmp_path, capsys):
    pred, gt = semantic_folders(tmp_path)
    assert main(["eval-seg", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    got = {(r["case"], r["name"]): (float(r["dsc"]), float(r["nsd"]), r["f1"]) for r in rows}
    assert got[("a", "liver")][0] == pytest.approx(0.8) and got[("a", "spleen")][:2] == (0.0, 0.0)
    assert got[("b", "liver")][:2] == got[("b", "spleen")][:2] == (1.0, 1.0) and got[("a", "liver")][2] == ""
    assert got[("a", "liver")][1] == pytest.approx(1.0)  # shifted 2 voxels of 1 mm: within 2 mm
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| 1 liver | 2 | 0.9000 ± 0.1414 |" in summary and "| 2 spleen | 2 | 0.5000 ± 0.7071 |" in summary
    assert "| **all classes** (case means) | 2 | 0.7000 ± 0.4243 |" in summary  # case means 0.4 and 1.0
    assert (tmp_path / "out" / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.9000 ± 0.1414" in capsys.readouterr().out
    assert main(["eval-seg", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "strict"),
                 "--tolerance-mm", "1.5"]) == 0
    rows = csv.DictReader((tmp_path / "strict" / "metrics.csv").open())
    (strict,) = [r for r in rows if r["case"] == "a" and r["name"] == "liver"]
    assert 0.0 < float(strict["nsd"]) < 1.0 and float(strict["dsc"]) == pytest.approx(0.8)


def test_eval_seg_instance_mode_reports_f1(tmp_path):
    gt = np.zeros(SHAPE, np.uint8)
    gt[cube((1, 1, 1), 4)], gt[cube((1, 12, 1), 4)], gt[cube((15, 15, 15), 4)] = 1, 2, 3
    write_ground_truth(tmp_path / "gt", {"c": gt}, {"1": ["lesion"]})
    found = cube((1, 1, 1), 4) | cube((1, 12, 1), 4) | cube((15, 1, 15), 4)  # 2 matched, 1 missed, 1 spurious
    write_prediction(tmp_path / "pred", "c", {"lesion": found})
    assert main(["eval-seg", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "out"), "--instance"]) == 0
    (row,) = csv.DictReader((tmp_path / "out" / "metrics.csv").open())
    assert float(row["f1"]) == pytest.approx(2 / 3, abs=1e-6) and float(row["dsc_tp"]) == 1.0
    assert float(row["dsc"]) == pytest.approx(2 * 128 / (192 + 192))  # union masks
    assert "F1" in (tmp_path / "out" / "summary.md").read_text().splitlines()[0]


def test_evaluation_rejects_mismatched_inputs(tmp_path, capsys):
    pred, gt = semantic_folders(tmp_path)
    volume = Volume(np.zeros(SHAPE, np.uint8), AFFINE)
    with pytest.raises(InputError, match="'kidney' is none of the phrasings"):
        evaluate_case("x", volume, {1: "kidney"}, volume, TARGETS)
    with pytest.raises(InputError, match="'liver' and 'hepatic parenchyma' both name class 1"):
        evaluate_case("x", volume, {1: "liver", 2: "hepatic parenchyma"}, volume, TARGETS)
    with pytest.raises(InputError, match="prediction grid"):
        evaluate_case("x", Volume(np.zeros(SHAPE, np.uint8), np.eye(4)), {}, volume, TARGETS)
    with pytest.raises(InputError, match="one class"):
        evaluate_case("x", volume, {}, volume, TARGETS, instance=True)
    (pred / "b.nii.gz").unlink()
    with pytest.raises(InputError, match="no prediction for case"):
        evaluate_folders(pred, gt)
    (pred / "a.json").unlink()
    assert main(["eval-seg", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "o")]) == 2
    assert "no prediction for case(s) b" in capsys.readouterr().err
