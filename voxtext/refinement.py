"""Boundaries refined by attenuation on CT.

A model answering on a coarse grid (the embedded default works at 5 mm) places a boundary, once its probability is
interpolated to the scan, to within about one of its voxels. On CT the edge of an organ is where its attenuation
ends, and the scan resolves it: within about one model voxel of the model's boundary (:data:`BAND_VOXELS`) each
voxel is decided by the image, lightly smoothed against noise. The organ's attenuation is measured in its core
(deeper than :data:`CORE_MM` in the model's mask), its surroundings' in a shell just outside (:data:`RING_MM`),
where that shell is nearest each voxel (:data:`NEARBY_MM`): the fat on one side of the pancreas, the liver on
another. A voxel the model keeps stays unless its attenuation is nearer the surroundings' there, or the median of
the whole shell, than the organ's (fat around the liver, a water-dense neighbour, a brighter organ it overreached
into, a muscle between the organ and the fat beyond); a voxel the model hesitates on joins where its attenuation is
the organ's (on a lower probability, :data:`LOW_PROBABILITY`, where it is strictly the organ's: a model that
under-reads a small organ, such as the aorta, gives its edge little), or where it lies further beyond the organ's,
away from the surroundings', than they lie from it, within what the model's mask holds (the cortex of a vertebra
round its marrow: :data:`MASK_PERCENTILES`). Where the shell nearby reads as the organ itself (within
:data:`SPREAD_SD` of its attenuation: a model that fell short of it, or a neighbour of the same attenuation) the
median of the whole shell stands in. Voxels further from the boundary keep the model's answer: two organs of one
attenuation that touch (liver and inferior vena cava) are told apart by the model only.

Organs asked together are refined against each other (:class:`Neighbour`): where the band of one answer lies in
another's mask, the voxel goes to the organ whose attenuation (each measured in its own core) is nearer, and joins
this answer on a lower probability (:data:`GROWTH_PROBABILITY`), since the other answer vouches for it being an
organ's; two answers of one attenuation ("kidney" and "left kidney") are not told apart (:data:`COMPETING_SD`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .distances import DISTANCE_TIE_MM, at_most, padded_box, signed_distance

BAND_VOXELS = 1.2  # the band decided: a little more than one model voxel on either side of the model's boundary
CORE_MM = 5.0  # the organ's attenuation: the median of its mask at least this deep
RING_MM = (4.0, 10.0)  # its surroundings': this shell outside the mask ...
NEARBY_MM = 2.0  # ... read where it is nearest each voxel decided, averaged over the shell with this Gaussian sigma
SMOOTHING_MM = 1.0  # Gaussian sigma of the image read (noise down, edges kept)
SPREAD_SD = 2.0  # a hesitant voxel joins within this many robust SD of the organ's median ...
MIN_PROBABILITY = 0.3  # ... (or half the organ's contrast to its surroundings, if wider) when p exceeds this;
# a shell that close to the organ's median reads as the organ itself
LOW_PROBABILITY = 0.1  # a hesitant voxel within SPREAD_SD of the organ's median (no wider) joins from this p
MASK_PERCENTILES = (1.0, 99.0)  # the attenuation the model's mask holds: a voxel beyond the organ's, away from
# its surroundings, joins within this range (a vertebra's cortex round its marrow)
COMPETING_SD = 1.0  # another answer's organ competes for the band when its attenuation is this many robust SD away
GROWTH_PROBABILITY = 0.02  # a voxel of another answer's mask joins on this probability when nearer this organ's
CUBE = np.ones((3, 3, 3), bool)


@dataclass(frozen=True, eq=False)
class Neighbour:
    """Another answer asked together with the one refined: its organ's attenuation and its mask, on the CT grid."""

    attenuation: float
    mask: np.ndarray

    @classmethod
    def of(cls, probability: np.ndarray, hu: np.ndarray, spacing: Sequence[float], threshold: float
           ) -> Neighbour | None:
        """The answer ``probability > threshold`` with the attenuation of its core (as its own refinement measures
        it); None for an empty answer."""
        mask = probability > threshold
        if not mask.any():
            return None
        box = padded_box(mask, spacing, 4 * SMOOTHING_MM)  # the smoothing's reach (scipy truncates at 4 sigma)
        return cls(core_attenuation(smoothed(hu[box], spacing), mask[box], spacing)[0], mask)


