"""CVPR 2025 BiomedSegFM npz cases: round trip, validation, model-grid preparation, folder listing, train-seg."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
from test_training import TINY

from voxtext.data.biomedsegfm import (
    PROMPTS_FILE,
    ClassPrompts,
    NpzCase,
    npz_folder_cases,
    read_class_prompts,
    read_npz_case,
    training_case,
    write_npz_case,
)
from voxtext.errors import InputError
from voxtext.training import train_seg
from voxtext.training.cases import Target

DEEPLESION = SHARED / "data" / "deeplesion_train" / "CT_Lesion_000001_02_01_008-023.npz"
VOCABULARY = SHARED / "data" / "cvpr25_prompts" / PROMPTS_FILE
SEMANTIC = {"1": ["liver", "the liver"], "2": ["spleen"], "instance_label": 0}


def vocabulary(folder: Path, table: dict) -> dict[str, ClassPrompts]:
    """``table`` written as the class-prompt JSON in ``folder`` and read back."""
    path = folder / PROMPTS_FILE
    path.write_text(json.dumps(table))
    return read_class_prompts(path)


def synthetic_case(prompts: dict | None = None) -> NpzCase:
    """(z, y, x) = (10, 20, 30) at (x, y, z) = (1.0, 1.5, 3.0) mm: intensity grows along x, liver in rows 5..9."""
    imgs = np.broadcast_to((1 + 8 * np.arange(30)).astype(np.uint8), (10, 20, 30)).copy()
    gts = np.zeros(imgs.shape, np.uint8)
    gts[2:5, 5:10, 10:20] = 1
    return NpzCase(imgs, (1.0, 1.5, 3.0), gts, prompts)


def test_npz_round_trip_keeps_arrays_spacing_and_prompts(tmp_path):
    case = synthetic_case({"1": "liver", "2": "spleen", "instance_label": 0})
    back = read_npz_case(write_npz_case(tmp_path / "CT_Test_001.npz", case))
    assert back.imgs.dtype == np.uint8 and np.array_equal(back.imgs, case.imgs)
    assert back.gts.dtype == np.uint8 and np.array_equal(back.gts, case.gts)
    assert back.spacing == (1.0, 1.5, 3.0) and back.zyx_spacing == (3.0, 1.5, 1.0)
    assert back.text_prompts == case.text_prompts
    assert back.prompts().classes == {1: ("liver",), 2: ("spleen",)} and not back.prompts().instance
    unlabelled = read_npz_case(write_npz_case(tmp_path / "test.npz", NpzCase(case.imgs, case.spacing)))
    assert unlabelled.gts is None and unlabelled.text_prompts is None


def test_npz_validation_names_the_problem(tmp_path):
    imgs = np.zeros((4, 5, 6), np.uint8)
    np.savez(tmp_path / "a.npz", imgs=imgs, gts=imgs)
    with pytest.raises(InputError, match=r"missing key\(s\) \['spacing'\]"):
        read_npz_case(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", imgs=imgs, gts=np.zeros((4, 5, 7), np.uint8), spacing=[1.0, 1.0, 1.0])
    with pytest.raises(InputError, match=r"gts shape \(4, 5, 7\) differs from imgs shape \(4, 5, 6\)"):
        read_npz_case(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", imgs=imgs, spacing=[1.0, 0.0, 1.0])
    with pytest.raises(InputError, match="spacing must be 3 positive"):
        read_npz_case(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", imgs=imgs[0], spacing=[1.0, 1.0, 1.0])
    with pytest.raises(InputError, match="3-D numeric"):
        read_npz_case(tmp_path / "d.npz")
    (tmp_path / "e.npz").write_text("not a zip")
    with pytest.raises(InputError, match="cannot read"):
        read_npz_case(tmp_path / "e.npz")


def test_text_prompts_are_unpickled_with_plain_types_only(tmp_path):
    np.savez(tmp_path / "evil.npz", imgs=np.zeros((2, 2, 2)), spacing=[1.0, 1.0, 1.0],
             text_prompts=np.array(tmp_path, dtype=object))  # a pathlib object: any class but numpy's is refused
    with pytest.raises(InputError, match="may not reference pathlib"):
        read_npz_case(tmp_path / "evil.npz")
    np.savez(tmp_path / "bad.npz", imgs=np.zeros((2, 2, 2)), spacing=[1.0, 1.0, 1.0],
             text_prompts=np.array({"1": "liver", "instance_label": 3}, dtype=object))
    with pytest.raises(InputError, match="instance_label must be 0 or 1"):
        read_npz_case(tmp_path / "bad.npz")


def test_training_case_is_on_the_model_grid_with_inference_intensities(tmp_path):
    path = write_npz_case(tmp_path / "case.npz", synthetic_case())
    case = training_case(path, vocabulary(tmp_path, {"CT_Test": SEMANTIC})["CT_Test"], "CT_Test", 1.5)
    # z: 10 x 3 mm, y: 20 x 1.5 mm, x: 30 x 1.0 mm, all 30 mm -> 20 voxels of 1.5 mm; nothing is cropped (imgs > 0).
    assert case.image.shape == case.labels.shape == (20, 20, 20)
    assert case.image.min() > 0 and case.image.max() <= 1.0
    # 0..255 -> 0..1 and axis order kept: the intensity ramp is along the last axis, as in imgs.
    assert np.allclose(case.image[0, 0], case.image[7, 13]) and np.all(np.diff(case.image[0, 0]) > 0)
    assert case.image[0, 0, 0] == pytest.approx(1 / 255, abs=0.03)
    assert case.image[0, 0, -1] == pytest.approx(0.9, abs=0.05)
    # y keeps its 1.5 mm grid, so the liver rows are exactly 5..9; z 2..4 (3 mm) -> 4..9 (1.5 mm).
    rows = np.flatnonzero(case.labels.any(axis=(0, 2)))
    slices = np.flatnonzero(case.labels.any(axis=(1, 2)))
    assert rows.tolist() == [5, 6, 7, 8, 9] and slices.tolist() == [4, 5, 6, 7, 8, 9]
    assert case.targets == [Target(("liver", "the liver"), (1,)), Target(("spleen",), (2,))]
    assert [t.name for t in case.present] == ["liver"] and case.group == "CT_Test"


def test_instance_dataset_is_one_target_over_all_instances(tmp_path):
    case = synthetic_case()
    case.gts[6:8, 12:16, 2:6] = 2
    case.gts[6:8, 12:16, 22:26] = 3
    path = write_npz_case(tmp_path / "les.npz", case)
    prompts = vocabulary(tmp_path, {"CT_Les": {"1": ["lesion", "tumour"], "instance_label": 1}})["CT_Les"]
    trained = training_case(path, prompts, "CT_Les", 1.5)
    assert prompts.instance and set(np.unique(trained.labels)) == {0, 1}
    assert trained.targets == [Target(("lesion", "tumour"), (1,))]
    # Three instances (1, 2, 3) of 150 + 32 + 32 voxels of 4.5 mm^3 -> the union at 1.5^3 mm^3.
    assert trained.mask(trained.targets[0]).sum() * 1.5**3 == pytest.approx(214 * 4.5, rel=0.1)


def test_folder_listing_by_folder_name_file_prefix_or_text_prompts(tmp_path):
    root = tmp_path / "npz"
    (root / "CT" / "CT_Test").mkdir(parents=True)
    write_npz_case(root / "CT" / "CT_Test" / "a.npz", synthetic_case())
    write_npz_case(root / "CT_Test_b.npz", synthetic_case())
    (root / PROMPTS_FILE).write_text(json.dumps({"CT": {"1": ["wrong"]}, "CT_Test": SEMANTIC}))
    cases = npz_folder_cases(root, 3.0)
    assert [c.name for c in cases] == ["a", "CT_Test_b"] and {c.group for c in cases} == {"CT_Test"}
    assert all(c.image.shape == (10, 10, 10) and c.targets[0].phrasings == ("liver", "the liver") for c in cases)
    write_npz_case(root / "MR_Other_c.npz", synthetic_case())
    with pytest.raises(InputError, match="MR_Other_c.npz: neither its folder nor its name"):
        npz_folder_cases(root, 3.0)
    (root / PROMPTS_FILE).unlink()
    with pytest.raises(InputError, match="has no text_prompts and there is no"):
        npz_folder_cases(root, 3.0)
    own = tmp_path / "own"
    own.mkdir()
    write_npz_case(own / "x.npz", synthetic_case({"1": "liver", "instance_label": 0}))
    (case,) = npz_folder_cases(own, 3.0)
    assert case.targets == [Target(("liver",), (1,))] and case.group == "own"


def test_train_seg_detects_the_npz_layout_and_trains(tmp_path):
    data = tmp_path / "npz"
    data.mkdir()
    for i in range(2):
        write_npz_case(data / f"s{i}.npz", synthetic_case({"1": "cube", "instance_label": 0}))
    assert [c.name for c in train_seg.data_cases(data, 2.0)] == ["s0", "s1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="neither images/"):
        train_seg.data_cases(empty, 2.0)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    out = tmp_path / "run"
    assert train_seg.main(["--data", str(data), "--model-config", str(tmp_path / "tiny.json"), "--out", str(out),
                           "--steps", "1", "1", "--batch-size", "1", "--save-every", "100"]) == 0
    assert (out / "final" / "model.safetensors").exists()


def test_cvpr25_vocabulary_loads():
    datasets = read_class_prompts(VOCABULARY)
    assert len(datasets) == 68 and sum(len(d.classes) for d in datasets.values()) == 326
    assert datasets["CT_AdrenalTumor"].instance and not datasets["CT_AMOS"].instance
    assert datasets["CT_Abdomen1K"].classes[1][0] == "Liver"


@pytest.mark.skipif(not DEEPLESION.exists(), reason="shared DeepLesion npz not available")
def test_real_deeplesion_case_keeps_its_lesion_volume(tmp_path):
    raw = read_npz_case(DEEPLESION)
    assert raw.imgs.shape == (16, 512, 512) and raw.zyx_spacing[0] == 5.0
    prompts = vocabulary(tmp_path, {"CT_Lesion": {"1": ["lesion"], "instance_label": 1}})["CT_Lesion"]
    case = training_case(DEEPLESION, prompts, "CT_Lesion", 1.5)
    assert case.image.shape[0] == round(16 * 5.0 / 1.5)  # 5 mm slices on axis 0, not the 0.31 mm of spacing[0]
    assert case.present and 0.0 <= case.image.min() and case.image.max() <= 1.0
    lesion_ml = raw.gts.astype(bool).sum() * np.prod(raw.spacing) / 1000
    assert case.labels.astype(bool).sum() * 1.5**3 / 1000 == pytest.approx(lesion_ml, rel=0.15)
