"""VoxText: text-guided 3-D segmentation (ESICA) and radiology reporting for 3D Slicer and Python."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the submodule defining each; imported on first use so that
# ``import voxtext.models`` stays light.
_EXPORTS = {
    "Segmenter": "api",
    "segment": "api",
    "Segmentation": "segmentation",
    "Reporter": "report",
    "report": "report",
    "ask": "report",
    "Volume": "volume",
    "VoxTextError": "errors",
    "InputError": "errors",
    "CheckpointError": "errors",
    "WeightsNotFoundError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'voxtext' has no attribute {name!r}")
