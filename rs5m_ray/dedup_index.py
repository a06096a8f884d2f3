"""Persistent, incremental near-dup index: pHashes and embeddings of accepted rows.

Layout: `<index_path>/<kind>/run=<run_id>/<batch key>.parquet` with columns
sample_id, source and the value (`phash` or `image_embedding`). Parts are only ever
added, each committed whole (rename / single PUT) under a name fixed by its batch,
so a retried task rewrites the same part and nothing is deleted. A run reads every
part except its own run's: a restarted run never dedups against itself, and a later
run over new sources dedups against all earlier ones without recomputing them (old
rows always win the keep rule and old-old pairs are never compared).
"""
from __future__ import annotations

import hashlib

import pyarrow as pa
import ray.data

from rs5m_ray.config import NearDupConfig
from rs5m_ray.ledger import batch_key, write_parquet
from rs5m_ray.storage import Storage, join, strip_protocol

KINDS = ("phash", "image_embedding")


class DedupIndex:
    def __init__(self, path: str, storage: Storage, run_id: str):
        if "/" in run_id or not run_id:
            raise ValueError(f"run_id must be a non-empty name without '/', got {run_id!r}")
        self.path = path
        self.storage = storage
        self.run_id = run_id

    def parts(self, kind: str) -> list[str]:
        """Committed parts of `kind` from earlier runs."""
        mine = join(self.path, _kind(kind), f"run={self.run_id}")
        return [p for p in self.storage.glob(join(self.path, _kind(kind), "run=*", "*.parquet"))
                if not p.startswith(mine + "/")]

    def read(self, kind: str) -> ray.data.Dataset | None:
        files = self.parts(kind)
        if not files:
            return None
        fs, _ = self.storage.arrow_fs(files[0])
        return ray.data.read_parquet([strip_protocol(f) for f in files], filesystem=fs)

    def append(self, ds: ray.data.Dataset, kind: str) -> ray.data.Dataset:
        """`ds` unchanged; each batch's (sample_id, source, kind) is committed as one part as it streams by."""
        return ds.map_batches(IndexWriter(self.path, self.storage, self.run_id, _kind(kind)), batch_format="pyarrow")


class IndexWriter:
    def __init__(self, path: str, storage: Storage, run_id: str, kind: str):
        self.dir = join(path, kind, f"run={run_id}")
        self.storage = storage
        self.kind = kind

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.filter(batch[self.kind].is_valid()) if len(batch) else batch
        if len(rows):
            write_parquet(self.storage, join(self.dir, f"{batch_key(rows)}.parquet"),
                          rows.select(["sample_id", "source", self.kind]))
        return batch


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {KINDS}")
    return kind


def index_for(cfg: NearDupConfig, output: str, storage: Storage) -> DedupIndex | None:
    """The configured index, with run id `cfg.run_id` or one derived from the run's output path."""
    if not cfg.index_path:
        return None
    run_id = cfg.run_id or hashlib.sha1(output.rstrip("/").encode()).hexdigest()[:16]
    return DedupIndex(cfg.index_path, storage, run_id)
