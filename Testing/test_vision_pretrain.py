"""Dense vision-tower pretraining (stage 0 of the default VLM recipe) and the frozen-tower ``language`` stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from voxtext.errors import CheckpointError, InputError
from voxtext.models.dcformer import DCFormer, med3dvlm_config
from voxtext.models.med3dvlm import prepare_volume, prepare_volume_and_labels
from voxtext.phantom import LABELS, generate_phantom
from voxtext.training import default_vlm
from voxtext.training.train_vlm import ModelSize, Stage, build_model, set_trainable, train
from voxtext.training.vision_pretrain import (
    LESION_LABELS,
    ORGAN_LABELS,
    DenseHeads,
    dense_targets,
    pretrain_vision_tower,
)
from voxtext.training.vlm_data import phantom_cases
from voxtext.volume import Volume

SIZE = (32, 32, 32)
WINDOW = (-150.0, 250.0)


def test_labels_follow_the_image_through_reorientation_crop_and_resize():
    rng = np.random.default_rng(0)
    array = np.zeros((40, 30, 20), np.float32)
    array[5:35, 4:26, 3:17] = rng.uniform(10, 20, (30, 22, 14))
    array[10:20, 8:14, 5:9] = 100.0  # a bright box, also labelled
    labels = (array == 100.0).astype(np.uint8)
    affine = np.diag([-1.5, 2.0, -3.0, 1.0])  # axes flipped and anisotropic: reorientation matters
    volume = Volume(array, affine, "CT")
    image, label_map = prepare_volume_and_labels(volume, labels, (16, 16, 16))
    torch.testing.assert_close(image, prepare_volume(volume, (16, 16, 16)))
    bright = image[0, 0] > 0.9
    assert label_map.dtype == torch.int64 and label_map.shape == (16, 16, 16)
    assert bright.any() and (label_map.bool() == bright).float().mean() > 0.97
    with pytest.raises(InputError, match="label map shape"):
        prepare_volume_and_labels(volume, labels[:-1], (16, 16, 16))


def test_dense_targets_are_cell_shares_and_lesion_presence():
    seed = 5  # phantom_lesions(5) = 0.5: this one has lesions
    image, cells, present = dense_targets(seed, SIZE, WINDOW)
    assert image.shape == (1, *SIZE) and cells.shape == (len(ORGAN_LABELS + LESION_LABELS), 8, 8, 8)
    assert cells.min() >= 0 and cells.sum(0).max() <= 1 + 1e-6  # labels are exclusive: shares add up to <= 1
    assert cells[ORGAN_LABELS.index(LABELS["liver"])].max() == 1  # whole cells inside the liver
    ph = generate_phantom(seed, shape=SIZE, lesions=0.5)
    painted = {f["label"] for f in ph.findings}
    # a presence flag is never set for a lesion the phantom lacks (a 1-voxel one may vanish when resized)
    assert all(v in painted for v, p in zip(LESION_LABELS, present) if p)
    assert torch.equal(present.bool(), cells[len(ORGAN_LABELS):].flatten(1).amax(1) > 0)


def test_pretraining_lowers_the_dense_loss_and_changes_the_tower(tmp_path):
    torch.manual_seed(0)
    tower = DCFormer(med3dvlm_config("nano"))
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    losses = pretrain_vision_tower(tower, SIZE, WINDOW, steps=40, lr=3e-3, batch_size=4, log=tmp_path / "m.csv",
                                   log_every=10)
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert (tmp_path / "m.csv").read_text().count("\nvision,") == 4
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items() if v.is_floating_point())
    cells, presence = DenseHeads(tower, SIZE)(torch.zeros(2, 1, *SIZE))
    assert cells.shape == (2, len(ORGAN_LABELS + LESION_LABELS), 8, 8, 8) and presence.shape == (2, 6)


def test_language_stage_keeps_the_pretrained_tower(tmp_path):
    size = ModelSize(image_size=SIZE, hidden_size=32, layers=1, heads=4, kv_heads=2, intermediate_size=64,
                     image_window=WINDOW)
    torch.manual_seed(1)
    tower = DCFormer(med3dvlm_config("nano"))
    for p in tower.parameters():
        torch.nn.init.normal_(p, std=0.02)  # unlike a fresh tower's initialisation
    cases = phantom_cases(range(3), size.image_size, size.image_window)
    folder, losses = train(cases, tmp_path, size, [Stage("language", 4, 3e-3)], batch_size=2, log_every=1,
                           vision_weights=tower.state_dict())
    assert len(losses) == 4
    saved = load_file(str(folder / "model.safetensors"))
    for key, value in tower.state_dict().items():  # loaded, then frozen (BatchNorm statistics included)
        torch.testing.assert_close(saved["model.vision_tower.vision_tower." + key], value, atol=0, rtol=0)
    model = build_model(size, AutoTokenizer.from_pretrained(tmp_path / "tokenizer"))
    trainable = {n for n, p in model.named_parameters() if p in set(set_trainable(model, "language"))}
    assert trainable == {n for n, _ in model.named_parameters() if ".vision_tower." not in n}
    assert any("mm_projector" in n for n in trainable) and any("layers.0" in n for n in trainable)
    with pytest.raises(InputError, match="unknown stage"):
        set_trainable(model, "vision")


def test_recipe_continues_stage_0_from_a_saved_tower_or_skips_it(tmp_path):
    """``default_vlm``: ``--vision-tower`` (a whole model's ``model.safetensors``) starts stage 0 from that tower,
    and with ``--vision-steps 0`` stage 1 gets it unchanged."""
    small = ["--cases", "4", "--steps", "2", "--eval-cases", "4", "--threads", "1"]
    assert default_vlm.main(["--out", str(tmp_path / "a"), "--vision-steps", "2", *small]) == 0
    first = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    tower_keys = [k for k in first if k.startswith("model.vision_tower.") and first[k].is_floating_point()]
    runs = {"skip": ["--vision-steps", "0"], "continue": ["--vision-steps", "1", "--vision-seed", "1"]}
    for name, steps in runs.items():
        assert default_vlm.main(["--out", str(tmp_path / name), "--vision-tower",
                                 str(tmp_path / "a" / "model" / "model.safetensors"), *steps, *small]) == 0
    skipped = load_file(str(tmp_path / "skip" / "model" / "model.safetensors"))
    continued = load_file(str(tmp_path / "continue" / "model" / "model.safetensors"))
    assert tower_keys and all(torch.equal(first[k], skipped[k]) for k in tower_keys)
    assert not (tmp_path / "skip" / "vision_metrics.csv").exists()
    # one AdamW step away from the given tower (a fresh initialisation would differ by far more)
    weights = [k for k in tower_keys if "running_" not in k]
    assert any(not torch.equal(first[k], continued[k]) for k in weights)
    assert max((first[k] - continued[k]).abs().max().item() for k in weights) < 1e-3
    rows = (tmp_path / "continue" / "vision_metrics.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["vision", "1"]]
    scores = json.loads((tmp_path / "skip" / "eval.json").read_text())
    assert scores["lesion_cases"]["closed_questions"] > 0 and scores["normal_cases"]["normal_cases"] == 1
    with pytest.raises(SystemExit):  # stage 1 on an untrained tower is refused
        default_vlm.main(["--out", str(tmp_path / "c"), "--vision-steps", "0", *small])
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no vision tower weights"):
        default_vlm.main(["--out", str(tmp_path / "c"), "--vision-tower", str(tmp_path / "other.safetensors"), *small])
