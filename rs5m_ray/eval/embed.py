"""Embedding passes: images (by path, local or s3://) and texts -> L2-normalised float32 rows.

`LocalEmbedder` runs a loaded `ClipModel` in this process (tests, the training loop's periodic
evaluation). `RayEmbedder` runs the same pass as a Ray Data actor-pool stage: each actor loads the
model through the one loader (`load_clip`, so checkpoints, s3:// and adapters load as everywhere),
reads and decodes its batch with the shard reader's fast path in a thread pool while the model runs
on the previous chunk, on a GPU when `num_gpus` asks for one. Resources and pool size come from
the model's `ScoringConfig` (num_gpus, num_cpus, min/max_actors, batch_size, forward_batch_size,
decode_threads), as for the scoring stage. Undecodable images come back with their error, never
silently dropped.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from rs5m_ray.config import ScoringConfig, StorageConfig
from rs5m_ray.models.clip import ClipModel, load_clip
from rs5m_ray.storage import Storage


@dataclass
class Embedded:
    vectors: np.ndarray  # [N, D] float32, L2-normalised; zero rows where the image failed
    errors: list[str | None]  # one per image; None = embedded

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def embed_texts(clip: ClipModel, texts: list[str], normalize: bool = True, batch_size: int = 512) -> torch.Tensor:
    """[N, D] float32 text features on CPU (L2-normalised unless `normalize` is False)."""
    parts = [clip.encode_texts(texts[i:i + batch_size], normalize=normalize) for i in range(0, len(texts), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


class _Pass:
    """Read, decode (thread pool, one chunk ahead) and encode one list of images with a loaded model."""

    def __init__(self, clip: ClipModel, storage: Storage, forward_batch_size: int, decode_threads: int, draft: bool):
        self.clip, self.storage, self.draft = clip, storage, draft
        self.step = max(1, forward_batch_size)
        self.threads = max(1, decode_threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="eval-decode")
        self.dim = int(clip.encode_texts(["x"]).shape[1])

    def _decode(self, paths: list[str]) -> tuple[torch.Tensor, list[str | None]]:
        data, read_errors = [], []
        for p in paths:
            try:
                data.append(self.storage.read_bytes(p))
                read_errors.append(None)
            except Exception as e:  # noqa: BLE001 - a missing or unreadable file is this image's error
                data.append(b"")
                read_errors.append(f"read: {type(e).__name__}: {e}"[:300])
        pixels, errors = self.clip.decode_images(data, self.draft)
        return pixels, [r or (e[:300] if e else None) for r, e in zip(read_errors, errors)]

    def run(self, paths: list[str]) -> tuple[np.ndarray, list[str | None]]:
        chunks = [paths[i:i + self.step] for i in range(0, len(paths), self.step)]
        vectors = np.zeros((len(paths), self.dim), np.float32)
        errors: list[str | None] = []
        ahead = self.threads + 1  # chunks decoded ahead of the forward: memory stays bounded
        pending = deque(self.pool.submit(self._decode, c) for c in chunks[:ahead])
        for k in range(len(chunks)):
            pixels, chunk_errors = pending.popleft().result()
            if k + ahead < len(chunks):
                pending.append(self.pool.submit(self._decode, chunks[k + ahead]))
            rows = [len(errors) + i for i, err in enumerate(chunk_errors) if err is None]
            if rows:
                vectors[rows] = self.clip.encode_images(pixels).numpy()
            errors += chunk_errors
        return vectors, errors


class LocalEmbedder:
    """The embedding pass in this process, with a model already loaded."""

    def __init__(self, clip: ClipModel, storage: Storage | None = None, forward_batch_size: int = 64,
                 decode_threads: int = 2, draft: bool = True):
        self.clip = clip
        self._pass = _Pass(clip, storage or Storage(), forward_batch_size, decode_threads, draft)

    def embed_images(self, paths: list[str]) -> Embedded:
        return Embedded(*self._pass.run(list(paths)))


class EmbedActor:
    """Ray Data stage: (index, path) rows -> (index, embedding, error)."""

    def __init__(self, cfg: ScoringConfig, storage_cfg: StorageConfig | None):
        storage = Storage(storage_cfg or StorageConfig())
        self._pass = _Pass(load_clip(cfg, storage), storage, cfg.forward_batch_size, cfg.decode_threads,
                           cfg.decode_draft)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors, errors = self._pass.run(batch["path"].to_pylist())
        dim = vectors.shape[1]
        flat = pa.array(vectors.reshape(-1))
        offsets = pa.array(np.arange(0, (len(batch) + 1) * dim, dim, dtype=np.int32))
        return pa.table({"index": batch["index"], "embedding": pa.ListArray.from_arrays(offsets, flat),
                         "error": pa.array(errors, pa.string())})


class RayEmbedder:
    """The embedding pass as a Ray Data actor-pool stage (GPU actors on a cluster); the driver only
    collects the vectors. Texts are embedded by `clip` in the driver (prompts and captions are few)."""

    def __init__(self, cfg: ScoringConfig, storage_cfg: StorageConfig | None = None, clip: ClipModel | None = None):
        self.cfg, self.storage_cfg = cfg, storage_cfg
        self.clip = clip or load_clip(cfg, Storage(storage_cfg or StorageConfig()))

    def embed_images(self, paths: list[str]) -> Embedded:
        import ray
        import ray.data

        table = pa.table({"index": np.arange(len(paths), dtype=np.int64), "path": pa.array(paths, pa.string())})
        step = max(1, self.cfg.batch_size)  # one block per batch, made here: no task stage before the actors
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, max(len(paths), 1), step)]).map_batches(
            EmbedActor, fn_constructor_kwargs={"cfg": self.cfg, "storage_cfg": self.storage_cfg},
            compute=ray.data.ActorPoolStrategy(min_size=self.cfg.min_actors, max_size=self.cfg.max_actors),
            num_gpus=self.cfg.num_gpus or None, num_cpus=self.cfg.num_cpus, batch_size=self.cfg.batch_size,
            batch_format="pyarrow")
        out = pa.concat_tables([ray.get(ref) for ref in ds.to_arrow_refs()]) if paths else None
        dim = int(self.clip.encode_texts(["x"]).shape[1])
        vectors = np.zeros((len(paths), dim), np.float32)
        errors: list[str | None] = [None] * len(paths)
        if out is not None and len(out):
            index = out["index"].to_numpy()
            flat = out["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vectors[index] = flat.reshape(len(out), dim)
            for i, e in zip(index, out["error"].to_pylist()):
                errors[i] = e
        return Embedded(vectors, errors)
