"""Checkpoints: named models, download and cache, integrity checks and strict loading.

A checkpoint folder holds ``config.json`` and ``model.safetensors`` in the layout the
reference ESICA's ``save_pretrained`` writes, so published and our own weights load the
same way. Nothing is ever unpickled: weights are read with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CheckpointError, WeightsNotFoundError
from .models.esica import ESICA, ESICAConfig
from .models.esica.text import load_tokenizer, text_config_for
from .models.state_dict import check_state_dict, read_state_dict

CONFIG_FILE, WEIGHTS_FILE, LOCK_FILE = "config.json", "model.safetensors", "voxtext-lock.json"
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json")


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where its files live and what it is."""

    name: str
    description: str
    repo_id: str | None = None  # Hugging Face repository (None: shipped in the package)
    revision: str = "main"
    subfolder: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)  # file -> hex digest, when pinned
    licence: str = ""


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("default", "embedded small ESICA trained by voxtext on phantoms and real scans (CPU-friendly)",
                  licence="Apache-2.0; training data licences in its model card"),
        ModelSpec("esica", "published ESICA (ClinicalBERT text encoder), MagicXin/ESICA", repo_id="MagicXin/ESICA",
                  licence="see the model repository"),
        ModelSpec("esica-lite", "published ESICA-Lite (tiny-clinicalbert text encoder)", repo_id="MagicXin/ESICA",
                  subfolder="ESICA_Lite", licence="see the model repository"),
    )
}


def list_models() -> list[ModelSpec]:
    return list(REGISTRY.values())


def parse_hf_uri(uri: str) -> ModelSpec:
    """``hf://owner/repo[@revision][/subfolder]`` -> an ad-hoc :class:`ModelSpec`."""
    body = uri.removeprefix("hf://")
    parts = body.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"malformed model URI {uri!r}: expected hf://owner/repo[@revision][/subfolder]")
    repo, revision = parts[1].split("@", 1) if "@" in parts[1] else (parts[1], "main")
    subfolder = "/".join(parts[2:]) or None
    return ModelSpec(uri, f"Hugging Face {parts[0]}/{repo}", f"{parts[0]}/{repo}", revision, subfolder)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_folder(folder: Path) -> Path:
    """A checkpoint folder with both files, else a :class:`CheckpointError` naming what is missing."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint folder {folder} lacks {', '.join(missing)}")
    return folder


def verify_integrity(folder: Path, pinned: dict[str, str] | None = None) -> None:
    """Compare file digests with the pinned ones, or with the lock written at first download."""
    lock = folder / LOCK_FILE
    expected = pinned or (json.loads(lock.read_text())["sha256"] if lock.exists() else {})
    for name, digest in expected.items():
        path = folder / name
        if not path.exists() or sha256_of(path) != digest:
            raise CheckpointError(
                f"{path} does not match its recorded checksum (corrupt or partly downloaded). "
                f"Delete {folder} and run the command again to download it afresh."
            )


def snapshot_commit(folder: Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot folder (``.../snapshots/<commit>[/subfolder]``)."""
    for path in (folder, *folder.parents):
        if path.parent.name == "snapshots":
            return path.name
    return None


def write_lock(folder: Path, revision: str | None, files: Sequence[str] = (CONFIG_FILE, WEIGHTS_FILE)) -> None:
    """Record ``revision``, the snapshot's commit and the sha256 of ``files`` (trust on first use)."""
    digests = {f: sha256_of(folder / f) for f in files}
    record = {"revision": revision, "commit": snapshot_commit(folder), "sha256": digests}
    (folder / LOCK_FILE).write_text(json.dumps(record, indent=2))


def locked_snapshot(
    spec: ModelSpec, files: Sequence[str], required: str, download: bool = True, cache_dir: str | None = None
) -> Path:
    """:func:`fetch_snapshot` plus the integrity lock every downloaded model gets.

    At the first resolution the revision, commit and sha256 of every file matching ``files`` are written to
    ``voxtext-lock.json`` in the snapshot; every later resolution recomputes the digests and refuses a file
    that changed (``spec.sha256``, when pinned, takes precedence over the lock).
    """
    folder = fetch_snapshot(spec, [*files, LOCK_FILE], required, download, cache_dir)
    if not (folder / LOCK_FILE).exists():
        names = sorted({p.relative_to(folder).as_posix() for pattern in files for p in folder.glob(pattern)
                        if p.is_file() and p.name != LOCK_FILE})
        write_lock(folder, spec.revision, names)
    verify_integrity(folder, spec.sha256)
    return folder


