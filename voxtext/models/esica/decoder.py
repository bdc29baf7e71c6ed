"""ESICA's prompt encoder and mask decoder (with two-pass refinement).

The mask is a similarity map: a 48-d vector derived from the text embedding is
dotted with the 48-d feature of every voxel of the upsampled decoder output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from ..blocks import DecompConv3d, RMSNorm3d
from .transformer import TwoWayTransformer


class PromptEncoder(nn.Module):
    """Sparse prompt = text token (+ previous mask token); dense prompt = embedded previous mask."""

    def __init__(self, dim: int, feat_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.no_mask_embed = nn.Parameter(torch.randn(1, dim, *feat_size))
        widths = [1, dim // 8, dim // 4, dim // 2, dim]
        self.mask_downscaling = nn.Sequential(
            *(
                DecompConv3d(widths[i], widths[i + 1], k, stride=2, act=True, cube=True)
                for i, k in enumerate((13, 11, 7, 5))
            )
        )

    def forward(
        self,
        text_token: torch.Tensor,
        prev_mask: torch.Tensor | None = None,
        prev_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = text_token.unsqueeze(1)
        if prev_token is not None:
            sparse = torch.cat((sparse, prev_token), dim=1)
        if prev_mask is None:
            dense = self.no_mask_embed.expand(text_token.shape[0], -1, -1, -1, -1)
        else:
            dense = self.mask_downscaling(prev_mask)
        return sparse, dense


class SkipUpBlock(nn.Module):
    """x2 trilinear upsampling + conv, fused with a skip connection, residual on the upsampled map.

    The fusing conv sees ``cat(up, skip)``; its skip half depends on the image only, so
    :meth:`skip_term` computes it once per window and :meth:`forward` adds it for every prompt.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.up_conv = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False), nn.Conv3d(dim, dim, 3, padding=1)
        )
        self.conv = nn.Sequential(nn.Conv3d(2 * dim, dim, 3, padding=1), RMSNorm3d(dim), nn.GELU())

    def skip_term(self, skip: torch.Tensor) -> torch.Tensor:
        fuse = self.conv[0]
        return F.conv3d(skip, fuse.weight[:, self.dim :], fuse.bias, padding=1)

    def forward(self, x: torch.Tensor, skip_term: torch.Tensor) -> torch.Tensor:
        up = self.up_conv(x)
        fused = F.conv3d(up, self.conv[0].weight[:, : self.dim], padding=1) + skip_term
        return self.conv[1:](fused) + up  # norm and activation of the fusing conv


class ImageDecoder(nn.Module):
    """Brings every encoder level to ``hidden_dim`` channels and upsamples back to full resolution."""

    def __init__(self, level_dims: tuple[int, ...], kernel_sizes: tuple[int, ...], hidden_dim: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(
            nn.Identity()
            if dim == hidden_dim
            else DecompConv3d(dim, hidden_dim, k, act=True, cube=True)
            for dim, k in zip(level_dims, kernel_sizes)
        )
        self.up_blocks = nn.ModuleList(SkipUpBlock(hidden_dim) for _ in range(len(level_dims) - 1))

    def skip_terms(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """The prompt-independent part of each up block from the high-resolution levels, deepest first."""
        adapted = [self.adapters[i](x) for i, x in enumerate(skips)][::-1]
        return [block.skip_term(skip) for block, skip in zip(self.up_blocks, adapted)]

    def forward(self, src: torch.Tensor, skip_terms: list[torch.Tensor]) -> torch.Tensor:
        x = self.adapters[len(skip_terms)](src)
        for block, term in zip(self.up_blocks, skip_terms):
            x = block(x, term)
        return x


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer: TwoWayTransformer,
        dim: int,
        text_dim: int,
        level_dims: tuple[int, ...],
        kernel_sizes: tuple[int, ...],
        hidden_dim: int,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.mask_tokens = nn.Embedding(1, dim)
        self.upscaling = ImageDecoder(level_dims, kernel_sizes, hidden_dim)
        self.txt_align_upscaled_embedding = nn.Sequential(
            nn.Linear(text_dim, dim // 4),
            nn.RMSNorm(dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, dim // 8),
            nn.RMSNorm(dim // 8),
            nn.GELU(),
            nn.Linear(dim // 8, hidden_dim),
        )

    def forward(
        self,
        image_embedding: torch.Tensor,
        text_embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        skip_terms: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns mask logits (B, 1, D, H, W) and the mask-token output (B, 1, C)."""
        tokens = torch.cat((self.mask_tokens.weight.expand(sparse.shape[0], -1, -1), sparse), dim=1)
        src = image_embedding + dense
        queries, keys = self.transformer(src, tokens)
        src = keys.transpose(1, 2).reshape(src.shape)
        voxel_features = self.upscaling(src, skip_terms)
        text_vector = self.txt_align_upscaled_embedding(text_embedding)
        logits = torch.einsum("bc,bc...->b...", text_vector, voxel_features).unsqueeze(1)
        return logits, queries[:, :1]


@dataclass
class ImageContext:
    """Prompt-independent decoder inputs of a batch of windows, computed once and shared by all prompts."""

    embedding: torch.Tensor
    skip_terms: list[torch.Tensor]

    def repeat(self, n: int) -> "ImageContext":
        """Each window repeated ``n`` times in a row (window-major), as views where possible."""

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.unsqueeze(1).expand(t.shape[0], n, *t.shape[1:]).reshape(t.shape[0] * n, *t.shape[1:])

        return ImageContext(rep(self.embedding), [rep(s) for s in self.skip_terms])


class SegDecoder(nn.Module):
    """Text-prompted mask decoder with ``pass_num`` refinement passes after the first."""

    def __init__(
        self,
        dim: int,
        text_dim: int,
        feat_size: tuple[int, int, int],
        pass_num: int,
        depth: int,
        mlp_dim: int,
        num_heads: int,
        num_kv_heads: int,
        level_dims: tuple[int, ...],
        kernel_sizes: tuple[int, ...],
        hidden_dim: int,
    ) -> None:
        super().__init__()
        self.pass_num = pass_num
        transformer = TwoWayTransformer(depth, dim, num_heads, num_kv_heads, mlp_dim)
        self.mask_decoder = MaskDecoder(transformer, dim, text_dim, level_dims, kernel_sizes, hidden_dim)
        self.prompt_encoder = PromptEncoder(dim, feat_size)
        self.text_adapt = nn.Linear(text_dim, dim)

    def image_context(self, features: list[torch.Tensor]) -> ImageContext:
        return ImageContext(features[-1], self.mask_decoder.upscaling.skip_terms(features[:-1]))

    def forward(self, context: ImageContext, text_embedding: torch.Tensor, pass_num: int | None = None) -> torch.Tensor:
        """Logits of the last pass; ``context`` and ``text_embedding`` are aligned along the batch."""
        text_token = self.text_adapt(text_embedding)
        sparse, dense = self.prompt_encoder(text_token)
        logits, token = self.mask_decoder(context.embedding, text_embedding, sparse, dense, context.skip_terms)
        for _ in range(self.pass_num if pass_num is None else pass_num):
            sparse, dense = self.prompt_encoder(text_token, torch.sigmoid(logits), token)
            logits, token = self.mask_decoder(context.embedding, text_embedding, sparse, dense, context.skip_terms)
        return logits
