"""Recipe of the embedded default model: a small ESICA trained on CPU on phantoms and real scans.

``python -m voxtext.training.default_model --out runs/default`` rebuilds it from scratch
(deterministic seeds), its lesion stage (:mod:`.lesion_model`) included; the model card in
``voxtext/weights/esica-default/README.md`` records the figures of the shipped run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..checkpoints import build_esica, load_esica
from ..lesions import LESION_FOLDER
from ..models.esica import ESICA, ESICAConfig
from ..models.esica.text import load_tokenizer
from ..phantom import LABELS, TARGETS, PhantomCase, generate_phantom
from ..preprocess import PreprocessConfig, prepare_with_labels
from ..vocabulary import TrainedVocabulary
from ..volume import Volume
from .cases import CropSampler, Target, TrainingCase, batch_stream
from .seg_trainer import SegTrainer, StageConfig, TrainConfig, seed_everything

DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# A 48^3 window at 5 mm sees 24 cm: most of an abdominal cross-section, so organs are told apart by their
# place in the body (at 3 mm the 14.4 cm window mostly showed one organ without its neighbours).
SPACING_MM = 5.0

DEFAULT_CONFIG = ESICAConfig(
    image_size=(48, 48, 48),
    embed_dim=128,
    text_model=TEXT_MODEL,
    # No refinement pass: on CPU it doubled the decoder's cost; the time buys more prompts instead.
    pass_num=0,
    transformer_depth=2,
    mlp_dim=256,
    num_heads=4,
    num_kv_heads=2,
    encoder_channels=(16, 16, 32, 64, 128),
    encoder_blocks=(1, 1, 1, 2, 1),
    decoder_hidden_dim=16,
    text_pooling="mean",
    text_weights="text_model",
    target_spacing=SPACING_MM,
)

# Real data held out from training, for the model card's figures.
HELD_OUT = {"brats2018": ("case_5", "case_6"), "brats2015": ("brats_2013_pat0006_1",),
            "deeplesion": ("CT_Lesion_000009_03_01_036-048",)}

FLAIR = "head MR T2 FLAIR"
T1C = "head post-contrast T1-weighted MR"
BRAIN_TARGETS_FLAIR = [
    Target(("brain tumor", "whole tumor", "glioma", f"Whole tumor in {FLAIR}", f"Brain tumor visualized in {FLAIR}",
            "tumor with surrounding edema in brain MRI"), (1, 2, 3, 4)),
    Target(("peritumoral edema", "edema", f"Peritumoral edema in {FLAIR}", "vasogenic edema around the tumor",
            f"Segmentation of peritumoral edema in {FLAIR}"), (2,)),
]
BRAIN_TARGETS_T1C = [
    Target(("enhancing tumor", "enhancing tumour", f"Enhancing tumor in {T1C}", "contrast-enhancing tumor rim",
            f"Delineation of enhancing tumor in {T1C}"), (4,)),
    Target(("necrosis", "necrotic tumor core", f"Necrotic tumor core in {T1C}", "tumor necrosis"), (1,)),
    Target(("tumor core", "brain tumor core", f"Tumor core in {T1C}"), (1, 3, 4)),
]
LESION_CT = [Target(("lesion", "tumor lesion", "Lesion in CT", "Lesion identified in CT imaging", "CT lesion",
                     "focal lesion"), (1,))]
# Colin27 AAL regions used: AAL name -> plain name.
AAL_REGIONS = {
    "Hippocampus": "hippocampus", "Thalamus": "thalamus", "Caudate": "caudate nucleus", "Putamen": "putamen",
    "Amygdala": "amygdala", "Insula": "insula", "Precentral": "precentral gyrus", "Occipital_Sup": "superior occipital gyrus",
}
SIDES = {"L": "left", "R": "right"}


@dataclass(frozen=True)
class CaseSource:
    """One real training/evaluation case: image file(s), labels and targets."""

    name: str
    group: str
    image: Path
    labels: Path
    targets: tuple[Target, ...]
    modality: str


def brain_region_targets(labels_json: Path) -> list[Target]:
    names = {v: int(k) for k, v in json.loads(labels_json.read_text())["aal.nii.gz"].items()}
    targets = []
    for aal, plain in AAL_REGIONS.items():
        for code, side in SIDES.items():
            value = names[f"{aal}_{code}"]
            targets.append(Target((f"{side} {plain}", f"{plain} in the {side} hemisphere",
                                   f"{side.capitalize()} {plain} in head MR T1", f"{side} cerebral {plain}"), (value,)))
    return targets


def real_sources(root: Path = DATA_ROOT) -> list[CaseSource]:
    sources = []
    for case in sorted((root / "brats_train/brats2018").glob("case_*")):
        sources.append(CaseSource(f"brats2018/{case.name}", "brain-mr", case / "FLAIR.nii.gz", case / "GT_W.nii.gz",
                                  (Target(BRAIN_TARGETS_FLAIR[0].phrasings, (1,)),), "MR"))
    for case in sorted((root / "brats_train/brats2015").glob("brats_*")):
        labels = case / "OTMultiClass.nii.gz"
        sources.append(CaseSource(f"brats2015/{case.name}/flair", "brain-mr", case / "Flair_subtrMeanDivStd.nii.gz",
                                  labels, tuple(BRAIN_TARGETS_FLAIR), "MR"))
        sources.append(CaseSource(f"brats2015/{case.name}/t1c", "brain-mr", case / "T1c_subtrMeanDivStd.nii.gz",
                                  labels, tuple(BRAIN_TARGETS_T1C), "MR"))
    colin = root / "colin27_aal"
    sources.append(CaseSource("colin27", "brain-mr", colin / "ch2bet.nii.gz", colin / "aal.nii.gz",
                              tuple(brain_region_targets(colin / "labels.json")), "MR"))
    for npz in sorted((root / "deeplesion_train").glob("*.npz")):
        sources.append(CaseSource(f"deeplesion/{npz.stem}", "lesion-ct", npz, npz, tuple(LESION_CT), "CT-windowed"))
    return sources


def is_held_out(name: str) -> bool:
    return any(name.split("/")[1] in cases for cases in HELD_OUT.values() if "/" in name)


def load_source(source: CaseSource) -> tuple[Volume, np.ndarray]:
    """The image volume and its label map (same grid) of a real case."""
    if source.image.suffix == ".npz":
        data = np.load(source.image, allow_pickle=False)
        spacing = [float(s) for s in data["spacing"]]  # listed (x, y, z) for (z, y, x) arrays
        image = data["imgs"].transpose(2, 1, 0).astype(np.float32)
        labels = data["gts"].transpose(2, 1, 0)
        affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-ordered CT slices, in RAS
        # The images are already windowed to 0..255: percentile scaling treats them as such.
        return Volume(image, affine, "MR"), labels
    image = nib.load(source.image)
    labels = np.asarray(nib.load(source.labels).dataobj)
    return Volume(np.asarray(image.dataobj, dtype=np.float32), image.affine, source.modality), labels


def prepare_case(source: CaseSource, spacing: float = SPACING_MM) -> TrainingCase:
    volume, labels = load_source(source)
    prepared, grid_labels = prepare_with_labels(volume, labels, PreprocessConfig(target_spacing=spacing))
    return TrainingCase(source.name, source.group, prepared.image, grid_labels.astype(np.int16), list(source.targets))


def acquired_phantom(seed: int) -> tuple[Volume, PhantomCase]:
    """A phantom as "acquired" for training and held-out evaluation: 1.5-3 mm in-plane, 1.5-4.5 mm slices."""
    rng = np.random.default_rng(seed)
    acquired = (float(rng.uniform(1.5, 3.0)),) * 2 + (float(rng.uniform(1.5, 4.5)),)
    case = generate_phantom(seed, spacing=acquired, lesions=0.6)
    return Volume(case.image.astype(np.float32), case.affine, "CT"), case


LESION_LABELS = {value for name, value in LABELS.items() if name.endswith(("cyst", "tumor", "stone"))}
# Lesions are a few voxels at 5 mm and absent from most crops: target-centred crops are placed on them three
# times as often as on an organ (and a crop's anchor is always asked).
LESION_ANCHOR_WEIGHT = 3.0


def phantom_target(phrasings: tuple[str, ...], values: tuple[int, ...], lesions: bool) -> Target:
    """A phantom target; a lesion one is up-weighted as a crop anchor, or, without ``lesions``, covers no label
    value, so it is never present and only asked with an empty mask."""
    if not set(values) <= LESION_LABELS:
        return Target(phrasings, values)
    return Target(phrasings, values, LESION_ANCHOR_WEIGHT) if lesions else Target(phrasings, ())


def phantom_case(seed: int, spacing: float = SPACING_MM, lesions: bool = True) -> TrainingCase:
    """A procedural abdominal CT on the model grid, with every phantom target (organs include their lesions).

    ``lesions=False``: lesion phrasings are asked only as absent structures (empty masks). The embedded
    default's lesion prompts go to its lesion stage (:mod:`voxtext.lesions`), so its main model spends its
    steps on the organs and learns only to answer lesion prompts empty.
    """
    volume, case = acquired_phantom(seed)
    prepared, grid_labels = prepare_with_labels(volume, case.labels, PreprocessConfig(target_spacing=spacing))
    targets = [phantom_target(phrasings, values, lesions) for phrasings, values in TARGETS]
    return TrainingCase(f"phantom/{seed}", "abdomen-ct", prepared.image, grid_labels.astype(np.int16), targets)


TRAIN_PHANTOM_SEEDS = range(0, 160)
HELD_OUT_PHANTOM_SEEDS = range(10_000, 10_050)  # never used for training
GROUP_WEIGHTS = {"abdomen-ct": 0.6, "brain-mr": 0.3, "lesion-ct": 0.1}
# Steps of the five stages: about 2 hours on 2 CPU cores (1.2-1.5 s a step of 2 crops x 4 prompts).
RECIPE_STEPS = (1150, 380, 1070, 1500, 1200)
# The organs with the lowest held-out DSC after four stages (pancreas 0.63, inferior vena cava 0.70, right kidney
# 0.84; their false positives lie mostly in the liver): the fifth stage anchors crops on them more often.
WEAK_ORGANS = {"pancreas": 3.0, "inferior vena cava": 3.0, "right kidney": 2.0}


def trained_modalities() -> dict[str, list[str]]:
    """Each phrasing the recipe asks, with the modalities of the images it is asked on (``trained_on.json``)."""
    learned: dict[str, set[str]] = {}
    for phrasings, _ in TARGETS:  # the phantoms are CT
        for phrasing in phrasings:
            learned.setdefault(phrasing, set()).add("CT")
    for source in real_sources():
        for target in source.targets:
            for phrasing in target.phrasings:
                learned.setdefault(phrasing, set()).add(source.modality.removesuffix("-windowed"))
    return {phrasing: sorted(modalities) for phrasing, modalities in sorted(learned.items())}


def organs_without_findings() -> list[str]:
    """The phantom organs that hold no lesion: the model segments them but learned none of their findings."""
    return [phrasings[0] for phrasings, values in TARGETS if not LESION_LABELS.intersection(values)]


def trained_vocabulary() -> TrainedVocabulary:
    """What the recipe teaches (``trained_on.json``)."""
    return TrainedVocabulary(trained_modalities(), organs_without_findings())


def training_cases() -> list[TrainingCase]:
    cases = [phantom_case(seed, lesions=False) for seed in TRAIN_PHANTOM_SEEDS]
    cases += [prepare_case(s) for s in real_sources() if not is_held_out(s.name)]
    return cases


def recipe(output_dir: str, steps: tuple[int, ...] = RECIPE_STEPS) -> TrainConfig:
    """Stage 1: target-centred crops; stages 2-5: mixed crops and absent prompts (stage 5 anchored on the weak
    organs more often). Dice is taken per prompt.

    Each step: 2 crops, each asked for 4 structures (an encoded crop is shared by its prompts).
    """
    return cpu_config(
        output_dir,
        [
            StageConfig("pretrain", steps[0], lr=1e-3, weight_decay=1e-5, pos_ratio=1.0, absent_prompt_prob=0.0),
            StageConfig("finetune", steps[1], lr=2e-4, weight_decay=1e-6, pos_ratio=0.4, absent_prompt_prob=0.25,
                        freeze_text_encoder=True),
            StageConfig("contrastive", steps[2], lr=3e-4, weight_decay=1e-6, pos_ratio=0.7, absent_prompt_prob=0.3,
                        freeze_text_encoder=True),
            # A warm restart at a lower rate: the loss was still falling when stage 3's cosine reached 0.
            StageConfig("consolidate", steps[3], lr=2e-4, weight_decay=1e-6, pos_ratio=0.7, absent_prompt_prob=0.3,
                        freeze_text_encoder=True),
            StageConfig("focus", steps[4], lr=1e-4, weight_decay=1e-6, pos_ratio=0.8, absent_prompt_prob=0.3,
                        freeze_text_encoder=True, anchor_weights=WEAK_ORGANS),
        ],
        seed=42,
    )


def cpu_config(output_dir: str, stages: list[StageConfig], seed: int) -> TrainConfig:
    """The embedded models' steps: 2 crops, each asked for 4 structures (a crop is encoded once for its prompts)."""
    return TrainConfig(output_dir, stages, batch_size=2, prompts_per_crop=4, log_every=20, save_every=200, seed=seed)