def fetch_snapshot(
    spec: ModelSpec, files: Sequence[str], required: str, download: bool = True, cache_dir: str | None = None
) -> Path:
    """The folder of ``spec`` in the Hugging Face cache holding ``files`` (glob patterns), downloaded if allowed.

    The cache is used when ``required`` is there; otherwise the error says how to fetch the files elsewhere.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    prefix = f"{spec.subfolder}/" if spec.subfolder else ""
    kwargs = dict(repo_id=spec.repo_id, revision=spec.revision, allow_patterns=[prefix + f for f in files],
                  cache_dir=cache_dir)
    try:
        root = Path(snapshot_download(local_files_only=True, **kwargs))
        if (root / prefix / required).exists():
            return root / prefix
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    command = f"huggingface-cli download {spec.repo_id} --revision {spec.revision}"
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsNotFoundError(_offline_message(spec, command))
    try:
        return Path(snapshot_download(**kwargs)) / prefix  # tqdm progress bars come from huggingface_hub
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise WeightsNotFoundError(_offline_message(spec, command) + f" (download failed: {exc})") from exc


def _offline_message(spec: ModelSpec, command: str) -> str:
    return (
        f"the weights of model {spec.name!r} are not in the Hugging Face cache and cannot be downloaded here. "
        f"On a machine with internet run `{command}` and copy the cache (~/.cache/huggingface, or $HF_HOME) "
        "to this machine, or pass the path of a folder holding config.json and model.safetensors instead."
    )


def resolve_folder(
    name_or_path: str | Path,
    registry: dict[str, ModelSpec],
    files: Sequence[str],
    required: str,
    kind: str,
    *,
    embedded: str | None = None,
    download: bool = True,
    cache_dir: str | None = None,
) -> Path:
    """Local folder of ``default`` (the package's ``embedded`` weights), a ``registry`` name, an ``hf://`` URI
    (a locked download: revision, commit and sha256 recorded first, verified at every load) or a folder path."""
    name = str(name_or_path)
    if name == "default" and embedded:
        folder = PACKAGE_WEIGHTS / embedded
        if not (folder / required).is_file():
            raise WeightsNotFoundError(f"the embedded default {kind} is missing from {folder}; reinstall voxtext")
        return folder
    if name in registry or name.startswith("hf://"):
        return locked_snapshot(registry.get(name) or parse_hf_uri(name), files, required, download, cache_dir)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        names = ", ".join(["default"] * bool(embedded) + list(registry))
        raise CheckpointError(f"{name!r} is neither a {kind} name ({names}), an hf:// URI nor an existing folder")
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"checkpoint folder {folder} lacks {CONFIG_FILE}")
    return folder


def resolve_model(name_or_path: str | Path, *, download: bool = True, cache_dir: str | None = None) -> Path:
    """The local ESICA checkpoint folder of a registry name, an ``hf://`` URI or a folder path."""
    return check_folder(resolve_folder(name_or_path, REGISTRY, [CONFIG_FILE, WEIGHTS_FILE], WEIGHTS_FILE,
                                       "segmentation model", embedded="esica-default", download=download,
                                       cache_dir=cache_dir))


def load_esica_config(folder: Path, overrides: dict | None = None) -> ESICAConfig:
    try:
        data = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {folder / CONFIG_FILE}: {exc}") from exc
    try:
        return ESICAConfig.from_dict({**data, **(overrides or {})})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a usable ESICA config: {exc}") from exc


def build_esica(config: ESICAConfig, folder: Path | None = None) -> ESICA:
    """The model of ``config``; a frozen pretrained text encoder is loaded from its own weights."""
    model = ESICA(config, text_config_for(config.text_model, folder, config.text_config))
    if config.text_weights == "text_model":
        from transformers import AutoModel

        from .models.esica.text import resolve_text_source

        pretrained = AutoModel.from_pretrained(resolve_text_source(config.text_model, folder))
        model.text_encoder.load_state_dict(pretrained.state_dict(), strict=True)
    return model


def expected_keys(model: ESICA) -> dict[str, torch.Size]:
    """Keys the checkpoint file must hold (without the text encoder when it comes from its own weights)."""
    keys = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.text_weights == "text_model":
        keys = {k: v for k, v in keys.items() if not k.startswith("text_encoder.")}
    return keys


def check_keys(expected: dict[str, torch.Size], weights: dict[str, torch.Tensor], source: Path) -> None:
    """Strict comparison with a readable diagnosis, plus what an ESICA file that does not fit usually is."""
    try:
        check_state_dict(expected, weights, source, "ESICA model of its config.json")
    except CheckpointError as error:
        unexpected = [k for k in weights if k not in expected]
        hint = ""
        if not any(k.startswith("image_encoder.") for k in weights):
            hint = " This is not an ESICA checkpoint."
        elif any(k.startswith("text_encoder.transformer.") for k in unexpected):
            hint = " The file holds a DistilBERT text encoder (ESICA) but config.json names another text model."
        elif any(k.startswith("text_encoder.encoder.") for k in unexpected):
            hint = " The file holds a BERT text encoder (ESICA-Lite) but config.json names another text model."
        raise CheckpointError(f"{error}{hint}") from None


def load_esica_weights(model: ESICA, folder: Path) -> None:
    """Load ``folder/model.safetensors`` into ``model`` strictly (keys and shapes checked first)."""
    path = folder / WEIGHTS_FILE
    weights = read_state_dict(path)
    check_keys(expected_keys(model), weights, path)
    model.load_state_dict(weights, strict=model.config.text_weights == "checkpoint")


def load_esica(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    overrides: dict | None = None,
    download: bool = True,
    tokenizer: bool = True,
):
    """Resolve, verify and load an ESICA checkpoint; returns ``(model, tokenizer or None)``."""
    folder = resolve_model(name_or_path, download=download)
    config = load_esica_config(folder, overrides)
    model = build_esica(config, folder)
    load_esica_weights(model, folder)
    model = model.eval().to(device=device, dtype=dtype)
    return model, (load_tokenizer(config.text_model, folder) if tokenizer else None)


def save_esica(model: ESICA, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (reference layout; a frozen text encoder is left out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["text_config"] = model.text_encoder.config.to_diff_dict() | {"model_type": model.text_encoder.config.model_type}
    keys = expected_keys(model)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items() if k in keys}
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder
