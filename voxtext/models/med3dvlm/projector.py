"""Med3DVLM's dual-stream MLP-Mixer projector (reference ``mm_projector_type: mixer``).

Two independent streams map DCFormer stage s3 ("low") and stage s4 ("high") tokens into the
LLM's embedding space; the result is the concatenation, low-stream tokens first. Key names
follow the published checkpoint (``low_mixer.0.mlp1.mm_projector.1.1.weight`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import Med3DVLMConfig


class MixerMLP(nn.Module):
    """``Linear(in, out)`` followed by ``depth - 1`` blocks ``GELU -> Linear(out, out)`` (key ``mm_projector``)."""

    def __init__(self, in_features: int, out_features: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
        layers += [nn.Sequential(nn.GELU(), nn.Linear(out_features, out_features)) for _ in range(depth - 1)]
        self.mm_projector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm_projector(x)


class MixerLayer(nn.Module):
    """Token mixing then channel mixing of ``(B, n_in, d_in)`` into ``(B, n_out, d_out)``.

    Both LayerNorms have width ``d_in`` (the second one runs after token mixing, which keeps the
    width). There are no residual connections: the sizes change in both mixings.
    """

    def __init__(self, in_size: Sequence[int], out_size: Sequence[int], mlp_depth: int) -> None:
        super().__init__()
        (n_in, d_in), (n_out, d_out) = in_size, out_size
        self.ln1 = nn.LayerNorm(d_in)
        self.ln2 = nn.LayerNorm(d_in)
        self.mlp1 = MixerMLP(n_in, n_out, mlp_depth)
        self.mlp2 = MixerMLP(d_in, d_out, mlp_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return self.mlp2(self.ln2(x))


def mixer_stream(in_size: Sequence[int], token_counts: Sequence[int], output_dim: int, mlp_depth: int) -> nn.Sequential:
    """Layers ``i = 0..depth-1`` reach ``token_counts[i]`` tokens of width ``output_dim / 2**(depth-1-i)``."""
    depth = len(token_counts)
    sizes = [tuple(in_size)] + [(n, output_dim // 2 ** (depth - 1 - i)) for i, n in enumerate(token_counts)]
    return nn.Sequential(*(MixerLayer(sizes[i], sizes[i + 1], mlp_depth) for i in range(depth)))


class MixerProjector(nn.Module):
    """``[low, high]`` vision tokens -> ``(B, n_low + n_high, hidden)`` LLM embeddings."""

    def __init__(self, config: Med3DVLMConfig) -> None:
        super().__init__()
        depth = config.mm_mlp_depth
        self.low_mixer = mixer_stream(config.low_input_size, config.low_output_size, config.hidden_size, depth)
        self.high_mixer = mixer_stream(config.high_input_size, config.high_output_size, config.hidden_size, depth)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        low, high = features
        return torch.cat([self.low_mixer(low), self.high_mixer(high)], dim=1)
