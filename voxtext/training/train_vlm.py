"""Train a Med3DVLM-class model (DCFormer + mixer projector + Qwen2) on volumes with reports and Q/A pairs.

Stages as the reference (spec section 4.4): ``projector`` (the projector and the input embeddings
train, the vision tower and the LM are frozen) and ``full`` (everything trains). The reference's
stage 2 uses LoRA on the LM; that is not implemented here (``full`` fine-tunes all weights).
Samples follow M3D-Cap / M3D-VQA: captions are ``"<im_patch>"*N + prompt`` -> ``" " + report``,
closed questions ``" " + question + " Choices: A. .. B. .."`` -> ``"B. no"``, open questions the
answer text; the loss covers the answer and the EOS token only. The result is saved in the folder
layout :func:`voxtext.models.med3dvlm.load_med3dvlm` reads (config.json ``vlm_qwen``,
model.safetensors, vision_tower.bin, tokenizer files, generation_config.json).

Data (``--data DIR``):

* ``DIR/captions.json``: ``{"train": [{"image": "case1/image.nii.gz", "text": "FINDINGS: ..."}]}``
  (M3D-Cap; ``text`` may also be the path of a ``.txt`` file), paths relative to ``DIR``;
* ``DIR/vqa.csv`` (optional): M3D-VQA columns ``Image Path, Question, Answer`` and, for closed
  questions, ``Choice A`` .. ``Choice D`` and ``Answer Choice``.

or ``--phantoms N``: N procedural phantoms (:mod:`voxtext.phantom`) with their templated reports and Q/A.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..errors import InputError
from ..models.med3dvlm import IMAGE_TOKEN, Med3DVLMConfig, Med3DVLMForCausalLM, encode_prompts, prepare_volume
from ..phantom import generate_phantom
from ..report import LETTERS, REPORT_PROMPT, format_choice_answer, format_question, vision_config_of
from ..volume import Volume
from .seg_trainer import plot_curve, seed_everything, warmup_cosine

EOS_TOKEN = "<|endoftext|>"
CAPTION_PROMPTS = (REPORT_PROMPT, "Describe the findings of this CT scan.", "Write the radiology report of this scan.")


@dataclass
class Case:
    """One training volume (model input, float16 to halve the cache) and its text pairs."""

    image: torch.Tensor  # (1, D, H, W)
    report: str | None
    questions: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer)


def qa_pairs(qa: Iterable[dict]) -> list[tuple[str, str]]:
    """Phantom/M3D Q/A records -> (question prompt, target answer) pairs."""
    pairs = []
    for item in qa:
        choices = item.get("choices")
        if choices:
            answer = format_choice_answer(choices, LETTERS.index(item["answer_choice"]))
            pairs.append((format_question(item["question"], choices), answer))
        else:
            pairs.append((item["question"], str(item["answer"])))
    return pairs


def phantom_cases(seeds: Iterable[int], size: Sequence[int], window: Sequence[float] | None) -> list[Case]:
    """Phantoms generated directly at the model's input size (a quarter of them without lesions)."""
    cases = []
    for seed in seeds:
        ph = generate_phantom(seed, shape=tuple(size[::-1]), lesions=0.0 if seed % 4 == 0 else 0.5)
        image = prepare_volume(Volume(ph.image, ph.affine, "CT"), tuple(size), window)[0].half()
        cases.append(Case(image, ph.report, qa_pairs(ph.qa)))
    return cases


def folder_cases(root: Path, size: Sequence[int], window: Sequence[float] | None) -> list[Case]:
    """Cases from ``captions.json`` (+ ``vqa.csv``) in the M3D-Cap / M3D-VQA layout (see the module docstring)."""
    by_path: dict[str, Case] = {}

    def case(path: str) -> Case:
        if path not in by_path:
            image = prepare_volume(Volume.from_file(root / path), tuple(size), window)[0].half()
            by_path[path] = Case(image, None)
        return by_path[path]

    captions = root / "captions.json"
    if captions.is_file():
        for item in json.loads(captions.read_text())["train"]:
            text = item["text"]
            if text.endswith(".txt") and (root / text).is_file():
                text = (root / text).read_text()
            case(item["image"]).report = " ".join(text.split())
    vqa = root / "vqa.csv"
    if vqa.is_file():
        with vqa.open(newline="") as f:
            for row in csv.DictReader(f):
                choices = [row[f"Choice {c}"] for c in "ABCD" if row.get(f"Choice {c}")]
                item = {"question": row["Question"], "answer": row["Answer"]}
                if choices and row.get("Answer Choice"):
                    item |= {"choices": choices, "answer_choice": row["Answer Choice"].strip()}
                case(row["Image Path"]).questions += qa_pairs([item])
    if not by_path:
        raise InputError(f"{root} holds neither captions.json nor vqa.csv (see voxtext.training.train_vlm)")
    return list(by_path.values())


