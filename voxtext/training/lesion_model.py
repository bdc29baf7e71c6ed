"""Recipe of the default model's lesion stage: the same small ESICA on a 2 mm grid, trained on the regions
around the organs that hold the phantom lesions, with lesion prompts only.

The default model's 5 mm grid sees a whole abdominal cross-section but not the lesions (see its model card);
this model sees 9.6 cm windows at 2 mm and is asked only inside the organ the default model finds
(``voxtext.lesions``). ``python -m voxtext.training.lesion_model --out runs/lesions`` rebuilds it.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import build_esica
from ..lesions import ROUTING_FILE, LesionTarget, organ_surroundings
from ..phantom import LABELS, TARGETS
from ..preprocess import PreprocessConfig, prepare_with_labels
from .cases import Target, TrainingCase
from .default_model import (DEFAULT_CONFIG, TRAIN_PHANTOM_SEEDS, acquired_phantom, cpu_config, fit_on_cases,
                            real_sources)
from .seg_trainer import StageConfig, TrainConfig, seed_everything

LESION_SPACING_MM = 2.0
LESION_CONFIG = replace(DEFAULT_CONFIG, target_spacing=LESION_SPACING_MM)
# Organ regions are cut out with this margin, as at inference (``voxtext.lesions.ORGAN_MARGIN_MM``).
REGION_MARGIN_MM = 20.0
RECIPE_STEPS = (700, 800, 500)
# Stages: name, lr, weight decay, share of crops on a lesion, share of absent prompts (the text encoder is frozen).
STAGES = (("pretrain", 1e-3, 1e-5, 1.0, 0.0), ("balanced", 3e-4, 1e-6, 0.6, 0.3), ("negatives", 1e-4, 1e-6, 0.7, 0.6))


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
    return final


def write_routing(folder: Path) -> None:
    """The routing file: each lesion target's phrasings and organs, and the phrasings the default model
    answers itself (a prompt goes to the lesion stage when its nearest known phrasing is a lesion's)."""
    other = [p for phrasings, values in TARGETS if not set(values) <= LESION_VALUES for p in phrasings]
    other += [p for source in real_sources() for t in source.targets for p in t.phrasings]
    routing = {"lesions": [t.to_dict() for t in LESION_TARGETS], "other_phrasings": sorted(set(other))}
    (folder / ROUTING_FILE).write_text(json.dumps(routing, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Retrain the default model's lesion stage from scratch.")
    parser.add_argument("--out", default="runs/lesions")
    parser.add_argument("--steps", type=int, nargs=3, default=RECIPE_STEPS,
                        metavar=("PRETRAIN", "BALANCED", "NEGATIVES"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"trained lesion stage in {train(args.out, tuple(args.steps), args.threads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
