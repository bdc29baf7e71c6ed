"""Two-way transformer between prompt tokens and image tokens (SAM-style), with GQA and RoPE."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over interleaved pairs ``(x[2i], x[2i+1])``.

    Positions are ``0..n-1`` of whatever sequence it is applied to. The published ESICA
    applies it to queries and keys of every attention, including cross-attention
    (prompt positions 0..T-1 against image positions 0..N-1 of the flattened grid);
    we reproduce that because the weights were trained with it.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (B, heads, N, head_dim)."""
        exponents = torch.arange(0, self.dim, 2, device=x.device)[: self.dim // 2].float() / self.dim
        inv_freq = 1.0 / (self.base**exponents)
        positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        cos, sin = angles.cos(), angles.sin()
        pairs = x.float().unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
        return rotated.flatten(-2).type_as(x)


class GroupedQueryAttention(nn.Module):
    """Attention with ``num_kv_heads`` key/value heads shared by groups of query heads."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, self.head_dim * num_kv_heads)
        self.v_proj = nn.Linear(dim, self.head_dim * num_kv_heads)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        q = rope(self._heads(self.q_proj(q), self.num_heads))
        k = rope(self._heads(self.k_proj(k), self.num_kv_heads))
        v = self._heads(self.v_proj(v), self.num_kv_heads)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Post-norm block: token self-attention, token->image, MLP, image->token.

    nn.RMSNorm is used with eps=None (finfo(dtype).eps), as in the published weights.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = GroupedQueryAttention(dim, num_heads, num_kv_heads)
        self.norm1 = nn.RMSNorm(dim)
        self.cross_attn_token_to_image = GroupedQueryAttention(dim, num_heads, num_kv_heads)
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.RMSNorm(dim)
        self.cross_attn_image_to_token = GroupedQueryAttention(dim, num_heads, num_kv_heads)
        self.norm4 = nn.RMSNorm(dim)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.norm1(queries + self.self_attn(queries, queries, queries, rope))
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries, keys, keys, rope))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys, queries, queries, rope))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Alternating attention between prompt tokens (queries) and image tokens (keys)."""

    def __init__(self, depth: int, dim: int, num_heads: int, num_kv_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.rope = RotaryEmbedding(dim // num_heads)
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, num_kv_heads, mlp_dim) for _ in range(depth))
        self.final_attn_token_to_image = GroupedQueryAttention(dim, num_heads, num_kv_heads)
        self.norm_final_attn = nn.RMSNorm(dim)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` (B, C, d, h, w), ``tokens`` (B, T, C) -> (queries (B, T, C), keys (B, d*h*w, C))."""
        queries, keys = tokens, image.flatten(2).transpose(1, 2)
        for layer in self.layers:
            queries, keys = layer(queries, keys, self.rope)
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(queries, keys, keys, self.rope))
        return queries, keys
