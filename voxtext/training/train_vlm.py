"""Train a Med3DVLM-class model (DCFormer + mixer projector + Qwen2) on volumes with reports and Q/A pairs.

Stages as the reference (spec section 4.4): ``projector`` (the projector and the input embeddings
train, the vision tower and the LM are frozen) and ``full`` (everything trains, or with ``--lora-r R``
as the reference's stage 2: LoRA via ``peft`` on the LM's q/k/v/o/gate/up/down projections, while the
vision tower, projector, embeddings and lm_head train fully; the saved model has the LoRA merged in).
A run folder resumes where it stopped (``last/`` + ``training_state.pt``); ``torchrun
--nproc_per_node N -m voxtext train-vlm ...`` trains with DDP (gloo on CPUs).
Data (``--data DIR`` in the M3D-Cap / M3D-VQA layouts, or ``--phantoms N``) and batches:
:mod:`voxtext.training.vlm_data`. The result is saved in the folder layout
:func:`voxtext.models.med3dvlm.load_med3dvlm` reads (config.json ``vlm_qwen``, model.safetensors,
vision_tower.bin, tokenizer files, generation_config.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..errors import InputError
from ..models.med3dvlm import IMAGE_TOKEN, Med3DVLMConfig, Med3DVLMForCausalLM
from ..report import vision_config_of
from .distributed import DistInfo, cleanup_distributed, init_distributed, mean_across
from .seg_trainer import append_metrics, plot_curve, seed_everything, warmup_cosine
from .state import STATE_FILE, load_state
from .vlm_data import Case, corpus, folder_cases, phantom_cases, sample_batches, train_tokenizer


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


@dataclass
class Stage:
    name: str  # "projector", "language" or "full" (see set_trainable)
    steps: int
    lr: float


# LoRA on the LM as the reference's stage 2: every Linear of the decoder layers, r / alpha = 2r / dropout 0.05.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULLY_TRAINED_WITH_LORA = ("vision_tower", "mm_projector", "embed_tokens", "lm_head")
LAST_DIR, LORA_WEIGHTS = "last", "model_with_lora.safetensors"
STAGES = ("projector", "language", "full")


def set_trainable(model: torch.nn.Module, stage: str, lora: bool = False) -> list[torch.nn.Parameter]:
    """Projector stage: projector + input embeddings (as the reference); language: every weight but the
    (pretrained) vision tower's; full: every weight; full with LoRA (the reference's stage 2): the LoRA
    matrices plus vision tower, projector, input embeddings and lm_head."""
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    for name, p in model.named_parameters():
        if stage == "projector":
            p.requires_grad_(".mm_projector." in f".{name}" or ".embed_tokens." in f".{name}")
        elif stage == "language":
            p.requires_grad_(".vision_tower." not in f".{name}")
        elif lora:
            p.requires_grad_("lora_" in name or any(f".{m}." in f".{name}" for m in FULLY_TRAINED_WITH_LORA))
        else:
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def apply_lora(model: Med3DVLMForCausalLM, rank: int, alpha: int | None = None, dropout: float = 0.05):
    """The model wrapped by ``peft`` with LoRA adapters on the LM's attention and MLP projections."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, bias="none",
                        target_modules=list(LORA_TARGETS))
    return get_peft_model(model, config)


def merge_lora(model) -> Med3DVLMForCausalLM:
    """The plain model with the LoRA updates added into its weights (``peft``'s merge_and_unload)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _save_last(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path, lora: bool) -> None:
    """``out/last``: config, tokenizer and every weight (with the LoRA matrices unmerged), replaced atomically."""
    from safetensors.torch import save_file

    tmp = out / (LAST_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = model.get_base_model() if lora else model
    base.config.save_pretrained(tmp)
    base.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / (LORA_WEIGHTS if lora else "model.safetensors")), metadata={"format": "pt"})
    last = out / LAST_DIR
    if last.exists():
        shutil.rmtree(last)
    tmp.rename(last)


def _load_last(out: Path, lora_rank: int):
    """Model (LoRA-wrapped when the state was saved during a LoRA stage) and tokenizer of ``out/last``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ..models.med3dvlm.model import read_config

    folder = out / LAST_DIR
    config = read_config(folder)
    model = Med3DVLMForCausalLM(config, vision_config_of(config))
    model.generation_config = GenerationConfig.from_pretrained(folder)
    lora = (folder / LORA_WEIGHTS).is_file()
    if lora:
        model = apply_lora(model, lora_rank)
    model.load_state_dict(load_file(str(folder / (LORA_WEIGHTS if lora else "model.safetensors"))), strict=True)
    return model, AutoTokenizer.from_pretrained(folder)


