"""The lesion stage of a segmentation model: lesion prompts answered by a finer-grid model inside their organ.

A model folder may hold a ``lesions/`` sub-folder: a second ESICA checkpoint (``config.json`` +
``model.safetensors``) on a finer grid, and ``routing.json``, which lists the lesions it answers (their
phrasings and the organs they lie in) and the phrasings the main model answers itself. A prompt goes to the
lesion stage when the nearest of all these phrasings (cosine of the main model's text embeddings) is a
lesion's, so paraphrases ("hepatic mass") are routed as well as the listed names. The main model segments
the lesion's organ(s); the lesion model is run on the organ's bounding box (plus a margin) at its own grid,
on an image blanked beyond a few millimetres around the organ mask (dilated: the main model's organ edges are
coarse), and its answer is kept within the same distance of the organ. Each lesion may carry a calibrated
minimum volume and confidence (mean probability) of the connected components it keeps, as nnU-Net's
post-processing: small or hesitant blobs are the usual false alarms for a lesion the organ does not hold.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .checkpoints import load_esica
from .errors import CheckpointError
from .inference import ESICAInferer, Precision, WindowConfig
from .preprocess import PreprocessConfig, prepare, restore, to_model_grid
from .volume import Volume

ROUTING_FILE = "routing.json"
LESION_FOLDER = "lesions"
ORGAN_MARGIN_MM = 20.0  # context around the organ's bounding box given to the lesion model
ORGAN_DILATION_MM = 6.0  # how far outside the main model's organ mask a lesion may reach
RELIABLE_DSC = 0.1  # below this validation DSC a lesion target's answers carry a caution


@dataclass(frozen=True)
class LesionTarget:
    """A lesion the lesion stage answers: its phrasings and the organ(s) it lies in."""

    phrasings: tuple[str, ...]
    within: tuple[str, ...]
    min_volume_ml: float = 0.0  # connected components smaller than this are dropped ...
    min_confidence: float = 0.0  # ... as are those whose mean probability is lower
    # Measured by the calibration: validation phantoms holding this lesion, and the mean DSC of the kept answer.
    validated_cases: int = 0
    validated_dsc: float | None = None

    @property
    def caution(self) -> str:
        """A warning to show with every answer of this target when the calibration measured it unreliable."""
        if self.validated_dsc is None or self.validated_dsc >= RELIABLE_DSC:
            return ""
        return (f"the lesion stage found almost no {self.phrasings[0]} on its validation phantoms (mean DSC "
                f"{self.validated_dsc:.2f} over {self.validated_cases}): an empty mask does not rule one out")

    def to_dict(self) -> dict:
        return {"phrasings": list(self.phrasings), "within": list(self.within),
                "min_volume_ml": self.min_volume_ml, "min_confidence": self.min_confidence,
                "validated_cases": self.validated_cases, "validated_dsc": self.validated_dsc}

    @classmethod
    def from_dict(cls, data: dict) -> LesionTarget:
        dsc = data.get("validated_dsc")
        return cls(tuple(data["phrasings"]), tuple(data["within"]), float(data.get("min_volume_ml", 0.0)),
                   float(data.get("min_confidence", 0.0)), int(data.get("validated_cases", 0)),
                   None if dsc is None else float(dsc))


@dataclass(frozen=True)
class LesionRouting:
    """Which prompts the lesion stage answers (see the module docstring)."""

    lesions: tuple[LesionTarget, ...]
    other_phrasings: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> LesionRouting:
        try:
            data = json.loads(path.read_text())
            lesions = tuple(LesionTarget.from_dict(t) for t in data["lesions"])
            other = tuple(data["other_phrasings"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"unreadable lesion routing file {path}: {error}") from error
        if not lesions or any(not t.phrasings or not t.within for t in lesions):
            raise CheckpointError(f"{path} lists no lesions, or a lesion without phrasings or organs")
        if any(t.min_volume_ml < 0 or not 0 <= t.min_confidence < 1 for t in lesions):
            raise CheckpointError(f"{path}: min_volume_ml must be >= 0 and min_confidence in [0, 1)")
        return cls(lesions, other)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"lesions": [t.to_dict() for t in self.lesions],
                                    "other_phrasings": list(self.other_phrasings)}, indent=2))

    @functools.lru_cache(maxsize=4)
    def known_vectors(self, embed: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Unit embeddings of every listed phrasing (the lesions', then the others), once per text encoder: a
        segmentation call embeds only its own prompts."""
        known = [p for t in self.lesions for p in t.phrasings] + list(self.other_phrasings)
        return torch.nn.functional.normalize(embed(known).float(), dim=1)

    def route(self, prompts: Sequence[str], embed: Callable[[list[str]], torch.Tensor]) -> dict[str, LesionTarget]:
        """The prompts the lesion stage answers, each with its lesion target."""
        owners = [t for t in self.lesions for _ in t.phrasings] + [None] * len(self.other_phrasings)
        vectors = torch.nn.functional.normalize(embed(list(prompts)).float(), dim=1)
        nearest = (vectors @ self.known_vectors(embed).T).argmax(1).tolist()
        return {p: owners[n] for p, n in zip(prompts, nearest) if owners[n] is not None}


