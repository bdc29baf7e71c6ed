"""Sliding-window ESICA inference with one image encoding per window shared by all prompts."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from .errors import Cancelled, InputError
from .models.esica import ESICA

Precision = Literal["fp32", "bf16", "fp16"]
ProgressCallback = Callable[[int, int], None]

# Logit given to windows that hold no foreground at all (never run through the model).
EMPTY_WINDOW_LOGIT = -20.0


@dataclass(frozen=True)
class WindowConfig:
    """How the model is slid over the volume."""

    overlap: float = 0.5
    batch_size: int = 1
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = 0.125
    pass_num: int | None = None  # refinement passes; None = the checkpoint's own
    prompt_batch_size: int = 4  # prompts decoded together per window
    skip_empty: bool = True  # windows with no foreground voxel are not run

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1 or self.prompt_batch_size < 1:
            raise InputError("batch sizes must be >= 1")
        if self.pass_num is not None and self.pass_num < 0:
            raise InputError(f"pass_num must be >= 0, got {self.pass_num}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an unavailable device is a clear error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use device='cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' was requested but Apple MPS is not available; use device='cpu'")
    return device


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding window visits for a volume of ``shape``."""
    padded = [max(s, r) for s, r in zip(shape, roi)]
    interval = _get_scan_interval(padded, roi, len(roi), [overlap] * len(roi))
    return len(dense_patch_slices(padded, roi, interval))


class ESICAInferer:
    """Runs a loaded ESICA model over whole (preprocessed) volumes for many prompts at once."""

    def __init__(self, model: ESICA, tokenizer, device: torch.device, precision: Precision = "fp32") -> None:
        if precision != "fp32" and device.type == "cpu":
            raise InputError(f"{precision} autocast is for GPUs; use precision='fp32' on the CPU")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device, self.precision = device, precision

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @torch.no_grad()
    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """One text embedding per prompt (P, text_dim)."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with self._autocast():
            return self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))

    @torch.no_grad()
    def logits(
        self,
        image: torch.Tensor,
        text_embeddings: torch.Tensor,
        config: WindowConfig = WindowConfig(),
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> torch.Tensor:
        """Blended logits (P, z, y, x) for a preprocessed image (z, y, x) in [0, 1].

        Each window is encoded once; its context is reused by every prompt.
        """
        if image.ndim != 3:
            raise InputError(f"expected a 3-D preprocessed image, got shape {tuple(image.shape)}")
        roi = self.model.config.image_size
        n_prompts = text_embeddings.shape[0]
        total = -(-count_windows(image.shape, roi, config.overlap) // config.batch_size)
        done = 0

        def predict(windows: torch.Tensor) -> torch.Tensor:
            nonlocal done
            if cancel is not None and cancel.is_set():
                raise Cancelled("segmentation cancelled")
            out = torch.full((windows.shape[0], n_prompts, *roi), EMPTY_WINDOW_LOGIT, device=windows.device)
            keep = (windows.flatten(1).amax(1) > 0) if config.skip_empty else torch.ones(len(windows), dtype=torch.bool)
            if keep.any():
                out[keep] = self._predict_windows(windows[keep], text_embeddings, config).float()
            done += 1
            if progress is not None:
                progress(done, total)
            return out

        with self._autocast(), warnings.catch_warnings():
            # MONAI 1.5 indexes with lists internally; torch warns about it once per process.
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            return sliding_window_inference(
                image[None, None].to(self.device, torch.float32),
                roi_size=roi,
                sw_batch_size=config.batch_size,
                predictor=predict,
                overlap=config.overlap,
                mode=config.blend,
                sigma_scale=config.sigma_scale,
                padding_mode="constant",
                cval=0.0,
            )[0]

    def _predict_windows(self, windows: torch.Tensor, text: torch.Tensor, config: WindowConfig) -> torch.Tensor:
        """Logits (B, P, *roi) for B windows and all P prompts, encoding the windows once."""
        context = self.model.encode_image(windows)
        b, outputs = windows.shape[0], []
        for start in range(0, text.shape[0], config.prompt_batch_size):
            chunk = text[start : start + config.prompt_batch_size]
            n = chunk.shape[0]
            logits = self.model.decode(context.repeat(n), chunk.repeat(b, 1), config.pass_num)
            outputs.append(logits.view(b, n, *logits.shape[2:]))
        return torch.cat(outputs, dim=1)
