"""Med3DVLM conformance: our assembly reproduces the reference VLM (med3dvlm_tiny) and its checkpoint layout."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from transformers import TextIteratorStreamer

from conftest import (
    SHARED, assert_arrays_close, fixture_dcformer_config, load_npz, siglip_fixture_dir, vlm_fixture_dir,
    word_tokenizer,
)
from voxtext.errors import CheckpointError, InputError
from voxtext.models.med3dvlm import Med3DVLMConfig, Med3DVLMForCausalLM, load_med3dvlm
from voxtext.models.med3dvlm.preprocess import prepare_volume
from voxtext.models.med3dvlm.prompt import encode_prompts, image_token_id
from voxtext.volume import Volume

ATOL = RTOL = 1e-4
FULL_KEYS = SHARED / "fixtures" / "med3dvlm_full_keys"
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FORWARD_ARRAYS = ("vision_low_tokens", "vision_high_tokens", "proj_low_layer0_out", "proj_low_layer1_out",
                  "proj_high_layer0_out", "proj_high_layer1_out", "image_features", "inputs_embeds",
                  "lm_hidden_states", "logits", "loss")


@pytest.fixture(scope="module")
def folder():
    return vlm_fixture_dir()


@pytest.fixture(scope="module")
def model(folder):
    return load_med3dvlm(folder, fixture_dcformer_config(folder))


@pytest.fixture(scope="module")
def inputs(folder):
    return {k: torch.from_numpy(v) for k, v in load_npz(folder / "inputs.npz").items()}


@pytest.fixture(scope="module")
def expected(folder):
    return load_npz(folder / "expected.npz")


def test_vlm_conformance_strict_layout(model, folder):
    keys = json.loads((folder / "keys.json").read_text())
    assert list(model.state_dict()) == list(keys)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys


def test_vlm_conformance_forward(model, inputs, expected):
    captured = {}

    def keep(name):
        return lambda module, args, out: captured.update({name: out})  # returns None: output unchanged

    projector = model.model.mm_projector
    hooks = [model.model.vision_tower.register_forward_hook(keep("vision")),
             projector.register_forward_hook(keep("image_features"))]
    for stream in ("low", "high"):
        for i, layer in enumerate(getattr(projector, f"{stream}_mixer")):
            hooks.append(layer.register_forward_hook(keep(f"proj_{stream}_layer{i}_out")))
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    images=inputs["image"], output_hidden_states=True)
    for h in hooks:
        h.remove()
    got = {name: captured[name] for name in FORWARD_ARRAYS if name.startswith("proj_") or name == "image_features"}
    got |= {"vision_low_tokens": captured["vision"][0], "vision_high_tokens": captured["vision"][1],
            "inputs_embeds": out.hidden_states[0], "lm_hidden_states": torch.stack(out.hidden_states),
            "logits": out.logits, "loss": out.loss}
    worst = assert_arrays_close(got, {k: expected[k] for k in FORWARD_ARRAYS}, ATOL, RTOL)
    assert worst < 1e-4


def test_vlm_conformance_image_token_off_by_one(model, inputs):
    """The first text token after the placeholders (index N) never reaches the model; index N+1 does."""
    n = model.num_image_tokens
    ids = inputs["input_ids"]

    def logits(changed_at):
        changed = ids.clone()
        changed[0, changed_at] = (changed[0, changed_at] + 1) % 290
        with torch.no_grad():
            return model(input_ids=changed, images=inputs["image"]).logits

    with torch.no_grad():
        base = model(input_ids=ids, images=inputs["image"]).logits
    assert torch.equal(logits(n), base)
    assert (logits(n + 1) - base).abs().max() > 0.1


def test_vlm_conformance_generation(model, inputs, expected):
    greedy = model.generate(inputs["image"], inputs["prompt_ids"], max_new_tokens=8, do_sample=False,
                            repetition_penalty=1.0, return_dict_in_generate=True, output_logits=True)
    # generation_config.json stays in force: greedy + repetition penalty 1.05 over generated tokens only.
    genconfig = model.generate(inputs["image"], inputs["prompt_ids"], max_new_tokens=8, do_sample=False,
                               return_dict_in_generate=True, output_scores=True)
    got = {"generated_ids_greedy": greedy.sequences, "generated_logits_greedy": torch.stack(greedy.logits),
           "generated_ids_greedy_genconfig": genconfig.sequences,
           "generated_scores_greedy_genconfig": torch.stack(genconfig.scores)}
    assert_arrays_close(got, {k: expected[k] for k in got}, ATOL, RTOL)
    assert model.generation_config.do_sample and model.generation_config.top_k == 20  # reference sampling defaults


def test_vlm_conformance_batched_generation_with_padding(model, inputs, expected):
    """Left-padded batches decode each row exactly as the reference's unpadded batch of one."""
    prompt = inputs["prompt_ids"][0]
    other = prompt.clone()
    other[-3:] = torch.tensor([5, 6, 7])
    pad = torch.full((3,), model.generation_config.pad_token_id)
    ids = torch.stack([torch.cat([pad, prompt]), torch.cat([pad, other])])
    mask = (torch.arange(ids.shape[1]) >= 3).long().expand(2, -1)
    images = inputs["image"].expand(2, -1, -1, -1, -1)
    out = model.generate(images, ids, mask, max_new_tokens=8, do_sample=False, repetition_penalty=1.0,
                         return_dict_in_generate=True, output_logits=True)
    np.testing.assert_array_equal(out.sequences[0].numpy(), expected["generated_ids_greedy"][0])
    np.testing.assert_allclose(torch.stack(out.logits)[:, 0].numpy(), expected["generated_logits_greedy"][:, 0],
                               atol=ATOL, rtol=RTOL)
    alone = model.generate(inputs["image"], other[None], max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    assert torch.equal(out.sequences[1], alone[0])


def test_vlm_conformance_prompts_and_streaming(model, inputs, expected):
    tokenizer = word_tokenizer(300, QWEN_SPECIALS, image_token=True)
    assert image_token_id(tokenizer) == model.config.image_token_id == 299
    question = " ".join(f"t{i}" for i in inputs["prompt_ids"][0, 16:].tolist())
    batch = encode_prompts(tokenizer, [question, "t1 t2"], model.num_image_tokens, separator="")
    assert torch.equal(batch["input_ids"][0], inputs["prompt_ids"][0])
    assert batch["attention_mask"][1].tolist() == [0] * 5 + [1] * 18
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.0, streamer=streamer)
    worker = threading.Thread(target=model.generate, args=(inputs["image"], batch["input_ids"][:1]), kwargs=kwargs)
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text.split() == [f"t{i}" for i in expected["generated_ids_greedy"][0]]


