"""Shared pytest fixtures: reference fixture folders and small models built from them."""

from __future__ import annotations

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
