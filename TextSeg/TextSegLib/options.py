"""What the user asks for: prompts, model, device, quality (no MRML, no Qt, no torch)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Device = Literal["auto", "cpu", "gpu"]
Quality = Literal["fast", "accurate"]
ExistingSegments = Literal["add", "replace"]

# Display name -> voxtext model name; any other model is a local folder or an hf:// URI.
NAMED_MODELS: dict[str, str] = {"Embedded default": "default", "ESICA": "esica", "ESICA-Lite": "esica-lite"}
DEVICES: tuple[Device, ...] = ("auto", "cpu", "gpu")
QUALITIES: tuple[Quality, ...] = ("fast", "accurate")
EXISTING_SEGMENTS: tuple[ExistingSegments, ...] = ("add", "replace")
RECENT_PROMPTS_LIMIT = 30
_SEPARATORS = re.compile(r"[,;\n]")


def check_model_and_device(model: str, device: str) -> None:
    """Refuse an empty model or an unknown device (ValueError saying what to choose)."""
    if not str(model).strip():
        raise ValueError("no model given: choose a named model, a folder or an hf:// URI")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")


def check_server(server: str) -> None:
    """Refuse a server that is not an http(s) URL (empty means: run on this computer)."""
    if server and not server.startswith(("http://", "https://")):
        raise ValueError(f"the server must be an http:// or https:// URL, got {server!r}")


@dataclass(frozen=True)
class SegmentOptions:
    """Model and inference settings of one run (sent to the worker as JSON)."""

    model: str = "default"
    device: Device = "auto"
    quality: Quality = "fast"
    # On CT, boundaries decided by attenuation within a few mm of the model's (voxtext.refinement).
    refine: bool = True
    # Targets the model learned on other modalities only are left empty (with a caution) unless this is set.
    other_modalities: bool = False
    probabilities: bool = False
    # A ``voxtext serve`` URL runs the model there (its token comes from VOXTEXT_TOKEN, never from a file).
    server: str = ""

    def __post_init__(self) -> None:
        check_model_and_device(self.model, self.device)
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {', '.join(QUALITIES)}, got {self.quality!r}")
        check_server(self.server)
        if self.server and self.probabilities:
            raise ValueError("probability volumes are only available when the model runs on this computer")

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT_OPTIONS = SegmentOptions()


def parse_prompts(text: str | Sequence[str]) -> list[str]:
    """Targets from a comma, semicolon or newline separated text (or a list); blanks and repeats dropped."""
    items = _SEPARATORS.split(text) if isinstance(text, str) else list(text)
    prompts: list[str] = []
    for item in items:
        prompt = " ".join(str(item).split())
        if prompt and prompt.lower() not in (p.lower() for p in prompts):
            prompts.append(prompt)
    return prompts


def completion_candidates(text: str, names: Iterable[str]) -> list[str]:
    """Full-text completions of the target being typed last: the earlier targets kept, the last one completed."""
    cut = max((m.end() for m in _SEPARATORS.finditer(text)), default=0)
    head = text[:cut].rstrip() + " " if cut else ""
    typed = text[cut:].strip().lower()
    return [head + name for name in names if name.lower().startswith(typed)]


def remember_prompts(recent: Sequence[str], prompts: Sequence[str], limit: int = RECENT_PROMPTS_LIMIT) -> list[str]:
    """The prompts just used, then the older ones, without repeats (case-insensitive), at most ``limit``."""
    merged: list[str] = []
    for prompt in [*prompts, *recent]:
        if prompt.lower() not in (p.lower() for p in merged):
            merged.append(prompt)
    return merged[:limit]
