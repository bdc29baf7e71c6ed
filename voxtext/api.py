"""High-level segmentation API: ``Segmenter`` (a loaded model) and ``segment()``."""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import load_esica, resolve_model
from .errors import InputError
from .inference import ESICAInferer, Precision, ProgressCallback, WindowConfig, resolve_device
from .laterality import apply_laterality
from .lesions import LesionStage
from .postprocess import OverlapPolicy, OverlapResolver, clean_mask
from .preprocess import PreprocessConfig, prepare, restore
from .refinement import Neighbour, refine_by_attenuation
from .segmentation import Segmentation
from .vocabulary import TrainedVocabulary, unit_embeddings
from .volume import Volume

Quality = Literal["accurate", "fast"]


@dataclass(frozen=True)
class QualityPreset:
    """Resolution and window overlap of a quality level.

    The grid is the model's own training spacing, coarsened to at least ``min_spacing_mm``.
    """

    min_spacing_mm: float
    overlap: float
    pass_num: int | None  # None = the checkpoint's refinement passes


QUALITY_PRESETS: dict[str, QualityPreset] = {
    # As the model was trained and evaluated (1.5 mm for the published ESICA), half-window overlap.
    "accurate": QualityPreset(min_spacing_mm=0.0, overlap=0.5, pass_num=None),
    # For CPUs: at least a 3 mm grid (8x fewer voxels than 1.5 mm), quarter overlap; see the README.
    "fast": QualityPreset(min_spacing_mm=3.0, overlap=0.25, pass_num=None),
}


def normalize_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Validated prompt list; a single string is one prompt."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise InputError("no prompt given: name at least one target, e.g. 'liver'")
    cleaned = []
    for item in items:
        if not isinstance(item, str):
            raise InputError(f"prompts must be strings, got {type(item).__name__}")
        text = " ".join(item.split())
        if not text:
            raise InputError("empty or whitespace-only prompt: every prompt must name a target")
        if text in cleaned:
            raise InputError(f"prompt {text!r} is given twice")
        cleaned.append(text)
    return cleaned


def as_volume(volume: Volume | str | Path | np.ndarray, modality: str | None = None) -> Volume:
    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, (str, Path)):
        return Volume.from_file(volume, modality=modality)
    if isinstance(volume, np.ndarray):
        return Volume.from_numpy(volume, modality=modality)
    raise InputError(f"cannot segment a {type(volume).__name__}: pass a Volume, a file path or a 3-D numpy array")


def _roi_slices(roi: Sequence[Sequence[int]], shape: tuple[int, ...]) -> tuple[slice, ...]:
    if len(roi) != 3:
        raise InputError(f"roi needs (start, stop) voxel bounds for the 3 axes, got {roi!r}")
    slices = []
    for axis, (bounds, size) in enumerate(zip(roi, shape)):
        start, stop = (int(b) for b in bounds)
        start, stop = max(start, 0), min(stop, size)
        if stop <= start:
            raise InputError(f"roi is empty along axis {axis} after clipping to the volume (size {size})")
        slices.append(slice(start, stop))
    return tuple(slices)


