"""Recipe of the default model's lesion stage: the same small ESICA on a 2 mm grid, trained on the regions
around the organs that hold the phantom lesions, with lesion prompts only.

The default model's 5 mm grid sees a whole abdominal cross-section but not the lesions (see its model card);
this model sees 9.6 cm windows at 2 mm and is asked only inside the organ the default model finds
(``voxtext.lesions``). ``python -m voxtext.training.lesion_model --out runs/lesions`` rebuilds it; the
minimum volume and confidence of the lesion components it keeps are then calibrated on validation phantoms
(``--calibrate FOLDER`` redoes only that).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import cache
from itertools import product
from pathlib import Path

import numpy as np
import torch

from ..api import Segmenter
from ..checkpoints import build_esica
from ..lesions import ROUTING_FILE, LesionRouting, LesionStage, LesionTarget, components, organ_surroundings
from ..phantom import LABELS, TARGETS
from ..preprocess import PreprocessConfig, prepare_with_labels
from .cases import Target, TrainingCase
from .default_model import (DEFAULT_CONFIG, TRAIN_PHANTOM_SEEDS, acquired_phantom, cpu_config, fit_on_cases,
                            real_sources)
from .evaluate_default import NEAR_EMPTY_ML
from .seg_trainer import StageConfig, TrainConfig, seed_everything

LESION_SPACING_MM = 2.0
LESION_CONFIG = replace(DEFAULT_CONFIG, target_spacing=LESION_SPACING_MM)
# Organ regions are cut out with this margin, as at inference (``voxtext.lesions.ORGAN_MARGIN_MM``).
REGION_MARGIN_MM = 20.0
RECIPE_STEPS = (700, 800, 500)
# Stages: name, lr, weight decay, share of crops on a lesion, share of absent prompts (the text encoder is frozen).
STAGES = (("pretrain", 1e-3, 1e-5, 1.0, 0.0), ("balanced", 3e-4, 1e-6, 0.6, 0.3), ("negatives", 1e-4, 1e-6, 0.7, 0.6))
CALIBRATION_PHANTOM_SEEDS = range(20_000, 20_040)  # neither trained on nor in the held-out figures
MIN_VOLUMES_ML = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
MIN_CONFIDENCES = (0.0, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)


def parent_organs(values: tuple[int, ...]) -> tuple[str, ...]:
    """Organs holding lesion label ``values``: "right kidney stone" -> "right kidney"."""
    names = {v: k for k, v in LABELS.items()}
    return tuple(sorted({names[v].rsplit(" ", 1)[0] for v in values}))


LESION_VALUES = {v for name, v in LABELS.items() if name.endswith(("cyst", "tumor", "stone"))}
LESION_TARGETS = [LesionTarget(phrasings, parent_organs(values)) for phrasings, values in TARGETS
                  if set(values) <= LESION_VALUES]
ORGAN_TARGETS = {phrasings[0]: values for phrasings, values in TARGETS if not set(values) <= LESION_VALUES}


def lesion_case(seed: int) -> TrainingCase:
    """A training phantom on the 2 mm grid, cut to the organs that can hold lesions (plus a margin) and blanked
    beyond a random 2-10 mm around them, as the lesion stage sees a volume around the main model's organ mask."""
    volume, case = acquired_phantom(seed)
    prepared, labels = prepare_with_labels(volume, case.labels, PreprocessConfig(target_spacing=LESION_SPACING_MM))
    organs = {o for t in LESION_TARGETS for o in t.within}
    region = np.isin(labels, [v for o in organs for v in ORGAN_TARGETS[o]])
    margin = int(round(REGION_MARGIN_MM / LESION_SPACING_MM))
    box = tuple(slice(max(int(lo) - margin, 0), int(hi) + margin + 1)
                for lo, hi in zip(np.argwhere(region).min(0), np.argwhere(region).max(0)))
    dilation = np.random.default_rng(seed).uniform(2.0, 10.0)
    image = organ_surroundings(prepared.image[box], region[box], LESION_SPACING_MM, dilation)
    targets = [Target(phrasings, values) for phrasings, values in TARGETS if set(values) <= LESION_VALUES]
    return TrainingCase(f"phantom/{seed}", "abdomen-ct", image, labels[box].astype(np.int16), targets)


def recipe(output_dir: str, steps: tuple[int, int, int] = RECIPE_STEPS) -> TrainConfig:
    """Stage 1 (positive only): crops on lesions, asked for lesions they hold; stage 2: 40 % of the crops anywhere
    in the organ regions and absent lesions asked (the lesion stage answers inside organs that usually hold none);
    stage 3: absent lesions asked more often, at a low rate, against false alarms. Absent prompts from the start
    make the model answer every lesion "empty" (measured, see the model card)."""
    stages = [StageConfig(name, n, lr=lr, weight_decay=decay, pos_ratio=pos, absent_prompt_prob=absent,
                          freeze_text_encoder=name != "pretrain")
              for (name, lr, decay, pos, absent), n in zip(STAGES, steps)]
    return cpu_config(output_dir, stages, seed=7)


def train(output_dir: str, steps: tuple[int, int, int], threads: int, workers: int = 2) -> Path:
    torch.set_num_threads(threads)
    seed_everything(7)
    with ProcessPoolExecutor(workers) as pool:
        cases = list(pool.map(lesion_case, TRAIN_PHANTOM_SEEDS, chunksize=8))
    final = fit_on_cases(build_esica(LESION_CONFIG), cases, recipe(output_dir, steps))
    write_routing(final)
    calibrate(final, workers=workers)
    return final


