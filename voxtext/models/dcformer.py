"""DCFormer: a 3-D hierarchical encoder built from decomposed convolutions.

One parameterised implementation serves both published encoders:

* ESICA's image encoder: RMS norms, an extra 3x3x3 branch, a full-resolution stem
  (one k=13 stride-1 decomposed conv) and transformer blocks in the last stage;
* Med3DVLM's DCFormer variants: BatchNorm, three branches, a stride-4 stem
  (k=7 stride 4, then three k=3) and conv blocks in every stage, run on the
  volume permuted to (H, W, D).

The module returns the five stage outputs ``s0..s4`` as 5-D feature maps;
:meth:`DCFormer.tokens` flattens one into the token layout Med3DVLM's projector and
DCFormer_SigLIP consume, and :func:`load_dcformer` reads the encoder out of any of the
reference's checkpoint files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
import torch.nn.functional as F

from pathlib import Path

from ..errors import CheckpointError
from .blocks import ConvBlock, DecompConv3d, DownsampleIn, FeedForward, NormKind
from .state_dict import load_strict, read_state_dict, with_prefix

StemKind = Literal["esica", "dcformer"]


@dataclass
class DCFormerConfig:
    """Widths, depths and flavour of a DCFormer encoder."""

    channels: tuple[int, ...] = (48, 96, 192, 384, 768)
    num_blocks: tuple[int, ...] = (1, 2, 3, 6, 4)
    kernel_sizes: tuple[int, ...] = (13, 11, 9, 7)
    block_types: tuple[str, ...] = ("C", "C", "C", "T")
    in_channels: int = 1
    norm: NormKind = "rms"
    cube_branch: bool = True
    stem: StemKind = "esica"
    permute_input: bool = False
    attention_heads: int = 8

    def __post_init__(self) -> None:
        self.channels, self.num_blocks = tuple(self.channels), tuple(self.num_blocks)
        self.kernel_sizes, self.block_types = tuple(self.kernel_sizes), tuple(self.block_types)
        if len(self.channels) != 5 or len(self.num_blocks) != 5 or len(self.block_types) != 4:
            raise ValueError("DCFormer needs 5 channel widths, 5 block counts and 4 block types")
        if self.num_blocks[0] != 1:
            raise ValueError("stage s0 holds exactly one stem")


# Med3DVLM's published DCFormer variants (kernel sizes 13, 11, 9, 7 in all of them).
MED3DVLM_VARIANTS: dict[str, dict] = {
    "nano": dict(channels=(32, 32, 64, 128, 256), num_blocks=(1, 1, 1, 1, 1)),
    "naive": dict(channels=(32, 64, 128, 256, 512), num_blocks=(1, 2, 2, 2, 2)),
    "tiny": dict(channels=(64, 96, 192, 384, 768), num_blocks=(1, 2, 3, 3, 2)),
    "small": dict(channels=(64, 96, 192, 384, 768), num_blocks=(1, 2, 3, 6, 2)),
    "base": dict(channels=(64, 128, 256, 512, 1024), num_blocks=(1, 2, 6, 6, 2)),
    "large": dict(channels=(64, 256, 512, 1024, 2048), num_blocks=(1, 2, 6, 12, 2)),
}


def med3dvlm_config(variant: str) -> DCFormerConfig:
    """The configuration of one of Med3DVLM's DCFormer variants."""
    if variant not in MED3DVLM_VARIANTS:
        raise ValueError(f"unknown DCFormer variant {variant!r}; choose from {sorted(MED3DVLM_VARIANTS)}")
    return DCFormerConfig(
        **MED3DVLM_VARIANTS[variant],
        block_types=("C", "C", "C", "C"),
        norm="batch",
        cube_branch=False,
        stem="dcformer",
        permute_input=True,
    )


class PositionalConv(nn.Module):
    """Conditional positional encoding: depthwise decomposed 3-tap conv (key ``proj``), no norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = DecompConv3d(dim, dim, 3, groups=dim, norm=None)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        feat = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return tokens + self.proj(feat).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with bias-free ``qkv`` / ``proj`` projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # Quirk the published ESICA weights depend on: queries are MULTIPLIED by sqrt(head_dim)
        # instead of divided, i.e. the logits are head_dim times the usual ones.
        out = F.scaled_dot_product_attention(q, k, v, scale=(c // self.heads) ** 0.5)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SpatialBlock(nn.Module):
    """Pre-norm transformer block with a positional conv before attention and before the MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cpe = nn.ModuleList([PositionalConv(dim), PositionalConv(dim)])
        self.attn = SelfAttention(dim, heads)
        # nn.RMSNorm with eps=None uses finfo(dtype).eps (1.2e-7 in fp32, 7.8e-3 in bf16),
        # which is what the published weights were trained with.
        self.layer_norm1 = nn.RMSNorm(dim)
        self.mlp1 = FeedForward(dim, 4 * dim)
        self.layer_norm2 = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        x = self.cpe[0](x, grid)
        x = x + self.attn(self.layer_norm1(x))
        x = self.cpe[1](x, grid)
        return x + self.mlp1(self.layer_norm2(x))


