"""What a model learned each phrasing on: the imaging modalities of its training images.

A model folder may hold ``trained_on.json`` (``{"modalities": {phrasing: ["CT", ...]}, "without_findings":
[structure, ...]}``), written by the recipe that trained it. A prompt is matched to the nearest learned phrasing
(cosine of the model's text embeddings, as the lesion routing matches paraphrases). A prompt near none of them names
a structure the model never learned ("prostate", "gallbladder") and is answered empty, with a caution that says so.
When the volume's modality is not one the nearest phrasing was learned on, nothing validates the model's answer
there, and by default it is not given either (empty, with a caution) unless the caller allows other modalities. The
embedded default learned brain structures on MR only and abdominal organs on CT only; asked "brain tumor" on an
abdominal CT it marks vertebrae and a kidney, and asked "liver" on a real abdominal MR it marks background only.

``without_findings`` lists structures the model segments but none of whose lesions it learned (the default's
spleen, pancreas, lungs...). A prompt that reads as a finding in one of them ("lung nodule", "pancreatic mass") is
near that structure's name, and the model answers it with the whole structure; it is answered empty instead, with
a caution, when a finding phrase of that structure ("lungs nodule") is clearly nearer than every learned phrasing.
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
# 0.52 -> "bladder", "heart" 0.53, "gallbladder" 0.60 -> "kidney stone"); "lung nodule" -> "lungs" (0.69) passes,
# and is answered empty as a finding (below).
MIN_SIMILARITY = 0.62
# Finding phrases made of each structure in ``without_findings`` and these nouns.
FINDING_NOUNS = ("lesion", "tumor", "mass", "nodule", "cyst", "stone", "metastasis")
# How much nearer a finding phrase must be than every learned phrasing. With the embedded default: "lung nodule"
# 0.97 against "lungs" 0.69, "pancreatic mass" 0.96 against "pancreas" 0.78, "splenic lesion" 0.80 against 0.69,
# "bladder stone" 0.94 against 0.80; "liver nodule" is nearer "liver lesions" (0.75, learned) than "stomach nodule"
# (0.74), and organ paraphrases are nearer their organ ("pancreatic head" 0.80 against "pancreas nodule" 0.69).
FINDING_MARGIN = 0.05


def unit_embeddings(texts: Sequence[str], embed: Embed) -> torch.Tensor:
    """Unit-length text embeddings (one row per text, on the CPU): their products are cosine similarities."""
    with torch.no_grad():
        return F.normalize(embed(list(texts)).float(), dim=-1).cpu()


@functools.lru_cache(maxsize=8)
def _phrasing_vectors(phrasings: tuple[str, ...], embed: Embed) -> torch.Tensor:
    return unit_embeddings(phrasings, embed)


def nearest_phrasings(vectors: torch.Tensor, phrasings: tuple[str, ...], embed: Embed) -> tuple[list[int], list[float]]:
    """For each prompt's unit embedding (:func:`unit_embeddings`), the index of the nearest of ``phrasings`` and
    its cosine similarity (-1 and -inf when there are no phrasings); the phrasings are embedded once per text
    encoder."""
    if not phrasings:
        return [-1] * len(vectors), [float("-inf")] * len(vectors)
    similarity, index = (vectors @ _phrasing_vectors(phrasings, embed).T).max(dim=1)
    return index.tolist(), similarity.tolist()


class TrainedVocabulary:
    """The phrasings a model learned, each with the modalities it learned it on."""

    def __init__(self, modalities: Mapping[str, Sequence[str]], without_findings: Sequence[str] = ()) -> None:
        self.modalities = {phrasing: tuple(m) for phrasing, m in modalities.items()}
        self.without_findings = tuple(without_findings)
        self.findings = {f"{structure} {noun}": structure for structure in self.without_findings
                         for noun in FINDING_NOUNS}

    @classmethod
    def of(cls, folder: str | Path) -> TrainedVocabulary | None:
        """The folder's vocabulary, or None when it has no ``trained_on.json`` (the published weights)."""
        path = Path(folder) / TRAINED_ON_FILE
        if not path.is_file():
            return None
        try:
            content = json.loads(path.read_text())
            modalities, structures = content["modalities"], content.get("without_findings", [])
            return cls({str(p): [str(m) for m in mods] for p, mods in modalities.items()},
                       [str(s) for s in structures])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path} is not a valid {TRAINED_ON_FILE}: {error}") from error

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TRAINED_ON_FILE
        content = {"modalities": {p: list(m) for p, m in self.modalities.items()},
                   "without_findings": list(self.without_findings)}
        path.write_text(json.dumps(content, indent=2))
        return path

    def review(self, prompts: Sequence[str], vectors: torch.Tensor, modality: str, embed: Embed,
               other_modalities: bool = False) -> tuple[dict[str, str], dict[str, str]]:
        """(withheld, unvalidated), each prompt -> caution, given the prompts' :func:`unit_embeddings`. Withheld,
        to be answered empty: the prompts no learned phrasing is near (:data:`MIN_SIMILARITY`), those that read
        as a finding in a structure :attr:`without_findings` (:data:`FINDING_MARGIN`) and, unless
        ``other_modalities``, those whose nearest learned phrasing was never learned on ``modality``;
        unvalidated: the latter when ``other_modalities`` (answered)."""
        phrasings, findings = tuple(self.modalities), tuple(self.findings)
        withheld, unvalidated = {}, {}
        for prompt, i, similarity, f, finding_similarity in zip(
                prompts, *nearest_phrasings(vectors, phrasings, embed), *nearest_phrasings(vectors, findings, embed)):
            phrasing = phrasings[i]
            learned = self.modalities[phrasing]
            if similarity < MIN_SIMILARITY:
                withheld[prompt] = (f"not a structure this model learned (the nearest it knows is {phrasing!r}, "
                                    f"similarity {similarity:.2f}): answered empty")
            elif finding_similarity > similarity + FINDING_MARGIN:
                structure = self.findings[findings[f]]
                withheld[prompt] = (f"reads as a finding in the {structure} ({findings[f]!r}), which this model "
                                    f"segments without its lesions: answered empty, not with the whole {structure}")
            elif modality not in learned:
                where = f"this model learned {phrasing!r} on {'/'.join(learned)} images only, not {modality}"
                if other_modalities:
                    unvalidated[prompt] = f"{where}: its answer here is unvalidated"
                else:
                    withheld[prompt] = (f"{where}: answered empty (allow other modalities to see its unvalidated "
                                        "answer)")
        return withheld, unvalidated