def fit(
    model: Med3DVLMForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    batches: Iterator[dict[str, torch.Tensor]],
    stages: Sequence[Stage],
    out: Path,
    warmup_ratio: float = 0.03,
    log_every: int = 10,
    save_every: int = 0,
    lora_rank: int = 0,
    stop_after: int | None = None,
    resume: dict | None = None,
    dist_info: DistInfo = DistInfo(),
    device: torch.device = torch.device("cpu"),
) -> tuple[torch.nn.Module, list[float], bool]:
    """AdamW with warm-up + cosine per stage, resumable; logs ``metrics.csv`` (as seg_trainer).

    Returns the model (LoRA merged), the logged losses and whether every stage finished. The state
    (``out/last`` weights, ``training_state.pt`` optimizer and RNG) is saved every ``save_every`` steps,
    at the end of each stage and when ``stop_after`` steps of this call are done; ``resume`` (that
    state) continues where it stopped. With several processes (torchrun) the model is wrapped in DDP.
    """
    out.mkdir(parents=True, exist_ok=True)
    losses, t0, done_here = [], time.time(), 0
    first = resume["stage"] if resume else 0
    for index, stage in enumerate(stages[first:], start=first):
        lora = stage.name == "full" and lora_rank > 0
        if lora and not hasattr(model, "merge_and_unload"):
            model = apply_lora(model, lora_rank)
        model.to(device)  # before the optimizer state is loaded: it follows its parameters' device
        params = set_trainable(model, stage.name, lora)
        model.train()
        if stage.name != "full":  # the frozen vision tower keeps its BatchNorm statistics
            (model.get_base_model() if hasattr(model, "get_base_model") else model).model.vision_tower.eval()
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
        start = 0
        if resume and resume["stage"] == index:
            optimizer.load_state_dict(resume["optimizer"])
            start = resume["step"]
        warmup = int(warmup_ratio * stage.steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s, start=start, total=stage.steps, w=warmup: warmup_cosine(start + s, total, w))
        net = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if dist_info.enabled else model)
        running = []
        for step in range(start, stage.steps):
            loss = net(**{k: v.to(device) for k, v in next(batches).items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            running.append(loss.item())
            done_here += 1
            if (step + 1) % log_every == 0 or step + 1 == stage.steps:
                losses.append(mean_across(float(np.mean(running)), dist_info, device))
                if dist_info.is_main:
                    append_metrics(out / "metrics.csv", stage.name, step + 1, losses[-1],
                                   scheduler.get_last_lr()[0], time.time() - t0)
                running = []
            stopping = stop_after is not None and done_here >= stop_after
            if step + 1 == stage.steps or stopping or (save_every and (step + 1) % save_every == 0):
                _save_state(model, tokenizer, optimizer, out, index, step + 1, lora_rank if lora else 0, dist_info)
            if stopping and (step + 1 < stage.steps or index + 1 < len(stages)):
                return model, losses, False
        resume = None
    model.eval()
    return merge_lora(model), losses, True


def _save_state(model, tokenizer, optimizer, out: Path, stage: int, step: int, lora_rank: int,
                dist_info: DistInfo) -> None:
    if dist_info.is_main:
        _save_last(model, tokenizer, out, lora_rank > 0)
        torch.save({"stage": stage, "step": step, "lora_rank": lora_rank, "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   out / STATE_FILE)
    if dist_info.enabled:
        torch.distributed.barrier()


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
    *,
    lora_rank: int = 0,
    save_every: int = 0,
    stop_after: int | None = None,
    log_every: int = 10,
    device: str | torch.device = "cpu",
    vision_weights: dict[str, torch.Tensor] | None = None,
) -> tuple[Path | None, list[float]]:
    """Tokenizer + model from scratch (or resumed from ``out``), trained stage by stage, saved in ``out/model``.

    ``vision_weights`` (a pretrained DCFormer's state dict, e.g. from
    :func:`voxtext.training.vision_pretrain.pretrain_vision_tower`) initialise a fresh run's vision tower.

    Under torchrun every process samples its own batches (seed + rank) and DDP averages the gradients;
    process 0 writes. Returns ``(None, losses)`` when ``stop_after`` interrupted the run.
    """
    dist_info = init_distributed()
    if dist_info.enabled and torch.cuda.is_available():
        device = torch.device("cuda", dist_info.local_rank)  # one GPU per torchrun process
        torch.cuda.set_device(device)
    else:
        from ..inference import resolve_device

        device = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out)
    seed_everything(seed)
    if state is not None:
        model, tokenizer = _load_last(out, state.get("lora_rank") or lora_rank)
        torch.set_rng_state(state["torch_rng"])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        if dist_info.rank:  # the state is process 0's: the others draw their own batches
            random.seed(seed + dist_info.rank + 1000 * (state["stage"] + 1) + state["step"])
    else:
        if dist_info.is_main:
            train_tokenizer(corpus(cases)).save_pretrained(out / "tokenizer")
        if dist_info.enabled:
            torch.distributed.barrier()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
        model = build_model(size, tokenizer)
        if vision_weights is not None:
            model.model.vision_tower.vision_tower.load_state_dict(vision_weights, strict=True)
        if dist_info.rank:
            seed_everything(seed + dist_info.rank)  # each process its own batches
        if dist_info.is_main:
            (out / "train_config.json").write_text(json.dumps(
                {"size": asdict(size), "stages": [asdict(s) for s in stages], "batch_size": batch_size, "seed": seed,
                 "cases": len(cases), "lora_rank": lora_rank, "world_size": dist_info.world_size}, indent=2))
    num_image_tokens = (model.get_base_model() if lora_rank and hasattr(model, "get_base_model")
                        else model).num_image_tokens
    batches = sample_batches(cases, tokenizer, num_image_tokens, batch_size)
    try:
        model, losses, finished = fit(model, tokenizer, batches, stages, out, log_every=log_every,
                                      save_every=save_every, lora_rank=lora_rank, stop_after=stop_after,
                                      resume=state, dist_info=dist_info, device=device)
        if not finished:
            return None, losses
        folder = out / "model"
        if dist_info.is_main:
            plot_curve(out / "metrics.csv", out / "training_curve.png", ylabel="cross-entropy (answer tokens)")
            save_vlm(model, tokenizer, folder)
        return folder, losses
    finally:
        cleanup_distributed(dist_info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxtext train-vlm", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="folder with captions.json and/or vqa.csv (M3D-Cap / M3D-VQA layout)")
    source.add_argument("--phantoms", type=int, help="train on this many procedural phantoms")
    parser.add_argument("--out", required=True, help="run folder: metrics.csv, training_curve.png, last/, model/; "
                                                     "an interrupted run in it resumes")
    parser.add_argument("--projector-steps", type=int, default=0, help="stage 1 (projector + embeddings)")
    parser.add_argument("--steps", type=int, default=1000, help="stage 2 (all weights, or LoRA with --lora-r)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--lora-r", type=int, default=0, help="stage 2 with LoRA of this rank on the LM (alpha 2r, "
                        "dropout 0.05, as the reference's r=16); vision tower, projector, embeddings and lm_head "
                        "train fully. The saved model has the LoRA merged in")
    parser.add_argument("--save-every", type=int, default=0, help="also save the resumable state every N steps")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after N steps of this invocation with a resumable state (time-limited jobs)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--image-size", type=int, nargs=3, default=(64, 64, 64), metavar=("D", "H", "W"))
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto (torchrun with GPUs: one "
                                                         "GPU per process)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = ModelSize(image_size=tuple(args.image_size), hidden_size=args.hidden_size, layers=args.layers,
                     intermediate_size=3 * args.hidden_size)
    cases = (phantom_cases(range(args.phantoms), size.image_size, size.image_window) if args.phantoms
             else folder_cases(Path(args.data), size.image_size, size.image_window))
    stages = [Stage("projector", args.projector_steps, args.lr), Stage("full", args.steps, args.lr)]
    folder, losses = train(cases, Path(args.out), size, [s for s in stages if s.steps > 0], args.batch_size, args.seed,
                           lora_rank=args.lora_r, save_every=args.save_every, stop_after=args.stop_after,
                           log_every=args.log_every, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; " if losses else ""
        print(summary + (f"model in {folder}" if folder
                         else f"stopped; run the same command to resume from {args.out}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
