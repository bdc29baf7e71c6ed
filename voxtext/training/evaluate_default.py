"""Held-out figures of the embedded default model (phantoms with unseen seeds and held-out real scans).

    python -m voxtext.training.evaluate_default --model default --phantoms 50 --quality fast --workers 2 \
        --out runs/eval-default.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch

from ..api import Segmenter
from ..evaluation.metrics import dice, normalized_surface_dice
from ..phantom import LABELS
from .default_model import HELD_OUT_PHANTOM_SEEDS, acquired_phantom, is_held_out, load_source, real_sources

ORGANS = ["liver", "spleen", "stomach", "pancreas", "right kidney", "left kidney", "aorta", "inferior vena cava",
          "vertebrae", "urinary bladder"]
LESIONS = ["liver tumor", "liver cyst", "kidney cyst", "kidney stone"]
NEAR_EMPTY_ML = 1.0  # a prompt of an absent structure counts as answered "empty" below this volume
# Structures of other body regions, which a volume cannot hold: asked of every abdominal CT phantom, and the
# abdominal ones of every held-out brain MR (FLAIR). Clinicians type them; the answer should be empty.
OTHER_REGION_ON_CT = ["brain tumor", "peritumoral edema", "left hippocampus", "right putamen", "prostate",
                      "gallbladder", "lung nodule"]
OTHER_REGION_ON_BRAIN_MR = ["liver", "spleen", "left kidney", "pancreas", "aorta", "liver tumor", "kidney stone",
                            "lung nodule"]


def evaluate_phantom(
    segmenter: Segmenter, seed: int, quality: str, laterality: bool = True, refine: bool = True
) -> dict:
    volume, case = acquired_phantom(seed)
    present = {t[0][0] for t in case.targets}
    organs = [o for o in ORGANS if o in present]
    lesions = [t for t in LESIONS if t in present]
    absent = [t for t in LESIONS if t not in present]
    result = segmenter.segment(volume, organs + lesions + absent + OTHER_REGION_ON_CT, quality=quality,
                               laterality=laterality, refine=refine)
    volumes = result.volumes_ml()
    truth = {o: case.target_mask(o) for o in organs}
    row = {"seed": seed, "organ_dice": {o: dice(result.mask(o), truth[o]) for o in organs},
           "organ_nsd": {o: normalized_surface_dice(result.mask(o), truth[o], volume.spacing) for o in organs},
           "lesion_dice": {t: dice(result.mask(t), case.target_mask(t)) for t in lesions},
           "absent_volume_ml": {t: volumes[t] for t in absent},
           "other_region_volume_ml": {t: volumes[t] for t in OTHER_REGION_ON_CT}}
    left, right = case.labels == LABELS["left kidney"], case.labels == LABELS["right kidney"]
    pred_left = result.mask("left kidney")
    row["kidney_swapped"] = bool((pred_left & right).sum() > (pred_left & left).sum())
    return row


@cache
def _segmenter(model: str) -> Segmenter:
    return Segmenter(model, device="cpu")


def _evaluate_seed(model: str, quality: str, laterality: bool, refine: bool, seed: int) -> dict:
    """One phantom's row, with the model loaded once per process."""
    return evaluate_phantom(_segmenter(model), seed, quality, laterality, refine)


def evaluate_real(segmenter: Segmenter, quality: str, refine: bool = True) -> list[dict]:
    """DSC of each held-out real case's targets; on brain MR (FLAIR) also the volume answered for abdominal
    structures (``other_region_ml``)."""
    rows = []
    for source in real_sources():
        if not is_held_out(source.name):
            continue
        volume, labels = load_source(source)
        prompts = [t.name for t in source.targets]
        other = OTHER_REGION_ON_BRAIN_MR if source.group == "brain-mr" and "brain tumor" in prompts else []
        result = segmenter.segment(volume, prompts + other, quality=quality, refine=refine)
        for target in source.targets:
            rows.append({"case": source.name, "prompt": target.name,
                         "dice": dice(result.mask(target.name), np.isin(labels, target.values))})
        volumes = result.volumes_ml()
        rows += [{"case": source.name, "prompt": p, "other_region_ml": volumes[p]} for p in other]
    return rows


