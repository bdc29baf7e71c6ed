"""Training: a short run learns, checkpoints reload and resume, DDP runs with two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from voxtext.checkpoints import build_esica, load_esica
from voxtext.errors import InputError
from voxtext.evaluation.metrics import dice
from voxtext.models.esica import ESICAConfig
from voxtext.models.esica.text import load_tokenizer
from voxtext.phantom import LABELS
from voxtext.training.cases import CropSampler, Target, TrainingCase, batch_stream, crop
from voxtext.training.seg_trainer import (
    SegLoss,
    SegTrainer,
    StageConfig,
    TrainConfig,
    dice_focal_loss,
    foreground_bce,
    warmup_cosine,
)
from voxtext.training.train_seg import folder_cases, read_prompts

TEXT = "sentence-transformers/all-MiniLM-L6-v2"
TINY = dict(image_size=(16, 16, 16), embed_dim=32, transformer_depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1,
            encoder_channels=(8, 8, 16, 16, 32), encoder_blocks=(1, 1, 1, 1, 1), decoder_hidden_dim=8,
            text_model=TEXT, text_pooling="mean", text_weights="text_model", target_spacing=2.0)


def shapes_case(seed: int) -> TrainingCase:
    """A bright cube (label 1) and a dim ball (label 2) at random places in a 24^3 volume."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.2, 0.02, (24, 24, 24)).clip(0.01, 1).astype(np.float32)
    labels = np.zeros(image.shape, np.int16)
    c = rng.integers(4, 12, 3)
    labels[c[0] : c[0] + 6, c[1] : c[1] + 6, c[2] : c[2] + 6] = 1
    zz, yy, xx = np.mgrid[:24, :24, :24]
    b = rng.integers(14, 19, 3)
    labels[(zz - b[0]) ** 2 + (yy - b[1]) ** 2 + (xx - b[2]) ** 2 <= 9] = 2
    image[labels == 1] = 0.9
    image[labels == 2] = 0.5
    return TrainingCase(f"shapes/{seed}", "shapes", image, labels,
                        [Target(("cube", "bright box"), (1,)), Target(("ball", "grey sphere"), (2,))])


def predict_dice(model, tokenizer, case: TrainingCase, prompt: str, values) -> float:
    centre = [s // 2 for s in case.image.shape]
    image = torch.from_numpy(crop(case.image, centre, (16, 16, 16)))[None, None]
    tokens = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(image, tokens["input_ids"], tokens["attention_mask"])
    truth = crop(np.isin(case.labels, values), centre, (16, 16, 16))
    return dice(logits[0, 0].numpy() > 0, truth)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def test_dice_per_prompt_weighs_small_structures_and_penalises_false_positives_on_empty_targets():
    loss = dice_focal_loss(StageConfig("s", 1))
    large, small = torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16)
    large[..., :12, :, :] = 1
    small[..., 7:9, 7:9, 7:9] = 1
    target = torch.cat([large, small])
    right = torch.where(target > 0, 8.0, -8.0)
    small_missed = right.clone()
    small_missed[1] = -8.0
    # Missing an 8-voxel structure costs about as much as it would alone, not 8 / 3000 of the batch ...
    assert loss(small_missed, target) - loss(right, target) > 0.4
    batch = dice_focal_loss(StageConfig("s", 1, batch_dice=True))
    assert batch(small_missed, target) - batch(right, target) < 0.05  # ... as it does with Dice over the batch.
    empty = torch.zeros(1, 1, 16, 16, 16)
    silent = torch.full((1, 1, 16, 16, 16), -12.0)
    spots, blob = silent.clone(), silent.clone()
    spots[..., :2, :2, :2] = 8.0
    blob[..., :8, :8, :8] = 8.0
    # An absent structure: its Dice grows with the predicted volume and stays near 0 when nothing is predicted;
    # with MONAI's default smoothing it is saturated as soon as anything is predicted.
    assert loss.dice(silent, empty) < 0.05 < loss.dice(spots, empty) < loss.dice(blob, empty) - 0.05
    saturated = dice_focal_loss(StageConfig("s", 1, dice_smooth=1e-5)).dice
    assert saturated(blob, empty) - saturated(spots, empty) < 0.01