class TransformerBlock(DownsampleIn):
    """A stage block that attends over all voxels of its (small) feature map."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, heads: int) -> None:
        super().__init__()
        self._init_downsample(in_channels, out_channels, downsample)
        self.spatial_attention = SpatialBlock(out_channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        b, c, *grid = x.shape
        tokens = self.spatial_attention(x.flatten(2).transpose(1, 2), tuple(grid))
        return tokens.transpose(1, 2).reshape(b, c, *grid)


def _stem(cfg: DCFormerConfig) -> nn.Sequential:
    c0 = cfg.channels[0]
    if cfg.stem == "esica":
        # ESICA's stem: one full-resolution k=13 decomposed conv with norms and no activation.
        return nn.Sequential(DecompConv3d(cfg.in_channels, c0, 13, norm=cfg.norm, cube=cfg.cube_branch))
    # Med3DVLM's stem: k=7 stride 4, then three k=3; norms on every branch, no activation.
    layers = [DecompConv3d(cfg.in_channels, c0, 7, stride=4, norm=cfg.norm, cube=cfg.cube_branch)]
    layers += [DecompConv3d(c0, c0, 3, norm=cfg.norm, cube=cfg.cube_branch) for _ in range(3)]
    return nn.Sequential(*layers)


class DCFormer(nn.Module):
    """Five-stage encoder; ``forward`` returns the list of stage outputs ``[s0, ..., s4]``."""

    def __init__(self, config: DCFormerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        stages: dict[str, nn.Module] = {"s0": nn.Sequential(_stem(cfg))}
        for i in range(1, 5):
            c_in, c_out = cfg.channels[i - 1], cfg.channels[i]
            blocks = []
            for j in range(cfg.num_blocks[i]):
                first = j == 0
                if cfg.block_types[i - 1] == "T":
                    blocks.append(TransformerBlock(c_in if first else c_out, c_out, first, cfg.attention_heads))
                else:
                    blocks.append(
                        ConvBlock(
                            c_in if first else c_out, c_out, cfg.kernel_sizes[i - 1], first, cfg.norm, cfg.cube_branch
                        )
                    )
            stages[f"s{i}"] = nn.Sequential(*blocks)
        self.encoder = nn.ModuleDict(stages)

    @property
    def total_stride(self) -> int:
        return 16 if self.config.stem == "esica" else 64

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.config.permute_input:
            x = x.permute(0, 1, 3, 4, 2)  # (B,C,D,H,W) -> (B,C,H,W,D), as Med3DVLM was trained
        features = []
        for stage in self.encoder.values():
            x = stage(x)
            features.append(x)
        return features

    def spatial(self, feature: torch.Tensor) -> torch.Tensor:
        """A stage output ``(B, C, D', H', W')`` with its axes in the input's order."""
        if self.config.permute_input:
            return feature.permute(0, 1, 4, 2, 3)  # internal (H',W',D') back to (D',H',W')
        return feature

    def tokens(self, feature: torch.Tensor) -> torch.Tensor:
        """A stage output as tokens ``(B, D'*H'*W', C)``, index ``d*H'*W' + h*W' + w`` over the input's axis order."""
        return self.spatial(feature).flatten(2).transpose(1, 2)


# Where the reference's files keep the DCFormer tensors: pretrained_ViT.bin (bare), a DCFormer_SigLIP
# checkpoint, the merged Med3DVLM safetensors and the merged model's vision_tower.bin.
DCFORMER_PREFIXES = ("", "vision_encoder.", "model.vision_tower.vision_tower.", "vision_tower.")


def load_dcformer(path: str | Path, config: DCFormerConfig | None = None) -> DCFormer:
    """Med3DVLM's DCFormer (default ``decomp_small``) from any reference checkpoint file, loaded strictly.

    The tensors under the file's DCFormer prefix must match the model exactly; ``.bin`` files are read
    with ``torch.load(weights_only=True)``.
    """
    model = DCFormer(config or med3dvlm_config("small"))
    state = read_state_dict(path)
    probe = next(iter(model.state_dict()))
    prefix = next((p for p in DCFORMER_PREFIXES if p + probe in state), None)
    if prefix is None:
        raise CheckpointError(f"{path} is not a DCFormer checkpoint: no vision tower weights ({probe!r} under none "
                              f"of {DCFORMER_PREFIXES})")
    weights = state if prefix == "" else with_prefix(state, prefix)
    load_strict(model, weights, path, "DCFormer")
    return model.eval()
