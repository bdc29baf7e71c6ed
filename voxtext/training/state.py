"""The resume state of a training run folder (optimizer, step, RNG), shared by all trainers."""

from __future__ import annotations

from pathlib import Path

import torch

STATE_FILE = "training_state.pt"


def load_state(out: Path) -> dict | None:
    """The saved training state of a run folder, or None. ``weights_only``: tensors and plain containers only,
    nothing is unpickled."""
    path = Path(out) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
