"""Evaluation outputs: per-case-per-class CSV, per-class Markdown summary and a box plot."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from .segmentation_eval import ClassScore

CSV_NAME, SUMMARY_NAME, PLOT_NAME = "metrics.csv", "summary.md", "boxplot.png"
COLUMNS = [f.name for f in fields(ClassScore)]


def write_csv(scores: Sequence[ClassScore], path: Path) -> Path:
    """One row per case and class; ``f1`` and ``dsc_tp`` are blank for semantic classes."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for score in scores:
            writer.writerow(["" if v is None else f"{v:.6f}" if isinstance(v, float) else v
                             for v in (getattr(score, c) for c in COLUMNS)])
    return path


def metric_names(scores: Sequence[ClassScore]) -> list[str]:
    return ["dsc", "nsd"] + (["f1", "dsc_tp"] if any(s.f1 is not None for s in scores) else [])


def mean_sd(values: Sequence[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{float(np.mean(values)):.4f} ± {sd:.4f}"


def summary_markdown(scores: Sequence[ClassScore]) -> str:
    """Mean ± sd (sample) per class, and of the case scores (each the mean over its classes)."""
    metrics = metric_names(scores)
    classes = {(s.label, s.name) for s in scores}
    header = "| class | cases | " + " | ".join(m.upper().replace("_", " ") for m in metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for label, name in sorted(classes):
        rows = [s for s in scores if s.label == label]
        lines.append(f"| {label} {name} | {len(rows)} | "
                     + " | ".join(mean_sd([getattr(s, m) for s in rows]) for m in metrics) + " |")
    cases = sorted({s.case for s in scores})
    per_case = {m: [np.mean([getattr(s, m) for s in scores if s.case == c]) for c in cases] for m in metrics}
    lines.append(f"| **all classes** (case means) | {len(cases)} | "
                 + " | ".join(mean_sd(per_case[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def box_plot(scores: Sequence[ClassScore], path: Path) -> Path:
    """One panel per metric, one box per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_names(scores)
    classes = sorted({(s.label, s.name) for s in scores})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3 + 1.2 * len(classes) * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        axis.boxplot([[getattr(s, metric) for s in scores if s.label == label] for label, _ in classes])
        axis.set_xticks(range(1, len(classes) + 1), [name for _, name in classes], rotation=30, ha="right")
        axis.set_title(metric.upper().replace("_", " "))
        axis.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(scores: Sequence[ClassScore], out_dir: Path) -> list[Path]:
    """``metrics.csv``, ``summary.md`` and ``boxplot.png`` in ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / SUMMARY_NAME
    summary.write_text(summary_markdown(scores))
    return [write_csv(scores, out_dir / CSV_NAME), summary, box_plot(scores, out_dir / PLOT_NAME)]
