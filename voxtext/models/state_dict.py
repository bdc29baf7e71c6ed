"""Reading checkpoint files into state dicts and checking them strictly against a model.

Weights are read with safetensors, or (for the ``.bin`` files the Med3DVLM reference writes
with ``torch.save``) with ``torch.load(weights_only=True)``, which refuses anything but tensors
and plain containers: no checkpoint can run code.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError

SHARD_INDEX = "model.safetensors.index.json"
Shapes = Mapping[str, torch.Size | tuple[int, ...] | list[int]]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``torch.save`` file read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path} holds more than tensors and is refused "
            f"(read with torch.load(weights_only=True); nothing else is unpickled): {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors converted to ``dtype`` (integer buffers kept); unchanged for None."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def read_sharded(folder: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder (``model.safetensors`` or the shards of its index).

    With ``dtype`` each shard's floating-point tensors are converted as it is read, which bounds the
    peak memory by the converted model plus one shard.
    """
    folder = Path(folder)
    index = folder / SHARD_INDEX
    if not index.is_file():
        return cast_floats(read_state_dict(folder / "model.safetensors"), dtype)
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_state_dict(folder / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            raise CheckpointError(f"{folder / shard} does not hold the tensors {index.name} lists for it")
        state.update(cast_floats(tensors, dtype))
    return state


def with_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_state_dict(expected: Shapes, weights: Mapping[str, torch.Tensor], source: str | Path, what: str) -> None:
    """Raise a :class:`CheckpointError` unless ``weights`` has exactly the keys and shapes of ``expected``."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(s)}"
        for k, s in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(s)
    ]
    if not (missing or unexpected or mismatched):
        return
    if len(missing) == len(expected):
        raise CheckpointError(f"{source} is not a {what} checkpoint: none of its {len(expected)} tensors is there")
    parts = [
        f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if items
    ]
    raise CheckpointError(f"{source} does not match the {what}: " + "; ".join(parts) + ".")


def load_strict(
    module: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str | Path, what: str, assign: bool = False
) -> None:
    """Check keys and shapes with a readable diagnosis, then ``load_state_dict(strict=True)``."""
    check_state_dict({k: v.shape for k, v in module.state_dict().items()}, weights, source, what)
    module.load_state_dict(weights, strict=True, assign=assign)
