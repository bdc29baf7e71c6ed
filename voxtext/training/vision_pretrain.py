"""Dense pretraining of a Med3DVLM vision tower on phantom label maps (stage 0 of the default VLM recipe).

A 1-5 cm lesion is a handful of voxels of a 64^3 whole-field input, and the one bit per volume that reports
and Q/A pairs give was measured not to teach a DCFormer to see it (``voxtext/weights/vlm-default/README.md``).
Here every voxel supervises the tower: a feature-pyramid head over its five stages predicts which share of each
cell of the stem's grid (4^3 input voxels) every organ and lesion label covers, and a linear head on the
stage-3/4 tokens, the ones the projector reads, predicts the presence of each lesion label. Every step draws
fresh phantoms (:func:`voxtext.phantom.generate_phantom`, a quarter without lesions), so nothing is seen twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..models.dcformer import DCFormer
from ..models.med3dvlm import prepare_volume_and_labels
from ..phantom import LABELS, generate_phantom
from ..volume import Volume
from .seg_trainer import append_metrics
from .train_vlm import stage_tokens
from .vlm_data import phantom_lesions

ORGAN_LABELS = tuple(v for v in LABELS.values() if v < 20)
LESION_LABELS = tuple(v for v in LABELS.values() if v >= 20)
LESION_WEIGHT = 20.0  # positive-class weight of the lesion cells (a lesion covers ~0.1 % of the volume)


def dense_targets(seed: int, size: tuple[int, int, int], window: tuple[float, float] | None, cell: int = 4
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phantom ``seed`` as ``(image (1, D, H, W), cell occupancy (labels, D/cell, H/cell, W/cell),
    lesion presence (len(LESION_LABELS),))``, prepared as the VLM's input (:func:`prepare_volume_and_labels`)."""
    ph = generate_phantom(seed, shape=tuple(size[::-1]), lesions=phantom_lesions(seed))
    image, labels = prepare_volume_and_labels(Volume(ph.image, ph.affine, "CT"), ph.labels, size, window)
    one_hot = torch.stack([labels == v for v in ORGAN_LABELS + LESION_LABELS]).float()
    present = one_hot[len(ORGAN_LABELS):].flatten(1).amax(1)
    return image[0], F.avg_pool3d(one_hot[None], cell)[0], present


class FreshPhantoms(IterableDataset):
    """Endless :func:`dense_targets` of phantoms ``first, first + stride, ...`` (one sequence per loader worker)."""

    def __init__(self, size: tuple[int, int, int], window: tuple[float, float] | None, first: int = 1_000_000,
                 stride: int = 7) -> None:
        self.size, self.window, self.first, self.stride = size, window, first, stride

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        seed = self.first + worker * self.stride
        while True:
            yield dense_targets(seed, self.size, self.window)
            seed += workers * self.stride


class DenseHeads(nn.Module):
    """Training heads on a DCFormer: cell occupancy from a feature pyramid, lesion presence from the s3/s4 tokens."""

    def __init__(self, tower: DCFormer, image_size: Sequence[int], width: int = 48) -> None:
        super().__init__()
        self.tower, channels = tower, tower.config.channels
        self.lateral = nn.ModuleList(nn.Conv3d(c, width, 1) for c in channels)
        self.cells = nn.Sequential(nn.Conv3d(width, width, 3, padding=1), nn.GELU(),
                                   nn.Conv3d(width, len(ORGAN_LABELS + LESION_LABELS), 1))
        token_features = sum(stage_tokens(image_size, i) * channels[i] for i in (3, 4))
        self.presence = nn.Linear(token_features, len(LESION_LABELS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grids = [self.tower.spatial(f) for f in self.tower(images)]  # (B, C, D', H', W') per stage
        pyramid = sum(F.interpolate(lateral(g), size=grids[0].shape[2:], mode="trilinear", align_corners=False)
                      for lateral, g in zip(self.lateral, grids))
        return self.cells(pyramid), self.presence(torch.cat([grids[3].flatten(1), grids[4].flatten(1)], 1))


def dense_loss(heads: DenseHeads, images: torch.Tensor, cells: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Cell-occupancy BCE (lesion labels up-weighted) plus lesion-presence BCE."""
    predicted_cells, predicted_presence = heads(images)
    weight = torch.ones(cells.shape[1])
    weight[len(ORGAN_LABELS):] = LESION_WEIGHT
    return (F.binary_cross_entropy_with_logits(predicted_cells, cells, pos_weight=weight.view(-1, 1, 1, 1))
            + F.binary_cross_entropy_with_logits(predicted_presence, present))


def pretrain_vision_tower(
    tower: DCFormer,
    image_size: tuple[int, int, int],
    window: tuple[float, float] | None,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
    log: Path | None = None,
    log_every: int = 50,
) -> list[float]:
    """Train ``tower`` in place for ``steps`` AdamW steps (one-cycle schedule) on fresh phantoms (each ``seed``
    draws its own); returns the logged losses (``log``: a metrics CSV as the other trainers write)."""
    torch.manual_seed(seed)
    heads = DenseHeads(tower, image_size).train()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    loader = DataLoader(FreshPhantoms(image_size, window, first=1_000_000 + 100_000 * seed), batch_size=batch_size,
                        num_workers=1, prefetch_factor=4)
    losses, running, t0 = [], [], time.time()
    for step, (images, cells, present) in enumerate(loader, 1):
        loss = dense_loss(heads, images, cells, present)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            losses.append(sum(running) / len(running))
            running = []
            if log is not None:
                append_metrics(log, "vision", step, losses[-1], schedule.get_last_lr()[0], time.time() - t0)
        if step == steps:
            break
    tower.eval()
    return losses
