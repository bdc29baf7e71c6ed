"""Image-text retrieval recall, as the Med3DVLM reference evaluates DCFormer_SigLIP (``eval_clip.py``)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in both directions for paired items (the match of row i is column i).

    ``similarity[i, j]`` scores image i against text j (e.g. cosine similarity). ``image_to_text@k``
    (the reference's IR_k) is the fraction of images whose own text ranks in the top k of its row;
    ``text_to_image@k`` (TR_k) the same over columns. The rank is the number of strictly better
    candidates, so ties count in the query's favour. As in the reference only the diagonal is a hit:
    duplicated report texts count as misses.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"need a square similarity matrix of paired items, got shape {tuple(similarity.shape)}")
    result = {}
    for name, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        rank = (scores > scores.diagonal()[:, None]).sum(dim=1)
        for k in ks:
            result[f"{name}@{k}"] = float((rank < k).float().mean())
    return result


def similarity_matrix(model: str | Path, pairs: Sequence[tuple[Path, str]], device: str = "auto",
                      precision: str = "fp32", progress: Callable[[str], None] | None = None) -> torch.Tensor:
    """Cosine similarities ``(N, N)`` of the images and texts of ``pairs`` under a DCFormer_SigLIP model
    (images prepared as for zero-shot findings, texts truncated at the encoder's limit, one at a time)."""
    from ..findings import FindingsRanker

    ranker = FindingsRanker(model, device=device, precision=precision)
    images, texts = [], []
    with torch.no_grad():
        for index, (image, text) in enumerate(pairs, 1):
            images.append(ranker.model.encode_image(ranker.prepare(image)).float().cpu())
            texts.append(ranker.encode_findings([text]).float().cpu())
            if progress:
                progress(f"{index}/{len(pairs)} encoded")
    return torch.cat(images) @ torch.cat(texts).T


def recall_table(similarity: torch.Tensor, sizes: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> list[dict]:
    """Recall on the first N pairs for each N in ``sizes`` (larger than the data: all of it), as the reference's
    prefixes of the test list; columns ``IR@k`` (image queries) and ``TR@k`` (text queries)."""
    total = similarity.shape[0]
    rows = []
    for n in sorted({min(int(s), total) for s in sizes if int(s) > 0}):
        recall = recall_at_k(similarity[:n, :n], ks)
        rows.append({"N": n, **{f"IR@{k}": recall[f"image_to_text@{k}"] for k in ks},
                     **{f"TR@{k}": recall[f"text_to_image@{k}"] for k in ks}})
    return rows


def evaluate_retrieval(model: str | Path, pairs: Sequence[tuple[Path, str]], sizes: Sequence[int], out: Path,
                       device: str = "auto", precision: str = "fp32",
                       progress: Callable[[str], None] | None = None) -> list[Path]:
    """``retrieval.csv`` and ``summary.md`` in ``out``: recall@1/5/10 both ways for each test size."""
    if len(pairs) < 2:
        raise ValueError("retrieval needs at least two image-text pairs")
    table = recall_table(similarity_matrix(model, pairs, device, precision, progress), sizes)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(table[0])
    csv_path = out / "retrieval.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[row["N"], *(f"{row[c]:.6f}" for c in columns[1:])] for row in table])
    lines = [f"# Image-text retrieval ({model})", "", "Recall (%) of the paired item in the top k; only the pair "
             "itself counts (duplicated report texts count as misses, as in the reference).", "",
             "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join([str(row["N"]), *(f"{100 * row[c]:.2f}" for c in columns[1:])]) + " |"
              for row in table]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return [csv_path, summary]
