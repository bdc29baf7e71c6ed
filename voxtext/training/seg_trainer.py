"""Two-stage ESICA training: positive-only pretraining, then balanced fine-tuning.

AdamW with linear warm-up and cosine decay (the reference's Muon setup cannot run),
DiceFocal loss, optional bf16/fp16 autocast on GPU, gradient accumulation, gradient
clipping, checkpoints in the reference format plus a resumable training state, a
CSV metrics log and a plotted curve. Runs as one process or under ``torchrun`` (DDP).
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoints import load_esica_weights, save_esica
from ..models.esica import ESICA
from .distributed import DistInfo, mean_across
from .state import STATE_FILE, load_state

Batch = dict[str, torch.Tensor]


@dataclass
class StageConfig:
    """One training stage (the paper: stage 1 pos_ratio 1.0, stage 2 pos_ratio 0.5 + frozen text)."""

    name: str
    steps: int
    lr: float = 1e-4
    weight_decay: float = 1e-5
    pos_ratio: float = 1.0  # fraction of crops centred on the target
    absent_prompt_prob: float = 0.0  # fraction of samples prompting a structure absent from the case
    freeze_text_encoder: bool = False
    # Dice over the whole batch instead of per prompt: the large organs then dominate it and small
    # structures (the pancreas, lesions) can vanish; per prompt, each structure weighs the same.
    batch_dice: bool = False
    # Smoothing of the Dice ratio, in voxels. With one voxel the Dice of an empty target (an absent
    # structure) is 1 - 1 / (1 + predicted volume) and teaches; with MONAI's 1e-5 it saturates at 1.
    dice_smooth: float = 1.0
    # Weight of a BCE averaged over each prompt's own foreground voxels. In DiceFocal a 100-voxel lesion's
    # voxels weigh 100 / (prompts x crop voxels) of the focal mean and its Dice gradient vanishes once the
    # sigmoid saturates, so a rare small target can settle on "always empty"; this term keeps it pulled.
    foreground_weight: float = 0.0
    # Target name -> factor on its weight as a crop anchor in this stage (a crop's anchor is always asked), to
    # spend a stage's prompts on the structures the model gets wrong most.
    anchor_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    output_dir: str
    stages: list[StageConfig]
    batch_size: int = 4  # crops per step
    prompts_per_crop: int = 1  # prompts asked of each crop (the crop is encoded once for all)
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    amp: str = "no"  # "no", "bf16", "fp16" (GPU only)
    save_every: int = 500
    log_every: int = 10
    seed: int = 42
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dice_focal_loss(stage: StageConfig) -> DiceFocalLoss:
    """The stage's DiceFocal loss on logits (Dice per prompt or over the batch, focal per voxel)."""
    return DiceFocalLoss(sigmoid=True, batch=stage.batch_dice, smooth_nr=stage.dice_smooth,
                         smooth_dr=stage.dice_smooth, lambda_dice=1.0, lambda_focal=1.0)


def foreground_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over each prompt's foreground voxels, averaged per prompt (prompts with an empty target skipped)."""
    dims = tuple(range(1, logits.ndim))
    count = target.sum(dims)
    has = count > 0
    if not has.any():
        return logits.sum() * 0.0
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return ((bce * target).sum(dims)[has] / count[has]).mean()


