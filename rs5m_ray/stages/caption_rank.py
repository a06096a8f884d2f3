"""Caption candidates ranked by two CLIP models, then the rotation-invariance pick (notes §2.3).

Per image, over its distinct non-empty candidates (exact duplicates, common under nucleus
sampling, are scored once and carry their first copy's scores):
1. model A (RS5M: ViT-H/14) keeps the `keep_a` (10) most similar to the image;
2. model B (RS5M: RN50x64) keeps the `keep_b` (5) most similar of those: the first is `top_caption`;
3. the rotation model (default B) embeds the image at `rotation_angles` (12) rotations
   (`models.images.rotated_views`: rotate, then the centre square every angle keeps, so no fill
   enters and every view has the same scale); `rotation_invariant_caption` is the kept caption whose
   12 cosine similarities have the least (population) variance.
Ties: a ranking keeps the candidate sampled first (stable sort); a variance tie goes to the caption
model B ranked higher.

Each model embeds each image once (plus the rotated views for the rotation model); texts are
encoded in chunks of `text_chunk` across the whole batch; a text already encoded by a model is
never encoded again by it. The final caption is a seeded pick between `top_caption` and
`rotation_invariant_caption` (`final_picks`), as RS5M chose one of the two at random per image.
With randomly initialised models (tests, demo) the scores mean nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from rs5m_ray.config import CaptionRankConfig, ScoringConfig
from rs5m_ray.models.clip import ClipModel, load_clip
from rs5m_ray.models.images import rotated_views, rotation_crop_fraction
from rs5m_ray.stages.keep_rule import seeded_order
from rs5m_ray.storage import Storage

TOP = "top"
ROTATION_INVARIANT = "rotation_invariant"


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest scores, best first; ties keep the lower index first."""
    return np.argsort(-scores, kind="stable")[:k]


def rotation_variances(text_emb: np.ndarray, view_emb: np.ndarray) -> np.ndarray:
    """Per caption (rows of `text_emb`): the variance of its cosine similarity over the views."""
    return (text_emb @ view_emb.T).var(axis=1)


def least_variance(variances: np.ndarray) -> int:
    """The caption with the least variance; on a tie the first (the better-ranked)."""
    return int(np.argmin(variances))


def final_picks(sample_ids: list[str], seed: int) -> list[str]:
    """Per sample: TOP or ROTATION_INVARIANT, half each, fixed by the seed and the sample_id alone."""
    return [TOP if h % 2 == 0 else ROTATION_INVARIANT for h in seeded_order(sample_ids, seed)]


@dataclass
class Ranked:
    """One image's ranking: a score per candidate (None where the step did not see it)."""

    score_a: list[float | None]
    score_b: list[float | None]
    rotation_variance: list[float | None]
    top_caption: str
    rotation_invariant_caption: str


class CaptionRanker:
    """Models A and B (and the rotation pick) over decoded images and their candidates."""

    def __init__(self, cfg: CaptionRankConfig, device: str = "auto", storage: Storage | None = None):
        self.cfg = cfg
        self.a = load_clip(self._clip_config(cfg.model_a, cfg.pretrained_a, device), storage)
        self.b = load_clip(self._clip_config(cfg.model_b, cfg.pretrained_b, device), storage)
        self.rotation = self.a if cfg.rotation_model == "a" else self.b
        self.angles = [360.0 * i / cfg.rotation_angles for i in range(cfg.rotation_angles)]

    def _clip_config(self, model: str, pretrained: str | None, device: str) -> ScoringConfig:
        c = self.cfg
        return ScoringConfig(clip_model=model, clip_pretrained=pretrained, device=device, precision=c.precision,
                             weights_cache_dir=c.weights_cache_dir, strict_weights=c.strict_weights)

    @property
    def decode_size(self) -> int:
        """The smallest side images must keep when decoded for ranking (rotated views included)."""
        rotated = int(np.ceil(self.rotation.image_size / rotation_crop_fraction(self.angles)))
        return max(self.a.image_size, self.b.image_size, rotated)

    def _embed_texts(self, clip: ClipModel, texts: list[str]) -> np.ndarray:
        step = self.cfg.text_chunk
        return np.concatenate([clip.encode_texts(texts[i:i + step]).numpy() for i in range(0, len(texts), step)])

    @staticmethod
    def _embed_images(clip: ClipModel, images: list[Image.Image]) -> np.ndarray:
        return clip.encode_images(torch.stack([clip.preprocess(img) for img in images])).numpy()

    def rank(self, images: list[Image.Image], candidates: list[list[str]]) -> list[Ranked | None]:
        """One ranking per image (None where no candidate has any text)."""
        distinct = [list(dict.fromkeys(c for c in cands if c)) for cands in candidates]
        live = [i for i, d in enumerate(distinct) if d]
        result: list[Ranked | None] = [None] * len(images)
        if not live:
            return result
        # Model A: every distinct candidate of the batch, chunked.
        img_a = self._embed_images(self.a, [images[i] for i in live])
        texts_a = [t for i in live for t in distinct[i]]
        txt_a = self._embed_texts(self.a, texts_a)
        bounds = np.cumsum([0] + [len(distinct[i]) for i in live])
        kept_a = []
        scores_a = []
        for j, i in enumerate(live):
            s = txt_a[bounds[j]:bounds[j + 1]] @ img_a[j]
            scores_a.append(s)
            kept_a.append(top_indices(s, self.cfg.keep_a))
        # Model B: the survivors of A.
        img_b = self._embed_images(self.b, [images[i] for i in live])
        texts_b = [distinct[i][k] for j, i in enumerate(live) for k in kept_a[j]]
        txt_b = self._embed_texts(self.b, texts_b)
        bounds_b = np.cumsum([0] + [len(k) for k in kept_a])
        # Rotation model: the survivors of B, against every rotated view.
        views = [v for i in live for v in rotated_views(images[i], self.angles, self.rotation.image_size)]
        view_emb = self._embed_images(self.rotation, views).reshape(len(live), len(self.angles), -1)
        for j, i in enumerate(live):
            tb = txt_b[bounds_b[j]:bounds_b[j + 1]]
            s_b = tb @ img_b[j]
            order_b = top_indices(s_b, self.cfg.keep_b)  # positions within kept_a[j]
            kept_b = kept_a[j][order_b]  # indices into distinct[i], best first
            if self.rotation is self.b:
                rot_text = tb[order_b]
            else:
                rot_text = txt_a[bounds[j]:bounds[j + 1]][kept_b]
            variances = rotation_variances(rot_text, view_emb[j])
            per_distinct_b = dict(zip(kept_a[j].tolist(), s_b.tolist()))
            per_distinct_v = dict(zip(kept_b.tolist(), variances.tolist()))
            index = {t: k for k, t in enumerate(distinct[i])}
            pos = [index.get(c) for c in candidates[i]]
            result[i] = Ranked(
                score_a=[None if p is None else float(scores_a[j][p]) for p in pos],
                score_b=[per_distinct_b.get(p) for p in pos],
                rotation_variance=[per_distinct_v.get(p) for p in pos],
                top_caption=distinct[i][kept_b[0]],
                rotation_invariant_caption=distinct[i][kept_b[least_variance(variances)]])
        return result