class LesionStage:
    """A finer-grid ESICA model asked for lesions inside organ masks found by the main model."""

    def __init__(self, folder: Path, device: torch.device, precision: Precision = "fp32") -> None:
        network, tokenizer = load_esica(folder, device=device, download=False)
        self.inferer = ESICAInferer(network, tokenizer, device, precision)
        self.routing = LesionRouting.load(folder / ROUTING_FILE)

    @classmethod
    def of(cls, model_folder: Path, device: torch.device, precision: Precision = "fp32") -> LesionStage | None:
        """The lesion stage stored with a model, if it has one."""
        folder = model_folder / LESION_FOLDER
        return cls(folder, device, precision) if folder.is_dir() else None

    @property
    def spacing_mm(self) -> float:
        return self.inferer.model.config.target_spacing

    def probabilities(
        self,
        volume: Volume,
        prompts: Sequence[str],
        targets: Sequence[LesionTarget],
        organ: np.ndarray,
        modality: str,
        windows: WindowConfig,
        threshold: float,
        cancel: threading.Event | None = None,
    ) -> np.ndarray:
        """Probabilities (P, i, j, k) of lesion ``prompts`` (routed to ``targets``) that all lie in ``organ``
        (bool, the volume's grid); zero outside the (slightly dilated) organ and in the components of
        ``p > threshold`` that their target rejects. ``modality``: as the main model prepared the volume."""
        out = np.zeros((len(prompts), *volume.shape), np.float32)
        if not organ.any():
            return out
        spacing = np.asarray(volume.spacing)
        margin = np.ceil(ORGAN_MARGIN_MM / spacing).astype(int)
        lo = np.maximum(np.argwhere(organ).min(0) - margin, 0)
        hi = np.minimum(np.argwhere(organ).max(0) + margin + 1, volume.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        prepared = prepare(volume.crop(box), PreprocessConfig(target_spacing=self.spacing_mm, modality=modality))
        organ_grid = to_model_grid(prepared.geometry, organ[box], "nearest")
        image = organ_surroundings(prepared.image, organ_grid, self.spacing_mm, ORGAN_DILATION_MM)
        text = self.inferer.embed_prompts(prompts)
        logits = self.inferer.logits(torch.from_numpy(image), text, windows, cancel=cancel).float().cpu()
        inside = ndimage.distance_transform_edt(~organ[box], sampling=spacing) <= ORGAN_DILATION_MM
        voxel_ml = float(np.prod(spacing)) / 1000.0
        for i, target in enumerate(targets):
            probability = restore(prepared, torch.sigmoid(logits[i]), "linear") * inside
            out[(i, *box)] = keep_confident(probability, threshold, target, voxel_ml)
        return out


def components(probability: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components (26-neighbourhood) of ``probability > threshold``: label array, voxel counts and
    mean probabilities of components 1..n."""
    labels, n = ndimage.label(probability > threshold, structure=np.ones((3, 3, 3)))
    index = np.arange(1, n + 1)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:], np.asarray(
        ndimage.mean(probability, labels, index)).reshape(n)


def keep_confident(probability: np.ndarray, threshold: float, target: LesionTarget, voxel_ml: float) -> np.ndarray:
    """``probability`` with the components of ``p > threshold`` that ``target`` rejects set to zero."""
    if not (target.min_volume_ml or target.min_confidence):
        return probability
    labels, counts, means = components(probability, threshold)
    rejected = 1 + np.flatnonzero((counts * voxel_ml < target.min_volume_ml) | (means < target.min_confidence))
    return np.where(np.isin(labels, rejected), 0.0, probability).astype(probability.dtype, copy=False)


def organ_surroundings(image: np.ndarray, organ: np.ndarray, spacing_mm: float, dilation_mm: float) -> np.ndarray:
    """A prepared image (values 0..1, isotropic ``spacing_mm``) blanked to 0 further than ``dilation_mm`` from
    ``organ``: the lesion model sees the organ and a thin rim, not the neighbours that look like lesions."""
    near = ndimage.distance_transform_edt(~organ) * spacing_mm <= dilation_mm
    return np.where(near, image, 0.0).astype(np.float32)