def test_vlm_conformance_full_size_layout():
    reference = json.loads((FULL_KEYS / "state_dict_vlm_merged.json").read_text())
    config = Med3DVLMConfig(vocab_size=151666, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Med3DVLMForCausalLM(config)
    state = model.state_dict()
    assert list(state) == list(reference)
    assert {k: list(v.shape) for k, v in state.items()} == reference
    assert sum(p.numel() for p in model.parameters()) == 7_678_229_696
    assert sum(p.numel() for p in model.model.mm_projector.parameters()) == 47_221_248
    assert config.image_token_id == 151665 and model.num_image_tokens == 256


def test_vlm_conformance_bad_inputs(model, folder, inputs, tmp_path):
    with pytest.raises(CheckpointError, match="not Med3DVLM"):
        load_med3dvlm(siglip_fixture_dir())
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_med3dvlm(folder)  # the reference's decomp_small does not fit the reduced fixture
    with pytest.raises(CheckpointError, match="no <im_patch> token"):
        image_token_id(word_tokenizer(300, QWEN_SPECIALS, image_token=False))
    with pytest.raises(InputError, match="must start with 16 image tokens"):
        model(input_ids=inputs["input_ids"][:, 1:], images=inputs["image"])
    copy = tmp_path / "vlm"
    shutil.copytree(folder, copy)
    tower = torch.load(copy / "vision_tower.bin", weights_only=True)
    tower["vision_tower.encoder.s1.0.scale"] = tower["vision_tower.encoder.s1.0.scale"] + 1
    torch.save(tower, copy / "vision_tower.bin")
    with pytest.raises(CheckpointError, match="different vision tower weights"):
        load_med3dvlm(copy, fixture_dcformer_config(folder))


def test_vlm_conformance_preprocessing_matches_reference_chain():
    """Min-max, CropForeground (voxels > 0, margin 0) and trilinear Resize as the reference's MONAI chain."""
    from monai.transforms import CropForeground, Resize

    rng = np.random.default_rng(0)
    array = np.full((20, 30, 25), -50.0, np.float32)
    array[3:15, 5:27, 2:20] = rng.normal(40.0, 30.0, (12, 22, 18))
    scaled = torch.from_numpy((array - array.min()) / (array.max() - array.min()))[None]
    reference = Resize((16, 32, 24), mode="bilinear")(CropForeground(allow_smaller=True)(scaled))
    ours = prepare_volume(array, (16, 32, 24))
    assert ours.shape == (1, 1, 16, 32, 24)
    np.testing.assert_allclose(ours[0].numpy(), np.asarray(reference), atol=1e-6)
    # Canonical orientation: the same scan stored RAS (i, j, k) or as the LPS (z, y, x) array gives one input.
    ras = np.ascontiguousarray(np.flip(array.transpose(2, 1, 0), axis=(0, 1)))
    assert torch.equal(prepare_volume(Volume.from_numpy(ras), (16, 32, 24)), ours)
