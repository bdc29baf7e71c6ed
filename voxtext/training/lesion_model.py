"""Recipe of the default model's lesion stage: the same small ESICA on a 2 mm grid, trained on the regions
around the organs that hold the phantom lesions, with lesion prompts only.

The default model's 5 mm grid sees a whole abdominal cross-section but not the lesions (see its model card);
this model sees 9.6 cm windows at 2 mm and is asked only inside the organ the default model finds
(``voxtext.lesions``). ``python -m voxtext.training.lesion_model --out runs/lesions`` rebuilds it; the rule
for the lesion components it keeps (volume, mean probability and, on CT, attenuation) is then calibrated on
validation phantoms (``--calibrate FOLDER`` redoes only that).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import cache
from itertools import product
from pathlib import Path

import numpy as np
import torch

from ..api import Segmenter
from ..checkpoints import build_esica
from ..distances import padded_box
from ..lesions import (ROUTING_FILE, ComponentRule, LesionRouting, LesionStage, LesionTarget, measure_components,
                       organ_surroundings)
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
# Attenuation criteria (CT): a simple cyst is water (about -10 to 20 HU); fat is below, solid lesions and the
# organs above.
MAX_HU = (None, 20.0, 30.0, 40.0)
MIN_HU = (None, -20.0, 20.0, 30.0)
MIN_CONTRASTS_HU = (0.0, 10.0, 20.0, 30.0)
MIN_INSIDE = (0.0, 0.5, 0.9)  # share of a (grown) component inside the organ mask


def parent_organs(values: tuple[int, ...]) -> tuple[str, ...]:
    """Organs holding lesion label ``values``: "right kidney stone" -> "right kidney"."""
    names = {v: k for k, v in LABELS.items()}
    return tuple(sorted({names[v].rsplit(" ", 1)[0] for v in values}))


LESION_VALUES = {v for name, v in LABELS.items() if name.endswith(("cyst", "tumor", "stone"))}
STONE_VALUES = {v for name, v in LABELS.items() if name.endswith("stone")}
# The lesion model never finds a kidney stone (a few voxels; model card): stones are found by attenuation, as
# calcium above the enhanced renal parenchyma (up to about 250 HU) and at or below most stones.
STONE_HU = 300.0


def lesion_target(phrasings: tuple[str, ...], values: tuple[int, ...]) -> LesionTarget:
    """The lesion stage's target for phantom label ``values``: a stone found by attenuation; any other lesion found
    by the lesion model and taking its extent from attenuation (:mod:`voxtext.lesions`)."""
    stone = set(values) <= STONE_VALUES
    return LesionTarget(phrasings, parent_organs(values), hyperdense_hu=STONE_HU if stone else None,
                        grow_by_attenuation=not stone)


LESION_TARGETS = [lesion_target(phrasings, values) for phrasings, values in TARGETS if set(values) <= LESION_VALUES]
ORGAN_TARGETS = {phrasings[0]: values for phrasings, values in TARGETS if not set(values) <= LESION_VALUES}


def lesion_case(seed: int) -> TrainingCase:
    """A training phantom on the 2 mm grid, cut to the organs that can hold lesions (plus a margin) and blanked
    beyond a random 2-10 mm around them, as the lesion stage sees a volume around the main model's organ mask."""
    volume, case = acquired_phantom(seed)
    prepared, labels = prepare_with_labels(volume, case.labels, PreprocessConfig(target_spacing=LESION_SPACING_MM))
    organs = {o for t in LESION_TARGETS for o in t.within}
    region = np.isin(labels, [v for o in organs for v in ORGAN_TARGETS[o]])
    box = padded_box(region, LESION_SPACING_MM, REGION_MARGIN_MM)
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


def spawned_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes spawned, not forked: the caller may have run torch already, and a forked copy of its thread
    pools can hang."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def train(output_dir: str, steps: tuple[int, int, int], threads: int, workers: int = 2,
          main_model: str | Path = "default", calibration_seeds: range = CALIBRATION_PHANTOM_SEEDS) -> Path:
    """Train the lesion stage into ``output_dir``, then calibrate its component rules on ``calibration_seeds``
    behind ``main_model`` (whose organ masks the stage reads at inference)."""
    torch.set_num_threads(threads)
    seed_everything(7)
    with spawned_pool(workers) as pool:
        cases = list(pool.map(lesion_case, TRAIN_PHANTOM_SEEDS, chunksize=8))
    final = fit_on_cases(build_esica(LESION_CONFIG), cases, recipe(output_dir, steps))
    write_routing(final)
    calibrate(final, calibration_seeds, workers, main_model=main_model)
    return final