def test_foreground_term_pulls_a_missed_small_structure_as_hard_as_a_large_one():
    large, small = torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16)
    large[..., :12, :, :] = 1
    small[..., 7:9, 7:9, 7:9] = 1
    missed = torch.full((1, 1, 16, 16, 16), -20.0)  # a saturated "always empty" answer
    # Per prompt, each missed foreground voxel costs its BCE (about 20 here) whatever the structure's size ...
    assert foreground_bce(missed, small).item() == pytest.approx(20.0, abs=1e-3)
    assert foreground_bce(missed, large).item() == pytest.approx(20.0, abs=1e-3)
    # ... while the focal mean over the crop hardly notices 8 missed voxels out of 4096.
    plain = dice_focal_loss(StageConfig("s", 1))
    assert plain.focal(missed, small).item() < 0.05 * foreground_bce(missed, small).item()
    # Empty targets (absent structures) add nothing; the stage weight scales the term.
    found = torch.where(small > 0, 8.0, -8.0)
    assert foreground_bce(found, small).item() < 1e-3
    assert foreground_bce(missed, torch.zeros_like(small)).item() == 0.0
    weighted = SegLoss(StageConfig("s", 1, foreground_weight=0.5))
    assert weighted(missed, small) - SegLoss(StageConfig("s", 1))(missed, small) == pytest.approx(10.0, abs=1e-2)


def test_sampler_labels_match_prompts_and_absent_prompts_are_empty():
    cases = [shapes_case(0)]
    cases[0].targets.append(Target(("pyramid",), (7,)))  # never present
    sampler = CropSampler(cases, (16, 16, 16), pos_ratio=1.0, absent_prompt_prob=0.5, seed=1)
    seen: dict[str, list[bool]] = {}
    for _ in range(60):
        s = sampler.sample()
        assert s.image.shape == s.label.shape == (1, 16, 16, 16) and len(s.prompts) == 1
        seen.setdefault(s.prompts[0], []).append(bool(s.label.any()))
        if s.label.any() and s.prompts[0] in ("cube", "bright box"):
            # The bright cube, not the dim ball: the prompt decides what is labelled.
            assert s.image[s.label].mean() > s.image[(s.image > 0) & ~s.label].mean()
    assert not any(seen["pyramid"])
    # A structure outside the crop is asked for with an empty label; inside it, with its mask.
    cube = seen.get("cube", []) + seen.get("bright box", [])
    assert any(cube) and not all(cube)
    # Without absent prompts every sample shows its structure.
    sampler = CropSampler(cases, (16, 16, 16), pos_ratio=1.0, absent_prompt_prob=0.0, seed=2)
    assert all(sampler.sample().label.any() for _ in range(30))


