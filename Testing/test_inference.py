"""Sliding-window inference: one image encoding per window shared by every prompt."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from test_esica_conformance import build_fixture_model
from voxtext.errors import Cancelled, InputError
from voxtext.inference import EMPTY_WINDOW_LOGIT, ESICAInferer, WindowConfig, count_windows


@pytest.fixture(scope="module")
def inferer(esica_fixture):
    return ESICAInferer(build_fixture_model(esica_fixture), tokenizer=None, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def text(esica_fixture):
    inputs = np.load(esica_fixture / "inputs.npz")
    ids = torch.from_numpy(inputs["input_ids"])
    mask = torch.from_numpy(inputs["attention_mask"])
    model = build_fixture_model(esica_fixture)
    with torch.no_grad():  # three prompts: the two fixture prompts and the first again, shortened
        emb = model.encode_text(ids, mask)
        third = model.encode_text(ids[:1, :5], mask[:1, :5])
    return torch.cat([emb, third])


def volume(shape=(45, 40, 50), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32)
    image[:, :, :8] = 0.0  # a slab of background
    return torch.from_numpy(image)


def test_each_window_is_encoded_once_for_all_prompts(inferer, text):
    image = volume()
    calls = []
    hook = inferer.model.image_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        logits = inferer.logits(image, text, WindowConfig(overlap=0.5, batch_size=1, skip_empty=False))
    finally:
        hook.remove()
    roi = inferer.model.config.image_size
    assert len(calls) == count_windows(image.shape, roi, 0.5) > 1
    assert all(b == 1 for b in calls)
    assert logits.shape == (3, *image.shape)


def test_joint_prompts_equal_separate_runs(inferer, text):
    image = volume(seed=1)
    config = WindowConfig(overlap=0.25, batch_size=2, prompt_batch_size=2)
    joint = inferer.logits(image, text, config)
    for p in range(text.shape[0]):
        alone = inferer.logits(image, text[p : p + 1], config)
        torch.testing.assert_close(joint[p : p + 1], alone, atol=1e-5, rtol=1e-5)


def test_empty_windows_are_skipped_and_background(inferer, text):
    image = torch.zeros(40, 40, 40)
    image[:4, :4, :4] = 0.5  # only the window at the origin holds foreground
    calls = []
    hook = inferer.model.image_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        logits = inferer.logits(image, text[:1], WindowConfig(overlap=0.0))
    finally:
        hook.remove()
    assert count_windows(image.shape, inferer.model.config.image_size, 0.0) == 8
    assert sum(calls) == 1
    torch.testing.assert_close(logits[0, 36:, 36:, 36:], torch.full((4, 4, 4), EMPTY_WINDOW_LOGIT))


def test_progress_and_cancel(inferer, text):
    seen = []
    inferer.logits(volume(), text[:1], WindowConfig(overlap=0.0), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] == len(seen)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        inferer.logits(volume(), text[:1], WindowConfig(), cancel=cancel)


@pytest.mark.parametrize("kwargs", [{"overlap": 1.0}, {"overlap": -0.1}, {"batch_size": 0}, {"pass_num": -1}])
def test_bad_window_options(kwargs):
    with pytest.raises(InputError):
        WindowConfig(**kwargs)


def test_bad_image_rank(inferer, text):
    with pytest.raises(InputError, match="3-D"):
        inferer.logits(torch.zeros(4, 32, 32, 32), text[:1])


def test_autocast_refused_on_cpu(esica_fixture):
    with pytest.raises(InputError, match="fp32"):
        ESICAInferer(build_fixture_model(esica_fixture), None, torch.device("cpu"), precision="bf16")