def write_routing(folder: Path) -> None:
    """The routing file: each lesion target's phrasings and organs, and the phrasings the default model
    answers itself (a prompt goes to the lesion stage when its nearest known phrasing is a lesion's)."""
    other = [p for phrasings, values in TARGETS if not set(values) <= LESION_VALUES for p in phrasings]
    other += [p for source in real_sources() for t in source.targets for p in t.phrasings]
    LesionRouting(tuple(LESION_TARGETS), tuple(sorted(set(other)))).save(folder / ROUTING_FILE)


def unfiltered(routing: LesionRouting) -> LesionRouting:
    """``routing`` with every lesion's component rule off (a target grown by attenuation is still grown: its rule
    judges the grown components)."""
    return replace(routing, lesions=tuple(replace(t, rule=ComponentRule()) for t in routing.lesions))


@cache
def _segmenter(lesion_folder: Path, main_model: str) -> Segmenter:
    """``main_model`` (the shipped one: "default") with the lesion stage in ``lesion_folder``, its component rule
    off."""
    segmenter = Segmenter(main_model, device="cpu")
    segmenter.lesion_stage = LesionStage(lesion_folder, segmenter.device)
    segmenter.lesion_stage.routing = unfiltered(segmenter.lesion_stage.routing)
    return segmenter


def component_table(lesion_folder: Path, seed: int, names: Sequence[str] | None = None,
                    main_model: str = "default") -> list[dict]:
    """For one validation phantom and each lesion target (those named by their first phrasing in ``names``, or
    all): is it present, its true volume, and the components of the lesion stage's answer behind ``main_model``,
    unfiltered: volume, mean probability, volume on the truth, median HU and contrast to the (main model's) organ,
    as :func:`voxtext.lesions.measure_components` measures them."""
    volume, case = acquired_phantom(seed)
    present = {t[0][0] for t in case.targets}
    targets = [t for t in LESION_TARGETS if names is None or t.phrasings[0] in names]
    organs = sorted({o for t in targets for o in t.within})
    asked = [t.phrasings[0] for t in targets]
    result = _segmenter(lesion_folder, main_model).segment(volume, asked + organs, quality="fast",
                                                           return_probabilities=True)
    voxel_ml, rows = result.voxel_volume_ml, []
    for target, probability in zip(targets, result.probabilities):
        name = target.phrasings[0]
        truth = case.target_mask(name) if name in present else np.zeros(probability.shape, bool)
        organ = np.logical_or.reduce([result.mask(o) for o in target.within])
        found = measure_components(probability, 0.5, voxel_ml, volume.array, organ)
        hits = np.bincount(found.labels[truth], minlength=len(found.volume_ml) + 1)[1:] * voxel_ml
        rows.append({"target": name, "present": name in present, "truth_ml": float(truth.sum()) * voxel_ml,
                     "volume_ml": found.volume_ml.tolist(), "confidence": found.confidence.tolist(),
                     "hit_ml": hits.tolist(), "median_hu": found.median_hu.tolist(),
                     "contrast_hu": found.contrast_hu.tolist(), "inside": found.inside.tolist()})
    return rows


def rule_outcomes(rows: list[dict], rule: ComponentRule) -> tuple[list[float], list[bool]]:
    """Under a component rule: the DSC of each row whose lesion is present, and for each other row whether the
    answer is (near-)empty."""
    dice, empty = [], []
    for row in rows:
        keep = rule.keeps(row["volume_ml"], row["confidence"], row["median_hu"], row["contrast_hu"], row.get("inside"))
        volume = float(np.sum(np.asarray(row["volume_ml"])[keep]))
        if row["present"]:
            hit = float(np.sum(np.asarray(row["hit_ml"])[keep]))
            dice.append(2 * hit / max(volume + row["truth_ml"], 1e-9))
        else:
            empty.append(volume < NEAR_EMPTY_ML)
    return dice, empty