def test_sampler_asks_each_crop_for_distinct_structures():
    case = shapes_case(0)
    case.targets.append(Target(("pyramid",), (7,)))  # never present
    names = {"cube": "cube", "bright box": "cube", "ball": "ball", "grey sphere": "ball", "pyramid": "pyramid"}
    roi = (48, 48, 48)  # twice the volume: every crop holds the whole of the cube and the ball
    sampler = CropSampler([case], roi, pos_ratio=0.0, absent_prompt_prob=0.0, seed=3, prompts_per_crop=3)
    for _ in range(10):
        s = sampler.sample()
        assert s.label.shape == (3, *roi) and len(s.prompts) == 3
        asked = [names[p] for p in s.prompts]
        assert sorted(asked[:2]) == ["ball", "cube"] and asked[2] in ("ball", "cube")  # both before a repeat
        for prompt, label in zip(asked, s.label):
            assert label.sum() == (case.labels == (1 if prompt == "cube" else 2)).sum()
        cube, ball = s.label[asked.index("cube")], s.label[asked.index("ball")]
        assert s.image[0][cube].mean() > s.image[0][ball].mean()  # each label is its own structure
    # With absent prompts allowed, the structure not in the crop is asked too, with an empty label.
    sampler = CropSampler([case], roi, pos_ratio=0.0, absent_prompt_prob=0.5, seed=4, prompts_per_crop=3)
    samples = [sampler.sample() for _ in range(20)]
    pyramid = [label for s in samples for p, label in zip(s.prompts, s.label) if p == "pyramid"]
    assert pyramid and not any(label.any() for label in pyramid)
    with pytest.raises(ValueError, match="prompts_per_crop"):
        CropSampler([case], (24, 24, 24), prompts_per_crop=0)


def test_sampler_places_crops_on_weighted_targets_and_asks_their_anchor():
    def ball_share(weight: float, stage_factors: dict[str, float] | None = None) -> float:
        shapes = shapes_case(0)
        case = TrainingCase(shapes.name, shapes.group, shapes.image, shapes.labels,
                            [shapes.targets[0], Target(("ball",), (2,), anchor_weight=weight)])
        # 8^3 crops around a voxel of the chosen target: most hold only that structure
        sampler = CropSampler([case], (8, 8, 8), pos_ratio=1.0, seed=5, anchor_weights=stage_factors)
        return np.mean([sampler.sample().prompts[0] == "ball" for _ in range(400)])

    # The anchor is asked first, so the prompt follows the weights: 1:1 -> about 1/2, 4:1 -> about 4/5.
    assert 0.4 < ball_share(1.0) < 0.6
    assert 0.72 < ball_share(4.0) < 0.88
    # A stage's factors multiply the targets' own weights: 4 x 1 = 4:1, and 2 x 2 against 4 = 1:1.
    assert 0.72 < ball_share(1.0, {"ball": 4.0}) < 0.88
    assert 0.4 < ball_share(2.0, {"ball": 2.0, "cube": 4.0}) < 0.6


def test_default_main_model_asks_phantom_lesions_only_as_absent():
    from voxtext.training.default_model import LESION_LABELS, phantom_case

    cases = ((seed, phantom_case(seed)) for seed in range(1, 20))
    seed, with_lesions = next((s, c) for s, c in cases if set(np.unique(c.labels).tolist()) & LESION_LABELS)
    case = phantom_case(seed, lesions=False)
    lesion_names = {t.name for t in with_lesions.present if set(t.values) <= LESION_LABELS}
    assert lesion_names and not lesion_names & {t.name for t in case.present}
    liver = next(t for t in case.present if t.name == "liver")
    assert set(liver.values) >= {LABELS["liver cyst"], LABELS["liver tumor"]}  # organs keep their lesions
    phrasings = {p: t for t in case.targets for p in t.phrasings}
    sampler = CropSampler([case], (48, 48, 48), pos_ratio=1.0, absent_prompt_prob=0.5, seed=6, prompts_per_crop=4)
    samples = [sampler.sample() for _ in range(20)]
    asked = [(phrasings[p], label) for s in samples for p, label in zip(s.prompts, s.label)]
    lesion_answers = [label for t, label in asked if t.name in lesion_names]
    assert lesion_answers and not any(label.any() for label in lesion_answers)
    assert any(label.any() for t, label in asked if t.values)  # organs in the crop come with their masks


def test_prompts_per_image_shares_one_encoding():
    torch.manual_seed(0)
    model = build_esica(ESICAConfig(**TINY)).eval()
    tokens = load_tokenizer(TEXT)(["cube", "ball", "grey sphere", "bright box"], padding=True, return_tensors="pt")
    images = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        shared = model(images, tokens["input_ids"], tokens["attention_mask"], prompts_per_image=2)
        one_by_one = model(images.repeat_interleave(2, dim=0), tokens["input_ids"], tokens["attention_mask"])
    assert shared.shape == (4, 1, 16, 16, 16)
    torch.testing.assert_close(shared, one_by_one, rtol=1e-4, atol=1e-5)


