"""train-clip: SigLIP pretraining lowers the loss and learns retrieval, saves the published layout, resumes
exactly, and runs under DDP with 2 gloo processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from voxtext.cli import main as cli_main
from voxtext.evaluation.retrieval import recall_at_k
from voxtext.findings import FindingsRanker
from voxtext.models.dcformer import load_dcformer, med3dvlm_config
from voxtext.models.esica.text import load_tokenizer
from voxtext.models.siglip import load_siglip
from voxtext.training.seg_trainer import seed_everything
from voxtext.training.train_clip import DEFAULT_TOKENIZER, ClipSize, Schedule, build_siglip, retrieval_recall, train
from voxtext.training.vlm_data import phantom_cases
from voxtext.volume import Volume

# The SigLIP paper's initialisation (t' = log 10, b = -10) and beta2 0.95. A model this small first collapses to constant
# embeddings (loss ~ the constant-logit optimum, 2.249 for 4 pairs) and needs 60+ steps at a constant lr to recover
# (seen by hand): more than a CPU test affords, so retrieval gains are not asserted here.
TINY = ClipSize(image_size=(16, 16, 16), vision_variant="nano", embed_dim=32, text_dim=32, text_layers=1, text_heads=2,
                max_length=32, t_prime=math.log(10), bias=-10.0)
SEEDS = (0, 2, 3, 4)  # phantoms differing in contrast phase or liver lesion (the first 32 report tokens)
PAIRS = len(SEEDS)
STEPS = 30


@pytest.fixture(scope="module")
def cases():
    return phantom_cases(SEEDS, TINY.image_size, TINY.image_window)


@pytest.fixture(scope="module")
def run(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "run"
    folder, losses = train(lambda size: cases, out, TINY, Schedule(STEPS, lr=5e-3, warmup_ratio=0.0, adam_beta2=0.95,
                                                                 log_every=5),
                           batch_size=PAIRS)
    return out, folder, losses


def test_training_lowers_the_loss_and_reports_retrieval(cases, run):
    out, folder, losses = run
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER)
    seed_everything(0)  # train() seeds 0 before building the model: this is its starting point
    start_model = build_siglip(TINY, tokenizer)
    start_loss = start_model.train()(torch.stack([c.image for c in cases]).float(),
                                     **{k: v for k, v in tokenizer([c.report for c in cases], padding=True,
                                                                   truncation=True, max_length=TINY.max_length,
                                                                   return_tensors="pt").items()
                                        if k in ("input_ids", "attention_mask")}).loss.item()
    assert losses[-1] < 0.7 * min(losses[0], start_loss)
    trained = load_siglip(folder, med3dvlm_config("nano"))
    recall = retrieval_recall(trained, tokenizer, cases, TINY.max_length)
    ranker = FindingsRanker(folder, device="cpu")  # the eval-retrieval path gives the same similarities
    with torch.no_grad():
        images = torch.cat([ranker.model.encode_image(c.image[None].float()) for c in cases])
        texts = ranker.encode_findings([c.report for c in cases])
    assert recall == pytest.approx(recall_at_k(images @ texts.T, (1, 5)))
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss,lr,elapsed_s" and len(rows) == 1 + STEPS // 5
    assert (out / "training_curve.png").stat().st_size > 0


def test_saved_folder_has_the_published_layout_and_ranks_findings(cases, run, tmp_path):
    _, folder, _ = run
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dec_clip" and config["loss_type"] == "sigmoid"
    assert config["input_size"] == [16, 16, 16] and config["vision_variant"] == "nano"
    model = load_siglip(folder, med3dvlm_config("nano"))  # strict: every key and shape
    weights = load_file(folder / "model.safetensors")
    assert model.t_prime.item() == pytest.approx(weights["t_prime"].item())
    assert model.t_prime.item() != pytest.approx(config["t_prime"])  # trained away from its initial value
    vit = load_dcformer(folder / "pretrained_ViT.bin", med3dvlm_config("nano"))
    assert all(torch.equal(v, weights[f"vision_encoder.{k}"]) for k, v in vit.state_dict().items())
    ranker = FindingsRanker(folder, device="cpu")
    assert ranker.image_size == TINY.image_size and ranker.tokenizer("liver")["input_ids"][0] == 101  # [CLS]
    phrases = ["simple cyst in the liver", "solid mass in the kidney", "normal size and attenuation"]
    volume = Volume(cases[1].image[0].float().numpy(), np.diag([12.0, 12.0, 12.0, 1.0]), "CT")
    ranked = ranker.rank(volume, phrases)
    assert sorted(f.text for f in ranked) == sorted(phrases)
    assert [f.logit for f in ranked] == sorted((f.logit for f in ranked), reverse=True)
    path = tmp_path / "ct.nii.gz"
    volume.save(path)
    assert cli_main(["findings", str(path), "--model", str(folder), "--device", "cpu", "--findings", *phrases]) == 0


def test_interrupted_run_resumes_to_the_same_weights(cases, tmp_path):
    plan = Schedule(3, lr=1e-3, log_every=1)
    straight, _ = train(lambda size: cases, tmp_path / "straight", TINY, plan, batch_size=2)
    stopped, _ = train(lambda size: cases, tmp_path / "resumed", TINY, replace(plan, stop_after=1), batch_size=2)
    assert stopped is None and (tmp_path / "resumed" / "last" / "model.safetensors").is_file()
    after_one = load_file(tmp_path / "resumed" / "last" / "model.safetensors")
    resumed, _ = train(lambda size: cases, tmp_path / "resumed", TINY, plan, batch_size=2)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    assert any(not torch.equal(a[k], v) for k, v in after_one.items())  # the resumed run did train on
    steps = [line.split(",")[:2] for line in (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [["siglip", str(s)] for s in range(1, 4)]


def test_ddp_with_two_gloo_processes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               "-m", "voxtext", "train-clip", "--phantoms", "4", "--val", "2", "--out", str(out), "--steps", "2",
               "--batch-size", "2", "--image-size", "16", "16", "16", "--embed-dim", "16", "--text-dim", "16",
               "--text-layers", "1", "--text-heads", "2", "--max-length", "64", "--threads", "1", "--log-every", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and json.loads((out / "train_config.json").read_text())["cases"] == 4
    first, second = summary["parameter_checksums"]
    assert first == pytest.approx(second, rel=1e-9, abs=1e-9)  # DDP kept both processes' weights identical
    model = load_siglip(out / "model", med3dvlm_config("nano"))
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    assert first == pytest.approx([float(flat.sum()), float((flat * flat).sum())], rel=1e-9, abs=1e-9)
    assert set(summary["val_retrieval"]) == {"image_to_text@1", "image_to_text@5", "text_to_image@1",
                                             "text_to_image@5"}
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # one header, one row per step (process 0)
    assert "model in" in done.stdout
