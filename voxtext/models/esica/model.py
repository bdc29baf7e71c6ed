"""The ESICA text-guided 3-D segmentation model."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from transformers import AutoModel, PretrainedConfig

from ...errors import InputError
from ..dcformer import DCFormer
from .config import ESICAConfig
from .decoder import ImageContext, SegDecoder
from .text import pool_text


class ESICA(nn.Module):
    """DCFormer image encoder + BERT-family text encoder + text-prompted mask decoder.

    Attribute names (``image_encoder``, ``text_encoder``, ``seg_decoder``) and the
    whole sub-module tree follow the published checkpoints, which load strictly.
    Inference is split into :meth:`encode_text`, :meth:`encode_image` and
    :meth:`decode` so an image window is encoded once for any number of prompts.
    """

    def __init__(self, config: ESICAConfig, text_config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = DCFormer(config.encoder_config())
        self.text_encoder = AutoModel.from_config(text_config)
        text_dim = text_config.hidden_size
        self.seg_decoder = SegDecoder(
            dim=config.embed_dim,
            text_dim=text_dim,
            feat_size=config.feat_size,
            pass_num=config.pass_num,
            depth=config.transformer_depth,
            mlp_dim=config.mlp_dim,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            level_dims=config.encoder_channels,
            kernel_sizes=config.decoder_kernel_sizes,
            hidden_dim=config.decoder_hidden_dim,
        )

    @property
    def device(self) -> torch.device:
        return self.seg_decoder.text_adapt.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.seg_decoder.text_adapt.weight.dtype

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (P, L) -> one embedding per prompt (P, text_dim)."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_text(hidden, attention_mask, self.config.text_pooling)

    def encode_image(self, image: torch.Tensor) -> ImageContext:
        """Windows (B, 1, *image_size) -> prompt-independent decoder context."""
        if tuple(image.shape[2:]) != self.config.image_size or image.ndim != 5 or image.shape[1] != 1:
            raise InputError(
                f"ESICA expects windows of shape (B, 1, {', '.join(map(str, self.config.image_size))}), "
                f"got {tuple(image.shape)}"
            )
        return self.seg_decoder.image_context(self.image_encoder(image))

    def decode(
        self, context: ImageContext, text_embedding: torch.Tensor, pass_num: int | None = None
    ) -> torch.Tensor:
        """Mask logits (B, 1, *image_size) for context[b] with prompt text_embedding[b]."""
        logits = self.seg_decoder(context, text_embedding.to(context.embedding.dtype), pass_num)
        if tuple(logits.shape[2:]) != self.config.image_size:
            logits = F.interpolate(logits, size=self.config.image_size, mode="trilinear", align_corners=False)
        return logits

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pass_num: int | None = None,
        prompts_per_image: int = 1,
    ) -> torch.Tensor:
        """Logits for the prompts of each image (the reference's ``generate`` when ``prompts_per_image`` is 1).

        Prompts are image-major: prompt ``b * prompts_per_image + k`` is asked of ``image[b]``, which is
        encoded once for all its prompts.
        """
        context = self.encode_image(image).repeat(prompts_per_image)
        return self.decode(context, self.encode_text(input_ids, attention_mask), pass_num)
