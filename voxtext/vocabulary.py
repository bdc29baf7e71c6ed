"""What a model learned each phrasing on: the imaging modalities of its training images.

A model folder may hold ``trained_on.json`` (``{"modalities": {phrasing: ["CT", ...]}}``), written by the recipe
that trained it. A prompt is matched to the nearest learned phrasing (cosine of the model's text embeddings, as
the lesion routing matches paraphrases). A prompt near none of them names a structure the model never learned
("prostate", "gallbladder") and is answered empty, with a caution that says so. When the volume's modality is not
one the nearest phrasing was learned on, nothing validates the model's answer there, and by default it is not given
either (empty, with a caution) unless the caller allows other modalities. The embedded default learned brain
structures on MR only and abdominal organs on CT only; asked "brain tumor" on an abdominal CT it marks vertebrae and
a kidney, and asked "liver" on a real abdominal MR it marks background only.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CheckpointError

Embed = Callable[[Sequence[str]], torch.Tensor]  # the model's text embeddings of some phrasings
TRAINED_ON_FILE = "trained_on.json"
# A prompt this far from every learned phrasing (cosine of MiniLM embeddings) names a structure the model never
# learned, and is answered empty. Measured with the embedded default's 159 phrasings: paraphrases of what it learned
# lie at 0.70-0.93 ("spinal column" -> "spine" 0.70, "splenic tissue" -> "spleen" 0.73, "liver parenchyma" ->
# "hepatic parenchyma" 0.93), structures it never saw at 0.48-0.60 ("adrenal gland" 0.48, "colon" 0.51, "prostate"
# 0.52 -> "bladder", "heart" 0.53, "gallbladder" 0.60 -> "kidney stone"); "lung nodule" -> "lungs" (0.69) passes.
MIN_SIMILARITY = 0.62


def unit_embeddings(texts: Sequence[str], embed: Embed) -> torch.Tensor:
    """Unit-length text embeddings (one row per text, on the CPU): their products are cosine similarities."""
    with torch.no_grad():
        return F.normalize(embed(list(texts)).float(), dim=-1).cpu()


@functools.lru_cache(maxsize=8)
def _phrasing_vectors(phrasings: tuple[str, ...], embed: Embed) -> torch.Tensor:
    return unit_embeddings(phrasings, embed)


def nearest_phrasings(vectors: torch.Tensor, phrasings: tuple[str, ...], embed: Embed) -> tuple[list[int], list[float]]:
    """For each prompt's unit embedding (:func:`unit_embeddings`), the index of the nearest of ``phrasings`` and
    its cosine similarity; the phrasings are embedded once per text encoder."""
    similarity, index = (vectors @ _phrasing_vectors(phrasings, embed).T).max(dim=1)
    return index.tolist(), similarity.tolist()


class TrainedVocabulary:
    """The phrasings a model learned, each with the modalities it learned it on."""

    def __init__(self, modalities: Mapping[str, Sequence[str]]) -> None:
        self.modalities = {phrasing: tuple(m) for phrasing, m in modalities.items()}

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

    def review(self, prompts: Sequence[str], vectors: torch.Tensor, modality: str, embed: Embed,
               other_modalities: bool = False) -> tuple[dict[str, str], dict[str, str]]:
        """(withheld, unvalidated), each prompt -> caution, given the prompts' :func:`unit_embeddings`. Withheld,
        to be answered empty: the prompts no learned phrasing is near (:data:`MIN_SIMILARITY`) and, unless
        ``other_modalities``, those whose nearest learned phrasing was never learned on ``modality``; unvalidated:
        the latter when ``other_modalities`` (answered)."""
        phrasings = tuple(self.modalities)
        withheld, unvalidated = {}, {}
        for prompt, i, similarity in zip(prompts, *nearest_phrasings(vectors, phrasings, embed)):
            phrasing = phrasings[i]
            learned = self.modalities[phrasing]
            if similarity < MIN_SIMILARITY:
                withheld[prompt] = (f"not a structure this model learned (the nearest it knows is {phrasing!r}, "
                                    f"similarity {similarity:.2f}): answered empty")
            elif modality not in learned:
                where = f"this model learned {phrasing!r} on {'/'.join(learned)} images only, not {modality}"
                if other_modalities:
                    unvalidated[prompt] = f"{where}: its answer here is unvalidated"
                else:
                    withheld[prompt] = (f"{where}: answered empty (allow other modalities to see its unvalidated "
                                        "answer)")
        return withheld, unvalidated
