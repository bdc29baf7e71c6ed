"""Checkpoint resolution, integrity and strict loading, with a specific error for every bad folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import esica_fixture_overrides
from voxtext.checkpoints import (
    LOCK_FILE,
    build_esica,
    load_esica,
    parse_hf_uri,
    resolve_model,
    save_esica,
    write_lock,
)
from voxtext.errors import CheckpointError, WeightsNotFoundError
from voxtext.models.esica import ESICAConfig


@pytest.fixture()
def folder(esica_fixture, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(esica_fixture, copy)
    return copy


def load(folder, **kwargs):
    return load_esica(folder, overrides=esica_fixture_overrides(folder), tokenizer=False, **kwargs)[0]


def test_fixture_loads_strictly_and_exactly(folder):
    model = load(folder)
    weights = load_file(folder / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_save_load_round_trip_is_bitwise(folder, tmp_path):
    model = load(folder)
    out = save_esica(model, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "med3d_seg" and config["text_config"]["model_type"] == "bert"
    reloaded = load_esica(out, tokenizer=False)[0]  # self-contained: sizes and text config travel in config.json
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_bf16_checkpoint_loads(folder):
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = load(folder)
    assert model.seg_decoder.text_adapt.weight.dtype == torch.float32
    torch.testing.assert_close(model.seg_decoder.text_adapt.weight, weights["seg_decoder.text_adapt.weight"].float())


def edit_weights(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: (f / "config.json").unlink(), "lacks config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "lacks model.safetensors"),
        (lambda f: (f / "config.json").write_text("{not json"), "cannot read"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
         "not a readable safetensors"),
        (lambda f: edit_weights(f, lambda w: w.pop("seg_decoder.text_adapt.bias")), "1 missing"),
        (lambda f: edit_weights(f, lambda w: w.update(extra=torch.zeros(2))), "1 unexpected"),
        (lambda f: edit_weights(f, lambda w: w.update({"seg_decoder.text_adapt.bias": torch.zeros(3)})),
         "1 wrong shape"),
        (lambda f: edit_weights(f, lambda w: [w.pop(k) for k in list(w) if k.startswith("image_encoder")]),
         "not an ESICA checkpoint"),
    ],
)
def test_bad_checkpoints_give_specific_errors(folder, breakage, message):
    breakage(folder)
    with pytest.raises(CheckpointError, match=message):
        load(folder)


def test_config_of_another_size_is_reported(folder):
    with pytest.raises(CheckpointError, match="not a usable ESICA config"):
        load_esica(folder, tokenizer=False)  # config.json alone implies the full-size encoder widths
    wider = {**esica_fixture_overrides(folder), "decoder_hidden_dim": 16}
    with pytest.raises(CheckpointError, match="does not match the ESICA model of its config.json: .* wrong shape"):
        load_esica(folder, overrides=wider, tokenizer=False)


def test_missing_tokenizer_is_reported(folder):
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        load_esica(folder, overrides=esica_fixture_overrides(folder))


def test_lock_detects_a_modified_file(folder, monkeypatch):
    write_lock(folder, "abc123")
    with (folder / "model.safetensors").open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    from voxtext.checkpoints import verify_integrity

    with pytest.raises(CheckpointError, match="checksum"):
        verify_integrity(folder)
    assert json.loads((folder / LOCK_FILE).read_text())["revision"] == "abc123"


def test_named_model_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="huggingface-cli download MagicXin/ESICA") as info:
        resolve_model("esica")
    assert "not in the Hugging Face cache" in str(info.value)


def test_unknown_name_and_uri_parsing(tmp_path):
    with pytest.raises(CheckpointError, match="neither a segmentation model name"):
        resolve_model(tmp_path / "nowhere")
    spec = parse_hf_uri("hf://owner/repo@v1.2/sub/dir")
    assert (spec.repo_id, spec.revision, spec.subfolder) == ("owner/repo", "v1.2", "sub/dir")
    with pytest.raises(CheckpointError, match="malformed"):
        parse_hf_uri("hf://onlyowner")


def test_frozen_pretrained_text_encoder_is_not_stored(tmp_path):
    config = ESICAConfig(
        image_size=(16, 16, 16), embed_dim=32, transformer_depth=1, mlp_dim=32, num_heads=2, num_kv_heads=1,
        encoder_channels=(8, 8, 16, 16, 32), encoder_blocks=(1, 1, 1, 1, 1), decoder_hidden_dim=8,
        text_model="sentence-transformers/all-MiniLM-L6-v2", text_pooling="mean", text_weights="text_model",
    )
    model = build_esica(config)
    out = save_esica(model, tmp_path / "small")
    assert not any(k.startswith("text_encoder.") for k in load_file(out / "model.safetensors"))
    reloaded, tokenizer = load_esica(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    assert tokenizer("left kidney")["input_ids"][0] == tokenizer.cls_token_id
