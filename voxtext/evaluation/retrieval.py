"""Image-text retrieval recall, as the Med3DVLM reference evaluates DCFormer_SigLIP (``eval_clip.py``)."""

from __future__ import annotations

from collections.abc import Sequence

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
