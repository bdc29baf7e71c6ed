"""Zero-shot findings: candidate finding texts ranked against a volume by a DCFormer_SigLIP model.

Med3DVLM's stage-0 image-text model (:mod:`voxtext.models.siglip`) scores a volume against any
text: ``logit = cos(image, text) * exp(t') + b`` and ``probability = sigmoid(logit)``, the pairwise
match probability it was trained for. The volume is prepared as for the report model
(:func:`voxtext.models.med3dvlm.prepare_volume`: canonical orientation, min-max, crop to the
foreground, trilinear resize to the checkpoint's input size, 128 x 256 x 256 for the published one).
The published model's probabilities are not calibrated (its bias stayed near 0): compare findings
with each other, not with a fixed threshold.

>>> FindingsRanker("dcformer-siglip").rank("ct.nii.gz", ["pleural effusion", "kidney stone"])  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .api import as_volume
from .checkpoints import ModelSpec, resolve_folder
from .errors import CheckpointError, InputError
from .inference import Precision, resolve_device
from .models.dcformer import DCFormerConfig, med3dvlm_config
from .models.med3dvlm import IMAGE_SIZE, prepare_volume
from .models.siglip import DCFormerSigLIP, load_siglip
from .volume import Volume

SIGLIP_FILES = ("*.json", "*.safetensors", "*.txt")  # config, weights, tokenizer (never pickles)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

FINDINGS_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("dcformer-siglip", "published DCFormer_SigLIP, MagicXin/DCFormer_SigLIP (0.15B parameters)",
                  repo_id="MagicXin/DCFormer_SigLIP", licence="see the model repository"),
    )
}

# Candidates when none are given: common CT findings, phrased as in findings reports.
DEFAULT_FINDINGS: tuple[str, ...] = (
    "pleural effusion", "pneumothorax", "pulmonary nodule", "consolidation in the lung", "emphysema",
    "cardiomegaly", "pericardial effusion", "ascites", "liver lesion", "fatty liver", "splenomegaly",
    "kidney stone", "hydronephrosis", "renal cyst", "gallstones", "bowel obstruction", "free intraperitoneal air",
    "lymphadenopathy", "bone fracture", "aortic aneurysm", "intracranial hemorrhage", "brain tumor",
    "no acute abnormality",
)
MAX_FINDINGS = 64  # per request on a server
MAX_FINDING_CHARS = 1000


@dataclass(frozen=True)
class Finding:
    """A candidate finding with the model's match probability ``sigmoid(logit)`` for the volume."""

    text: str
    probability: float
    logit: float


def resolve_siglip(model: str | Path, download: bool = True) -> Path:
    """Local folder of ``dcformer-siglip``, an ``hf://owner/repo`` URI or a DCFormer_SigLIP folder."""
    return resolve_folder(model, FINDINGS_REGISTRY, SIGLIP_FILES, "config.json", "findings model", download=download)


def normalize_findings(findings: str | Sequence[str] | None) -> list[str]:
    """The candidate texts, whitespace-normalised and deduplicated; :data:`DEFAULT_FINDINGS` when none."""
    if findings is None:
        return list(DEFAULT_FINDINGS)
    if isinstance(findings, str):
        findings = [findings]
    texts = [" ".join(str(f).split()) for f in findings]
    if not texts:
        return list(DEFAULT_FINDINGS)
    if not all(texts):
        raise InputError("empty finding text: give each candidate finding as words, e.g. 'pleural effusion'")
    too_long = [t[:40] for t in texts if len(t) > MAX_FINDING_CHARS]
    if too_long:
        raise InputError(f"finding texts are limited to {MAX_FINDING_CHARS} characters: {too_long[0]!r}...")
    return list(dict.fromkeys(texts))


