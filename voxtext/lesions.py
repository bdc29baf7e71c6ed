"""The lesion stage of a segmentation model: lesion prompts answered by a finer-grid model inside their organ.

A model folder may hold a ``lesions/`` sub-folder: a second ESICA checkpoint (``config.json`` +
``model.safetensors``) on a finer grid, and ``routing.json``, which lists the lesions it answers (their
phrasings and the organs they lie in) and the phrasings the main model answers itself. A prompt goes to the
lesion stage when the nearest of all these phrasings (cosine of the main model's text embeddings) is a
lesion's, so paraphrases ("hepatic mass") are routed as well as the listed names. The main model segments
the lesion's organ(s); the lesion model is run on the organ's bounding box (plus a margin) at its own grid,
on an image blanked beyond a few millimetres around the organ mask (dilated: the main model's organ edges are
coarse), and its answer is kept within the same distance of the organ. Each lesion may carry a calibrated
rule for the connected components it keeps, as nnU-Net's post-processing: small or hesitant blobs are the usual
false alarms for a lesion the organ does not hold. On CT the rule may also judge a component's attenuation, as a
radiologist does: a simple cyst is water (about -10 to 20 HU), and a lesion differs from the organ around it.
A lesion the model does not see may instead be found by attenuation alone (``hyperdense_hu``): a calculus is the
voxels of its organ at or above a calcium threshold on CT, the way stones are read and measured clinically.
On CT a target may also take its extent from attenuation (``grow_by_attenuation``): the model finds the lesion,
and each component of its answer is grown to the connected voxels of its own attenuation, as Slicer's "grow from
seeds" or a radiologist's region-growing tool, before the rule judges it: the lesion model runs on a coarser grid
than the scan and under-reads the edges of large lesions, and the main model's organ mask may cut off an
exophytic one.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from .checkpoints import load_esica
from .distances import at_most, distance_to, padded_box, widened, within_distance
from .errors import CheckpointError
from .inference import ESICAInferer, Precision, WindowConfig
from .preprocess import PreprocessConfig, prepare, restore, to_model_grid
from .vocabulary import Embed, nearest_phrasings
from .volume import Volume

ROUTING_FILE = "routing.json"
LESION_FOLDER = "lesions"
ORGAN_MARGIN_MM = 20.0  # context around the organ's bounding box given to the lesion model
ORGAN_DILATION_MM = 6.0  # how far outside the main model's organ mask a lesion may reach
RELIABLE_DSC = 0.1  # below this validation DSC a lesion target's answers carry a caution
HYPERDENSE_SHARE = 0.5  # a focus found by attenuation lies at least this much inside its organ's mask
# Growing a lesion by attenuation (:class:`AttenuationGrowth`).
GROWTH_SMOOTHING_MM = 1.5  # Gaussian sigma of the image the growth reads (noise down, edges kept)
GROWTH_REACH_MM = 10.0  # how far from the organ mask (or the lesion) a grown lesion may reach
GROWTH_HALF_WIDTH_HU = 35.0  # the attenuation band: the lesion's median +- this (or 3 SD of its core, if wider) ...
GROWTH_MIN_CONTRAST_HU = 20.0  # ... and at most half its contrast to the organ; a fainter lesion is not grown
# A grown lesion lies in its organ: at least this share of its surface within GROWTH_ENCLOSURE_MM of the organ mask
# (an exophytic cyst about 0.65, the bladder beside a liver mask's edge about 0.5); else the component stays as it is.
GROWTH_MIN_ENCLOSURE = 0.6
GROWTH_ENCLOSURE_MM = 4.0


@dataclass(frozen=True)
class Components:
    """The connected components (26-neighbourhood) of ``probability > threshold``: ``labels`` numbers them
    1..n, the arrays hold one value per component. Given the organ, the share of each inside it; the attenuation
    is measured on CT only (else ``None``): the median HU of each component and its difference from the median of
    the rest of its organ (NaN where the components cover the whole organ)."""

    labels: np.ndarray
    volume_ml: np.ndarray
    confidence: np.ndarray  # mean probability
    median_hu: np.ndarray | None = None
    contrast_hu: np.ndarray | None = None
    inside: np.ndarray | None = None


def measure_components(
    probability: np.ndarray,
    threshold: float,
    voxel_ml: float,
    hu: np.ndarray | None = None,
    organ: np.ndarray | None = None,
) -> Components:
    """The components of ``probability > threshold``; their share inside ``organ`` (bool, the organ the lesion lies
    in) when it is given, and their attenuation when ``hu`` (the CT image, same grid) is given too."""
    labels, n = ndimage.label(probability > threshold, structure=np.ones((3, 3, 3)))
    index = np.arange(1, n + 1)
    size = component_sizes(labels, n)
    confidence = np.asarray(ndimage.mean(probability, labels, index), np.float64).reshape(n)
    if organ is None:
        return Components(labels, size * voxel_ml, confidence)
    inside = inside_share(labels, organ, size)
    if hu is None:
        return Components(labels, size * voxel_ml, confidence, inside=inside)
    found = labels > 0
    median = np.asarray(ndimage.median(hu[found], labels[found], index) if n else [], np.float64).reshape(n)
    rest = organ & ~found
    reference = float(np.median(hu[rest])) if rest.any() else np.nan
    return Components(labels, size * voxel_ml, confidence, median, median - reference, inside)


@dataclass(frozen=True)
class ComponentRule:
    """Which components of a lesion answer are kept (calibrated on validation phantoms; the default keeps all).
    The attenuation criteria apply to CT only and are ignored where no attenuation was measured."""

    min_volume_ml: float = 0.0
    min_confidence: float = 0.0  # mean probability
    max_hu: float | None = None  # median attenuation at most this (cysts: water)
    min_hu: float | None = None  # ... at least this (solid lesions)
    min_contrast_hu: float = 0.0  # |median - the organ's median| at least this: a lesion differs from its organ
    min_inside: float = 0.0  # share inside the organ mask at least this (a lesion grown into a neighbour is not)

    def __post_init__(self) -> None:
        if self.min_volume_ml < 0 or not 0 <= self.min_confidence < 1 or self.min_contrast_hu < 0 or not (
                0 <= self.min_inside <= 1):
            raise ValueError(f"invalid component rule {self}: volume and contrast must be >= 0, confidence in [0, 1), "
                             f"inside share in [0, 1]")

    @property
    def keeps_all(self) -> bool:
        return self == ComponentRule()

    @property
    def uses_attenuation(self) -> bool:
        return self.max_hu is not None or self.min_hu is not None or self.min_contrast_hu > 0

    def keeps(self, volume_ml: np.ndarray, confidence: np.ndarray, median_hu: np.ndarray | None = None,
              contrast_hu: np.ndarray | None = None, inside: np.ndarray | None = None) -> np.ndarray:
        """Which components (one value per component in each array) the rule keeps."""
        keep = (np.asarray(volume_ml) >= self.min_volume_ml) & (np.asarray(confidence) >= self.min_confidence)
        if inside is not None and self.min_inside:
            keep &= np.asarray(inside) >= self.min_inside
        if median_hu is not None and contrast_hu is not None:
            median_hu = np.asarray(median_hu)
            if self.max_hu is not None:
                keep &= median_hu <= self.max_hu
            if self.min_hu is not None:
                keep &= median_hu >= self.min_hu
            if self.min_contrast_hu:
                keep &= np.abs(np.asarray(contrast_hu)) >= self.min_contrast_hu
        return keep

    def describe(self) -> str:
        parts = [f"volume >= {self.min_volume_ml} mL", f"mean probability >= {self.min_confidence}"]
        parts += [f"median <= {self.max_hu} HU"] if self.max_hu is not None else []
        parts += [f"median >= {self.min_hu} HU"] if self.min_hu is not None else []
        parts += [f"contrast to the organ >= {self.min_contrast_hu} HU"] if self.min_contrast_hu else []
        parts += [f"inside the organ mask >= {self.min_inside:.0%}"] if self.min_inside else []
        return ", ".join(parts)


@dataclass(frozen=True)
class LesionTarget:
    """A lesion the lesion stage answers: its phrasings, the organ(s) it lies in and its component rule."""

    phrasings: tuple[str, ...]
    within: tuple[str, ...]
    rule: ComponentRule = ComponentRule()
    # Measured by the calibration: validation phantoms holding this lesion, and the mean DSC of the kept answer.
    validated_cases: int = 0
    validated_dsc: float | None = None
    # Found by attenuation instead of the lesion model: the foci of at least this HU lying mostly in the organ
    # (:func:`hyperdense_foci`; CT only).
    hyperdense_hu: float | None = None
    # On CT, the model's components grown to the connected voxels of their own attenuation
    # (:class:`AttenuationGrowth`).
    grow_by_attenuation: bool = False

    @property
    def caution(self) -> str:
        """A warning to show with every answer of this target: how an attenuation target is found, and an
        unreliable validation measured by the calibration."""
        notes = []
        if self.hyperdense_hu is not None:
            notes.append(f"found by attenuation, not by the model: the voxels of at least {self.hyperdense_hu:g} HU "
                         f"in the {' or '.join(self.within)} (CT only; contrast in the collecting system and "
                         f"calcified vessels there are found too)")
        if self.validated_dsc is not None and self.validated_dsc < RELIABLE_DSC:
            notes.append(f"the lesion stage found almost no {self.phrasings[0]} on its validation phantoms (mean DSC "
                         f"{self.validated_dsc:.2f} over {self.validated_cases}): an empty mask does not rule one out")
        return "; ".join(notes)

    def to_dict(self) -> dict:
        return {"phrasings": list(self.phrasings), "within": list(self.within), **asdict(self.rule),
                "validated_cases": self.validated_cases, "validated_dsc": self.validated_dsc,
                "hyperdense_hu": self.hyperdense_hu, "grow_by_attenuation": self.grow_by_attenuation}

    @classmethod
    def from_dict(cls, data: dict) -> LesionTarget:
        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        rule = ComponentRule(**{f.name: number(f.name) for f in fields(ComponentRule) if f.name in data})
        return cls(tuple(data["phrasings"]), tuple(data["within"]), rule, int(data.get("validated_cases", 0)),
                   number("validated_dsc"), number("hyperdense_hu"), bool(data.get("grow_by_attenuation", False)))


@dataclass(frozen=True)
class LesionRouting:
    """Which prompts the lesion stage answers (see the module docstring)."""

    lesions: tuple[LesionTarget, ...]
    other_phrasings: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> LesionRouting:
        try:
            data = json.loads(path.read_text())
            lesions = tuple(LesionTarget.from_dict(t) for t in data["lesions"])
            other = tuple(data["other_phrasings"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"unreadable lesion routing file {path}: {error}") from error
        if not lesions or any(not t.phrasings or not t.within for t in lesions):
            raise CheckpointError(f"{path} lists no lesions, or a lesion without phrasings or organs")
        return cls(lesions, other)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"lesions": [t.to_dict() for t in self.lesions],
                                    "other_phrasings": list(self.other_phrasings)}, indent=2))

    def route(self, prompts: Sequence[str], vectors: torch.Tensor, embed: Embed) -> dict[str, LesionTarget]:
        """The prompts the lesion stage answers, each with its lesion target, given the prompts'
        :func:`~voxtext.vocabulary.unit_embeddings`."""
        known = tuple(p for t in self.lesions for p in t.phrasings) + self.other_phrasings
        owners = [t for t in self.lesions for _ in t.phrasings] + [None] * len(self.other_phrasings)
        nearest, _ = nearest_phrasings(vectors, known, embed)
        return {p: owners[n] for p, n in zip(prompts, nearest) if owners[n] is not None}


class LesionStage:
    """A finer-grid ESICA model asked for lesions inside organ masks found by the main model."""

    def __init__(self, folder: Path, device: torch.device, precision: Precision = "fp32") -> None:
        network, tokenizer = load_esica(folder, device=device, download=False)
        self.inferer = ESICAInferer(network, tokenizer, device, precision)
        self.routing = LesionRouting.load(folder / ROUTING_FILE)

    @classmethod
    def of(cls, model_folder: Path, device: torch.device, precision: Precision = "fp32") -> LesionStage | None:
        """The lesion stage stored with a model, if it has one."""
        folder = model_folder / LESION_FOLDER
        return cls(folder, device, precision) if folder.is_dir() else None

    @property
    def spacing_mm(self) -> float:
        return self.inferer.model.config.target_spacing

    def probabilities(
        self,
        volume: Volume,
        prompts: Sequence[str],
        targets: Sequence[LesionTarget],
        organ: np.ndarray,
        modality: str,
        windows: WindowConfig,
        threshold: float,
        cancel: threading.Event | None = None,
    ) -> np.ndarray:
        """Probabilities (P, i, j, k) of lesion ``prompts`` (routed to ``targets``) that all lie in ``organ``
        (bool, the volume's grid); zero outside the (slightly dilated) organ and in the components of
        ``p > threshold`` that their target rejects. A target found by attenuation (``hyperdense_hu``) is 1 on the
        organ's :func:`hyperdense_foci` on CT and 0 elsewhere (on any other modality everywhere); a target grown by
        attenuation is 1 where :class:`AttenuationGrowth` adds to the model's components (CT only), and its rule
        judges the grown components.
        ``modality``: as the main model prepared the volume."""
        out = np.zeros((len(prompts), *volume.shape), np.float32)
        if not organ.any():
            return out
        spacing = np.asarray(volume.spacing)
        box = padded_box(organ, spacing, ORGAN_MARGIN_MM)
        hu = volume.array[box] if modality == "CT" else None  # a view: only the rule and the threshold read it
        asked = [prompt for prompt, target in zip(prompts, targets) if target.hyperdense_hu is None]
        modelled = self._model_probabilities(volume, box, organ, asked, modality, windows, cancel)
        growth = AttenuationGrowth(hu, organ[box], spacing) if hu is not None else None
        voxel_ml = float(np.prod(spacing)) / 1000.0
        for i, target in enumerate(targets):
            if target.hyperdense_hu is None:
                probability = next(modelled)
            elif hu is not None:
                probability = hyperdense_foci(hu, organ[box], target.hyperdense_hu).astype(np.float32)
            else:
                probability = np.zeros(organ[box].shape, np.float32)
            if target.grow_by_attenuation and growth is not None:
                probability = np.maximum(probability, growth.grow(probability > threshold).astype(np.float32))
            out[(i, *box)] = apply_rule(probability, threshold, target.rule, voxel_ml, hu, organ[box])
        return out

    def _model_probabilities(
        self,
        volume: Volume,
        box: tuple[slice, ...],
        organ: np.ndarray,
        prompts: Sequence[str],
        modality: str,
        windows: WindowConfig,
        cancel: threading.Event | None,
    ) -> Iterator[np.ndarray]:
        """The lesion model's probabilities of ``prompts``, one at a time, on the ``box`` of the volume's grid: run on
        an image blanked beyond the organ's surroundings, and zero beyond them."""
        if not prompts:
            return
        prepared = prepare(volume.crop(box), PreprocessConfig(target_spacing=self.spacing_mm, modality=modality))
        organ_grid = to_model_grid(prepared.geometry, organ[box], "nearest")
        image = organ_surroundings(prepared.image, organ_grid, self.spacing_mm, ORGAN_DILATION_MM)
        text = self.inferer.embed_prompts(prompts)
        logits = self.inferer.logits(torch.from_numpy(image), text, windows, cancel=cancel).float().cpu()
        inside = within_distance(organ[box], np.asarray(volume.spacing), ORGAN_DILATION_MM)
        for row in logits:
            yield restore(prepared, torch.sigmoid(row), "linear") * inside


def apply_rule(
    probability: np.ndarray,
    threshold: float,
    rule: ComponentRule,
    voxel_ml: float,
    hu: np.ndarray | None = None,
    organ: np.ndarray | None = None,
) -> np.ndarray:
    """``probability`` with the components of ``p > threshold`` that ``rule`` rejects set to zero; ``hu`` and
    ``organ`` (see :func:`measure_components`) let it judge their attenuation (pass ``hu`` for CT only)."""
    if rule.keeps_all:
        return probability
    found = measure_components(probability, threshold, voxel_ml, hu if rule.uses_attenuation else None, organ)
    rejected = 1 + np.flatnonzero(~rule.keeps(found.volume_ml, found.confidence, found.median_hu, found.contrast_hu,
                                              found.inside))
    return np.where(np.isin(found.labels, rejected), 0.0, probability).astype(probability.dtype, copy=False)


def component_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """The voxel count of each of the components ``labels`` 1..n."""
    return np.bincount(labels.ravel(), minlength=n + 1)[1:]


def inside_share(labels: np.ndarray, organ: np.ndarray, size: np.ndarray) -> np.ndarray:
    """For components ``labels`` 1..n of :func:`component_sizes` ``size``: the share of each one's voxels inside
    ``organ`` (bool, same grid)."""
    return np.bincount(labels[organ], minlength=len(size) + 1)[1:] / np.maximum(size, 1)


def hyperdense_foci(hu: np.ndarray, organ: np.ndarray, min_hu: float) -> np.ndarray:
    """The connected components (26-neighbourhood) of ``hu >= min_hu`` that lie at least
    :data:`HYPERDENSE_SHARE` inside ``organ`` (bool, same grid): the organ's calcifications, not the bone or
    enhanced vessel that its mask grazes."""
    labels, n = ndimage.label(hu >= min_hu, structure=np.ones((3, 3, 3)))
    inside = inside_share(labels, organ, component_sizes(labels, n))
    return np.isin(labels, 1 + np.flatnonzero(inside >= HYPERDENSE_SHARE))


class AttenuationGrowth:
    """Lesions of one ``organ`` (bool) grown by attenuation on one CT (``hu``, same grid, voxel ``spacing`` in mm):
    the smoothed image and the organ's distance map are taken once, when first needed, for every lesion grown in
    it."""

    def __init__(self, hu: np.ndarray, organ: np.ndarray, spacing: Sequence[float]) -> None:
        self.hu, self.organ, self.spacing = hu, organ, spacing

    @functools.cached_property
    def smooth(self) -> np.ndarray:
        sigma = GROWTH_SMOOTHING_MM / np.asarray(self.spacing, float)
        return ndimage.gaussian_filter(self.hu.astype(np.float32), sigma)

    @functools.cached_property
    def to_organ(self) -> np.ndarray:
        return distance_to(self.organ, self.spacing, GROWTH_REACH_MM)

    def grow(self, lesion: np.ndarray) -> np.ndarray:
        """``lesion`` (bool) with each of its components (26-neighbourhood) grown to the connected voxels of its
        own attenuation on the CT (smoothed by :data:`GROWTH_SMOOTHING_MM`): those within the component's median
        +- :data:`GROWTH_HALF_WIDTH_HU` (or 3 SD of its core, if wider) and at most half its contrast to the rest of
        the organ, opened by one voxel (so the partial-volume rim between two tissues does not carry the growth
        along an organ's edge), within :data:`GROWTH_REACH_MM` of the organ or the lesion, and one voxel further
        where the lesion's side of half that contrast reaches. A component differing from its organ by less than
        :data:`GROWTH_MIN_CONTRAST_HU`, or whose grown surface is not enclosed by the organ
        (:data:`GROWTH_MIN_ENCLOSURE`), is kept as it is."""
        cube = np.ones((3, 3, 3), bool)
        labels, n = ndimage.label(lesion, structure=cube)
        rest = self.organ & ~lesion
        if not n or not rest.any():
            return lesion
        smooth = self.smooth
        reference = float(np.median(smooth[rest]))
        reach = at_most(self.to_organ, GROWTH_REACH_MM) | within_distance(lesion, self.spacing, GROWTH_REACH_MM)
        near_organ = at_most(self.to_organ, GROWTH_ENCLOSURE_MM)
        grown = lesion.copy()
        for c, where in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[where] == c
            median = float(np.median(smooth[where][component]))
            contrast = abs(median - reference)
            if contrast < GROWTH_MIN_CONTRAST_HU:
                continue
            core = ndimage.binary_erosion(component, cube)
            spread = 3.0 * float(smooth[where][core].std()) if core.any() else 0.0
            distance = np.abs(smooth - median)
            band = (distance <= min(contrast / 2, max(GROWTH_HALF_WIDTH_HU, spread))) & reach
            # The grown region lies in the connected part of band | component that holds the component; the
            # morphology below runs on that part's box, 3 voxels wider (the reach of opening, then two dilations):
            # the same answer as on the whole array, at a fraction of the cost.
            seed = tuple(s.start + int(i[0]) for s, i in zip(where, np.nonzero(component)))
            candidates, _ = ndimage.label(band | (labels == c), cube)
            part = candidates[seed]
            box = widened(ndimage.find_objects(candidates, max_label=part)[part - 1], 3, band.shape)
            parts, _ = ndimage.label(ndimage.binary_opening(band[box], cube) | (labels[box] == c), cube)
            region = parts == parts[tuple(i - s.start for i, s in zip(seed, box))]
            # The edge: one voxel further, where the lesion's side of half the contrast to its organ ends.
            region |= ndimage.binary_dilation(region, cube) & (distance[box] <= contrast / 2) & reach[box]
            if near_organ[box][ndimage.binary_dilation(region, cube) & ~region].mean() >= GROWTH_MIN_ENCLOSURE:
                grown[box] |= region
        return grown


def organ_surroundings(image: np.ndarray, organ: np.ndarray, spacing_mm: float, dilation_mm: float) -> np.ndarray:
    """A prepared image (values 0..1, isotropic ``spacing_mm``) blanked to 0 further than ``dilation_mm`` from
    ``organ``: the lesion model sees the organ and a thin rim, not the neighbours that look like lesions."""
    return np.where(within_distance(organ, spacing_mm, dilation_mm), image, 0.0).astype(np.float32)
