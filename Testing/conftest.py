"""Shared pytest fixtures: reference fixture folders and small models built from them."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def esica_fixture_dir() -> Path:
    """The ESICA conformance fixture folder (env ``VOXTEXT_ESICA_FIXTURE``, default the shared one)."""
    return Path(os.environ.get("VOXTEXT_ESICA_FIXTURE", SHARED / "fixtures" / "esica_tiny"))


def esica_fixture_overrides(folder: Path) -> dict:
    """Sizes the reference hard-codes, as recorded in the fixture's ``fixture.json``."""
    spec = json.loads((folder / "fixture.json").read_text())
    encoder = spec["image_encoder"]["kwargs"]
    return {
        "encoder_channels": encoder["channels"],
        "encoder_blocks": encoder["num_blocks"],
        "encoder_kernel_sizes": encoder["kernel_sizes"],
        "decoder_hidden_dim": spec["seg_decoder.mask_decoder"]["kwargs"]["hidden_dim"],
        "decoder_kernel_sizes": spec["seg_decoder.mask_decoder.upscaling"]["kwargs"]["kernel_size"],
    }


@pytest.fixture(scope="session")
def esica_fixture() -> Path:
    folder = esica_fixture_dir()
    if not (folder / "model.safetensors").exists():
        pytest.fail(f"ESICA fixture not found at {folder}; set VOXTEXT_ESICA_FIXTURE")
    return folder


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


# --- Med3DVLM fixtures (DCFormer, DCFormer_SigLIP, the VLM) ---------------------------------------

def _fixture_dir(env: str, name: str) -> Path:
    folder = Path(os.environ.get(env, SHARED / "fixtures" / name))
    if not (folder / "fixture.json").exists():
        pytest.fail(f"fixture {name} not found at {folder}; set {env}")
    return folder


def dcformer_fixture_dir() -> Path:
    """Folder of ``dcformer_tiny`` (env ``VOXTEXT_DCFORMER_FIXTURE``)."""
    return _fixture_dir("VOXTEXT_DCFORMER_FIXTURE", "dcformer_tiny")


def siglip_fixture_dir() -> Path:
    """Folder of ``siglip_clip_tiny`` (env ``VOXTEXT_SIGLIP_FIXTURE``)."""
    return _fixture_dir("VOXTEXT_SIGLIP_FIXTURE", "siglip_clip_tiny")


def vlm_fixture_dir() -> Path:
    """Folder of ``med3dvlm_tiny`` (env ``VOXTEXT_VLM_FIXTURE``)."""
    return _fixture_dir("VOXTEXT_VLM_FIXTURE", "med3dvlm_tiny")


def fixture_dcformer_config(folder: Path):
    """The reduced DCFormer a Med3DVLM fixture was built with (the reference hard-codes decomp_small)."""
    from voxtext.models.dcformer import med3dvlm_config

    spec = json.loads((folder / "fixture.json").read_text())
    kwargs = next(spec[k]["kwargs"] for k in ("model", "vision_encoder", "vision_tower") if k in spec)
    config = med3dvlm_config("small")
    config.channels, config.num_blocks = tuple(kwargs["channels"]), tuple(kwargs["num_blocks"])
    config.kernel_sizes = tuple(kwargs["kernel_sizes"])
    return config


def load_npz(path: Path) -> dict:
    import numpy as np

    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assert_arrays_close(got: dict, expected: dict, atol: float, rtol: float) -> float:
    """Every expected array reproduced (floats within tolerance, integers equal); returns the max abs difference."""
    import numpy as np

    assert set(got) == set(expected), f"not compared: {set(expected) - set(got)}"
    worst = 0.0
    for name, want in expected.items():
        have = np.asarray(got[name].detach() if isinstance(got[name], torch.Tensor) else got[name])
        assert have.shape == want.shape, f"{name}: shape {have.shape} vs {want.shape}"
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(have, want, err_msg=name)
            continue
        np.testing.assert_allclose(have, want, atol=atol, rtol=rtol, err_msg=name)
        worst = max(worst, float(np.abs(have.astype(np.float64) - want).max()))
    return worst


def word_tokenizer(vocab_size: int, specials: tuple[str, ...], image_token: bool):
    """A whitespace word-level tokenizer over ``t0 .. t{n}`` + ``specials`` (built offline, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"t{i}" for i in range(vocab_size - len(specials) - 1)] + list(specials)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0], eos_token=specials[-1])
    if image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<im_patch>"]})
    return tokenizer


def siglip_loss_worker(rank: int, world: int, init_file: str, arrays: dict, out_dir: str) -> None:
    """One process of the gloo sigmoid-loss test: its own pair, the loss, the gradients of its embeddings.

    Lives here (not in the test module) so the spawned processes import only torch and the loss.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_siglip_rank_result(rank, arrays), f"{out_dir}/rank{rank}.pt")
    # One CI run saw a rank abort at teardown ("terminate called without an active exception"). The all-gather's
    # autograd node keeps a reference to the process group; the graph is freed above, inside the helper, and
    # collected here, so the group is not destroyed late, during interpreter shutdown. The barrier makes every
    # rank finish its backward collectives before any tears gloo down.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _siglip_rank_result(rank: int, arrays: dict) -> dict[str, torch.Tensor]:
    from voxtext.models.siglip import sigmoid_loss

    image = arrays["image_embeds"][rank : rank + 1].clone().requires_grad_()
    text = arrays["text_embeds"][rank : rank + 1].clone().requires_grad_()
    loss, logits = sigmoid_loss(image, text, arrays["t_prime"], arrays["bias"])
    loss.backward()
    return {"loss": loss.detach(), "logits": logits.detach(), "image_grad": image.grad, "text_grad": text.grad}
