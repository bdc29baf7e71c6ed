"""Standard terminology (SNOMED CT category/type/laterality, anatomic region of a finding) and colour of a prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import slicer

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
TERMINOLOGY_FILE = RESOURCES / "SegmentationCategoryTypeModifier-VoxText.term.json"
_SPELLINGS = {"tumour": "tumor", "tumours": "tumor", "tumors": "tumor", "lesions": "lesion", "cysts": "cyst",
              "stones": "stone", "masses": "mass", "oesophagus": "esophagus"}
REGION_CONTEXT = "Anatomic codes - DICOM master list"  # Slicer's default anatomic context (same SNOMED codes)
ALTERED_STRUCTURE = "49755003"  # category "Morphologically Altered Structure": findings that sit in a region
ALIASES = {"bladder": "urinary bladder", "ivc": "inferior vena cava", "spine": "vertebrae"}


@dataclass(frozen=True)
class SegmentCode:
    """A serialized Slicer terminology entry and its recommended RGB colour (0..1)."""

    entry: str
    color: tuple[float, float, float]
    meaning: str  # e.g. "Kidney, Left" or "Calculus in Kidney, Left"


def terminology_labels(path: Path = TERMINOLOGY_FILE) -> list[str]:
    """Every ``3dSlicerLabel`` of the shipped terminology: the structure names the module knows."""
    labels: list[str] = []
    for category in json.loads(path.read_text())["SegmentationCodes"]["Category"]:
        for code in category.get("Type", []):
            labels += [item["3dSlicerLabel"] for item in (code, *code.get("Modifier", [])) if "3dSlicerLabel" in item]
    return labels


def normalize_label(prompt: str) -> str:
    """Lower case, no leading article, American spelling: the form ``3dSlicerLabel`` values use."""
    words = prompt.lower().split()
    if words[:1] == ["the"]:
        words = words[1:]
    text = " ".join(_SPELLINGS.get(word, word) for word in words)
    return ALIASES.get(text, text)


class PromptTerminology:
    """Looks prompts up in the terminology the extension ships (loaded once into the terminologies logic)."""

    def __init__(self, terminologies_logic, path: Path = TERMINOLOGY_FILE) -> None:
        self.logic = terminologies_logic
        self.context = json.loads(path.read_text())["SegmentationCategoryTypeContextName"]
        if not self.logic.IsTerminologyContextLoaded(self.context):
            if self.logic.LoadTerminologyFromFile(str(path)) != self.context:
                raise RuntimeError(f"Slicer could not load the terminology file {path}")

    def _find(self, label: str):
        entry = slicer.vtkSlicerTerminologyEntry()
        return entry if label and self.logic.FindTypeInTerminologyBy3dSlicerLabel(self.context, label, entry) else None

    def lookup(self, prompt: str) -> SegmentCode | None:
        """The coded entry of a prompt, else None.

        A prompt is a ``3dSlicerLabel`` of the shipped terminology (after :func:`normalize_label`), e.g.
        "left kidney", or a finding in a structure, e.g. "left kidney stone": the finding's type with the
        structure as anatomic region (codes of Slicer's DICOM anatomic context).
        """
        label = normalize_label(prompt)
        entry = self._find(label)
        if entry is None:
            structure, _, finding = label.rpartition(" ")
            entry, region = self._find(finding), self._find(structure)
            if entry is None or region is None or entry.GetCategoryObject().GetCodeValue() != ALTERED_STRUCTURE:
                return None
            entry.SetRegionContextName(REGION_CONTEXT)
            entry.GetRegionObject().Copy(region.GetTypeObject())
            entry.GetRegionModifierObject().Copy(region.GetTypeModifierObject())
        return SegmentCode(self.logic.SerializeTerminologyEntry(entry), _color(entry), _meaning(entry))


def _color(entry) -> tuple[float, float, float]:
    """Recommended colour of the type modifier (laterality) if any, else of the type, as RGB 0..1."""
    modifier = entry.GetTypeModifierObject()
    rgb = (modifier if modifier.GetCodeValue() else entry.GetTypeObject()).GetRecommendedDisplayRGBValue()
    return tuple(c / 255.0 for c in rgb)


def _meaning(entry) -> str:
    def named(code, modifier) -> str:
        return code.GetCodeMeaning() + (f", {modifier.GetCodeMeaning()}" if modifier.GetCodeValue() else "")

    text = named(entry.GetTypeObject(), entry.GetTypeModifierObject())
    if entry.GetRegionObject().GetCodeValue():
        text += " in " + named(entry.GetRegionObject(), entry.GetRegionModifierObject())
    return text
