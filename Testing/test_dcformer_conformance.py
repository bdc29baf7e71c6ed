"""DCFormer conformance: Med3DVLM's vision encoder reproduces the reference (dcformer_tiny) and its layouts."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import (
    SHARED, assert_arrays_close, dcformer_fixture_dir, fixture_dcformer_config, load_npz, siglip_fixture_dir,
    vlm_fixture_dir,
)
from voxtext.errors import CheckpointError
from voxtext.models.dcformer import DCFormer, MED3DVLM_VARIANTS, load_dcformer, med3dvlm_config
from voxtext.models.state_dict import read_state_dict

ATOL = RTOL = 1e-4
FULL_KEYS = SHARED / "fixtures" / "med3dvlm_full_keys"
# Parameter counts of the published variants (spec section 1.3).
VARIANT_PARAMS = {"nano": 789_216, "naive": 5_851_680, "tiny": 14_657_472, "small": 18_244_800,
                  "base": 33_868_864, "large": 185_125_440}


@pytest.fixture(scope="module")
def folder():
    return dcformer_fixture_dir()


@pytest.fixture(scope="module")
def model(folder):
    return load_dcformer(folder / "model.safetensors", fixture_dcformer_config(folder))


def test_dcformer_conformance_keys_in_order(model, folder):
    keys = json.loads((folder / "keys.json").read_text())
    assert list(model.state_dict()) == list(keys)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys


def test_dcformer_conformance_outputs(model, folder):
    image = torch.from_numpy(load_npz(folder / "inputs.npz")["image"])
    captured = {}
    hooks = [
        model.encoder.s0[0][0].register_forward_hook(lambda m, a, out: captured.update(stem=out)),
        model.encoder.s1[0].proj.register_forward_hook(lambda m, a, out: captured.update(proj=out)),
        model.encoder.s1[0].dwconv.register_forward_hook(lambda m, a, out: captured.update(dwconv=out)),
    ]
    with torch.no_grad():
        features = model(image)
    for h in hooks:
        h.remove()
    got = {f"s{i}_tokens": model.tokens(f) for i, f in enumerate(features)}
    got |= {"stem_conv0_out_sample0": captured["stem"][:1], "s1_block0_proj_out_sample0": captured["proj"][:1],
            "s1_block0_dwconv_out_sample0": captured["dwconv"][:1]}
    worst = assert_arrays_close(got, load_npz(folder / "expected.npz"), ATOL, RTOL)
    assert worst < 1e-4


def test_dcformer_conformance_pretrained_vit_bin_is_read_weights_only(model, folder, tmp_path):
    from_bin = load_dcformer(folder / "pretrained_ViT.bin", fixture_dcformer_config(folder))
    for (k, a), b in zip(model.state_dict().items(), from_bin.state_dict().values()):
        assert torch.equal(a, b), k
    # A pickle that would build an arbitrary object is refused, not executed.
    evil = tmp_path / "evil.bin"
    torch.save({"encoder.s0.0.0.c1.0.weight": torch.zeros(1), "payload": CheckpointError("x")}, evil)
    with pytest.raises(CheckpointError, match="holds more than tensors"):
        read_state_dict(evil)


def test_dcformer_conformance_other_reference_files():
    """The same encoder is found under the DCFormer_SigLIP and merged-VLM prefixes."""
    for folder, name in ((siglip_fixture_dir(), "model.safetensors"), (vlm_fixture_dir(), "vision_tower.bin")):
        encoder = load_dcformer(folder / name, fixture_dcformer_config(folder))
        assert sum(p.numel() for p in encoder.parameters()) > 0


def test_dcformer_conformance_wrong_checkpoints(folder):
    esica = SHARED / "fixtures" / "esica_tiny" / "model.safetensors"
    with pytest.raises(CheckpointError, match="not a DCFormer checkpoint"):
        load_dcformer(esica)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_dcformer(folder / "model.safetensors", med3dvlm_config("nano"))  # right layout, other widths


def test_dcformer_conformance_full_size_layout_and_variants():
    full = json.loads((FULL_KEYS / "state_dict_vision.json").read_text())
    prefix = "model.vision_tower.vision_tower."
    reference = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    for variant, params in VARIANT_PARAMS.items():
        with torch.device("meta"):
            encoder = DCFormer(med3dvlm_config(variant))
        assert sum(p.numel() for p in encoder.parameters()) == params, variant
        if variant == "small":
            state = encoder.state_dict()
            assert list(state) == list(reference)
            assert {k: list(v.shape) for k, v in state.items()} == reference
    assert set(VARIANT_PARAMS) == set(MED3DVLM_VARIANTS)


def test_dcformer_conformance_token_grid():
    """Spec formulas: stem floor((n-1)/4)+1, each pool floor((n-1)/2)+1; tokens in (D', H', W') order."""
    config = med3dvlm_config("nano")
    encoder = DCFormer(config).eval()
    with torch.no_grad():
        features = encoder(torch.rand(1, 1, 9, 21, 14))
    grid = [(9 - 1) // 4 + 1, (21 - 1) // 4 + 1, (14 - 1) // 4 + 1]
    for i, f in enumerate(features):
        if i:
            grid = [(n - 1) // 2 + 1 for n in grid]
        assert tuple(f.shape[2:]) == (grid[1], grid[2], grid[0])  # internal (H', W', D')
        tokens = encoder.tokens(f)
        d, h, w = grid
        assert torch.equal(tokens[0, (d - 1) * h * w + (h - 1) * w], f[0, :, h - 1, 0, d - 1])
