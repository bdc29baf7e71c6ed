"""DCFormer_SigLIP: Med3DVLM's stage-0 image-text model (reference ``DEC_CLIP``, ``model_type: dec_clip``).

A DCFormer encodes the volume (mean of the last stage's tokens), a DistilBERT encodes the report
([CLS] output); each side is projected to the joint space and L2-normalised. Training used a
pairwise sigmoid loss with a learnable log-temperature ``t_prime`` and ``bias``. Attribute names
follow the published checkpoint (``MagicXin/DCFormer_SigLIP``) so it loads strictly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .dcformer import DCFormer, DCFormerConfig, med3dvlm_config
from .state_dict import load_strict, read_state_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class SigLIPConfig:
    """The fields of the reference's ``config.json`` that shape the model (the others are unused there too)."""

    hidden_size: int = 768  # width of the joint embedding space
    t_prime: float = math.log(1 / 0.07)  # initial log-temperature; the trained value is in the weights
    bias: float = 0.0  # initial logit bias
    language_model_name_or_path: str = "medicalai/ClinicalBERT"

    @classmethod
    def from_file(cls, path: Path) -> SigLIPConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        if raw.get("model_type") != "dec_clip":
            raise CheckpointError(
                f"{path.parent} holds a {raw.get('model_type')!r} model, not DCFormer_SigLIP (model_type 'dec_clip')"
            )
        if raw.get("loss_type", "sigmoid") != "sigmoid":
            raise CheckpointError(f"{path} was trained with loss {raw['loss_type']!r}; only 'sigmoid' is supported")
        return cls(**{k: raw[k] for k in ("hidden_size", "t_prime", "bias", "language_model_name_or_path") if k in raw})


@dataclass
class SigLIPOutput:
    """Symmetrised pairwise logits ``(B, B)`` (global batch), the loss, and the local embeddings."""

    logits: torch.Tensor
    loss: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process (gradients flow back to each rank's part); ``x`` when alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def sigmoid_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's training loss over the global batch: ``(loss, symmetrised logits)``.

    ``L = I T^T exp(t') + b`` over all processes' pairs, ``logits = (L + L^T) / 2``, labels +1 on the
    diagonal and -1 elsewhere, ``loss = -sum(logsigmoid(labels * logits)) / B_global``. Every process
    gets the same value, whatever the world size. This is the formula of the reference's distributed
    branch, which training used; its single-process branch (no ``exp``, no division by B) is a bug and
    is not reproduced.
    """
    images, texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    scores = images @ texts.T * t_prime.exp().to(images.dtype) + bias.to(images.dtype)
    logits = (scores + scores.T) / 2
    labels = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits), logits


class DCFormerSigLIP(nn.Module):
    """Volume and report encoders with a shared embedding space, trained with the sigmoid loss."""

    def __init__(
        self, config: SigLIPConfig, text_config: PretrainedConfig, vision_config: DCFormerConfig | None = None
    ) -> None:
        from transformers import DistilBertModel  # imported here: the loss alone needs no transformers

        super().__init__()
        if text_config.model_type != "distilbert":
            raise CheckpointError(f"the text encoder must be a DistilBERT (ClinicalBERT), not {text_config.model_type!r}")
        # Parameters first: the reference's state dict starts with t_prime and bias.
        self.t_prime = nn.Parameter(torch.tensor(float(config.t_prime)))
        self.bias = nn.Parameter(torch.tensor(float(config.bias)))
        self.vision_encoder = DCFormer(vision_config or med3dvlm_config("small"))
        self.language_encoder = DistilBertModel(text_config)
        self.mm_vision_proj = nn.Linear(self.vision_encoder.config.channels[-1], config.hidden_size)
        self.mm_language_proj = nn.Linear(text_config.dim, config.hidden_size)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.t_prime.exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W)`` -> unit vectors ``(B, E)``: mean of the last stage's tokens, projected."""
        tokens = self.vision_encoder.tokens(self.vision_encoder(images)[-1])
        return F.normalize(self.mm_vision_proj(tokens.mean(dim=1)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> unit vectors ``(B, E)``: the [CLS] position of the last hidden state, projected."""
        hidden = self.language_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.mm_language_proj(hidden[:, 0]), dim=-1)

    def pair_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """``(n_images, n_texts)`` logits ``cos * exp(t') + b``; ``sigmoid`` of them is a match probability."""
        return image_embeds @ text_embeds.T * self.logit_scale + self.bias

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> SigLIPOutput:
        """Embeddings of paired volumes and texts, and the sigmoid loss over the (global) batch."""
        image_embeds, text_embeds = self.encode_image(images), self.encode_text(input_ids, attention_mask)
        loss, logits = sigmoid_loss(image_embeds, text_embeds, self.t_prime, self.bias)
        return SigLIPOutput(logits, loss, image_embeds, text_embeds)


def load_siglip(folder: str | Path, vision_config: DCFormerConfig | None = None) -> DCFormerSigLIP:
    """A DCFormer_SigLIP folder (``config.json`` + ``model.safetensors``), loaded strictly.

    The DistilBERT is built from its config (a folder named by ``language_model_name_or_path`` next
    to the checkpoint, the known ClinicalBERT config, or the HF cache); its weights come from the
    checkpoint. ``vision_config`` defaults to ``decomp_small``, which the reference hard-codes.
    """
    from .esica.text import text_config_for

    folder = Path(folder)
    config = SigLIPConfig.from_file(folder / "config.json")
    text_config = text_config_for(config.language_model_name_or_path, folder, None)
    model = DCFormerSigLIP(config, text_config, vision_config)
    path = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder} holds none of {', '.join(WEIGHT_FILES)}")
    load_strict(model, read_state_dict(path), path, "DCFormer_SigLIP")
    return model.eval()


@torch.no_grad()
def rank_findings(
    model: DCFormerSigLIP,
    tokenizer: PreTrainedTokenizerBase,
    image: torch.Tensor,
    phrases: Sequence[str],
    max_length: int = 512,
) -> list[tuple[str, float]]:
    """Zero-shot: finding phrases ranked by ``sigmoid(logit)`` against one ``(1, 1, D, H, W)`` volume."""
    tokens = tokenizer(list(phrases), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    scores = torch.sigmoid(model.pair_logits(model.encode_image(image), text))[0]
    order = torch.argsort(scores, descending=True, stable=True)
    return [(phrases[i], float(scores[i])) for i in order.tolist()]
