"""ESICA configuration, read from and written to a checkpoint's ``config.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..dcformer import DCFormerConfig

# Sizes the reference hard-codes instead of writing them to config.json (full-size values).
FULL_ENCODER_CHANNELS = (48, 96, 192, 384, 768)
FULL_ENCODER_BLOCKS = (1, 2, 3, 6, 4)


@dataclass
class ESICAConfig:
    """Everything needed to build an ESICA model.

    The first block of fields are the keys of the reference ``config.json``; the
    second block holds sizes the reference hard-codes (defaults: the published model),
    which our own checkpoints also write so reduced models round-trip.
    """

    image_size: tuple[int, int, int] = (96, 96, 96)
    patch_size: tuple[int, int, int] = (16, 16, 16)
    embed_dim: int = 768
    text_model: str = "medicalai/ClinicalBERT"
    pass_num: int = 1
    transformer_depth: int = 6
    mlp_dim: int = 3072
    num_heads: int = 12
    num_kv_heads: int = 4
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    torch_dtype: str = "float32"

    encoder_channels: tuple[int, ...] = FULL_ENCODER_CHANNELS
    encoder_blocks: tuple[int, ...] = FULL_ENCODER_BLOCKS
    encoder_kernel_sizes: tuple[int, ...] = (13, 11, 9, 7)
    decoder_hidden_dim: int = 48
    decoder_kernel_sizes: tuple[int, ...] = (13, 11, 9, 7, 5)
    text_pooling: str = "cls"
    # "checkpoint": text encoder weights are in model.safetensors (reference);
    # "text_model": they are loaded from the text model itself (a frozen pretrained encoder).
    text_weights: str = "checkpoint"
    target_spacing: float = 1.5  # mm, the isotropic grid the model was trained on
    text_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "encoder_channels", "encoder_blocks",
                     "encoder_kernel_sizes", "decoder_kernel_sizes"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        if any(p != 16 for p in self.patch_size):
            problems.append(f"patch_size must be 16 (the encoder's total stride), got {self.patch_size}")
        if any(s % 16 or s <= 0 for s in self.image_size):
            problems.append(f"image_size must be positive multiples of 16, got {self.image_size}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
            problems.append("embed_dim / num_heads must be an even integer (rotary embeddings)")
        if self.num_heads % self.num_kv_heads:
            problems.append("num_heads must be a multiple of num_kv_heads")
        if self.embed_dim % 8:
            problems.append("embed_dim must be a multiple of 8")
        if self.encoder_channels[-1] != self.embed_dim:
            problems.append(f"the last encoder width {self.encoder_channels[-1]} must equal embed_dim {self.embed_dim}")
        if self.text_pooling not in ("cls", "mean"):
            problems.append(f"text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}")
        if self.text_weights not in ("checkpoint", "text_model"):
            problems.append(f"text_weights must be 'checkpoint' or 'text_model', got {self.text_weights!r}")
        if problems:
            raise ValueError("invalid ESICA config: " + "; ".join(problems))

    @property
    def feat_size(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))

    def encoder_config(self) -> DCFormerConfig:
        return DCFormerConfig(
            channels=self.encoder_channels,
            num_blocks=self.encoder_blocks,
            kernel_sizes=self.encoder_kernel_sizes,
            block_types=("C", "C", "C", "T"),
            norm="rms",
            cube_branch=True,
            stem="esica",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ESICAConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra.get("model_type", "med3d_seg") != "med3d_seg":
            raise ValueError(f"not an ESICA config: model_type is {extra['model_type']!r}, expected 'med3d_seg'")
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "ESICAConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        data = {"architectures": ["ESICA"], "model_type": "med3d_seg"}
        data.update({k: v for k, v in self.extra.items() if k not in data})
        data.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "extra"})
        if data["text_config"] is None:
            del data["text_config"]
        return data
