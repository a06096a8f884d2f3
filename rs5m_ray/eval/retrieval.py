"""Cross-modal retrieval: R@K image->text and text->image, mean recalls (notes §5.2).

Image->text: an image is found at K when any of its captions ranks in its top K. Text->image: a
caption is found when its image does. This is CLIP_benchmark's `recall_at_k(...) > 0` (which RS5M
copied); ties are ranked by the protocol's rule instead of torch.topk's unspecified order.
"""
from __future__ import annotations

import numpy as np

from rs5m_ray.eval.protocols import RetrievalProtocol

BLOCK = 1024  # query rows scored at a time: memory stays ~BLOCK x gallery


def best_positive_ranks(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query (row): the 1-based rank of its best-scoring positive when every tied negative
    ranks before it (pessimistic) and after it (optimistic)."""
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    negative = ~positive
    above = ((scores > best) & negative).sum(axis=1)
    tied = ((scores == best) & negative).sum(axis=1)
    return 1 + above + tied, 1 + above


def recalls(query: np.ndarray, gallery: np.ndarray, query_item: np.ndarray, gallery_item: np.ndarray,
            ks: tuple[int, ...], ties: str) -> tuple[dict[int, float], dict[int, int]]:
    """R@K (%) of queries whose positive (same item id) ranks within K by cosine, and per K how many
    queries the tie rule decided (found one way, missed the other)."""
    hits = {k: 0 for k in ks}
    decided = {k: 0 for k in ks}
    for start in range(0, len(query), BLOCK):
        scores = query[start:start + BLOCK] @ gallery.T
        positive = query_item[start:start + BLOCK, None] == gallery_item[None, :]
        pessimistic, optimistic = best_positive_ranks(scores, positive)
        ranks = pessimistic if ties == "pessimistic" else optimistic
        for k in ks:
            hits[k] += int((ranks <= k).sum())
            decided[k] += int(((pessimistic > k) & (optimistic <= k)).sum())
    n = max(len(query), 1)
    return {k: 100.0 * hits[k] / n for k in ks}, decided


def retrieval(image_vectors: np.ndarray, text_vectors: np.ndarray, caption_image: np.ndarray,
              protocol: RetrievalProtocol) -> dict:
    """R@K both ways, mR (mean of all), per-direction means, and the tie counts."""
    images = np.arange(len(image_vectors))
    i2t, i2t_ties = recalls(image_vectors, text_vectors, images, caption_image, protocol.ks, protocol.ties)
    t2i, t2i_ties = recalls(text_vectors, image_vectors, caption_image, images, protocol.ks, protocol.ties)
    out = {"image_to_text": {f"R@{k}": v for k, v in i2t.items()},
           "text_to_image": {f"R@{k}": v for k, v in t2i.items()}}
    out["mR"] = float(np.mean(list(i2t.values()) + list(t2i.values())))
    out["mR_image_to_text"] = float(np.mean(list(i2t.values())))
    out["mR_text_to_image"] = float(np.mean(list(t2i.values())))
    out["queries_decided_by_ties"] = {"image_to_text": {f"R@{k}": v for k, v in i2t_ties.items()},
                                      "text_to_image": {f"R@{k}": v for k, v in t2i_ties.items()}}
    out["images"], out["captions"] = int(len(image_vectors)), int(len(text_vectors))
    return out
