"""``voxtext train-seg``: train or fine-tune ESICA on NIfTI folders and/or phantoms.

Single process:     voxtext train-seg --data my_data --init-from default --out runs/ft
Several GPUs/CPUs:  torchrun --nproc_per_node 4 -m voxtext train-seg --data my_data --out runs/ft
Multi-node:         torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m voxtext train-seg ...

A data folder holds ``images/<case>.nii.gz``, ``labels/<case>.nii.gz`` (same grid) and
``prompts.json`` = {"1": ["liver", "hepatic parenchyma"], "2": [...]} (label value -> phrasings),
or CVPR 2025 BiomedSegFM ``*.npz`` cases with ``CVPR25_TextSegFMData_with_class.json``.
Running the same command again resumes from ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import build_esica, load_esica
from ..data.biomedsegfm import npz_folder_cases
from ..errors import InputError
from ..models.esica import ESICAConfig
from ..models.esica.text import load_tokenizer
from ..preprocess import PreprocessConfig, prepare_with_labels
from ..volume import Volume
from .cases import CropSampler, Target, TrainingCase, batch_stream
from .default_model import DEFAULT_CONFIG, phantom_case
from .distributed import cleanup_distributed, init_distributed
from .seg_trainer import SegTrainer, StageConfig, TrainConfig


def read_prompts(folder: Path) -> list[Target]:
    path = folder / "prompts.json"
    if not path.exists():
        raise InputError(f"{folder} has no prompts.json (label value -> list of phrasings)")
    try:
        table = {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (ValueError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} must map integer label values to lists of phrasings: {exc}") from exc
    if not table or any(not isinstance(v, list) or not v or not all(isinstance(p, str) and p.strip() for p in v)
                        for v in table.values()):
        raise InputError(f"{path} must map each label value to a non-empty list of phrasings")
    return [Target(tuple(v), (k,)) for k, v in sorted(table.items())]


def folder_cases(folder: Path, spacing: float) -> list[TrainingCase]:
    """Training cases of a NIfTI folder, prepared on the model grid."""
    targets = read_prompts(folder)
    images = sorted((folder / "images").glob("*.nii*"))
    if not images:
        raise InputError(f"{folder / 'images'} holds no NIfTI images")
    cases = []
    for image_path in images:
        label_path = folder / "labels" / image_path.name
        if not label_path.exists():
            raise InputError(f"case {image_path.name}: no label map at {label_path}")
        volume, labels = Volume.from_file(image_path), Volume.from_file(label_path)
        if labels.shape != volume.shape or not np.allclose(labels.affine, volume.affine, atol=1e-3):
            raise InputError(f"case {image_path.name}: label map grid differs from the image grid")
        prepared, grid = prepare_with_labels(volume, np.rint(labels.array).astype(np.int16),
                                             PreprocessConfig(target_spacing=spacing))
        cases.append(TrainingCase(image_path.name, folder.name, prepared.image, grid.astype(np.int16), targets))
    return cases


def data_cases(folder: Path, spacing: float) -> list[TrainingCase]:
    """Cases of a NIfTI folder (``images/``, ``labels/``, ``prompts.json``) or a BiomedSegFM npz folder."""
    if (folder / "images").is_dir():
        return folder_cases(folder, spacing)
    if any(folder.rglob("*.npz")):
        return npz_folder_cases(folder, spacing)
    raise InputError(f"{folder} holds neither images/ + labels/ + prompts.json nor BiomedSegFM .npz cases")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxtext train-seg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", default=[], help="NIfTI or BiomedSegFM npz folder (repeatable)")
    p.add_argument("--phantoms", type=int, default=0, help="add N procedural CT phantoms")
    p.add_argument("--out", required=True)
    p.add_argument("--init-from", default=None, help="model to fine-tune ('default', a folder, ...)")
    p.add_argument("--model-config", default=None, help="JSON of ESICAConfig fields for a new model")
    p.add_argument("--steps", type=int, nargs=2, default=(1000, 500), metavar=("PRETRAIN", "FINETUNE"))
    p.add_argument("--lr", type=float, nargs=2, default=(1e-4, 1e-5), metavar=("PRETRAIN", "FINETUNE"))
    p.add_argument("--batch-size", type=int, default=4, help="crops per step")
    p.add_argument("--prompts-per-crop", type=int, default=1,
                   help="structures asked of each crop (the crop is encoded once for all of them)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--absent-prompt-prob", type=float, default=0.25, help="stage-2 prompts of absent targets")
    p.add_argument("--foreground-weight", type=float, default=0.0,
                   help="weight of a BCE over each prompt's own foreground, added to DiceFocal in both stages: "
                        "keeps small rare targets from settling on 'empty', at the price of false positives "
                        "(see the esica-default model card)")
    p.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=42)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dist = init_distributed()
    device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        if args.init_from:
            model, tokenizer = load_esica(args.init_from)
        else:
            config = (ESICAConfig.from_dict(json.loads(Path(args.model_config).read_text()))
                      if args.model_config else DEFAULT_CONFIG)
            model, tokenizer = build_esica(config), load_tokenizer(config.text_model)
        spacing = model.config.target_spacing
        cases = [c for folder in args.data for c in data_cases(Path(folder), spacing)]
        cases += [phantom_case(seed, spacing) for seed in range(args.phantoms)]
        if not cases:
            raise InputError("no training data: pass --data FOLDER and/or --phantoms N")
        config = TrainConfig(
            args.out,
            [StageConfig("pretrain", args.steps[0], lr=args.lr[0], pos_ratio=1.0,
                         foreground_weight=args.foreground_weight),
             StageConfig("finetune", args.steps[1], lr=args.lr[1], pos_ratio=0.5,
                         absent_prompt_prob=args.absent_prompt_prob, freeze_text_encoder=True,
                         foreground_weight=args.foreground_weight)],
            batch_size=args.batch_size, prompts_per_crop=args.prompts_per_crop, grad_accum=args.grad_accum,
            amp=args.amp, save_every=args.save_every, seed=args.seed,
            extra={"world_size": dist.world_size, "data": args.data, "phantoms": args.phantoms},
        )

        def data(stage: StageConfig, rank: int, world: int):
            sampler = CropSampler(cases, model.config.image_size, stage.pos_ratio, stage.absent_prompt_prob,
                                  seed=args.seed + 1000 * rank + len(stage.name),
                                  prompts_per_crop=config.prompts_per_crop)
            return batch_stream(sampler, tokenizer, config.batch_size)

        final = SegTrainer(model, config, data, dist, device).fit()
        if dist.is_main:
            print(f"trained model in {final}")
    finally:
        cleanup_distributed(dist)
    return 0
