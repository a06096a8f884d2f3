"""RS-detector evaluation: accuracy and ROC-AUC of a detector checkpoint on labelled folders, scored
by the scoring stage itself (`ClipScore`: the same decode, CLIP embedding and head as a pub11 run)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from rs5m_ray.config import ScoringConfig
from rs5m_ray.eval.datasets import DetectorSet
from rs5m_ray.ledger import DROP_REASON
from rs5m_ray.stages.rs_detector import load_detector
from rs5m_ray.storage import Storage


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney estimate with ties counted half (tied scores share their average rank)."""
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy at P(RS) >= 0.5 and ROC-AUC."""
    return {"accuracy": float(((probs >= 0.5) == (labels == 1)).mean()), "roc_auc": roc_auc(labels, probs),
            "n": int(len(labels)), "n_positive": int(labels.sum())}


def evaluate_detector(checkpoint: str, dataset: DetectorSet, scoring: ScoringConfig,
                      storage: Storage | None = None) -> dict:
    """The checkpoint's metrics on `dataset`; a clip_head detector runs on the CLIP model it was trained on."""
    from rs5m_ray.stages.clip_score import ClipScore  # the scoring stage (imports Ray Data): only when scoring

    storage = storage or Storage()
    meta = load_detector(checkpoint, storage).meta
    if meta.kind == "clip_head":
        scoring = dataclasses.replace(scoring, clip_model=meta.embedder["clip_model"],
                                      clip_pretrained=meta.embedder["clip_pretrained"])
    stage = ClipScore(dataclasses.replace(scoring, detector_checkpoint=checkpoint), storage)
    data = []
    for p in dataset.paths:
        try:
            data.append(storage.read_bytes(p))
        except OSError:
            data.append(None)
    scored = stage(pa.table({"jpg": pa.array(data, pa.binary())}))
    failed = scored[DROP_REASON].is_valid().to_numpy(zero_copy_only=False)
    probs = scored["rs_prob"].to_numpy(zero_copy_only=False)
    unreadable = [{"image": p} for p, f in zip(dataset.paths, failed) if f]
    return {"task": "detector", "dataset": dataset.name, "checkpoint": checkpoint, "detector_version": meta.version,
            "metrics": metrics(dataset.labels[~failed], probs[~failed].astype(np.float64)), "unreadable": unreadable}
