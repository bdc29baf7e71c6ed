"""ESICA conformance: our model reproduces the reference's outputs and checkpoint layout."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, esica_fixture_overrides
from voxtext.models.esica import ESICA, ESICAConfig
from voxtext.models.esica.text import text_config_for

ATOL = RTOL = 1e-4
FULL_KEYS = SHARED / "fixtures" / "esica_full_keys"


def build_fixture_model(folder):
    raw = json.loads((folder / "config.json").read_text())
    config = ESICAConfig.from_dict({**raw, **esica_fixture_overrides(folder)})
    model = ESICA(config, text_config_for(config.text_model, folder, None))
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return model.eval()


def run_with_intermediates(model, inputs):
    """Run the forward pass and capture the intermediates the fixture records, per decoder pass."""
    captured: dict[str, list] = defaultdict(list)
    decoder = model.seg_decoder.mask_decoder

    def keep(name):
        return lambda module, args, out: captured[name].append(out)

    hooks = [
        model.image_encoder.register_forward_hook(keep("features")),
        model.seg_decoder.text_adapt.register_forward_hook(keep("text_adapt")),
        decoder.txt_align_upscaled_embedding.register_forward_hook(keep("txt_align")),
        decoder.register_forward_hook(keep("mask_decoder")),
        decoder.transformer.register_forward_hook(keep("transformer")),
        model.seg_decoder.prompt_encoder.register_forward_hook(keep("prompt")),
        *(b.register_forward_hook(keep(f"up{i}")) for i, b in enumerate(decoder.upscaling.up_blocks)),
    ]
    with torch.no_grad():
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        logits = model(inputs["image"], inputs["input_ids"], inputs["attention_mask"])
    for h in hooks:
        h.remove()

    got = {"logits": logits, "text_cls": text, "text_adapt_out": captured["text_adapt"][0],
           "txt_align_out": captured["txt_align"][0]}
    for s, feat in enumerate(captured["features"][0]):
        got[f"image_features_s{s}_sample0"] = feat[:1]
    for p, (pass_logits, token) in enumerate(captured["mask_decoder"]):
        queries, keys = captured["transformer"][p]
        sparse, dense = captured["prompt"][p]
        got.update({f"pass{p}_logits": pass_logits, f"pass{p}_mask_tokens_out": token,
                    f"pass{p}_transformer_queries": queries, f"pass{p}_transformer_keys": keys,
                    f"pass{p}_sparse_prompt": sparse, f"pass{p}_dense_prompt": dense})
        for i in range(len(decoder.upscaling.up_blocks)):
            got[f"pass{p}_upblock{i}_out_sample{0}"] = captured[f"up{i}"][p][:1]
    return got


@pytest.fixture(scope="module")
def fixture_outputs(esica_fixture):
    model = build_fixture_model(esica_fixture)
    inputs = {k: torch.from_numpy(v) for k, v in np.load(esica_fixture / "inputs.npz").items()}
    expected = dict(np.load(esica_fixture / "expected.npz"))
    return run_with_intermediates(model, inputs), expected


def test_esica_conformance_strict_load_keys_in_order(esica_fixture):
    model = build_fixture_model(esica_fixture)
    keys = json.loads((esica_fixture / "keys.json").read_text())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    assert list(model.state_dict()) == list(keys)


def test_esica_conformance_every_expected_array(fixture_outputs):
    got, expected = fixture_outputs
    assert "logits" in expected
    for name, want in expected.items():
        assert name in got, f"intermediate {name} not produced"
        actual = got[name].detach().numpy()
        assert actual.shape == want.shape, name
        np.testing.assert_allclose(actual, want, atol=ATOL, rtol=RTOL, err_msg=name)


def test_esica_conformance_final_logits_are_last_pass(fixture_outputs):
    got, _ = fixture_outputs
    last = max(int(k[4]) for k in got if k.startswith("pass") and k.endswith("_logits"))
    assert torch.equal(got["logits"], got[f"pass{last}_logits"])


@pytest.mark.parametrize(
    "variant, text_model, n_params",
    [("esica", "medicalai/ClinicalBERT", 252_071_120), ("lite", "nlpie/tiny-clinicalbert", 130_773_416)],
)
def test_esica_conformance_full_size_layout_on_meta(variant, text_model, n_params):
    config = ESICAConfig(text_model=text_model)
    with torch.device("meta"):
        model = ESICA(config, text_config_for(text_model, None, None))
    reference = json.loads((FULL_KEYS / f"state_dict_{variant}.json").read_text())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == reference
    assert list(model.state_dict()) == list(reference)
    assert sum(p.numel() for p in model.parameters()) == n_params
