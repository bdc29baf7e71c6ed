"""Procedural abdominal CT phantoms with labels, prompt phrasings, findings, a report and Q/A pairs.

Every case is deterministic in its seed. Anatomy is built from rotated ellipsoids in patient
coordinates (RAS+, millimetres: +x patient right, +y anterior, +z superior), so laterality is
exact: the liver and right kidney lie at +x of the spine, the spleen, stomach and left kidney at -x.
Organ targets include the lesions inside them (a "liver" prompt covers liver cysts and tumours),
as in clinical datasets; see :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS: dict[str, int] = {
    "liver": 1, "spleen": 2, "stomach": 3, "pancreas": 4, "right kidney": 5, "left kidney": 6, "aorta": 7,
    "inferior vena cava": 8, "vertebrae": 9, "lungs": 10, "urinary bladder": 11,
    "liver cyst": 20, "liver tumor": 21, "right kidney cyst": 22, "left kidney cyst": 23,
    "right kidney stone": 24, "left kidney stone": 25,
}

# Prompt phrasings (first = plain name) and the label values each target covers.
TARGETS: list[tuple[tuple[str, ...], tuple[int, ...]]] = [
    (("liver", "hepatic parenchyma", "the liver", "Liver in abdominal CT", "liver including lesions"), (1, 20, 21)),
    (("spleen", "splenic parenchyma", "Spleen in abdominal CT", "the spleen"), (2,)),
    (("stomach", "gastric lumen and wall", "Stomach in abdominal CT"), (3,)),
    (("pancreas", "pancreatic gland", "Pancreas in abdominal CT"), (4,)),
    (("right kidney", "kidney on the right side", "right renal parenchyma", "Right kidney in abdominal CT"),
     (5, 22, 24)),
    (("left kidney", "kidney on the left side", "left renal parenchyma", "Left kidney in abdominal CT"),
     (6, 23, 25)),
    (("aorta", "abdominal aorta", "Aorta in abdominal CT"), (7,)),
    (("inferior vena cava", "IVC", "Inferior vena cava in abdominal CT"), (8,)),
    (("vertebrae", "spine", "vertebral bodies", "lumbar spine"), (9,)),
    (("lungs", "lung bases", "Lungs in CT"), (10,)),
    (("urinary bladder", "bladder", "Urinary bladder in CT"), (11,)),
    (("liver lesion", "hepatic lesion", "liver lesions", "focal liver lesion"), (20, 21)),
    (("liver tumor", "liver tumour", "hepatic tumor", "liver mass", "Liver tumor in abdominal CT"), (21,)),
    (("liver cyst", "hepatic cyst", "cystic liver lesion"), (20,)),
    (("kidney cyst", "renal cyst", "cystic kidney lesion"), (22, 23)),
    (("right kidney cyst", "cyst of the right kidney"), (22,)),
    (("left kidney cyst", "cyst of the left kidney"), (23,)),
    (("kidney stone", "renal calculus", "nephrolithiasis", "kidney stones"), (24, 25)),
    (("right kidney stone", "stone in the right kidney"), (24,)),
    (("left kidney stone", "stone in the left kidney"), (25,)),
]

PHASES = ("unenhanced", "arterial", "portal venous")
PHASE_QUESTION = "What is the contrast phase of this CT?"
# Attenuation (HU) per phase: unenhanced, arterial, portal venous.
HU = {
    "fat": (-100, -100, -100), "muscle": (50, 55, 60), "liver": (58, 70, 110), "spleen": (48, 120, 115),
    "pancreas": (42, 110, 90), "kidney": (32, 180, 160), "aorta": (40, 300, 150), "ivc": (40, 80, 140),
    "stomach_wall": (40, 70, 80), "bladder": (8, 8, 10),
}


@dataclass
class PhantomCase:
    image: np.ndarray  # int16 HU, axes (i, j, k)
    labels: np.ndarray  # uint8, same shape
    affine: np.ndarray  # voxel -> RAS mm
    structures: dict[int, list[str]]  # label value -> phrasings (first: plain name), present labels only
    findings: list[dict]
    report: str
    qa: list[dict]
    seed: int
    phase: str = ""
    targets: list[tuple[tuple[str, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def target_mask(self, name: str) -> np.ndarray:
        """Mask of a target by its plain name, e.g. ``"liver"`` (liver + its lesions)."""
        for phrasings, values in TARGETS:
            if phrasings[0] == name:
                return np.isin(self.labels, values)
        raise KeyError(name)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(self.image, self.affine), str(folder / "image.nii.gz"))
        nib.save(nib.Nifti1Image(self.labels, self.affine), str(folder / "labels.nii.gz"))
        meta = {"seed": self.seed, "phase": self.phase, "spacing": list(self.spacing),
                "structures": {str(k): v for k, v in self.structures.items()},
                "findings": self.findings, "report": self.report, "qa": self.qa}
        (folder / "case.json").write_text(json.dumps(meta, indent=2))


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Canvas:
    """Image and label arrays with a voxel <-> world mapping; shapes are painted in their bounding box."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], hu_background: float) -> None:
        self.shape, self.spacing = shape, np.asarray(spacing, float)
        # Axis i runs to the patient's left and j posterior (as DICOM-derived volumes), k superior.
        self.affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        self.affine[:3, 3] = -self.affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
        self.image = np.full(shape, hu_background, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        return (np.asarray(xyz) - self.affine[:3, 3]) / np.diag(self.affine)[:3]

    def ellipsoid(self, centre, radii, rotation=None, within: np.ndarray | None = None):
        """(slices, mask) of a rotated ellipsoid, restricted to its bounding box in the volume."""
        centre, radii = np.asarray(centre, float), np.asarray(radii, float)
        reach = np.full(3, radii.max())
        lo = np.floor(np.minimum(self.world_to_index(centre - reach), self.world_to_index(centre + reach))).astype(int)
        hi = np.ceil(np.maximum(self.world_to_index(centre - reach), self.world_to_index(centre + reach))).astype(int) + 1
        lo, hi = np.clip(lo, 0, self.shape), np.clip(hi, 0, self.shape)
        if np.any(hi <= lo):
            return None, None
        slices = tuple(slice(a, b) for a, b in zip(lo, hi))
        axes = [self.affine[d, d] * np.arange(lo[d], hi[d]) + self.affine[d, 3] - centre[d] for d in range(3)]
        x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
        rot = np.eye(3) if rotation is None else rotation.T
        u = (rot[0, 0] * x + rot[0, 1] * y + rot[0, 2] * z) / radii[0]
        v = (rot[1, 0] * x + rot[1, 1] * y + rot[1, 2] * z) / radii[1]
        w = (rot[2, 0] * x + rot[2, 1] * y + rot[2, 2] * z) / radii[2]
        mask = u * u + v * v + w * w <= 1.0
        if within is not None:
            mask &= within[slices]
        return slices, mask

    def paint(self, centre, radii, hu: float, label: int = 0, rotation=None, within=None,
              min_voxels: int = 1) -> np.ndarray:
        """Paint an ellipsoid unless it covers fewer than ``min_voxels``; returns its full-volume mask (painted)."""
        slices, mask = self.ellipsoid(centre, radii, rotation, within)
        full = np.zeros(self.shape, dtype=bool)
        if slices is None or mask.sum() < min_voxels:
            return full
        self.image[slices][mask] = hu
        if label:
            self.labels[slices][mask] = label
        full[slices] = mask
        return full


def _pick_inside(mask: np.ndarray, canvas: _Canvas, rng: np.random.Generator, margin_mm: float) -> np.ndarray | None:
    """World position of a random voxel of ``mask`` at least ``margin_mm`` from its border (approx.)."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=max(1, int(margin_mm / canvas.spacing.min())))
    idx = np.argwhere(inner if inner.any() else mask)
    if len(idx) == 0:
        return None
    ijk = idx[rng.integers(len(idx))]
    return canvas.affine[:3, :3] @ ijk + canvas.affine[:3, 3]


def generate_phantom(
    seed: int,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    lesions: bool | float = 0.5,
    phase: str | None = None,
) -> PhantomCase:
    """One abdominal CT phantom. ``lesions``: probability of each lesion type (True = 1, False = 0)."""
    rng = np.random.default_rng(seed)
    fov, length = rng.uniform(340, 420), rng.uniform(200, 320)
    if spacing is None and shape is not None:  # a given size covers the whole field of view
        spacing = (fov / shape[0], fov / shape[1], length / shape[2])
    spacing = spacing or (float(rng.uniform(0.6, 1.0)),) * 2 + (float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 5.0])),)
    shape = shape or (int(fov / spacing[0]), int(fov / spacing[1]), int(length / spacing[2]))
    phase = phase or str(rng.choice(PHASES))
    p = PHASES.index(phase)
    prob = float(lesions)
    canvas = _Canvas(shape, spacing, -1000.0)
    half_z = (shape[2] - 1) * spacing[2] / 2.0
    z_top = half_z - rng.uniform(0, 40)  # superior end of the anatomy window (lung bases)

    # Body, fat, muscle wall and abdominal cavity (elliptic cylinders with a gentle taper).
    a, b = rng.uniform(140, 185), rng.uniform(100, 135)
    body = canvas.paint((0, 0, 0), (a, b, 2 * length), HU["fat"][p])
    wall = rng.uniform(12, 30)
    canvas.paint((0, 0, 0), (a - wall, b - wall, 2 * length), HU["muscle"][p], within=body)
    cavity = canvas.paint((0, 0, 0), (a - wall - 8, b - wall - 8, 2 * length), HU["fat"][p] + 60, within=body)

    spine_y = -b + wall + rng.uniform(30, 40)
    shift = rng.normal(0, 6, 3) * (1, 1, 0)  # patient-to-patient organ displacement
    organs: dict[str, np.ndarray] = {}

    def organ(name: str, centre, radii, hu: float, max_rot: float = 12.0) -> np.ndarray:
        scale = rng.uniform(0.85, 1.15)
        mask = canvas.paint(np.asarray(centre) + shift, np.asarray(radii) * scale, hu, LABELS[name],
                            _rotation(rng, max_rot), within=cavity)
        organs[name] = mask
        return mask

    liver_z = z_top - rng.uniform(70, 90)
    kidney_z = liver_z - rng.uniform(40, 60)
    organ("liver", (0.45 * a, 5, liver_z), (0.55 * a, 0.75 * b, 85), HU["liver"][p], 10)
    organ("spleen", (-0.6 * a, spine_y + 35, liver_z + 5), (28, 48, 55), HU["spleen"][p])
    organ("stomach", (-0.3 * a, 0.35 * b, liver_z + 10), (45, 35, 50), HU["stomach_wall"][p])
    canvas.paint((-0.3 * a + shift[0], 0.35 * b + 25 + shift[1], liver_z + 30), (30, 12, 20), -900,
                 within=organs["stomach"])  # gastric air, still labelled stomach
    organ("pancreas", (-0.05 * a, spine_y + 55, kidney_z + 30), (65, 12, 12), HU["pancreas"][p], 8)
    organ("right kidney", (rng.uniform(58, 75), spine_y + 10, kidney_z - 15), (26, 30, 55), HU["kidney"][p])
    organ("left kidney", (-rng.uniform(58, 75), spine_y + 10, kidney_z), (26, 30, 55), HU["kidney"][p])
    organ("aorta", (-12, spine_y + 32, 0), (rng.uniform(9, 13),) * 2 + (2 * length,), HU["aorta"][p], 3)
    organ("inferior vena cava", (22, spine_y + 30, 0), (13, 10, 2 * length), HU["ivc"][p], 3)
    # Vertebral bodies: a column of cancellous bone with a cortical shell and soft discs.
    vertebrae = canvas.paint((0, spine_y, 0), (22, 18, 2 * length), 700, LABELS["vertebrae"])
    canvas.paint((0, spine_y, 0), (19, 15, 2 * length), 250, within=vertebrae)
    for z in np.arange(-half_z, half_z, 32.0) + rng.uniform(0, 32):
        disc = canvas.paint((0, spine_y, z), (23, 19, 4), 80, within=vertebrae)
        canvas.labels[disc] = 0
    for side in (1, -1):  # lung bases above the liver dome
        canvas.paint((side * 0.5 * a, -10, z_top + 60), (0.4 * a, 0.7 * b, 85), -850, LABELS["lungs"], within=body)
    organ("urinary bladder", (0, 0.3 * b, -half_z + rng.uniform(10, 60)), (45, 38, 35), HU["bladder"][p], 5)
    organs = {k: canvas.labels == v for k, v in LABELS.items() if v < 20}  # after overlaps are resolved

    findings = _add_lesions(canvas, organs, rng, prob, p)
    canvas.image += rng.normal(0.0, rng.uniform(4, 18), shape).astype(np.float32)
    image = np.clip(canvas.image, -1024, 3071).astype(np.int16)
    present = set(np.unique(canvas.labels).tolist())
    structures = {v: _phrasings(k) for k, v in LABELS.items() if v in present}
    case = PhantomCase(image, canvas.labels, canvas.affine, structures, findings, "", [], seed, phase,
                       [t for t in TARGETS if present.intersection(t[1])])
    case.report = write_report(case)
    case.qa = write_qa(case, rng)
    return case


def _phrasings(name: str) -> list[str]:
    for phrasings, values in TARGETS:
        if phrasings[0] == name:
            return list(phrasings)
    return [name]


def _add_lesions(canvas: _Canvas, organs: dict, rng: np.random.Generator, prob: float, p: int) -> list[dict]:
    findings = []
    voxel_ml = float(np.prod(canvas.spacing)) / 1000.0

    def lesion(kind: str, organ_name: str, label_name: str, radius_range, hu: float, side: str | None):
        organ_mask = organs[organ_name]
        if not organ_mask.any():
            return
        radius = rng.uniform(*radius_range)
        centre = _pick_inside(organ_mask, canvas, rng, radius)
        if centre is None:
            return
        radii = radius * rng.uniform(0.8, 1.2, 3) if kind == "tumor" else np.full(3, radius)
        # A lesion of one voxel at this spacing is neither painted nor reported: labels and findings agree.
        mask = canvas.paint(centre, radii, hu, LABELS[label_name], _rotation(rng, 45), within=organ_mask, min_voxels=2)
        if not mask.any():
            return
        findings.append({
            "type": kind, "organ": organ_name.split()[-1], "side": side, "label": LABELS[label_name],
            "location": _location(canvas, organ_mask, centre, organ_name),
            "diameter_mm": round(float(2 * radii.max()), 1), "volume_ml": round(float(mask.sum()) * voxel_ml, 2),
        })

    if rng.random() < prob:
        lesion("cyst", "liver", "liver cyst", (5, 18), rng.uniform(0, 12), None)
    if rng.random() < prob:
        hu = rng.choice([HU["liver"][p] - 40, HU["liver"][p] + 50]) if p else HU["liver"][p] - 25
        lesion("tumor", "liver", "liver tumor", (8, 25), hu, None)
    for side in ("right", "left"):
        if rng.random() < prob / 2:
            lesion("cyst", f"{side} kidney", f"{side} kidney cyst", (5, 15), rng.uniform(0, 12), side)
        if rng.random() < prob / 2:
            lesion("stone", f"{side} kidney", f"{side} kidney stone", (2, 5), rng.uniform(500, 1000), side)
    return findings


def _location(canvas: _Canvas, organ_mask: np.ndarray, centre: np.ndarray, organ_name: str) -> str:
    zs = canvas.affine[2, 2] * np.argwhere(organ_mask)[:, 2] + canvas.affine[2, 3]
    frac = (centre[2] - zs.min()) / max(np.ptp(zs), 1e-6)
    if "kidney" in organ_name:
        return "upper pole" if frac > 0.66 else "lower pole" if frac < 0.33 else "interpolar region"
    return "right lobe dome" if frac > 0.66 else "inferior right lobe" if frac < 0.33 else "right lobe"


def _describe(f: dict) -> str:
    organ = f"{f['side']} kidney" if f["side"] else f["organ"]
    kind = {"cyst": "simple cyst", "tumor": "solid mass", "stone": "calculus"}[f["type"]]
    return f"{f['diameter_mm']:.0f} mm {kind} in the {f['location']} of the {organ}"


def write_report(case: PhantomCase) -> str:
    """Templated FINDINGS / IMPRESSION report from the ground-truth findings."""
    by_organ: dict[str, list[dict]] = {}
    for f in case.findings:
        by_organ.setdefault(f"{f['side']} kidney" if f["side"] else f["organ"], []).append(f)
    lines = [f"TECHNIQUE: CT of the abdomen, {case.phase} phase.", "", "FINDINGS:"]
    for organ in ("liver", "spleen", "pancreas", "right kidney", "left kidney"):
        items = by_organ.get(organ)
        if items:
            lines.append(f"{organ.capitalize()}: " + "; ".join(_describe(f) for f in items) + ".")
        else:
            lines.append(f"{organ.capitalize()}: normal size and attenuation, no focal lesion.")
    lines.append("Aorta and inferior vena cava: normal calibre.")
    lines += ["", "IMPRESSION:"]
    lines += [f"- {_describe(f).capitalize()}." for f in case.findings] or ["- No acute abnormality."]
    return "\n".join(lines)


def write_qa(case: PhantomCase, rng: np.random.Generator) -> list[dict]:
    """Open and closed (A-D) question/answer pairs consistent with the findings."""
    qa = []
    stones = [f for f in case.findings if f["type"] == "stone"]
    liver = [f for f in case.findings if f["organ"] == "liver"]
    qa.append(_closed("Is there a kidney stone?", "yes" if stones else "no", ["yes", "no"], rng))
    qa.append(_closed("Is there a focal liver lesion?", "yes" if liver else "no", ["yes", "no"], rng))
    if stones:
        sides = sorted({f["side"] for f in stones})
        answer = "both" if len(sides) == 2 else sides[0]
        qa.append(_closed("Which kidney contains the stone?", answer, ["left", "right", "both", "neither"], rng))
    for f in case.findings:
        qa.append({"question": f"How large is the {f['type']} in the {f['side'] + ' ' if f['side'] else ''}{f['organ']}?",
                   "answer": f"About {f['diameter_mm']:.0f} mm.", "type": "open"})
    qa.append({"question": PHASE_QUESTION, "answer": case.phase, "type": "open"})
    return qa


def _closed(question: str, answer: str, options: list[str], rng: np.random.Generator) -> dict:
    options = list(options) + [o for o in ("uncertain", "not assessable") if len(options) < 4 and o not in options]
    options = options[:4]
    order = rng.permutation(len(options))
    choices = [options[i] for i in order]
    letter = "ABCD"[choices.index(answer)]
    return {"question": question, "answer": answer, "type": "closed", "choices": choices, "answer_choice": letter}


def main_phantom(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxtext phantom", description="Write a procedural abdominal CT phantom.")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True, help="folder for image.nii.gz, labels.nii.gz, case.json")
    parser.add_argument("--shape", type=int, nargs=3, default=None)
    parser.add_argument("--spacing", type=float, nargs=3, default=None)
    parser.add_argument("--lesions", type=float, default=0.5, help="probability of each lesion type")
    args = parser.parse_args(argv)
    case = generate_phantom(args.seed, tuple(args.shape) if args.shape else None,
                            tuple(args.spacing) if args.spacing else None, args.lesions)
    case.save(args.out)
    print(f"wrote {args.out}: shape {case.image.shape}, spacing {tuple(round(s, 2) for s in case.spacing)}, "
          f"{len(case.structures)} structures, {len(case.findings)} findings")
    return 0
