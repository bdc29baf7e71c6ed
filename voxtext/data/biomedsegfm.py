"""CVPR 2025 BiomedSegFM 3-D npz cases and their class-prompt JSON, as training cases.

A case ``<modality>/<dataset>/<case>.npz`` holds ``imgs`` (z, y, x) with intensities already windowed
to 0..255 by the challenge, ``gts`` (z, y, x) class or instance labels (absent from validation/test
files), ``spacing`` listed (x, y, z) and, in validation/test files, ``text_prompts``: a 0-d object array
holding ``{"<class id>": "<prompt>", ..., "instance_label": 0|1}``. The class-prompt JSON
(``CVPR25_TextSegFMData_with_class.json``) is ``{dataset: {"<class id>": [phrasings], "instance_label": 0|1}}``.

Cases are put on the model grid by :func:`voxtext.preprocess.prepare`, as inference does: the npz
array is read as SimpleITK's (z, y, x) array of an LPS image, so the model sees it unchanged but
resampled to the model spacing, cropped to ``imgs > 0`` and scaled 0..255 -> 0..1 (clipped).
Instance datasets are trained as one target (every instance, label 1) prompted by class "1".
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..preprocess import PreprocessConfig, prepare_with_labels
from ..training.cases import Target, TrainingCase
from ..volume import Volume

PROMPTS_FILE = "CVPR25_TextSegFMData_with_class.json"
# The challenge's intensities are a fixed 0..255 window; the fixed-window ("CT") branch of
# ``normalize_intensity`` with this window is exactly its ScaleIntensityRange(0..255 -> 0..1, clip).
INTENSITY_WINDOW = (0.0, 255.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The only globals a pickled ``text_prompts`` (an object array holding a dict) may reference.
_PICKLE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


@dataclass(frozen=True)
class ClassPrompts:
    """The prompt vocabulary of one dataset: class id -> phrasings, and whether labels are instances."""

    classes: dict[int, tuple[str, ...]]
    instance: bool


@dataclass(frozen=True, eq=False)
class NpzCase:
    """The arrays of one BiomedSegFM npz file, as stored."""

    imgs: np.ndarray  # (z, y, x), 0..255
    spacing: tuple[float, float, float]  # (x, y, z) mm, as stored
    gts: np.ndarray | None = None  # (z, y, x) class or instance labels
    text_prompts: dict[str, str | int] | None = None

    @property
    def zyx_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (z, y, x)."""
        return self.spacing[::-1]

    def prompts(self) -> ClassPrompts:
        """The case's own vocabulary (one phrasing per class) from ``text_prompts``."""
        if self.text_prompts is None:
            raise InputError("this case has no text_prompts")
        return parse_class_prompts(self.text_prompts, "text_prompts")

    def volume(self) -> Volume:
        """``imgs`` as an LPS volume whose model (z, y, x) array is ``imgs`` itself."""
        x, y, z = self.spacing
        return Volume(self.imgs.T, LPS_TO_RAS @ np.diag([x, y, z, 1.0]))


def read_npz_case(path: str | Path) -> NpzCase:
    """Read and validate one npz case; ``text_prompts`` is unpickled with numpy/builtin types only."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("imgs", "spacing", "gts") if key in npz.files}
            has_prompts = "text_prompts" in npz.files
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    missing = {"imgs", "spacing"} - set(arrays)
    if missing:
        raise InputError(f"{path.name}: missing key(s) {sorted(missing)}")
    prompts = _read_text_prompts(path) if has_prompts else None
    return _validated(path.name, arrays["imgs"], arrays["spacing"], arrays.get("gts"), prompts)


def write_npz_case(path: str | Path, case: NpzCase) -> Path:
    """Write ``case`` as a compressed npz with the challenge's keys."""
    path = Path(path)
    arrays = {"imgs": case.imgs, "spacing": np.asarray(case.spacing, np.float64)}
    if case.gts is not None:
        arrays["gts"] = case.gts
    if case.text_prompts is not None:
        arrays["text_prompts"] = np.array(case.text_prompts, dtype=object)
    np.savez_compressed(path, **arrays)
    return path


def parse_class_prompts(entry: Mapping, where: str) -> ClassPrompts:
    """One dataset's entry: ``{"<id>": [phrasings] or "phrasing", ..., "instance_label": 0|1}``."""
    if not isinstance(entry, Mapping):
        raise InputError(f"{where} must be an object of class id -> phrasings")
    instance = entry.get("instance_label", 0)
    if instance not in (0, 1):
        raise InputError(f"{where}: instance_label must be 0 or 1, got {instance!r}")
    classes = {}
    for key, value in entry.items():
        key = str(key)
        if key == "instance_label":
            continue
        phrasings = [value] if isinstance(value, str) else value
        if not key.isdigit() or int(key) == 0 or not isinstance(phrasings, list) or not phrasings or not all(
                isinstance(p, str) and p.strip() for p in phrasings):
            raise InputError(f"{where}: class {key!r} must be a positive integer id with non-empty phrasings")
        classes[int(key)] = tuple(phrasings)
    if not classes:
        raise InputError(f"{where} has no classes")
    return ClassPrompts(dict(sorted(classes.items())), bool(instance))


