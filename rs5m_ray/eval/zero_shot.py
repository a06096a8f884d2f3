"""Zero-shot classification: class vectors from a protocol's templates, top-K accuracy, per-class
accuracy and the confusion matrix (notes §5.1)."""
from __future__ import annotations

import numpy as np
import torch

from rs5m_ray.eval.protocols import ZeroShotProtocol
from rs5m_ray.models.clip import ClipModel


def class_vectors(clip: ClipModel, class_names: list[str], protocol: ZeroShotProtocol) -> torch.Tensor:
    """[C, D] unit class vectors: the mean of each class's prompt embeddings (raw or each normalised
    first, per the protocol), normalised."""
    out = []
    for name in class_names:
        features = clip.encode_texts(protocol.prompts(name), normalize=protocol.averaging == "normalized")
        mean = features.mean(dim=0)
        out.append(mean / mean.norm())
    return torch.stack(out)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                           top_k: tuple[int, ...] = (1, 5)) -> dict:
    """Top-K accuracy (%), per-class top-1 accuracy (%) and the confusion matrix (rows = true class).
    Top-K follows torch.topk's order, as RS5M's and CLIP_benchmark's accuracy do."""
    n, c = logits.shape
    ranked = torch.from_numpy(logits).topk(min(max(top_k), c), dim=1).indices.numpy()
    hits = ranked == labels[:, None]
    predicted = ranked[:, 0]
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    per_class = {name: (100.0 * confusion[i, i] / support[i]) if support[i] else None
                 for i, name in enumerate(class_names)}
    return {**{f"top{k}": 100.0 * float(hits[:, :k].any(axis=1).mean()) if n else None for k in top_k if k <= c},
            "per_class_top1": per_class, "confusion": confusion.tolist(), "classes": list(class_names),
            "images": int(n), "chance": 100.0 / c}


def zero_shot(image_vectors: np.ndarray, labels: np.ndarray, clip: ClipModel, class_names: list[str],
              protocol: ZeroShotProtocol) -> dict:
    """Metrics of images (unit rows) against the protocol's class vectors; logits = scale * cos."""
    weights = class_vectors(clip, class_names, protocol).numpy()
    logits = protocol.logit_scale * (image_vectors.astype(np.float32) @ weights.T)
    return classification_metrics(logits, labels, class_names, protocol.top_k)