def smoothed(hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The CT as the refinement reads it: a Gaussian of :data:`SMOOTHING_MM` (noise down, edges kept)."""
    return ndimage.gaussian_filter(hu.astype(np.float32), SMOOTHING_MM / np.asarray(spacing, float))


def core_attenuation(smooth: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                     distance: np.ndarray | None = None) -> tuple[float, float]:
    """Median and robust SD (scaled MAD) of ``smooth`` deeper than :data:`CORE_MM` in ``mask`` (all of a mask
    thinner than that); ``distance`` is the mask's :func:`signed_distance` when already at hand."""
    distance = signed_distance(mask, spacing) if distance is None else distance
    core = at_most(distance, -CORE_MM)
    values = smooth[core if core.any() else mask]
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def refine_by_attenuation(
    probability: np.ndarray,
    hu: np.ndarray,
    spacing: Sequence[float],
    threshold: float,
    model_spacing_mm: float,
    neighbours: Sequence[Neighbour] = (),
) -> np.ndarray:
    """``probability`` (a model's, on the grid of the CT ``hu`` with voxel ``spacing`` in mm; the model answered on
    an isotropic ``model_spacing_mm`` grid) with the boundary of its mask (``p > threshold``) decided by attenuation
    within ``BAND_VOXELS * model_spacing_mm`` of it (module docstring): a voxel of the band that leaves the
    mask gets probability 0, one that joins it 1, as a lesion grown by attenuation. Connected components
    (26-neighbourhood) that hold none of the model's mask beyond the band are dropped, so nothing is found that
    the model did not place. ``probability`` is changed in place (a whole-scan copy costs more than the
    refinement) and returned; an empty mask, or one without surroundings in the volume, is left as it was."""
    mask = probability > threshold
    if not mask.any():
        return probability
    band_mm = BAND_VOXELS * model_spacing_mm
    box = padded_box(mask, spacing, max(band_mm, RING_MM[1]) + 2 * SMOOTHING_MM)
    mask, prob = mask[box], probability[box]
    smooth = smoothed(hu[box], spacing)
    # mm, negative inside the mask; thresholds with a tie margin, so that a voxel exactly at one (a spacing's
    # multiple) is on the same side whatever the float rounding of the spacing (as read from another file format)
    distance = signed_distance(mask, spacing)
    ring = (distance > RING_MM[0] + DISTANCE_TIE_MM) & at_most(distance, RING_MM[1])
    if not ring.any():
        return probability
    organ, spread = core_attenuation(smooth, mask, spacing, distance)
    band = np.flatnonzero(at_most(np.abs(distance), band_mm))  # the voxels decided, as flat indices of the box
    values, inside, band_probability = smooth.ravel()[band], mask.ravel()[band], prob.ravel()[band]
    shell = float(np.median(smooth[ring]))
    surroundings = nearest_shell_value(smooth, ring, spacing, band)
    surroundings[np.abs(surroundings - organ) < SPREAD_SD * spread] = shell
    tolerance = np.maximum(SPREAD_SD * spread, np.abs(organ - surroundings) / 2)
    to_organ, to_surroundings = np.abs(values - organ), np.abs(values - surroundings)
    keeps = inside & (to_organ <= to_surroundings) & (to_organ <= np.abs(values - shell))
    strictly = to_organ <= SPREAD_SD * spread  # the organ's attenuation, not a partial volume with its surroundings
    # A hesitant voxel further beyond the organ's attenuation, away from the surroundings' (there and as a whole),
    # than they lie from it, within the range the mask holds: a vertebra's cortex round its marrow, never a clip
    # brighter than anything in the mask
    contrast = organ - surroundings
    lowest, highest = np.percentile(smooth[mask], MASK_PERCENTILES)
    beyond = (((values - organ) * contrast > 0) & ((values - organ) * (organ - shell) > 0)
              & (to_organ > np.abs(contrast)) & (values >= lowest) & (values <= highest))
    joins = (((band_probability > MIN_PROBABILITY) & ((to_organ <= tolerance) | beyond))
             | ((band_probability > LOW_PROBABILITY) & strictly)) & (to_organ <= to_surroundings)
    taken, given = np.zeros_like(inside), np.zeros_like(inside)
    may_join = (band_probability > GROWTH_PROBABILITY) & strictly  # from another's mask
    for other in neighbours:
        if abs(other.attenuation - organ) < COMPETING_SD * spread:
            continue  # the image cannot tell them apart: the model's answers stand
        theirs = other.mask[box].ravel()[band]
        to_theirs = np.abs(values - other.attenuation)
        taken |= theirs & (to_theirs < to_organ)
        given |= theirs & may_join & (to_organ < to_theirs)
    answer = mask.copy()
    answer.ravel()[band] = (keeps | joins | given) & ~taken
    anchors = mask.copy()  # the model's mask beyond the band
    anchors.ravel()[band] = False
    labels, n = ndimage.label(answer, CUBE)
    anchored = np.zeros(n + 1, bool)
    anchored[np.unique(labels[anchors])] = True
    anchored[0] = False
    if anchored.any():
        answer.ravel()[band] &= anchored[labels.ravel()[band]]
    prob[answer & ~mask] = 1.0  # a view of ``probability``
    prob[mask & ~answer] = 0.0
    return probability


def nearest_shell_value(image: np.ndarray, shell: np.ndarray, spacing: Sequence[float], at: np.ndarray) -> np.ndarray:
    """At each voxel ``at`` (flat indices), ``image`` at the ``shell`` voxel nearest to it, averaged over the shell
    (Gaussian, sigma :data:`NEARBY_MM`, normalized convolution: only the shell's voxels count). Read on every n-th
    voxel of the axes finer than :data:`NEARBY_MM` (a grid of about that step: as good, and several times cheaper
    on a fine CT), unless that grid misses the shell."""
    # The spacing rounded to 0.1 um: read back from another file format (float32) it gives the same grid, and the
    # same nearest voxel where two are equally near.
    spacing = np.round(np.asarray(spacing, float), 4)
    step = np.maximum(1, (NEARBY_MM // spacing).astype(int))
    grid = tuple(slice(None, None, int(n)) for n in step)
    if not shell[grid].any():
        step, grid = np.ones_like(step), (slice(None),) * shell.ndim
    voxels = tuple(axis // n for axis, n in zip(np.unravel_index(at, shell.shape), step))
    image, shell, spacing = image[grid], shell[grid], spacing * step
    sigma = NEARBY_MM / spacing
    weight = ndimage.gaussian_filter(shell.astype(np.float32), sigma)
    total = ndimage.gaussian_filter(np.where(shell, image, 0.0).astype(np.float32), sigma)
    nearest = ndimage.distance_transform_edt(~shell, sampling=spacing, return_distances=False, return_indices=True)
    flat = np.ravel_multi_index(tuple(axis[voxels] for axis in nearest), shell.shape)
    return total.ravel()[flat] / weight.ravel()[flat]
