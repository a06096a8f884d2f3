"""The one CLIP image pass: embedding, VLM score s_i and RS-detector probability c_i.

Images are decoded in a thread pool, each chunk of `forward_batch_size` split over all
`decode_threads`, so a chunk decodes in parallel and later chunks decode while the
model runs on the current one. With the default
`clip_head` detector the chunk is decoded for CLIP alone (`ClipModel.decode_images`:
the shard reader's fast path when the model's preprocess is open_clip's standard eval
transform; its tolerance is documented in `rs5m_ray.shards.reader`). A `backbone`
detector has its own PIL transform, so with one each image is decoded once with PIL
and fed to both transforms. The L2-normalised embedding is the
`image_embedding` column (reused by the embedding near-dup stage), gives
s_i = cos(embedding, mean prompt embedding) and, with the default `clip_head`
detector, c_i.

Prompt averaging (the paper does not say, notes §1.5): with `normalize_prompts`
(default, open_clip's zero-shot convention) each prompt embedding is L2-normalised
before the mean, so every prompt weighs the same; without it, raw text features are
averaged and prompts with larger feature norms weigh more. Either way the mean is
normalised, so s_i is a true cosine in [-1, 1].

With randomly initialised weights (tests, demo) s_i and c_i mean nothing.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from rs5m_ray import metrics
from rs5m_ray.config import ScoringConfig
from rs5m_ray.ledger import mark_dropped
from rs5m_ray.models.clip import ClipModel, load_clip
from rs5m_ray.models.images import open_rgb
from rs5m_ray.models.prompts import RS_PROMPTS
from rs5m_ray.stages.rs_detector import load_detector
from rs5m_ray.storage import Storage

NO_BYTES = "no image bytes"

# A decoded chunk: CLIP input and backbone-detector input (or None) of the images that
# decoded, in order, and one error per image of the chunk (None = decoded).
Chunk = tuple[torch.Tensor, torch.Tensor | None, list[str | None]]


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
        self.shared_decode = self.detector.kind == "backbone"  # it needs PIL images: decode once for both
        sizes = [self.clip.image_size] + ([self.detector.meta.arch["image_size"]]
                                          if self.detector.kind == "backbone" else [])
        self.decode_size = max(sizes)
        self.pool = ThreadPoolExecutor(max(1, cfg.decode_threads), thread_name_prefix="decode")

    def _decode_for_clip(self, data: list[bytes | None]) -> Chunk:
        pixels, errors = self.clip.decode_images([d or b"" for d in data], self.cfg.decode_draft)
        return pixels, None, [NO_BYTES if not d else None if e is None else e[:300] for d, e in zip(data, errors)]

    def _decode_pil(self, data: list[bytes | None]) -> Chunk:
        """Each image decoded once with PIL, then each model's own transform."""
        clip_in, det_in, errors = [], [], []
        for d in data:
            if not d:
                errors.append(NO_BYTES)
                continue
            try:
                img = open_rgb(d, self.decode_size, self.cfg.decode_draft)
                x = self.clip.preprocess(img)
                det = self.detector.preprocess(img) if self.detector.preprocess else None
            except Exception as e:  # untrusted bytes: any decoder failure is this row's drop reason
                errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            clip_in.append(x)
            det_in.append(det)
            errors.append(None)
        size = self.clip.image_size
        return (torch.stack(clip_in) if clip_in else torch.empty(0, 3, size, size),
                torch.stack(det_in) if det_in and det_in[0] is not None else None, errors)

    def _forward(self, pixels: torch.Tensor, det_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and detector probabilities of a chunk's decoded images."""
        e = self.clip.encode_images(pixels)
        return e, self.detector.probs(e if det_in is None else det_in)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = len(batch)
        data = batch["jpg"].to_pylist()
        step = max(1, self.cfg.forward_batch_size)
        decode = self._decode_pil if self.shared_decode else self._decode_for_clip
        piece = -(-step // max(1, self.cfg.decode_threads))  # every decode thread works on each chunk
        chunks = {start: [self.pool.submit(decode, data[i:min(i + piece, start + step)])
                          for i in range(start, min(start + step, n), piece)] for start in range(0, n, step)}
        emb = np.zeros((n, self.embed_dim), np.float32)
        scores = np.full(n, np.nan, np.float32)
        probs = np.full(n, np.nan, np.float32)
        errors: list[str | None] = [None] * n
        waited = forward = 0.0  # decode wait against forward: the accelerator starves when the first is large
        for start, pieces in chunks.items():
            # later chunks keep decoding during this chunk's forward
            t0 = time.perf_counter()
            pixels, det_in, chunk_errors = joined([future.result() for future in pieces])
            t1 = time.perf_counter()
            errors[start:start + len(chunk_errors)] = chunk_errors
            rows = [start + i for i, err in enumerate(chunk_errors) if err is None]
            if rows:
                e, c = self._forward(pixels, det_in)
                emb[rows], scores[rows], probs[rows] = e.numpy(), (e @ self.prompt).numpy(), c.numpy()
            waited, forward = waited + t1 - t0, forward + time.perf_counter() - t1
        metrics.observe("rs5m_clip_seconds", waited, phase="decode_wait")
        metrics.observe("rs5m_clip_seconds", forward, phase="forward")
        failed = np.array([err is not None for err in errors])
        batch = batch.append_column("image_embedding", embedding_column(emb, failed))
        batch = batch.append_column("clip_score", pa.array(scores, pa.float32(), mask=failed))
        batch = batch.append_column("rs_prob", pa.array(probs, pa.float32(), mask=failed))
        return mark_dropped(batch, pa.array(failed), "decode_error", pa.array(errors, pa.string()))


def joined(pieces: list[Chunk]) -> Chunk:
    """One chunk from the pieces decoded in parallel, in order."""
    det = [d for _, d, _ in pieces if d is not None]
    return (torch.cat([p for p, _, _ in pieces]), torch.cat(det) if det else None,
            [e for _, _, errors in pieces for e in errors])


def embedding_column(emb: np.ndarray, null: np.ndarray) -> pa.ListArray:
    """list<float32>, one list per row (null where the image failed)."""
    n, dim = emb.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)), mask=pa.array(null))