def read_class_prompts(path: str | Path) -> dict[str, ClassPrompts]:
    """The class-prompt JSON: dataset name -> :class:`ClassPrompts`."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the class-prompt JSON {path}: {exc}") from exc
    if not isinstance(table, dict) or not table:
        raise InputError(f"{path} must map dataset names to class prompts")
    return {name: parse_class_prompts(entry, f"{path.name}[{name!r}]") for name, entry in table.items()}


def dataset_of(path: Path, datasets: Mapping[str, ClassPrompts]) -> str:
    """The case's dataset: its folder name, else the longest dataset name prefixing the file name."""
    if path.parent.name in datasets:
        return path.parent.name
    prefixes = [name for name in datasets if path.stem.startswith(name + "_")]
    if not prefixes:
        raise InputError(f"{path.name}: neither its folder nor its name matches a dataset of the class-prompt JSON")
    return max(prefixes, key=len)


def training_case(path: Path, prompts: ClassPrompts, group: str, spacing: float) -> TrainingCase:
    """One labelled npz case on the model grid (``spacing`` mm), targets from ``prompts``."""
    case = read_npz_case(path)
    if case.gts is None:
        raise InputError(f"{path.name} has no gts: only labelled cases can be trained on")
    config = PreprocessConfig(target_spacing=spacing, modality="CT", ct_window=INTENSITY_WINDOW)
    labels = (case.gts > 0) if prompts.instance else case.gts
    prepared, grid = prepare_with_labels(case.volume(), labels.T.astype(np.int16), config)
    if prompts.instance:
        targets = [Target(prompts.classes[min(prompts.classes)], (1,))]
    else:
        targets = [Target(phrasings, (value,)) for value, phrasings in prompts.classes.items()]
    return TrainingCase(path.stem, group, prepared.image, grid.astype(np.int16), targets)


def npz_folder_cases(folder: str | Path, spacing: float, prompts_json: str | Path | None = None) -> list[TrainingCase]:
    """Training cases of every ``*.npz`` under ``folder``.

    Prompts come from ``prompts_json`` (default ``folder/CVPR25_TextSegFMData_with_class.json``) by dataset;
    without that file, from each case's ``text_prompts``.
    """
    folder = Path(folder)
    paths = sorted(folder.rglob("*.npz"))
    if not paths:
        raise InputError(f"{folder} holds no .npz cases")
    prompts_json = Path(prompts_json) if prompts_json else folder / PROMPTS_FILE
    if prompts_json.exists():
        datasets = read_class_prompts(prompts_json)
        return [training_case(p, datasets[name], name, spacing) for p in paths for name in [dataset_of(p, datasets)]]
    cases = []
    for path in paths:
        case = read_npz_case(path)
        if case.text_prompts is None:
            raise InputError(f"{path.name} has no text_prompts and there is no {prompts_json}")
        cases.append(training_case(path, case.prompts(), path.parent.name, spacing))
    return cases


class _PromptUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"text_prompts may not reference {module}.{name}")
        return super().find_class(module, name)


def _read_text_prompts(path: Path) -> dict:
    """The dict in ``text_prompts`` without running arbitrary pickled code."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("text_prompts.npy") as stream:
            major, _ = np.lib.format.read_magic(stream)
            if major == 1:
                np.lib.format.read_array_header_1_0(stream)
            else:
                np.lib.format.read_array_header_2_0(stream)
            value = _PromptUnpickler(stream).load()
    except (KeyError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise InputError(f"{path.name}: unreadable text_prompts: {exc}") from exc
    value = value.item() if isinstance(value, np.ndarray) and value.shape == () else value
    if not isinstance(value, dict):
        raise InputError(f"{path.name}: text_prompts must hold a dict, got {type(value).__name__}")
    return value


def _validated(name: str, imgs: np.ndarray, spacing: np.ndarray, gts: np.ndarray | None,
               text_prompts: dict | None) -> NpzCase:
    if imgs.ndim != 3 or not np.issubdtype(imgs.dtype, np.number):
        raise InputError(f"{name}: imgs must be a 3-D numeric (z, y, x) array, got {imgs.dtype} {imgs.shape}")
    spacing = np.asarray(spacing, dtype=np.float64).ravel()
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{name}: spacing must be 3 positive numbers (x, y, z) mm, got {spacing.tolist()}")
    if gts is not None:
        if gts.shape != imgs.shape:
            raise InputError(f"{name}: gts shape {gts.shape} differs from imgs shape {imgs.shape}")
        if not (np.issubdtype(gts.dtype, np.integer) or np.array_equal(gts, np.rint(gts))) or gts.min() < 0:
            raise InputError(f"{name}: gts must hold non-negative integer labels")
        gts = gts if np.issubdtype(gts.dtype, np.integer) else gts.astype(np.int32)
    if text_prompts is not None:
        parse_class_prompts(text_prompts, f"{name}: text_prompts")
    return NpzCase(imgs, tuple(float(s) for s in spacing), gts, text_prompts)
