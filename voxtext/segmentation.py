"""The result of a text-guided segmentation and its file formats (NIfTI + JSON, .seg.nrrd)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import slicerio

from .errors import InputError

# Distinct default colours (RGB 0..1) used when a prompt has no recommended colour.
PALETTE = [
    (0.86, 0.31, 0.27), (0.30, 0.69, 0.29), (0.22, 0.49, 0.72), (0.99, 0.75, 0.18), (0.60, 0.31, 0.64),
    (0.10, 0.74, 0.81), (1.00, 0.50, 0.05), (0.65, 0.34, 0.16), (0.97, 0.51, 0.75), (0.50, 0.50, 0.50),
]
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Segmentation:
    """Binary masks, one per prompt, on exactly the grid of the input volume.

    ``masks[p]`` answers ``prompts[p]``; label value ``p + 1`` in :meth:`labelmap` and the files.
    """

    masks: np.ndarray  # bool (P, i, j, k)
    prompts: list[str]
    affine: np.ndarray  # voxel -> RAS mm, the input volume's
    probabilities: np.ndarray | None = None  # float32 (P, i, j, k) when requested
    model: str = ""
    colors: list[tuple[float, float, float]] = field(default_factory=list)
    lesion_stage: dict[str, list[str]] = field(default_factory=dict)  # prompt -> organs it was sought in
    cautions: dict[str, str] = field(default_factory=dict)  # prompt -> why its (empty) answer may mislead
    refined: list[str] = field(default_factory=list)  # prompts whose boundaries were refined by attenuation (CT)

    def __post_init__(self) -> None:
        if self.masks.ndim != 4 or len(self.masks) != len(self.prompts):
            raise ValueError(f"masks {self.masks.shape} do not match {len(self.prompts)} prompts")
        if not self.colors:
            self.colors = [PALETTE[i % len(PALETTE)] for i in range(len(self.prompts))]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.masks.shape[1:])

    @property
    def voxel_volume_ml(self) -> float:
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def mask(self, prompt: str) -> np.ndarray:
        if prompt not in self.prompts:
            raise KeyError(f"no segment for prompt {prompt!r}; prompts are {self.prompts}")
        return self.masks[self.prompts.index(prompt)]

    def volumes_ml(self) -> dict[str, float]:
        return {p: float(m.sum()) * self.voxel_volume_ml for p, m in zip(self.prompts, self.masks)}

    def labelmap(self) -> np.ndarray:
        """One label map (value p+1 for prompt p); where masks overlap the later prompt wins."""
        dtype = np.uint8 if len(self.prompts) < 256 else np.uint16
        labels = np.zeros(self.shape, dtype=dtype)
        for i, m in enumerate(self.masks):
            labels[m] = i + 1
        return labels

    def label_table(self) -> dict[str, str]:
        return {str(i + 1): p for i, p in enumerate(self.prompts)}

    def save(self, path: str | Path) -> list[Path]:
        """Write by suffix: ``.nii``/``.nii.gz`` (label map + ``.json`` sidecar) or ``.seg.nrrd``."""
        path = Path(path)
        name = path.name.lower()
        if name.endswith(".seg.nrrd"):
            return [self.save_seg_nrrd(path)]
        if name.endswith((".nii", ".nii.gz")):
            return self.save_nifti(path)
        raise InputError(f"unsupported output format {path.name!r}: use .nii.gz, .nii or .seg.nrrd")

    def save_nifti(self, path: Path) -> list[Path]:
        nib.save(nib.Nifti1Image(self.labelmap(), self.affine), str(path))
        sidecar = path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".json")
        sidecar.write_text(json.dumps({"labels": self.label_table(), "model": self.model,
                                       "volumes_ml": self.volumes_ml(),
                                       "lesion_stage": self.lesion_stage, "cautions": self.cautions,
                                       "refined_by_attenuation": self.refined}, indent=2))
        return [path, sidecar]

    def save_seg_nrrd(self, path: Path) -> Path:
        """Slicer segmentation file with named, coloured segments; overlapping masks go to extra layers."""
        seg = slicerio.create_segmentation(self.shape, RAS_TO_LPS @ self.affine)
        for i, (prompt, mask) in enumerate(zip(self.prompts, self.masks)):
            slicerio.add_segment(seg, mask, {"id": f"Segment_{i + 1}", "name": prompt, "color": list(self.colors[i])})
        slicerio.write_segmentation(str(path), seg)
        return path