class FindingsRanker:
    """A loaded DCFormer_SigLIP model ranking candidate finding texts against volumes (zero-shot).

    The folder holds the reference's ``config.json`` (``model_type: dec_clip``), ``model.safetensors``
    and the text encoder's tokenizer files. Two optional config keys of ours describe smaller models:
    ``vision_variant`` (a Med3DVLM DCFormer variant; the reference always builds ``small``) and
    ``image_window`` (intensity clip before scaling); ``input_size`` is the reference's ``(H, W, D)``.
    """

    def __init__(self, model: str | Path = "dcformer-siglip", device: str | torch.device = "auto",
                 precision: Precision = "fp32", *, download: bool = True) -> None:
        if precision not in DTYPES:
            raise InputError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.device = resolve_device(device)
        self.model_name = str(model)
        folder = resolve_siglip(model, download)
        raw = json.loads((folder / "config.json").read_text())
        self.model: DCFormerSigLIP = load_siglip(folder, _vision_config(raw)).to(self.device, DTYPES[precision])
        self.tokenizer = _tokenizer(folder, raw.get("language_model_name_or_path", "medicalai/ClinicalBERT"))
        self.image_size = _image_size(raw)
        self.window = tuple(raw["image_window"]) if raw.get("image_window") else None
        self.max_length = min(512, self.model.language_encoder.config.max_position_embeddings)

    def prepare(self, volume: Volume | str | Path | np.ndarray) -> torch.Tensor:
        """The model input ``(1, 1, D, H, W)`` of a volume, a path or a 3-D array."""
        if not isinstance(volume, (Volume, str, Path, np.ndarray)):
            raise InputError(f"cannot rank findings for a {type(volume).__name__}: pass a Volume, a file path or "
                             "a 3-D array")
        image = prepare_volume(as_volume(volume), self.image_size, self.window)
        return image.to(self.device, next(self.model.parameters()).dtype)

    @torch.no_grad()
    def encode_findings(self, findings: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings ``(N, E)`` of the finding texts."""
        tokens = self.tokenizer(list(findings), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))

    @torch.no_grad()
    def rank(self, volume: Volume | str | Path | np.ndarray,
             findings: str | Sequence[str] | None = None) -> list[Finding]:
        """The candidate ``findings`` (default :data:`DEFAULT_FINDINGS`) by decreasing match probability."""
        texts = normalize_findings(findings)
        image = self.model.encode_image(self.prepare(volume))
        logits = self.model.pair_logits(image, self.encode_findings(texts))[0].float()
        probabilities = torch.sigmoid(logits)
        order = torch.argsort(logits, descending=True, stable=True).tolist()
        return [Finding(texts[i], float(probabilities[i]), float(logits[i])) for i in order]


def format_ranking(findings: Sequence[Finding]) -> str:
    """The ranked findings as a plain-text table (what ``voxtext findings`` prints)."""
    width = max([len("finding")] + [len(f.text) for f in findings])
    lines = [f"{'rank':>4}  {'probability':>11}  {'logit':>8}  {'finding':<{width}}".rstrip()]
    lines += [f"{rank:>4}  {f.probability:>11.4f}  {f.logit:>8.3f}  {f.text}" for rank, f in enumerate(findings, 1)]
    return "\n".join(lines)


def _vision_config(raw: dict) -> DCFormerConfig:
    try:
        return med3dvlm_config(raw.get("vision_variant", "small"))
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def _image_size(raw: dict) -> tuple[int, int, int]:
    """Model input ``(D, H, W)``; config ``input_size`` is stored ``(H, W, D)`` as in the reference."""
    size = raw.get("input_size")
    if not size:
        return IMAGE_SIZE
    h, w, d = (int(s) for s in size)
    return d, h, w


def _tokenizer(folder: Path, text_model: str):
    """The tokenizer shipped in the checkpoint folder, else the text encoder's (folder beside it or HF cache)."""
    from transformers import AutoTokenizer

    from .models.esica.text import load_tokenizer

    if (folder / "tokenizer_config.json").is_file() and \
            any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        try:
            return AutoTokenizer.from_pretrained(folder)  # never trust_remote_code
        except (OSError, ValueError) as error:
            raise CheckpointError(f"the tokenizer files in {folder} cannot be read: {error}") from error
    return load_tokenizer(text_model, folder)
