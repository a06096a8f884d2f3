"""Persistent, incremental near-dup index: pHashes and embeddings of accepted rows.

Layout: `<index_path>/<kind>/run=<run_id>/<shard>.parquet` with columns
sample_id, source and the value (`phash` or `image_embedding`). A shard's rows are
added only once the shard is committed (rows a later stage drops never enter), each
part committed whole (rename / single PUT) under the shard's name, so a retried
task rewrites the same part and nothing is deleted. A run reads every
part except its own run's: a restarted run never dedups against itself, and a later
run over new sources dedups against all earlier ones without recomputing them (old
rows always win the keep rule and old-old pairs are never compared).
"""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from rs5m_ray.config import NearDupConfig
from rs5m_ray.ledger import write_parquet
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

    def commit(self, name: str, rows: pa.Table) -> None:
        """Index the accepted `rows` of one committed shard under the shard's `name` (a retry
        rewrites the same parts)."""
        for kind in KINDS:
            if kind in rows.column_names:
                valid = rows.filter(pc.is_valid(rows[kind]))
                if len(valid):
                    write_parquet(self.storage, join(self.path, kind, f"run={self.run_id}", f"{name}.parquet"),
                                  valid.select(["sample_id", "source", kind]))


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
