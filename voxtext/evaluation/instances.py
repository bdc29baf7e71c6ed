"""Instance F1 with the CVPR BiomedSegFM matching (connected components, Hungarian matching at IoU 0.5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import relabel_sequential


@dataclass(frozen=True)
class InstanceScore:
    f1: float
    dsc_tp: float  # mean Dice of the matched (true positive) pairs
    true_positives: int
    predicted: int
    reference: int


def connected_components(mask: np.ndarray) -> np.ndarray:
    """Instances of a binary mask: 6-connected components labelled 1..n."""
    labels, _ = ndimage.label(np.asarray(mask, bool))
    return labels


def instance_f1(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> InstanceScore:
    """Match predicted and reference instance maps (0 = background) one to one.

    Both are relabelled 1..n; the Hungarian assignment minimises ``-(IoU >= t) - IoU / (2 n_min)``
    (as many matches above the threshold as possible, then the highest IoU); matched pairs with
    IoU >= t are true positives. F1 = 2PR / (P + R); F1 = DSC_TP = 1 when both maps are empty.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and reference {gt.shape} differ in shape")
    pred, _, _ = relabel_sequential(np.asarray(pred, np.int64))
    gt, _, _ = relabel_sequential(np.asarray(gt, np.int64))
    n_pred, n_gt = int(pred.max()), int(gt.max())
    if n_pred == 0 or n_gt == 0:
        both_empty = float(n_pred == n_gt)
        return InstanceScore(both_empty, both_empty, 0, n_pred, n_gt)
    # Overlap counts of every (reference, prediction) pair, background row/column included.
    pairs = np.bincount(gt.ravel() * (n_pred + 1) + pred.ravel(), minlength=(n_gt + 1) * (n_pred + 1))
    overlap = pairs.reshape(n_gt + 1, n_pred + 1)
    sizes_gt, sizes_pred = overlap.sum(axis=1)[1:], overlap.sum(axis=0)[1:]
    intersection = overlap[1:, 1:].astype(np.float64)
    iou = intersection / (sizes_gt[:, None] + sizes_pred[None, :] - intersection)
    cost = -(iou >= iou_threshold).astype(np.float64) - iou / (2 * min(n_pred, n_gt))
    rows, cols = linear_sum_assignment(cost)
    matched = iou[rows, cols] >= iou_threshold
    tp = int(matched.sum())
    if tp == 0:
        return InstanceScore(0.0, 0.0, 0, n_pred, n_gt)
    precision, recall = tp / n_pred, tp / n_gt
    r, c = rows[matched], cols[matched]
    dsc_tp = float(np.mean(2 * intersection[r, c] / (sizes_gt[r] + sizes_pred[c])))
    return InstanceScore(2 * precision * recall / (precision + recall), dsc_tp, tp, n_pred, n_gt)
