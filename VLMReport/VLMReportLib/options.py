"""What the user asks for: model, device, precision and decoding of a report or an answer (no MRML, no Qt)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

from TextSegLib.options import Device, check_model_and_device, check_server

Precision = Literal["fp32", "bf16", "fp16"]

# Display name -> voxtext VLM name; any other model is a local folder or an hf:// URI.
# The embedded model is a phantom-trained demo: it finds about half of the liver lesions and no kidney lesion
# (see its model card).
NAMED_MODELS: dict[str, str] = {"Embedded demo (phantoms only, misses most findings)": "default",
                                "Med3DVLM (GPU)": "med3dvlm"}
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
_CHOICE_SEPARATORS = re.compile(r"[,;\n|]")


@dataclass(frozen=True)
class ReportOptions:
    """Model and decoding settings of one run (sent to the worker as JSON)."""

    model: str = "default"
    device: Device = "auto"
    precision: Precision = "fp32"
    greedy: bool = True
    max_new_tokens: int | None = None
    score_choices: bool = True  # closed questions: rank the options by likelihood (always one of them)
    server: str = ""  # a ``voxtext serve --vlm`` URL runs the model there (token from VOXTEXT_TOKEN)

    def __post_init__(self) -> None:
        check_model_and_device(self.model, self.device)
        check_server(self.server)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT_OPTIONS = ReportOptions()


def parse_choices(text: str) -> list[str]:
    """Options of a closed question from ``"yes, no"`` (commas, semicolons, bars or lines); none for open ones."""
    return [" ".join(item.split()) for item in _CHOICE_SEPARATORS.split(text) if item.strip()]