def corpus(cases: Iterable[Case]) -> Iterator[str]:
    for case in cases:
        if case.report:
            yield case.report
        for question, answer in case.questions:
            yield question
            yield answer
    yield from CAPTION_PROMPTS


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (as Qwen's) with ``<|endoftext|>`` (EOS, pad) and the image token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   additional_special_tokens=[IMAGE_TOKEN])


@dataclass
class ModelSize:
    """Architecture of a small Med3DVLM-class model (the reference: decomp_small, Qwen2.5-7B, 128x256x256)."""

    image_size: tuple[int, int, int] = (64, 64, 64)  # (D, H, W)
    vision_variant: str = "nano"
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    low_output_size: tuple[int, ...] = (16, 16)
    high_output_size: tuple[int, ...] = (8, 8)
    image_window: tuple[float, float] | None = (-250.0, 750.0)  # HU clip before min-max (None: as the reference)


def stage_tokens(image_size: Sequence[int], stage: int) -> int:
    """Tokens of DCFormer stage ``stage`` (stem /4, then /2 per stage, MaxPool 3/2/1)."""
    tokens = 1
    for n in image_size:
        n = (n - 1) // 4 + 1
        for _ in range(stage):
            n = (n - 1) // 2 + 1
        tokens *= n
    return tokens


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerBase) -> Med3DVLMForCausalLM:
    """A freshly initialised model whose config records its vision variant, input size and HU window."""
    vision = vision_config_of(Med3DVLMConfig(vision_variant=size.vision_variant))
    d, h, w = size.image_size
    config = Med3DVLMConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        intermediate_size=size.intermediate_size, max_position_embeddings=1024, tie_word_embeddings=False,
        low_input_size=(stage_tokens(size.image_size, 3), vision.channels[3]),
        high_input_size=(stage_tokens(size.image_size, 4), vision.channels[4]),
        low_output_size=size.low_output_size, high_output_size=size.high_output_size,
        input_size=(h, w, d), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["VLMQwenForCausalLM"],
        vision_variant=size.vision_variant, image_window=list(size.image_window) if size.image_window else None,
    )
    model = Med3DVLMForCausalLM(config, vision)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=256, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def collate(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str, str]], num_image_tokens: int, max_length: int
) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and labels of ``(prompt, separator, answer)``: the loss covers ``" " + answer + EOS``."""
    rows, targets = [], []
    for prompt, separator, answer in pairs:
        ids = encode_prompts(tokenizer, [prompt], num_image_tokens, separator)["input_ids"][0].tolist()
        target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((ids + target)[:max_length])
        targets.append(len(target))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    labels = torch.full_like(input_ids, -100)
    for i, (row, n) in enumerate(zip(rows, targets)):
        n = min(n, len(row) - num_image_tokens - 1)
        labels[i, width - n:] = input_ids[i, width - n:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sample_batches(
    cases: Sequence[Case], tokenizer: PreTrainedTokenizerBase, num_image_tokens: int, batch_size: int,
    caption_ratio: float = 0.5, max_length: int = 512,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless random batches: a report with probability ``caption_ratio`` (when the case has one), else a Q/A."""
    while True:
        chosen = random.choices(cases, k=batch_size)
        pairs = []
        for case in chosen:
            if case.report and (not case.questions or random.random() < caption_ratio):
                pairs.append((random.choice(CAPTION_PROMPTS), "", case.report))
            else:
                question, answer = random.choice(case.questions)
                pairs.append((question, " ", answer))
        batch = collate(tokenizer, pairs, num_image_tokens, max_length)
        batch["images"] = torch.stack([c.image for c in chosen]).float()
        yield batch


@dataclass
class Stage:
    name: str  # "projector" or "full"
    steps: int
    lr: float