def test_short_training_lowers_loss_raises_dice_and_resumes(tmp_path):
    torch.manual_seed(0)
    cases = [shapes_case(s) for s in range(8)]
    held_out = shapes_case(99)
    tokenizer = load_tokenizer(TEXT)
    model = build_esica(ESICAConfig(**TINY))
    before = np.mean([predict_dice(model, tokenizer, held_out, p, v) for p, v in (("cube", 1), ("ball", 2))])

    def data(stage, rank, world):
        # 2 crops a step, each asked for 2 structures (the trainer's (B, K) label path)
        return batch_stream(CropSampler(cases, (16, 16, 16), stage.pos_ratio, seed=rank, prompts_per_crop=2),
                            tokenizer, 2)

    config = TrainConfig(str(tmp_path / "run"), [StageConfig("pretrain", 60, lr=3e-3)], log_every=10, save_every=30,
                         batch_size=2, prompts_per_crop=2)
    final = SegTrainer(model, config, data).fit()
    rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    losses = [float(r[2]) for r in rows]
    assert losses[-1] < 0.7 * losses[0]
    trained, _ = load_esica(final)
    after = np.mean([predict_dice(trained, tokenizer, held_out, p, v) for p, v in (("cube", 1), ("ball", 2))])
    assert after > before + 0.25 and after > 0.4
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 1000

    # A longer schedule in the same folder resumes from the saved state instead of starting over.
    config.stages[0].steps = 70
    SegTrainer(build_esica(ESICAConfig(**TINY)), config, data).fit()
    steps = [int(r.split(",")[1]) for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[-1] == 70 and steps.count(10) == 1


def write_folder(root, n=2):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(n):
        case = shapes_case(i)
        nib.save(nib.Nifti1Image(case.image * 100, affine), str(root / "images" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(case.labels.astype(np.uint8), affine), str(root / "labels" / f"c{i}.nii.gz"))
    (root / "prompts.json").write_text(json.dumps({"1": ["cube"], "2": ["ball"]}))


def test_nifti_folder_validation(tmp_path):
    write_folder(tmp_path / "ok")
    cases = folder_cases(tmp_path / "ok", 2.0)
    assert len(cases) == 2 and {t.name for t in cases[0].present} == {"cube", "ball"}
    (tmp_path / "ok" / "prompts.json").write_text('{"one": ["cube"]}')
    with pytest.raises(InputError, match="integer label values"):
        read_prompts(tmp_path / "ok")
    (tmp_path / "ok" / "prompts.json").write_text('{"1": []}')
    with pytest.raises(InputError, match="non-empty"):
        read_prompts(tmp_path / "ok")
    (tmp_path / "ok" / "prompts.json").write_text('{"1": ["cube"]}')
    (tmp_path / "ok" / "labels" / "c1.nii.gz").unlink()
    with pytest.raises(InputError, match="no label map"):
        folder_cases(tmp_path / "ok", 2.0)


def test_ddp_with_two_gloo_processes(tmp_path):
    write_folder(tmp_path / "data")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "voxtext", "train-seg", "--data", str(tmp_path / "data"), "--model-config",
               str(tmp_path / "tiny.json"), "--out", str(out), "--steps", "4", "2", "--batch-size", "2",
               "--save-every", "100", "--foreground-weight", "0.5"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["extra"]["world_size"] == 2
    assert [stage["foreground_weight"] for stage in saved["stages"]] == [0.5, 0.5]
    assert (out / "final" / "model.safetensors").exists()
    assert len((out / "metrics.csv").read_text().splitlines()) > 1
