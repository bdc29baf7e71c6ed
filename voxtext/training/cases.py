"""In-memory training cases on the model grid and a text-prompted crop sampler.

A case is an image already prepared exactly as at inference (``voxtext.preprocess``),
its label map on the same grid, and the targets it can be prompted with. A target
may cover several label values (an organ with its lesions, a whole tumour).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Target:
    """A structure that can be prompted: its phrasings and the label values it covers.

    ``anchor_weight``: how often a target-centred crop is placed on it, relative to the case's other
    present targets (raise it for small structures such as lesions, which few crops would otherwise hold).
    """

    phrasings: tuple[str, ...]
    values: tuple[int, ...]
    anchor_weight: float = 1.0

    @property
    def name(self) -> str:
        return self.phrasings[0]


@dataclass
class TrainingCase:
    name: str
    group: str  # cases of one group share a vocabulary of absent targets (e.g. "abdomen-ct")
    image: np.ndarray  # float32 (z, y, x) in [0, 1]
    labels: np.ndarray  # int16 (z, y, x)
    targets: list[Target]
    present: list[Target] = field(init=False)

    def __post_init__(self) -> None:
        if self.image.shape != self.labels.shape:
            raise ValueError(f"{self.name}: image {self.image.shape} and labels {self.labels.shape} differ")
        found = set(np.unique(self.labels).tolist())
        self.present = [t for t in self.targets if found.intersection(t.values)]

    def mask(self, target: Target) -> np.ndarray:
        return np.isin(self.labels, target.values)


@dataclass(frozen=True)
class Sample:
    """One crop asked for ``K`` prompts: ``label[k]`` is the mask of ``prompts[k]``."""

    image: np.ndarray  # (1, r, r, r)
    label: np.ndarray  # (K, r, r, r) bool
    prompts: tuple[str, ...]


def crop(array: np.ndarray, centre: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    """``roi``-sized window centred at ``centre``, zero-padded where it leaves the array."""
    out = np.zeros(tuple(roi), dtype=array.dtype)
    src, dst = [], []
    for c, r, n in zip(centre, roi, array.shape):
        start = int(c) - r // 2
        lo, hi = max(start, 0), min(start + r, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


class CropSampler:
    """Endless stream of crops, each with ``prompts_per_crop`` (prompt, binary label) pairs.

    ``pos_ratio``: probability that a crop is placed around a voxel of a present target (else anywhere).
    Each prompt is drawn among the structures in the crop, or, with ``absent_prompt_prob`` (or when the
    crop holds none), among the group's structures NOT in the crop, with an empty label: sliding-window
    inference asks every window for every prompt, and clinicians type absent structures. The prompts of
    one crop are distinct structures while there are enough, so neighbours in the crop are told apart;
    the image is encoded once for all of them. ``anchor_weights`` (target name -> factor) multiplies the
    targets' own anchor weights.
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        roi: Sequence[int],
        pos_ratio: float = 1.0,
        absent_prompt_prob: float = 0.0,
        group_weights: dict[str, float] | None = None,
        seed: int = 0,
        prompts_per_crop: int = 1,
        anchor_weights: dict[str, float] | None = None,
    ) -> None:
        if prompts_per_crop < 1:
            raise ValueError(f"prompts_per_crop must be at least 1, got {prompts_per_crop}")
        self.cases, self.roi = [c for c in cases if c.present], tuple(roi)
        self.pos_ratio, self.absent_prompt_prob = pos_ratio, absent_prompt_prob
        self.prompts_per_crop = prompts_per_crop
        self.anchor_weights = anchor_weights or {}
        self.rng = random.Random(seed)
        groups = sorted({c.group for c in self.cases})
        weights = group_weights or {}
        self.by_group = {g: [c for c in self.cases if c.group == g] for g in groups}
        self.group_weights = [weights.get(g, 1.0) for g in groups]
        self.vocabulary = {g: {t for c in self.by_group[g] for t in c.targets} for g in groups}

    def sample(self) -> Sample:
        group = self.rng.choices(list(self.by_group), weights=self.group_weights)[0]
        case = self.rng.choice(self.by_group[group])
        anchor = None
        if self.rng.random() < self.pos_ratio:
            # A voxel of a present target, shifted so the target is in the crop but not always at its centre:
            # otherwise "segment what is at the centre" would be a shortcut that ignores the prompt.
            anchor = self.rng.choices(case.present, weights=[
                t.anchor_weight * self.anchor_weights.get(t.name, 1.0) for t in case.present])[0]
            voxels = np.flatnonzero(case.mask(anchor))
            voxel = np.unravel_index(voxels[self.rng.randrange(len(voxels))], case.image.shape)
            centre = [a + self.rng.randint(-r // 4, r // 4) for a, r in zip(voxel, self.roi)]
        else:
            centre = [self.rng.randrange(n) for n in case.image.shape]
        labels = crop(case.labels, centre, self.roi)
        in_crop = set(np.unique(labels).tolist())
        present = [t for t in case.present if in_crop.intersection(t.values)]
        absent = sorted((t for t in self.vocabulary[group] if t not in present), key=lambda t: t.name)
        targets: list[Target] = []
        unused_present, unused_absent = self.rng.sample(present, len(present)), []
        if anchor is not None:  # the crop's anchor is the first present structure asked
            unused_present.remove(anchor)
            unused_present.append(anchor)
        for _ in range(self.prompts_per_crop):
            # Distinct structures first; a list is refilled (other phrasings) once all of it has been asked.
            unused_present = unused_present or self.rng.sample(present, len(present))
            unused_absent = unused_absent or self.rng.sample(absent, len(absent))
            ask_absent = not unused_present or (unused_absent and self.rng.random() < self.absent_prompt_prob)
            targets.append((unused_absent if ask_absent else unused_present).pop())
        label = np.stack([np.isin(labels, t.values) if t in present else np.zeros(self.roi, dtype=bool)
                          for t in targets])
        image = augment_intensity(crop(case.image, centre, self.roi), self.rng)
        return Sample(image[None], label, tuple(self.rng.choice(t.phrasings) for t in targets))

    def __iter__(self) -> Iterator[Sample]:
        while True:
            yield self.sample()


def augment_intensity(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """Random contrast (gamma), scale/shift and noise; background (0) stays 0. No flips: laterality matters."""
    body = image > 0
    out = np.clip(image, 0.0, 1.0) ** rng.uniform(0.7, 1.5)
    out = out * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    out = out + np.random.default_rng(rng.randrange(2**31)).normal(0.0, rng.uniform(0.0, 0.03), out.shape)
    return np.where(body, np.clip(out, 0.0, 1.0), 0.0).astype(np.float32)


def collate(samples: Sequence[Sample], tokenizer, max_length: int = 64) -> dict[str, torch.Tensor]:
    """``image`` (B, 1, r, r, r), ``label`` (B, K, r, r, r) and the B*K prompts' tokens, crop-major."""
    tokens = tokenizer([p for s in samples for p in s.prompts], padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt")
    return {
        "image": torch.from_numpy(np.stack([s.image for s in samples])),
        "label": torch.from_numpy(np.stack([s.label for s in samples])),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }


def batch_stream(sampler: CropSampler, tokenizer, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield collate([sampler.sample() for _ in range(batch_size)], tokenizer)