class Segmenter:
    """A loaded ESICA model ready to segment volumes from text prompts.

    >>> seg = Segmenter("default").segment("ct.nii.gz", ["liver", "left kidney"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | Path = "default",
        device: str | torch.device = "auto",
        precision: Precision = "fp32",
        download: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.model_name = str(model)
        folder = resolve_model(model, download=download)
        network, tokenizer = load_esica(folder, device=self.device)
        self.inferer = ESICAInferer(network, tokenizer, self.device, precision)
        self.lesion_stage = LesionStage.of(folder, self.device, precision)
        self.vocabulary = TrainedVocabulary.of(folder)

    def segment(
        self,
        volume: Volume | str | Path | np.ndarray,
        prompts: str | Sequence[str],
        *,
        quality: Quality = "accurate",
        threshold: float = 0.5,
        overlap: float | None = None,
        pass_num: int | None = None,
        roi: Sequence[Sequence[int]] | None = None,
        keep_largest: bool = False,
        fill_holes: bool = False,
        overlap_policy: OverlapPolicy = "independent",
        laterality: bool = True,
        lesion_stage: bool = True,
        refine: bool = True,
        other_modalities: bool = False,
        modality: str | None = None,
        return_probabilities: bool = False,
        progress: bool | ProgressCallback = False,
        cancel: threading.Event | None = None,
    ) -> Segmentation:
        """Segment every prompt in ``volume``; masks come back on exactly the input grid.

        With ``lesion_stage`` (and a model that has one, as the embedded default), lesion prompts are answered
        by its finer-grid lesion model inside the organ the main model finds (:mod:`voxtext.lesions`). With a
        model that lists what it learned (:mod:`voxtext.vocabulary`), a prompt of a structure it never learned is
        answered empty with a caution, and so is one it learned on other modalities only unless
        ``other_modalities`` (then it is answered, with a caution: nothing validates it there). With
        ``refine``, on CT the boundaries of the main model's answers are decided by attenuation within a few
        millimetres of where the model puts them (:mod:`voxtext.refinement`); returned probabilities are then 0
        or 1 where the refinement changed the answer. Answers asked together are refined against each other there
        (the voxels where two meet go to the organ of the nearer attenuation).
        """
        prompts = normalize_prompts(prompts)
        if quality not in QUALITY_PRESETS:
            raise InputError(f"quality must be one of {sorted(QUALITY_PRESETS)}, got {quality!r}")
        if not 0.0 < threshold < 1.0:
            raise InputError(f"threshold must be between 0 and 1, got {threshold}")
        preset = QUALITY_PRESETS[quality]
        volume = as_volume(volume, modality)
        slices = _roi_slices(roi, volume.shape) if roi is not None else tuple(slice(0, s) for s in volume.shape)
        region = volume.crop(slices) if roi is not None else volume

        spacing = max(preset.min_spacing_mm, self.inferer.model.config.target_spacing)
        prepared = prepare(region, PreprocessConfig(target_spacing=spacing, modality=modality))
        check_memory(prepared.image.shape, len(prompts), volume.shape, return_probabilities)
        windows = WindowConfig(
            overlap=preset.overlap if overlap is None else overlap,
            pass_num=preset.pass_num if pass_num is None else pass_num,
        )
        # The prompts are embedded once for matching them to what the model learned and to the lesion stage.
        embed = self.inferer.embed_prompts
        routing = self.lesion_stage.routing if lesion_stage and self.lesion_stage else None
        vectors = unit_embeddings(prompts, embed) if self.vocabulary or routing else None
        # With a model that lists what it learned: prompts it cannot answer validly here are answered empty.
        withheld, unvalidated = self.vocabulary.review(
            prompts, vectors, prepared.modality, embed, other_modalities) if self.vocabulary else ({}, {})
        kept = [i for i, p in enumerate(prompts) if p not in withheld]
        known = [prompts[i] for i in kept]
        routes = routing.route(known, vectors[kept], embed) if routing and known else {}
        # The main model answers the other prompts and segments the organs the routed lesions lie in.
        organs = list(dict.fromkeys(o for target in routes.values() for o in target.within))
        asked = [p for p in known if p not in routes] + [o for o in organs if o not in prompts]
        resolver = OverlapResolver(overlap_policy, threshold, region.shape, len(prompts))
        probabilities = np.zeros((len(prompts), *volume.shape), np.float32) if return_probabilities else None

        def answer(prompt: str, prob: np.ndarray) -> None:
            i = prompts.index(prompt)
            resolver.add(i, prob)
            if probabilities is not None:
                probabilities[(i, *slices)] = prob

        organ_masks, refined = {}, []
        if asked:
            text = self.inferer.embed_prompts(asked)
            with progress_callback(progress) as report:
                logits = self.inferer.logits(torch.from_numpy(prepared.image), text, windows, report, cancel)
            logits = logits.float().cpu()
            if laterality:
                apply_laterality(logits.numpy(), asked, prepared, math.log(threshold / (1.0 - threshold)))

            def restored(i: int) -> np.ndarray:
                return restore(prepared, torch.sigmoid(logits[i]), "linear").astype(np.float32, copy=False)

            answered = [i for i, prompt in enumerate(asked) if prompt in prompts and prompt not in routes]
            refining = refine and prepared.modality == "CT"
            # Answers asked together are refined against each other: each one's mask and attenuation first (the
            # probabilities are restored again below rather than all held at once). An answer learned on another
            # modality only (unvalidated here) is no neighbour: it must not move the others.
            vouched = [i for i in answered if asked[i] not in unvalidated] if refining and len(answered) > 1 else []
            neighbours = {i: n for i in vouched
                          if (n := Neighbour.of(restored(i), region.array, region.spacing, threshold)) is not None}
            for i, prompt in enumerate(asked):
                prob = restored(i)
                if prompt in organs:  # the lesion stage's rules were calibrated on the model's own organ masks
                    organ_masks[prompt] = prob > threshold
                if i in answered:
                    if refining:
                        others = [n for j, n in neighbours.items() if j != i]
                        prob = refine_by_attenuation(prob, region.array, region.spacing, threshold, spacing, others)
                        refined.append(prompt)
                    answer(prompt, prob)
        for within in dict.fromkeys(target.within for target in routes.values()):
            group = [p for p, target in routes.items() if target.within == within]
            organ = np.logical_or.reduce([organ_masks[o] for o in within])
            for prompt, prob in zip(group, self.lesion_stage.probabilities(
                    region, group, [routes[p] for p in group], organ, prepared.modality, windows, threshold, cancel)):
                answer(prompt, prob)

        masks = np.zeros((len(prompts), *volume.shape), dtype=bool)
        for i, mask in enumerate(resolver.finish()):
            masks[(i, *slices)] = clean_mask(mask, keep_largest, fill_holes)
        within = {p: list(target.within) for p, target in routes.items()}
        cautions = {p: target.caution for p, target in routes.items() if target.caution} | withheld
        cautions |= {p: caution for p, caution in unvalidated.items() if p not in routes}
        return Segmentation(masks, prompts, volume.affine, probabilities, model=self.model_name, lesion_stage=within,
                            cautions=cautions, refined=refined)


def available_memory_bytes() -> int:
    """Physical memory of this machine (the budget whole-volume arrays must fit in)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model_grid: tuple[int, ...], n_prompts: int, input_shape: tuple[int, ...], probabilities: bool) -> None:
    """Refuse jobs whose whole-volume arrays cannot fit in memory, before any work is done."""
    grid, full = int(np.prod(model_grid)), int(np.prod(input_shape))
    # logits + MONAI's weight map on the model grid; per-prompt restore, masks and the refinement's neighbour
    # masks on the input grid.
    needed = 4 * grid * (n_prompts + 2) + full * (4 * 3 + 2 * n_prompts)
    needed += 4 * full * n_prompts if probabilities else 0
    budget = int(0.8 * available_memory_bytes())
    if needed > budget:
        raise InputError(
            f"this job needs about {needed / 2**30:.1f} GiB of memory but {budget / 2**30:.1f} GiB are usable: "
            "segment fewer prompts at a time, set an roi, use quality='fast', or skip return_probabilities"
        )


@contextmanager
def progress_callback(progress: bool | ProgressCallback) -> Iterator[ProgressCallback | None]:
    """The user's callable as is, a tqdm bar for ``True``, nothing for ``False``."""
    if callable(progress) or not progress:
        yield progress or None
        return
    with tqdm(desc="segmenting", unit="window") as bar:

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield report


@functools.lru_cache(maxsize=2)
def _cached_segmenter(model: str, device: str, precision: str) -> Segmenter:
    return Segmenter(model, device, precision)


def segment(
    volume: Volume | str | Path | np.ndarray,
    prompts: str | Sequence[str],
    model: str | Path = "default",
    device: str = "auto",
    precision: Precision = "fp32",
    **options,
) -> Segmentation:
    """Segment ``prompts`` in ``volume`` with a (cached) model; see :meth:`Segmenter.segment` for options."""
    return _cached_segmenter(str(model), str(device), precision).segment(volume, prompts, **options)