class SegLoss(torch.nn.Module):
    """A stage's training loss: DiceFocal plus ``foreground_weight`` x :func:`foreground_bce`."""

    def __init__(self, stage: StageConfig) -> None:
        super().__init__()
        self.dice_focal = dice_focal_loss(stage)
        self.foreground_weight = stage.foreground_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice_focal(logits, target)
        if self.foreground_weight:
            loss = loss + self.foreground_weight * foreground_bce(logits, target)
        return loss


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class SegTrainer:
    """Trains an :class:`ESICA` model on batches from a per-stage data factory.

    ``data(stage, rank, world_size)`` returns an endless iterator of batches with keys
    ``image`` (B, 1, *roi), ``label`` (B, K, *roi) and the tokens of the B*K prompts
    (``input_ids``, ``attention_mask``, crop-major).
    """

    def __init__(
        self,
        model: ESICA,
        config: TrainConfig,
        data: Callable[[StageConfig, int, int], Iterator[Batch]],
        dist_info: DistInfo = DistInfo(),
        device: torch.device | str = "cpu",
    ) -> None:
        self.model, self.config, self.data, self.dist = model, config, data, dist_info
        self.device = torch.device(device)
        self.out = Path(config.output_dir)
        self.model.to(self.device)

    # ------------------------------------------------------------------ state
    def _save(self, stage_index: int, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Weights to ``last/`` and the optimizer/RNG state to resume stage ``stage_index`` at ``step``."""
        if not self.dist.is_main:
            return
        save_esica(self.model, self.out / "last")
        torch.save(
            {"stage": stage_index, "step": step, "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state()},
            self.out / STATE_FILE,
        )

    # ------------------------------------------------------------------ training
    def fit(self) -> Path:
        """Run every stage (resuming from ``output_dir`` when a training state exists)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(self.config.to_json())
        seed_everything(self.config.seed + self.dist.rank)
        state = load_state(self.out)
        if state is not None:
            load_esica_weights(self.model, self.out / "last")
            torch.set_rng_state(state["torch_rng"])
        start_stage = state["stage"] if state else 0
        for index, stage in enumerate(self.config.stages[start_stage:], start=start_stage):
            resume = state if (state and index == state["stage"]) else None
            # A stage lengthened since its end resumes too; a stage of 0 steps is skipped.
            if stage.steps > (resume["step"] if resume else 0):
                self._fit_stage(index, stage, resume)
            state = None
        if self.dist.is_main:
            save_esica(self.model, self.out / "final")
            plot_curve(self.out / "metrics.csv", self.out / "training_curve.png")
        return self.out / "final"

    def _fit_stage(self, index: int, stage: StageConfig, resume: dict | None) -> None:
        cfg, model = self.config, self.model
        for p in model.text_encoder.parameters():
            p.requires_grad_(not stage.freeze_text_encoder and model.config.text_weights == "checkpoint")
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=stage.lr,
        )
        start = 0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            start = resume["step"]
        warmup = int(cfg.warmup_ratio * stage.steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(start + s, stage.steps, warmup)
        )
        net = DistributedDataParallel(model) if self.dist.enabled else model
        scaler = torch.amp.GradScaler(enabled=cfg.amp == "fp16" and self.device.type == "cuda")
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
            enabled=cfg.amp != "no" and self.device.type == "cuda",
        )
        loss_fn = SegLoss(stage)
        batches = self.data(stage, self.dist.rank, self.dist.world_size)
        model.train()
        bar = tqdm(range(start, stage.steps), desc=stage.name, disable=not self.dist.is_main, initial=start,
                   total=stage.steps)
        running, t0 = [], time.time()
        for step in bar:
            loss_value = 0.0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
                sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
                context = nullcontext() if sync else net.no_sync()
                with context, autocast:
                    label = batch["label"]  # (B, K, *roi): K prompts per crop
                    logits = net(batch["image"], batch["input_ids"], batch["attention_mask"],
                                 prompts_per_image=label.shape[1])
                    target = label.reshape(-1, 1, *label.shape[2:]).float()
                    loss = loss_fn(logits.float(), target) / cfg.grad_accum
                scaler.scale(loss).backward()
                loss_value += loss.item()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            running.append(loss_value)
            if (step + 1) % cfg.log_every == 0 or step + 1 == stage.steps:
                mean_loss = mean_across(float(np.mean(running)), self.dist, self.device)
                self._log(stage.name, step + 1, mean_loss, scheduler.get_last_lr()[0], time.time() - t0)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                running = []
            if (step + 1) % cfg.save_every == 0:
                self._save(index, step + 1, optimizer)
        self._save(index, stage.steps, optimizer)

    def _log(self, stage: str, step: int, loss: float, lr: float, elapsed: float) -> None:
        if self.dist.is_main:
            append_metrics(self.out / "metrics.csv", stage, step, loss, lr, elapsed)


def append_metrics(path: Path, stage: str, step: int, loss: float, lr: float, elapsed: float) -> None:
    """One row of a run's ``metrics.csv`` (stage, step, loss, lr, elapsed_s); the header when the file is new."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["stage", "step", "loss", "lr", "elapsed_s"])
        writer.writerow([stage, step, f"{loss:.6f}", f"{lr:.3e}", f"{elapsed:.1f}"])


def plot_curve(metrics_csv: Path, output_png: Path, ylabel: str = "DiceFocal loss") -> None:
    """Loss per step for each stage, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(metrics_csv.open())) if metrics_csv.exists() else []
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for stage in dict.fromkeys(r["stage"] for r in rows):
        part = [r for r in rows if r["stage"] == stage]
        ax.plot([offset + int(r["step"]) for r in part], [float(r["loss"]) for r in part], label=stage)
        offset += int(part[-1]["step"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_png, dpi=120)
    plt.close(fig)
