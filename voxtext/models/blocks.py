"""Building blocks shared by the DCFormer encoders of ESICA and Med3DVLM.

Both published models build their encoders from the same decomposed convolution
and ConvNeXt-like block; they differ only in the normalisation (instance RMS norm
in ESICA, BatchNorm in Med3DVLM) and in an extra 3x3x3 branch (ESICA). Attribute
names follow the published checkpoints so their state dicts load strictly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

NormKind = Literal["rms", "batch"] | None


class RMSNorm3d(nn.Module):
    """Per-sample, per-channel RMS normalisation over the spatial axes.

    ``y = scale[c] * x / (sqrt(mean_{DHW} x^2) + eps)``; eps is added outside the
    square root, as the published ESICA weights were trained with.
    """

    def __init__(self, channels: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One reduction and one full-size product (the per-channel factor is small): on CPU this halves the
        # norm's cost against squaring, dividing and scaling the whole map.
        rms = torch.linalg.vector_norm(x, dim=(2, 3, 4), keepdim=True) / math.sqrt(math.prod(x.shape[2:]))
        return x * (self.scale.view(1, -1, 1, 1, 1) / (rms + self.eps))


def _norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "rms":
        return RMSNorm3d(channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


class DecompConv3d(nn.Module):
    """Sum of three axis-aligned 1-D convolutions (k,1,1), (1,k,1), (1,1,k).

    With ``cube=True`` a fourth 3x3x3 branch is added (ESICA). Each branch is
    ``Sequential(conv, norm)`` (keys ``cN.0``, ``cN.1``); ``act`` is applied to the sum.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        norm: NormKind = "rms",
        act: bool = False,
        cube: bool = False,
    ) -> None:
        super().__init__()
        k, p = kernel_size, kernel_size // 2
        shapes = [((k, 1, 1), (p, 0, 0)), ((1, k, 1), (0, p, 0)), ((1, 1, k), (0, 0, p))]
        if cube:
            shapes.append(((3, 3, 3), (1, 1, 1)))
        for i, (kernel, pad) in enumerate(shapes, start=1):
            conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=pad, groups=groups)
            self.add_module(f"c{i}", nn.Sequential(conv, _norm(norm, out_channels)))
        self.num_branches = len(shapes)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        for i in range(2, self.num_branches + 1):
            y = y + getattr(self, f"c{i}")(x)
        return self.act(y)


class FeedForward(nn.Module):
    """Channels-last MLP ``Linear -> GELU -> Linear`` (keys ``mlp.0``, ``mlp.3``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden_dim, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class DownsampleIn(nn.Module):
    """Base for blocks that may open a stage: stride-2 max pooling + bias-free 1x1x1 conv.

    The layers are plain attributes ``pool`` / ``proj`` so the keys match the checkpoints.
    """

    def _init_downsample(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        self.pool = nn.MaxPool3d(3, 2, 1) if downsample else None
        self.proj = nn.Conv3d(in_channels, out_channels, 1, bias=False) if downsample else None

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj(self.pool(x))


class ConvBlock(DownsampleIn):
    """ConvNeXt-like residual block: depthwise decomposed conv, MLP, layer scale.

    The first block of a stage halves the resolution and changes the width first.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        downsample: bool,
        norm: NormKind,
        cube: bool,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        # Layer scale (key ``scale``) is registered first: parameters precede sub-modules in the state dict.
        self.scale = nn.Parameter(torch.full((out_channels,), 1e-6))
        self._init_downsample(in_channels, out_channels, downsample)
        self.dwconv = DecompConv3d(out_channels, out_channels, kernel_size, groups=out_channels, norm=norm, cube=cube)
        self.mlp = FeedForward(out_channels, expansion * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        y = self.mlp(self.dwconv(x).movedim(1, -1)) * self.scale
        return x + y.movedim(-1, 1)
