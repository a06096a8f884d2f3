"""The one CLIP image pass: embedding, VLM score s_i and RS-detector probability c_i.

Each image is decoded once (in a thread pool, overlapping the forward pass of the
previous chunk) and fed to the CLIP image tower; its L2-normalised embedding is
the `image_embedding` column (reused by the embedding near-dup stage), gives
s_i = cos(embedding, mean prompt embedding) and, with the default `clip_head`
detector, c_i. A `backbone` detector gets its own tensor from the same decoded image.

Prompt averaging (the paper does not say, notes §1.5): with `normalize_prompts`
(default, open_clip's zero-shot convention) each prompt embedding is L2-normalised
before the mean, so every prompt weighs the same; without it, raw text features are
averaged and prompts with larger feature norms weigh more. Either way the mean is
normalised, so s_i is a true cosine in [-1, 1].

With randomly initialised weights (tests, demo) s_i and c_i mean nothing.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import ray.data
import torch

from rs5m_ray.config import ScoringConfig
from rs5m_ray.ledger import Accounted, mark_dropped
from rs5m_ray.models.clip import ClipModel, load_clip
from rs5m_ray.models.images import open_rgb
from rs5m_ray.models.prompts import RS_PROMPTS
from rs5m_ray.stages.rs_detector import load_detector
from rs5m_ray.storage import Storage

STAGE = "clip_score"


def prompt_embedding(clip: ClipModel, prompts: list[str] | tuple[str, ...], normalize_each: bool) -> torch.Tensor:
    """The unit-length mean of the prompts' text embeddings."""
    mean = clip.encode_texts(list(prompts), normalize=normalize_each).mean(dim=0)
    return mean / mean.norm()


class ClipScore:
    """Stage (callable class, one per actor): adds image_embedding, clip_score, rs_prob."""

    def __init__(self, cfg: ScoringConfig, storage: Storage | None = None):
        if not cfg.detector_checkpoint:
            raise ValueError("scoring.detector_checkpoint is not set: train one with `rs5m train-detector` "
                             "(the demo trains one on the fly)")
        self.cfg = cfg
        self.clip = load_clip(cfg, storage)
        self.prompt = prompt_embedding(self.clip, cfg.prompts or RS_PROMPTS, cfg.normalize_prompts)
        self.detector = load_detector(cfg.detector_checkpoint, storage, self.clip.device)
        self.embed_dim = int(self.prompt.shape[0])
        if self.detector.kind == "clip_head":
            self.detector.check_embedder(cfg.clip_model, cfg.clip_pretrained, self.embed_dim)
        sizes = [self.clip.image_size] + ([self.detector.meta.arch["image_size"]]
                                          if self.detector.kind == "backbone" else [])
        self.decode_size = max(sizes)
        self.pool = ThreadPoolExecutor(max(1, cfg.decode_threads), thread_name_prefix="decode")

    def _decode(self, data: bytes | None) -> tuple[torch.Tensor, torch.Tensor | None] | str:
        """Model inputs for one image, or the reason it cannot be read."""
        if not data:
            return "no image bytes"
        try:
            img = open_rgb(data, self.decode_size, self.cfg.decode_draft)
            det = self.detector.preprocess(img) if self.detector.preprocess else None
            return self.clip.preprocess(img), det
        except Exception as e:  # untrusted bytes: any decoder failure is this row's drop reason
            return f"{type(e).__name__}: {e}"[:300]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = len(batch)
        decoded = [self.pool.submit(self._decode, b) for b in batch["jpg"].to_pylist()]
        emb = np.zeros((n, self.embed_dim), np.float32)
        scores = np.full(n, np.nan, np.float32)
        probs = np.full(n, np.nan, np.float32)
        errors: list[str | None] = [None] * n
        step = max(1, self.cfg.forward_batch_size)
        for start in range(0, n, step):
            rows, clip_in, det_in = [], [], []
            for i in range(start, min(n, start + step)):
                result = decoded[i].result()  # later chunks keep decoding during this forward
                if isinstance(result, str):
                    errors[i] = result
                else:
                    rows.append(i)
                    clip_in.append(result[0])
                    det_in.append(result[1])
            if rows:
                e = self.clip.encode_images(torch.stack(clip_in))
                c = self.detector.probs(e if self.detector.kind == "clip_head" else torch.stack(det_in))
                emb[rows], scores[rows], probs[rows] = e.numpy(), (e @ self.prompt).numpy(), c.numpy()
        failed = np.array([err is not None for err in errors])
        batch = batch.append_column("image_embedding", embedding_column(emb, failed))
        batch = batch.append_column("clip_score", pa.array(scores, pa.float32(), mask=failed))
        batch = batch.append_column("rs_prob", pa.array(probs, pa.float32(), mask=failed))
        return mark_dropped(batch, pa.array(failed), "decode_error", pa.array(errors, pa.string()))


def embedding_column(emb: np.ndarray, null: np.ndarray) -> pa.ListArray:
    """list<float32>, one list per row (null where the image failed)."""
    n, dim = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)), mask=pa.array(null))


def score_images(ds: ray.data.Dataset, cfg: ScoringConfig, output: str, storage: Storage) -> ray.data.Dataset:
    """The CLIP pass as an accounted actor-pool stage: resources and pool size from `cfg`."""
    return ds.map_batches(
        Accounted,
        fn_constructor_kwargs={"stage_name": STAGE, "output": output, "storage": storage, "stage": ClipScore,
                               "stage_kwargs": {"cfg": cfg, "storage": storage}},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        num_gpus=cfg.num_gpus or None, num_cpus=cfg.num_cpus, batch_size=cfg.batch_size, batch_format="pyarrow")
