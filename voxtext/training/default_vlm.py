"""Recipe and held-out evaluation of the embedded default VLM (``voxtext/weights/vlm-default``).

``python -m voxtext.training.default_vlm --out runs/vlm-default`` retrains it from scratch on CPU
(deterministic seeds: phantoms 0..N-1 for training, 100000+ for evaluation), evaluates it and writes
``eval.json``; the model card records the figures of the shipped run. Two stages: the vision tower learns
the phantoms' label maps (:mod:`voxtext.training.vision_pretrain`, fresh phantoms every step), then, with
the tower frozen, the projector and the language model learn the reports and Q/A pairs.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from statistics import median

import torch

from ..models.dcformer import DCFormer, load_dcformer
from ..models.med3dvlm import Med3DVLMConfig
from ..phantom import PHASE_QUESTION, generate_phantom
from ..report import Reporter, vision_config_of
from ..volume import Volume
from .train_vlm import ModelSize, Stage, train
from .vision_pretrain import pretrain_vision_tower
from .vlm_data import phantom_cases, phantom_lesions

HELD_OUT_SEED = 100_000
SOFT_TISSUE_WINDOW = (-150.0, 250.0)  # HU: cysts, tumours and organs apart; a stone (> 250 HU) stays brightest
# How voxtext.phantom.write_report words each lesion type.
KIND_WORDS = {"cyst": "simple cyst", "tumor": "solid mass", "stone": "calculus"}
ORGANS = ("liver", "spleen", "pancreas", "right kidney", "left kidney")


def mentioned_lesions(report: str) -> set[tuple[str, str]]:
    """(organ, lesion type) pairs a report's FINDINGS lines mention, e.g. ``("left kidney", "cyst")``."""
    found = set()
    for organ in ORGANS:
        for line in re.findall(rf"^{organ.capitalize()}:(.*)$", report, flags=re.MULTILINE):
            found |= {(organ, kind) for kind, words in KIND_WORDS.items() if words in line}
    return found


def true_lesions(findings: Iterable[dict]) -> set[tuple[str, str]]:
    return {(f"{f['side']} kidney" if f["side"] else f["organ"], f["type"]) for f in findings}


def answer_prior(seeds: Iterable[int], shape: tuple[int, int, int]) -> dict[str, str]:
    """The most frequent answer to each question over training phantoms ``seeds`` (generated at ``shape``,
    x-y-z, as for training): what a model that ignores the image can do at best."""
    counts: dict[str, Counter] = {}
    for seed in seeds:
        for item in generate_phantom(seed, shape=shape, lesions=phantom_lesions(seed)).qa:
            counts.setdefault(item["question"], Counter())[item["answer"]] += 1
    return {question: c.most_common(1)[0][0] for question, c in counts.items()}


def size_mm(text: str) -> float | None:
    """The first size in millimetres an answer names ("About 15 mm." -> 15.0), None without one."""
    match = re.search(r"(\d+(?:\.\d+)?)\s*mm\b", text)
    return float(match.group(1)) if match else None


def size_error(answer: str, truth_mm: float) -> float:
    """|size the answer names - ``truth_mm``| in mm; infinite when it names none."""
    said = size_mm(answer)
    return float("inf") if said is None else abs(said - truth_mm)


def same_phase(said: str, truth: str) -> bool:
    """Whether an answer to the contrast-phase question names ``truth`` and nothing else ("Portal venous." ok)."""
    return said.strip().rstrip(".").strip().lower() == truth.lower()


def evaluate(reporter: Reporter, seeds: Iterable[int], lesions: float = 0.5, prior: dict[str, str] | None = None
             ) -> dict:
    """Closed-question accuracy (greedy answers parsed strictly, options ranked by likelihood, and the
    image-blind ``prior`` answers), report findings recall / precision / hallucinations, and the open questions
    (contrast phase right; lesion size's median absolute error, a missing size counting as infinite) on phantoms;
    per question ``[generated right, scored right, asked]`` and per finding ``[found, present, named when absent]``."""
    d, h, w = reporter.image_size
    prior = prior or {}
    closed = correct = scored = blind = unparsed = tp = fp = fn = normal = normal_with_lesion = 0
    by_question: dict[str, list[int]] = {}
    by_finding: dict[str, list[int]] = {}
    phase: Counter = Counter()
    size_errors: list[tuple[float, float]] = []  # (model, prior) per size question
    for seed in seeds:
        ph = generate_phantom(seed, shape=(w, h, d), lesions=lesions)
        volume = Volume(ph.image, ph.affine, "CT")
        for item in ph.qa:
            blind_answer = prior.get(item["question"], "")
            if item["type"] != "closed":
                said = reporter.ask(volume, item["question"], greedy=True).text
                if item["question"] == PHASE_QUESTION:
                    phase.update(asked=1, right=same_phase(said, item["answer"]),
                                 prior=same_phase(blind_answer, item["answer"]))
                else:
                    truth = size_mm(item["answer"])
                    size_errors.append((size_error(said, truth), size_error(blind_answer, truth)))
                continue
            answer = reporter.ask(volume, item["question"], item["choices"], greedy=True)
            right = answer.choice == item["answer"]
            right_scored = reporter.ask(volume, item["question"], item["choices"], score=True).choice == item["answer"]
            closed, correct, scored = closed + 1, correct + right, scored + right_scored
            unparsed += answer.index is None
            blind += blind_answer == item["answer"]
            tally(by_question, item["question"], right, right_scored, 1)
        said, truth = mentioned_lesions(reporter.report(volume, greedy=True)), true_lesions(ph.findings)
        tp, fp, fn = tp + len(said & truth), fp + len(said - truth), fn + len(truth - said)
        for organ, kind in said | truth:
            tally(by_finding, f"{organ} {kind}", (organ, kind) in said & truth, (organ, kind) in truth,
                  (organ, kind) in said - truth)
        if not truth:
            normal += 1
            normal_with_lesion += bool(said)
    return {
        "closed_questions": closed, "closed_accuracy": correct / max(closed, 1), "unparsed_answers": unparsed,
        "closed_accuracy_scored": scored / max(closed, 1), "closed_accuracy_prior": blind / max(closed, 1),
        "findings_recall": tp / max(tp + fn, 1), "findings_precision": tp / max(tp + fp, 1),
        "true_findings": tp + fn, "normal_cases": normal,
        "normal_cases_with_hallucinated_lesion": normal_with_lesion,
        "by_question": by_question, "by_finding": dict(sorted(by_finding.items())),
        "phase_accuracy": phase["right"] / max(phase["asked"], 1),
        "phase_accuracy_prior": phase["prior"] / max(phase["asked"], 1),
        "size_questions": len(size_errors), "size_unanswered": [e for e, _ in size_errors].count(float("inf")),
        "size_median_error_mm": median(e for e, _ in size_errors) if size_errors else None,
        "size_median_error_mm_prior": median(e for _, e in size_errors) if size_errors else None,
    }