def fit_on_cases(model: ESICA, cases: list[TrainingCase], config: TrainConfig,
                 group_weights: dict[str, float] | None = None) -> Path:
    """Run ``config``'s stages on crops of ``cases`` (a sampler a stage, seeded by the stage and the rank)."""
    tokenizer = load_tokenizer(model.config.text_model)

    def data(stage: StageConfig, rank: int, world: int):
        sampler = CropSampler(cases, model.config.image_size, stage.pos_ratio, stage.absent_prompt_prob,
                              group_weights, seed=config.seed + 1000 * rank + len(stage.name),
                              prompts_per_crop=config.prompts_per_crop, anchor_weights=stage.anchor_weights)
        return batch_stream(sampler, tokenizer, config.batch_size)

    return SegTrainer(model, config, data).fit()


def train(output_dir: str, steps: tuple[int, ...], threads: int, init_from: str | None = None) -> Path:
    """Run the recipe (stages of 0 steps are skipped), from scratch or continuing from ``init_from``."""
    torch.set_num_threads(threads)
    seed_everything(42)
    cases = training_cases()
    model = load_esica(init_from, tokenizer=False)[0] if init_from else build_esica(DEFAULT_CONFIG)
    final = fit_on_cases(model, cases, recipe(output_dir, steps), GROUP_WEIGHTS)
    trained_vocabulary().save(final)
    return final


