"""Score folders of predicted label maps against ground truth with the CVPR BiomedSegFM definitions.

Predictions: ``<case>.nii.gz`` + ``<case>.json`` as written by ``voxtext segment`` (``{"labels": {value: prompt}}``).
Ground truth: ``labels/<case>.nii.gz`` (or ``<case>.nii.gz``) + ``prompts.json`` (label value -> phrasings),
the training folder layout. A predicted segment answers the class whose phrasings contain its prompt.

Every class of ``prompts.json`` is scored in every case (the challenge averages over all prompted classes):
a class absent from both scores 1, a false positive on an absent class or a missed class scores 0.
For instance datasets the reference labels are instances and the prediction's connected components are
matched to them (:func:`voxtext.evaluation.instances.instance_f1`); DSC and NSD are then of the union masks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..training.cases import Target
from ..training.train_seg import read_prompts
from ..volume import Volume
from .instances import connected_components, instance_f1
from .metrics import dice, normalized_surface_dice


@dataclass(frozen=True)
class ClassScore:
    """The scores of one class in one case; ``f1``/``dsc_tp`` only for instance datasets."""

    case: str
    label: int
    name: str
    dsc: float
    nsd: float
    f1: float | None = None
    dsc_tp: float | None = None


def nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def read_prediction(path: Path) -> tuple[Volume, dict[int, str]]:
    """A predicted label map and its sidecar's label value -> prompt table."""
    sidecar = path.with_name(nifti_stem(path) + ".json")
    if not sidecar.exists():
        raise InputError(f"prediction {path.name} has no sidecar {sidecar.name} (label value -> prompt)")
    try:
        labels = json.loads(sidecar.read_text())["labels"]
        table = {int(value): str(prompt) for value, prompt in labels.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{sidecar} must hold {{'labels': {{label value: prompt}}}}: {exc}") from exc
    return Volume.from_file(path), table


def predicted_masks(
    labels: np.ndarray, prompts: dict[int, str], targets: list[Target], case: str
) -> dict[int, np.ndarray]:
    """Predicted mask of each target (keyed by its first label value); empty when it was not predicted."""
    by_phrase = {p.strip().casefold(): t.values[0] for t in targets for p in t.phrasings}
    masks = {t.values[0]: np.zeros(labels.shape, bool) for t in targets}
    answered: dict[int, str] = {}
    for value, prompt in prompts.items():
        key = by_phrase.get(prompt.strip().casefold())
        if key is None:
            raise InputError(f"{case}: predicted prompt {prompt!r} is none of the phrasings in prompts.json")
        if key in answered:
            raise InputError(f"{case}: prompts {answered[key]!r} and {prompt!r} both name class {key}")
        answered[key] = prompt
        masks[key] = labels == value
    return masks


def evaluate_case(
    name: str, pred: Volume, prompts: dict[int, str], gt: Volume, targets: list[Target],
    tolerance_mm: float = 2.0, instance: bool = False,
) -> list[ClassScore]:
    """Scores of every target in one case; ``instance``: ``gt`` holds instance labels of one target."""
    if pred.shape != gt.shape or not np.allclose(pred.affine, gt.affine, atol=1e-3):
        raise InputError(f"{name}: the prediction grid {pred.shape} differs from the ground-truth grid {gt.shape}")
    if instance and len(targets) != 1:
        raise InputError(f"instance datasets have one class in prompts.json, got {len(targets)}")
    labels = np.rint(gt.array).astype(np.int64)
    masks = predicted_masks(np.rint(pred.array).astype(np.int64), prompts, targets, name)
    scores = []
    for target in targets:
        mask = masks[target.values[0]]
        truth = labels > 0 if instance else np.isin(labels, target.values)
        overlap = dice(mask, truth), normalized_surface_dice(mask, truth, gt.spacing, tolerance_mm)
        if instance:
            matched = instance_f1(connected_components(mask), labels)
            scores.append(ClassScore(name, target.values[0], target.name, *overlap, matched.f1, matched.dsc_tp))
        else:
            scores.append(ClassScore(name, target.values[0], target.name, *overlap))
    return scores


def ground_truth_files(gt_dir: Path) -> list[Path]:
    folder = gt_dir / "labels" if (gt_dir / "labels").is_dir() else gt_dir
    files = sorted(folder.glob("*.nii*"))
    if not files:
        raise InputError(f"{folder} holds no NIfTI label maps")
    return files


def evaluate_folders(
    pred_dir: str | Path, gt_dir: str | Path, tolerance_mm: float = 2.0, instance: bool = False
) -> list[ClassScore]:
    """Scores of every ground-truth case and class (see the module docstring for the layouts)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise InputError(f"the NSD tolerance must be a non-negative number of mm, got {tolerance_mm}")
    if not pred_dir.is_dir():
        raise InputError(f"no predictions folder {pred_dir}")
    targets = read_prompts(gt_dir)
    cases = {nifti_stem(path): path for path in ground_truth_files(gt_dir)}
    predictions = {name: next(iter(sorted(pred_dir.glob(name + ".nii*"))), None) for name in cases}
    missing = sorted(name for name, path in predictions.items() if path is None)
    if missing:
        raise InputError(f"{pred_dir} has no prediction for case(s) {', '.join(missing)}")
    scores = []
    for name, gt_path in cases.items():
        pred, prompts = read_prediction(predictions[name])
        scores += evaluate_case(name, pred, prompts, Volume.from_file(gt_path), targets, tolerance_mm, instance)
    return scores
