"""Med3DVLM: DCFormer vision tower + mixer projector + Hugging Face Qwen2 language model.

:class:`Med3DVLMForCausalLM` is transformers' ``Qwen2ForCausalLM`` with the vision tower and the
projector attached to its decoder (``model.vision_tower`` / ``model.mm_projector``), so its state
dict has exactly the keys of the reference's merged checkpoint and HF's ``generate`` (KV cache,
logits processors, streamers) drives decoding. :func:`load_med3dvlm` reads such a folder without
``trust_remote_code``: our classes are built from ``config.json`` and the tensors are loaded strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from ...errors import CheckpointError, InputError
from ..dcformer import DCFormer, DCFormerConfig, med3dvlm_config
from ..state_dict import check_state_dict, load_strict, read_sharded, read_state_dict, with_prefix
from .config import Med3DVLMConfig
from .projector import MixerProjector

VISION_PREFIX = "model.vision_tower."


class VisionTower(nn.Module):
    """The DCFormer (key ``vision_tower``); returns stage tokens from ``select_layer`` on: ``[s3, s4]`` for -2."""

    def __init__(self, config: DCFormerConfig, select_layer: int = -2) -> None:
        super().__init__()
        self.vision_tower = DCFormer(config)
        self.select_layer = select_layer

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.vision_tower(images)[self.select_layer:]
        return [self.vision_tower.tokens(f) for f in features]


def prompt_starts(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Index of each row's first attended token: 0 without left padding."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return attention_mask.long().argmax(dim=1)


def insert_image_features(embeds: torch.Tensor, features: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Write ``features (B, N, H)`` into the text embeddings ``(B, L, H)`` as the published weights expect.

    Quirk reproduced on purpose: the reference (inherited from M3D/LaMed, which assumed a BOS token)
    overwrites positions ``1..N`` of a prompt ``"<im_patch>" * N + text``. Position 0 keeps the
    embedding of the first ``<im_patch>`` and the first text token (position N) is dropped; the
    published Med3DVLM was trained and evaluated that way, so "fixing" it changes its outputs. Here
    the positions count from each row's first token (``starts``), so left-padded batches get the
    placement of the reference's unpadded batch of one.
    """
    positions = starts[:, None] + 1 + torch.arange(features.shape[1], device=embeds.device)
    if int(positions.max()) >= embeds.shape[1]:
        raise InputError(f"the prompt is shorter than its {features.shape[1]} image tokens plus one text token")
    index = positions[..., None].expand(-1, -1, embeds.shape[2])
    return embeds.scatter(1, index, features.to(embeds.dtype))


class Med3DVLMForCausalLM(Qwen2ForCausalLM):
    """Qwen2 causal LM whose prompts start with ``num_image_tokens`` image tokens from a 3-D volume."""

    config_class = Med3DVLMConfig

    def __init__(self, config: Med3DVLMConfig, vision_config: DCFormerConfig | None = None) -> None:
        problems = config.unsupported()
        if problems:
            raise CheckpointError("unsupported Med3DVLM config: " + "; ".join(problems))
        super().__init__(config)
        # The reference always builds decomp_small, whatever the config says (its sizes are not in config.json).
        self.model.vision_tower = VisionTower(vision_config or med3dvlm_config("small"), config.vision_select_layer)
        self.model.mm_projector = MixerProjector(config)

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` volumes -> ``(B, num_image_tokens, hidden)`` LLM embeddings."""
        return self.model.mm_projector(self.model.vision_tower(images))

    def embed_multimodal(
        self, input_ids: torch.Tensor, images: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the image features placed as in :func:`insert_image_features`."""
        starts = prompt_starts(attention_mask, input_ids.shape[0], input_ids.device)
        slots = starts[:, None] + torch.arange(self.num_image_tokens, device=input_ids.device)
        image_id = self.config.image_token_id
        if slots.max() >= input_ids.shape[1] or not (input_ids.gather(1, slots) == image_id).all():
            raise InputError(
                f"every prompt must start with {self.num_image_tokens} image tokens (id {image_id}); "
                "build prompts with voxtext.models.med3dvlm.encode_prompts"
            )
        embeds = self.get_input_embeddings()(input_ids)
        return insert_image_features(embeds, self.encode_images(images.to(embeds.dtype)), starts)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        **kwargs,
    ):
        """Qwen2's forward; with ``images`` the image features are inserted into ``input_ids``' embeddings."""
        if images is not None:
            if inputs_embeds is not None:
                raise InputError("give either images with input_ids, or inputs_embeds")
            inputs_embeds = self.embed_multimodal(input_ids, images, attention_mask)
            input_ids = None
            if position_ids is None and attention_mask is not None and past_key_values is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding starts at 0
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, **kwargs,
        )

    def generate(
        self,
        images: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Decode answers to image prompts; returns only the new token ids (as the reference).

        Unlike the reference, which drops ``attention_mask``, padded batches (left padding) are
        handled: the mask is kept and positions start at each row's first token. The prompt ids are
        not passed on, so a ``repetition_penalty`` acts on generated tokens only, as in the reference.
        ``kwargs`` go to transformers' ``generate`` (``max_new_tokens``, ``do_sample``, ``streamer``
        e.g. a ``TextIteratorStreamer``, ...); defaults come from ``generation_config.json``.
        """
        if images is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            embeds = self.embed_multimodal(input_ids, images, attention_mask)
        return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


def read_config(folder: Path) -> Med3DVLMConfig:
    """The folder's ``config.json`` as a :class:`Med3DVLMConfig`; a clear error for other models."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if raw.get("model_type") != Med3DVLMConfig.model_type:
        raise CheckpointError(
            f"{folder} holds a {raw.get('model_type')!r} model, not Med3DVLM (config.json model_type 'vlm_qwen')"
        )
    return Med3DVLMConfig.from_dict(raw)


def load_med3dvlm(
    folder: str | Path,
    vision_config: DCFormerConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Med3DVLMForCausalLM:
    """A merged Med3DVLM folder (config.json, safetensors shards + index, vision_tower.bin, generation_config.json).

    The model is built on the meta device and takes the checkpoint's tensors directly, after a strict
    key and shape check; ``vision_tower.bin`` (read with ``weights_only=True``) must hold the same
    vision tensors. ``vision_config`` defaults to ``decomp_small``, which the reference hard-codes.
    """
    folder = Path(folder)
    config = read_config(folder)
    with torch.device("meta"):
        model = Med3DVLMForCausalLM(config, vision_config)
    weights = read_sharded(folder, dtype=dtype)
    load_strict(model, weights, folder, "Med3DVLM", assign=True)
    model.model.rotary_emb = Qwen2RotaryEmbedding(config=config)  # non-persistent buffer: rebuilt off meta
    model.tie_weights()
    tower_file = folder / "vision_tower.bin"
    if tower_file.is_file():
        tower = read_state_dict(tower_file)
        ours = with_prefix(weights, VISION_PREFIX)
        check_state_dict({k: v.shape for k, v in ours.items()}, tower, tower_file, "Med3DVLM vision tower")
        if not all(torch.equal(tower[k].to(v.dtype), v) for k, v in ours.items()):
            raise CheckpointError(f"{tower_file} and the safetensors shards hold different vision tower weights")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval().to(device)