def rule_score(rows: list[dict], rule: ComponentRule) -> float:
    """Mean DSC where the lesion is present plus the share of absent cases answered (near-)empty."""
    dice, empty = rule_outcomes(rows, rule)
    return float(np.mean(dice) if dice else 0.0) + float(np.mean(empty) if empty else 0.0)


def candidate_rules() -> list[ComponentRule]:
    """The grid the calibration searches, mildest first (fewest attenuation criteria, then lowest thresholds):
    :func:`best_rule` keeps the first of equals."""
    grid = [ComponentRule(volume, confidence, max_hu, min_hu, contrast, inside)
            for volume, confidence, max_hu, min_hu, contrast, inside
            in product(MIN_VOLUMES_ML, MIN_CONFIDENCES, MAX_HU, MIN_HU, MIN_CONTRASTS_HU, MIN_INSIDE)
            if max_hu is None or min_hu is None or min_hu < max_hu]
    return sorted(grid, key=lambda r: ((r.max_hu is not None) + (r.min_hu is not None) + (r.min_contrast_hu > 0)
                                       + (r.min_inside > 0), r.min_volume_ml + r.min_confidence, r.min_contrast_hu,
                                       r.min_inside))


def best_rule(rows: list[dict]) -> ComponentRule:
    """The rule of :func:`candidate_rules` with the highest :func:`rule_score` on ``rows``; the mildest among
    equals."""
    grid = candidate_rules()
    return grid[int(np.argmax([round(rule_score(rows, rule), 6) for rule in grid]))]


def calibrate(lesion_folder: Path, seeds: range = CALIBRATION_PHANTOM_SEEDS, workers: int = 2,
              table: Path | None = None, names: Sequence[str] | None = None,
              main_model: str | Path = "default") -> list[LesionTarget]:
    """Choose each lesion target's component rule on validation phantoms, behind ``main_model`` (the highest
    :func:`rule_score`, the mildest rule among equals), and write it into the routing file, with the mean DSC the
    chosen rule reaches on the phantoms that hold the lesion (a low one is a caution to users). ``table``: a JSON
    file keeping the measured components (read instead of re-running the lesion stage when it exists). ``names``:
    recalibrate only these targets (first phrasings), re-measured (their rows in ``table`` replaced); the others are
    kept."""
    path = Path(lesion_folder) / ROUTING_FILE
    routing = LesionRouting.load(path)
    rows = json.loads(Path(table).read_text()) if table is not None and Path(table).is_file() else []
    if names is not None or not rows:  # (re-)measure: all targets, or the named ones
        rows = [r for r in rows if r["target"] not in (names or ())]
        with spawned_pool(workers) as pool:
            for case in pool.map(component_table, [Path(lesion_folder)] * len(seeds), seeds, [names] * len(seeds),
                                 [str(main_model)] * len(seeds)):
                rows += case
        if table is not None:
            Path(table).write_text(json.dumps(rows))
    calibrated = []
    for target in routing.lesions:
        if names is not None and target.phrasings[0] not in names:
            calibrated.append(target)
            continue
        own = [r for r in rows if r["target"] == target.phrasings[0]]
        rule = best_rule(own)
        dice, _ = rule_outcomes(own, rule)
        calibrated.append(replace(target, rule=rule, validated_cases=len(dice),
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
    parser.add_argument("--table", metavar="JSON", help="keep the calibration's measured components in this file "
                                                        "(and reuse them when it exists)")
    parser.add_argument("--targets", nargs="+", metavar="NAME",
                        help="with --calibrate: re-measure and recalibrate only these lesion targets (first phrasing, "
                             "e.g. 'kidney stone'); the others keep their rules")
    parser.add_argument("--main-model", default="default",
                        help="the main model whose organ masks the stage reads, for its calibration (a folder, or "
                             "'default': the shipped one)")
    args = parser.parse_args(argv)
    if args.calibrate:
        for t in calibrate(Path(args.calibrate), table=args.table, names=args.targets, main_model=args.main_model):
            print(f"{t.phrasings[0]}: keep components with {t.rule.describe()}; validation DSC {t.validated_dsc} "
                  f"over {t.validated_cases} phantoms")
        return 0
    print(f"trained lesion stage in {train(args.out, tuple(args.steps), args.threads, main_model=args.main_model)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