def set_trainable(model: Med3DVLMForCausalLM, stage: str) -> list[torch.nn.Parameter]:
    """Projector stage: projector + input embeddings (as the reference); full: every weight."""
    if stage not in ("projector", "full"):
        raise InputError(f"unknown stage {stage!r}: 'projector' or 'full' (LoRA is not implemented)")
    for name, p in model.named_parameters():
        p.requires_grad_(stage == "full" or name.startswith(("model.mm_projector.", "model.embed_tokens.")))
    return [p for p in model.parameters() if p.requires_grad]


def fit(
    model: Med3DVLMForCausalLM,
    batches: Iterator[dict[str, torch.Tensor]],
    stages: Sequence[Stage],
    out: Path,
    warmup_ratio: float = 0.03,
    log_every: int = 10,
) -> list[float]:
    """AdamW with warm-up + cosine per stage; logs ``metrics.csv`` (as seg_trainer) and returns the logged losses."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "metrics.csv"
    losses, t0 = [], time.time()
    with log.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stage", "step", "loss", "lr", "elapsed_s"])
        for stage in stages:
            params = set_trainable(model, stage.name)
            # The vision tower keeps BatchNorm statistics frozen while it is frozen.
            model.train()
            if stage.name == "projector":
                model.model.vision_tower.eval()
            optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
            warmup = int(warmup_ratio * stage.steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, stage.steps, warmup))
            running = []
            for step in range(stage.steps):
                loss = model(**next(batches)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                running.append(loss.item())
                if (step + 1) % log_every == 0 or step + 1 == stage.steps:
                    losses.append(float(np.mean(running)))
                    writer.writerow([stage.name, step + 1, f"{losses[-1]:.6f}", f"{scheduler.get_last_lr()[0]:.3e}",
                                     f"{time.time() - t0:.1f}"])
                    f.flush()
                    running = []
    model.eval()
    plot_curve(log, out / "training_curve.png", ylabel="cross-entropy (answer tokens)")
    return losses


def save_vlm(model: Med3DVLMForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """The reference's merged layout: config.json, model.safetensors, vision_tower.bin, tokenizer, generation config."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tower = {k: v.detach().cpu().contiguous() for k, v in model.model.vision_tower.state_dict().items()}
    torch.save(tower, folder / "vision_tower.bin")
    tokenizer.save_pretrained(folder)
    return folder


def train(
    cases: Sequence[Case],
    out: Path,
    size: ModelSize,
    stages: Sequence[Stage],
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[Path, list[float]]:
    """Tokenizer + model from scratch, trained stage by stage and saved in ``out/model``."""
    seed_everything(seed)
    tokenizer = train_tokenizer(corpus(cases))
    model = build_model(size, tokenizer)
    batches = sample_batches(cases, tokenizer, model.num_image_tokens, batch_size)
    losses = fit(model, batches, stages, out)
    (out / "train_config.json").write_text(json.dumps(
        {"size": asdict(size), "stages": [asdict(s) for s in stages], "batch_size": batch_size, "seed": seed,
         "cases": len(cases)}, indent=2))
    return save_vlm(model, tokenizer, out / "model"), losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxtext train-vlm", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="folder with captions.json and/or vqa.csv (M3D-Cap / M3D-VQA layout)")
    source.add_argument("--phantoms", type=int, help="train on this many procedural phantoms")
    parser.add_argument("--out", required=True, help="run folder: metrics.csv, training_curve.png, model/")
    parser.add_argument("--projector-steps", type=int, default=0, help="stage 1 (projector + embeddings)")
    parser.add_argument("--steps", type=int, default=1000, help="stage 2 (all weights)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, nargs=3, default=(64, 64, 64), metavar=("D", "H", "W"))
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = ModelSize(image_size=tuple(args.image_size), hidden_size=args.hidden_size, layers=args.layers,
                     intermediate_size=3 * args.hidden_size)
    cases = (phantom_cases(range(args.phantoms), size.image_size, size.image_window) if args.phantoms
             else folder_cases(Path(args.data), size.image_size, size.image_window))
    stages = [Stage("projector", args.projector_steps, args.lr), Stage("full", args.steps, args.lr)]
    folder, losses = train(cases, Path(args.out), size, [s for s in stages if s.steps > 0], args.batch_size, args.seed)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; model in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