def _mean_of(phantoms: list[dict], field: str) -> float | None:
    """The mean of ``field`` (a name -> value dict per row) over every value of every row."""
    values = [v for r in phantoms for v in r[field].values()]
    return float(np.mean(values)) if values else None


def _mean_per_name(phantoms: list[dict], field: str, names: list[str]) -> dict[str, float]:
    """The mean of ``field`` per name, over the rows that hold it (names no row holds left out)."""
    held = {n: [r[field][n] for r in phantoms if n in r[field]] for n in names}
    return {n: float(np.mean(values)) for n, values in held.items() if values}


def summarize(phantoms: list[dict], real: list[dict]) -> dict:
    absent = [v for r in phantoms for v in r["absent_volume_ml"].values()]
    other = [v for r in phantoms for v in r["other_region_volume_ml"].values()]
    other += [r["other_region_ml"] for r in real if "other_region_ml" in r]
    return {
        "phantoms": len(phantoms),
        "organ_dice_mean": _mean_of(phantoms, "organ_dice"),
        "organ_nsd_mean": _mean_of(phantoms, "organ_nsd"),
        "lesion_dice_mean": _mean_of(phantoms, "lesion_dice"),
        "kidney_swap_rate": float(np.mean([r["kidney_swapped"] for r in phantoms])) if phantoms else None,
        "absent_empty_rate": float(np.mean([v < NEAR_EMPTY_ML for v in absent])) if absent else None,
        "other_region_empty_rate": float(np.mean([v < NEAR_EMPTY_ML for v in other])) if other else None,
        "other_region_ml_on_ct": _mean_per_name(phantoms, "other_region_volume_ml", OTHER_REGION_ON_CT),
        "per_organ_dice": _mean_per_name(phantoms, "organ_dice", ORGANS),
        "per_organ_nsd": _mean_per_name(phantoms, "organ_nsd", ORGANS),
        "per_lesion_dice": _mean_per_name(phantoms, "lesion_dice", LESIONS),
        "real": [r for r in real if "dice" in r],
        "other_region_on_mr": [r for r in real if "other_region_ml" in r],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--phantoms", type=int, default=50)
    parser.add_argument("--quality", default="accurate", choices=["accurate", "fast"])
    parser.add_argument("--out", default="runs/eval-default.json")
    parser.add_argument("--no-laterality", action="store_true", help="the model's raw masks for sided prompts")
    parser.add_argument("--no-refine", action="store_true", help="the model's own boundaries (no refinement on CT)")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="phantoms evaluated in parallel (1 thread each)")
    args = parser.parse_args(argv)
    t0 = time.time()
    rows_file = Path(args.out).with_suffix(".rows.jsonl")  # one line a phantom: an interrupted run resumes
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if rows_file.exists():
        done = {row["seed"]: row for row in map(json.loads, rows_file.read_text().splitlines())}
    seeds = list(HELD_OUT_PHANTOM_SEEDS)[: args.phantoms]
    todo = [seed for seed in seeds if seed not in done]
    job = partial(_evaluate_seed, args.model, args.quality, not args.no_laterality, not args.no_refine)
    with ProcessPoolExecutor(args.workers, initializer=torch.set_num_threads, initargs=(1,)) if args.workers > 1 \
            else nullcontext() as pool:
        for row in (pool.map(job, todo) if pool else map(job, todo)):
            done[row["seed"]] = row
            with rows_file.open("a") as rows:
                rows.write(json.dumps(row) + "\n")
            print(f"phantom {row['seed']}: organ DSC {np.mean(list(row['organ_dice'].values())):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    phantoms = [done[seed] for seed in seeds]
    real = [] if args.skip_real else evaluate_real(_segmenter(args.model), args.quality, not args.no_refine)
    summary = summarize(phantoms, real)
    summary.update(model=args.model, quality=args.quality, laterality=not args.no_laterality, refine=not args.no_refine,
                   seconds=round(time.time() - t0, 1))
    Path(args.out).write_text(json.dumps({"summary": summary, "phantom_rows": phantoms}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