def tally(table: dict[str, list[int]], key: str, *counts: int) -> None:
    """Add ``counts`` to ``table[key]`` element-wise."""
    table[key] = [a + b for a, b in zip(table.get(key, [0] * len(counts)), counts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Retrain and evaluate the embedded default VLM from scratch.")
    parser.add_argument("--out", default="runs/vlm-default")
    parser.add_argument("--cases", type=int, default=3200, help="training phantoms")
    parser.add_argument("--vision-steps", type=int, default=2500,
                        help="stage 0: dense vision-tower pretraining (0: none, stage 1 starts from --vision-tower)")
    parser.add_argument("--vision-lr", type=float, default=2e-3, help="stage 0's peak learning rate (one-cycle)")
    parser.add_argument("--vision-seed", type=int, default=0,
                        help="stage 0's seed; each seed draws its own fresh phantoms (to continue a tower on new ones)")
    parser.add_argument("--steps", type=int, default=4800, help="stage 1: projector + LM, vision tower frozen")
    parser.add_argument("--vision-tower", metavar="WEIGHTS", default=None,
                        help="start from this tower: an earlier run's model/vision_tower.bin or a model's "
                             "model.safetensors (stage 0 continues it; with --vision-steps 0 stage 1 starts from it)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-cases", type=int, default=50, help="held-out phantoms (a quarter without lesions)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evaluate", metavar="MODEL", default=None,
                        help="only evaluate this model folder (e.g. voxtext/weights/vlm-default), no training")
    args = parser.parse_args(argv)
    if not (args.vision_steps or args.vision_tower or args.evaluate):
        parser.error("--vision-steps 0 needs a pretrained --vision-tower")
    torch.set_num_threads(args.threads)
    out, size, t0 = Path(args.out), ModelSize(image_window=SOFT_TISSUE_WINDOW), time.time()
    out.mkdir(parents=True, exist_ok=True)
    scores: dict = {}
    if args.evaluate:
        folder = Path(args.evaluate)
    else:
        config = vision_config_of(Med3DVLMConfig(vision_variant=size.vision_variant))
        # A saved tower: an earlier run's vision_tower.bin or a whole model's weights, loaded strictly.
        tower = load_dcformer(args.vision_tower, config) if args.vision_tower else DCFormer(config)
        if args.vision_steps:
            vision_losses = pretrain_vision_tower(tower, size.image_size, size.image_window, args.vision_steps,
                                                  lr=args.vision_lr, seed=args.vision_seed,
                                                  log=out / "vision_metrics.csv")
            scores |= {"vision_seconds": round(time.time() - t0, 1), "vision_final_loss": vision_losses[-1]}
        cases = phantom_cases(range(args.cases), size.image_size, size.image_window)
        folder, losses = train(cases, out, size, [Stage("language", args.steps, args.lr)],
                               vision_weights=tower.state_dict())
        scores |= {"train_seconds": round(time.time() - t0, 1), "final_loss": losses[-1]}
    t_eval = time.time()
    reporter = Reporter(folder, device="cpu")
    n_normal = args.eval_cases // 4
    seeds = range(HELD_OUT_SEED, HELD_OUT_SEED + args.eval_cases - n_normal)
    normal_seeds = range(HELD_OUT_SEED + 50_000, HELD_OUT_SEED + 50_000 + n_normal)
    prior = answer_prior(range(args.cases), tuple(reporter.image_size[::-1]))
    scores |= {"lesion_cases": evaluate(reporter, seeds, prior=prior),
               "normal_cases": evaluate(reporter, normal_seeds, 0.0, prior),
               "parameters": int(sum(p.numel() for p in reporter.model.parameters())),
               "eval_seconds": round(time.time() - t_eval, 1)}
    (out / "eval.json").write_text(json.dumps(scores, indent=2, default=float))
    print(json.dumps(scores, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
