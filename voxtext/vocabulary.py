"""What a model learned each phrasing on: the imaging modalities of its training images.

A model folder may hold ``trained_on.json`` (``{"modalities": {phrasing: ["CT", ...]}}``), written by the recipe
that trained it. A prompt is matched to the nearest learned phrasing (cosine of the model's text embeddings, as
the lesion routing matches paraphrases); when the volume's modality is not one the phrasing was learned on, the
answer carries a caution: nothing validates it there. The embedded default learned brain structures on MR only
and abdominal organs on CT only; asked "brain tumor" on an abdominal CT it marks vertebrae and a kidney.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError

TRAINED_ON_FILE = "trained_on.json"


class TrainedVocabulary:
    """The phrasings a model learned, each with the modalities it learned it on."""

    def __init__(self, modalities: Mapping[str, Sequence[str]]) -> None:
        self.modalities = {phrasing: tuple(m) for phrasing, m in modalities.items()}
        self._vectors: torch.Tensor | None = None  # unit embeddings of the phrasings, once asked

    @classmethod
    def of(cls, folder: str | Path) -> TrainedVocabulary | None:
        """The folder's vocabulary, or None when it has no ``trained_on.json`` (the published weights)."""
        path = Path(folder) / TRAINED_ON_FILE
        if not path.is_file():
            return None
        try:
            modalities = json.loads(path.read_text())["modalities"]
            return cls({str(p): [str(m) for m in mods] for p, mods in modalities.items()})
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path} is not a valid {TRAINED_ON_FILE}: {error}") from error

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TRAINED_ON_FILE
        path.write_text(json.dumps({"modalities": {p: list(m) for p, m in self.modalities.items()}}, indent=2))
        return path

    def cautions(
        self, prompts: Sequence[str], modality: str, embed: Callable[[Sequence[str]], torch.Tensor]
    ) -> dict[str, str]:
        """prompt -> caution, for the prompts whose nearest learned phrasing was never learned on ``modality``."""
        if not prompts:
            return {}
        phrasings = list(self.modalities)
        with torch.no_grad():
            if self._vectors is None:
                self._vectors = F.normalize(embed(phrasings).float(), dim=-1).cpu()
            asked = F.normalize(embed(list(prompts)).float(), dim=-1).cpu()
        nearest = (asked @ self._vectors.T).argmax(dim=1).tolist()
        cautions = {}
        for prompt, index in zip(prompts, nearest):
            learned = self.modalities[phrasings[index]]
            if modality not in learned:
                cautions[prompt] = (f"this model learned {phrasings[index]!r} on {'/'.join(learned)} images only, "
                                    f"not {modality}: its answer here is unvalidated")
        return cautions