def write_routing(folder: Path) -> None:
    """The routing file: each lesion target's phrasings and organs, and the phrasings the default model
    answers itself (a prompt goes to the lesion stage when its nearest known phrasing is a lesion's)."""
    other = [p for phrasings, values in TARGETS if not set(values) <= LESION_VALUES for p in phrasings]
    other += [p for source in real_sources() for t in source.targets for p in t.phrasings]
    LesionRouting(tuple(LESION_TARGETS), tuple(sorted(set(other)))).save(folder / ROUTING_FILE)


def unfiltered(routing: LesionRouting) -> LesionRouting:
    """``routing`` with every lesion's component rule off."""
    return replace(routing, lesions=tuple(replace(t, min_volume_ml=0.0, min_confidence=0.0) for t in routing.lesions))


@cache
def _segmenter(lesion_folder: Path) -> Segmenter:
    """The shipped main model with the lesion stage in ``lesion_folder``, its component rule off."""
    segmenter = Segmenter("default", device="cpu")
    segmenter.lesion_stage = LesionStage(lesion_folder, segmenter.device)
    segmenter.lesion_stage.routing = unfiltered(segmenter.lesion_stage.routing)
    return segmenter


def component_table(lesion_folder: Path, seed: int) -> list[dict]:
    """For one validation phantom and each lesion target: is it present, its true volume, and the components
    of the lesion stage's answer (volume, mean probability, volume overlapping the truth), unfiltered."""
    volume, case = acquired_phantom(seed)
    present = {t[0][0] for t in case.targets}
    names = [t.phrasings[0] for t in LESION_TARGETS]
    result = _segmenter(lesion_folder).segment(volume, names, quality="fast", return_probabilities=True)
    voxel_ml, rows = result.voxel_volume_ml, []
    for name, probability in zip(names, result.probabilities):
        truth = case.target_mask(name) if name in present else np.zeros(probability.shape, bool)
        labels, counts, means = components(probability, 0.5)
        hits = np.bincount(labels[truth], minlength=len(counts) + 1)[1:]
        rows.append({"target": name, "present": name in present, "truth_ml": float(truth.sum()) * voxel_ml,
                     "components": [(float(c) * voxel_ml, float(m), float(h) * voxel_ml)
                                    for c, m, h in zip(counts, means, hits)]})
    return rows


def rule_outcomes(rows: list[dict], min_volume_ml: float, min_confidence: float) -> tuple[list[float], list[bool]]:
    """Under a component rule: the DSC of each row whose lesion is present, and for each other row whether the
    answer is (near-)empty."""
    dice, empty = [], []
    for row in rows:
        kept = [(v, h) for v, m, h in row["components"] if v >= min_volume_ml and m >= min_confidence]
        volume = sum(v for v, _ in kept)
        if row["present"]:
            dice.append(2 * sum(h for _, h in kept) / max(volume + row["truth_ml"], 1e-9))
        else:
            empty.append(volume < NEAR_EMPTY_ML)
    return dice, empty


def rule_score(rows: list[dict], min_volume_ml: float, min_confidence: float) -> float:
    """Mean DSC where the lesion is present plus the share of absent cases answered (near-)empty."""
    dice, empty = rule_outcomes(rows, min_volume_ml, min_confidence)
    return float(np.mean(dice) if dice else 0.0) + float(np.mean(empty) if empty else 0.0)


def best_rule(rows: list[dict]) -> tuple[float, float]:
    """The (minimum volume, minimum confidence) of the grid with the highest :func:`rule_score` on ``rows``; the
    mildest among equals."""
    return max(product(MIN_VOLUMES_ML, MIN_CONFIDENCES),
               key=lambda rule: (round(rule_score(rows, *rule), 6), -sum(rule)))


def calibrate(lesion_folder: Path, seeds: range = CALIBRATION_PHANTOM_SEEDS, workers: int = 2) -> list[LesionTarget]:
    """Choose each lesion target's minimum component volume and confidence on validation phantoms (the
    highest :func:`rule_score`, the mildest rule among equals) and write them into the routing file, with the
    mean DSC the chosen rule reaches on the phantoms that hold the lesion (a low one is a caution to users)."""
    path = Path(lesion_folder) / ROUTING_FILE
    routing = LesionRouting.load(path)
    with ProcessPoolExecutor(workers) as pool:
        rows = [r for case in pool.map(component_table, [Path(lesion_folder)] * len(seeds), seeds) for r in case]
    calibrated = []
    for target in routing.lesions:
        own = [r for r in rows if r["target"] == target.phrasings[0]]
        volume, confidence = best_rule(own)
        dice, _ = rule_outcomes(own, volume, confidence)
        calibrated.append(replace(target, min_volume_ml=volume, min_confidence=confidence, validated_cases=len(dice),
                                  validated_dsc=round(float(np.mean(dice)), 3) if dice else None))
    replace(routing, lesions=tuple(calibrated)).save(path)
    return calibrated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Retrain the default model's lesion stage from scratch.")
    parser.add_argument("--out", default="runs/lesions")
    parser.add_argument("--steps", type=int, nargs=3, default=RECIPE_STEPS,
                        metavar=("PRETRAIN", "BALANCED", "NEGATIVES"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibrate", metavar="FOLDER", help="only calibrate the trained lesion stage in FOLDER")
    args = parser.parse_args(argv)
    if args.calibrate:
        for t in calibrate(Path(args.calibrate)):
            print(f"{t.phrasings[0]}: keep components >= {t.min_volume_ml} mL with mean probability >= "
                  f"{t.min_confidence}; validation DSC {t.validated_dsc} over {t.validated_cases} phantoms")
        return 0
    print(f"trained lesion stage in {train(args.out, tuple(args.steps), args.threads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