def build_default(output_dir: str, steps: tuple[int, ...] = RECIPE_STEPS,
                  lesion_steps: tuple[int, int, int] | None = None, threads: int = 2,
                  init_from: str | None = None, calibration_seeds: range | None = None) -> Path:
    """The whole embedded default in ``output_dir/final``: the main model (:func:`train`), then its lesion stage
    (``lesion_steps``, None: its recipe's) trained in ``output_dir/lesions``, calibrated behind this main model
    (on ``calibration_seeds``, None: the recipe's validation phantoms) and copied to ``final/lesions``, as the
    shipped folder holds it. Both resume from their saved states."""
    from . import lesion_model  # (lesion_model builds on this module)

    final = train(output_dir, steps, threads, init_from)
    stage = lesion_model.train(str(Path(output_dir) / LESION_FOLDER), lesion_steps or lesion_model.RECIPE_STEPS,
                               threads, main_model=final,
                               calibration_seeds=calibration_seeds or lesion_model.CALIBRATION_PHANTOM_SEEDS)
    shutil.copytree(stage, final / LESION_FOLDER, dirs_exist_ok=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Retrain the embedded default ESICA model and its lesion stage "
                                                 "from scratch.")
    parser.add_argument("--out", default="runs/esica-default")
    parser.add_argument("--steps", type=int, nargs=5, default=RECIPE_STEPS,
                        metavar=("PRETRAIN", "FINETUNE", "CONTRASTIVE", "CONSOLIDATE", "FOCUS"))
    parser.add_argument("--lesion-steps", type=int, nargs=3, metavar=("PRETRAIN", "BALANCED", "NEGATIVES"),
                        help="the lesion stage's recipe (default: voxtext.training.lesion_model.RECIPE_STEPS)")
    parser.add_argument("--no-lesion-stage", action="store_true", help="train the main model only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-from", default=None, help="continue from this checkpoint instead of from scratch")
    args = parser.parse_args(argv)
    if args.no_lesion_stage:
        final = train(args.out, tuple(args.steps), args.threads, args.init_from)
    else:
        lesion_steps = tuple(args.lesion_steps) if args.lesion_steps else None
        final = build_default(args.out, tuple(args.steps), lesion_steps, args.threads, args.init_from)
    print(f"trained model in {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
