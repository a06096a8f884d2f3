"""Shard writer: RS5M-layout tars, a parquet sidecar and a manifest per shard.

Every row's split and shard come from a seeded hash of its sample_id, so the
same input and seed always give the same shards; within a shard samples are in
sample_id order and the tar bytes are deterministic. A shard is committed in
three atomic writes — tar, sidecar, then its manifest — and only a shard with a
manifest is complete: a rerun skips those and rewrites the rest.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import zlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m_ray.config import ShardConfig
from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes
from rs5m_ray.storage import Storage, join

SHARD = "shard"
SUMMARY_SCHEMA = pa.schema([("shard", pa.string()), ("split", pa.string()), ("count", pa.int64()),
                            ("status", pa.string())])
# Large or binary columns stay out of the per-sample json and the sidecar.
NOT_METADATA = {"jpg", "image_embedding", SHARD}


def _unit(seed: int, salt: str, sample_id: str) -> int:
    return zlib.crc32(f"{seed}:{salt}:{sample_id}".encode())


def split_of(sample_id: str, cfg: ShardConfig) -> str:
    return "val" if _unit(cfg.seed, "split", sample_id) % 1_000_000 < cfg.val_fraction * 1_000_000 else "train"


def shard_counts(num_rows: int, cfg: ShardConfig) -> dict[str, int]:
    """Shards per split for `num_rows` kept rows (at least one per split)."""
    val = num_rows * cfg.val_fraction
    return {"train": max(1, math.ceil((num_rows - val) / cfg.samples_per_shard)),
            "val": max(1, math.ceil(val / cfg.samples_per_shard))}


def assign_shards(batch: pa.Table, cfg: ShardConfig, counts: dict[str, int]) -> pa.Table:
    names = []
    for sid in batch["sample_id"].to_pylist():
        split = split_of(sid, cfg)
        names.append(shard_name(cfg.prefix, split, _unit(cfg.seed, "shard", sid) % counts[split]))
    return batch.append_column(SHARD, pa.array(names, pa.string()))


def manifest_path(out_dir: str, shard: str) -> str:
    return join(out_dir, shard.removesuffix(".tar") + ".manifest.json")


class ShardWriter:
    """map_groups function: one group = all rows of one shard."""

    __name__ = "write_shards"  # Ray names map_groups operators after their function

    def __init__(self, out_dir: str, storage: Storage):
        self.out_dir, self.storage = out_dir, storage

    def __call__(self, rows: pa.Table) -> pa.Table:
        shard = rows[SHARD][0].as_py()
        split = shard.rsplit("-", 2)[1]
        done = manifest_path(self.out_dir, shard)
        if self.storage.exists(done):
            count = json.loads(self.storage.read_bytes(done))["count"]
            return pa.table([[shard], [split], [count], ["skipped"]], schema=SUMMARY_SCHEMA)
        rows = rows.sort_by("sample_id")
        meta_cols = [c for c in rows.column_names if c not in NOT_METADATA]
        metadata = rows.select(meta_cols)
        meta_rows = metadata.drop_columns(["caption"]).to_pylist()
        members = []
        for sid, jpg, caption, meta in zip(rows["sample_id"].to_pylist(), rows["jpg"].to_pylist(),
                                           rows["caption"].to_pylist(), meta_rows):
            members += sample_members(sid, jpg, caption, meta)
        data = tar_bytes(members)
        self.storage.write_atomic(join(self.out_dir, shard), data)
        sidecar = io.BytesIO()
        pq.write_table(metadata, sidecar, compression="zstd")
        self.storage.write_atomic(join(self.out_dir, shard.removesuffix(".tar") + ".parquet"), sidecar.getvalue())
        sources = pc.value_counts(rows["source"]).to_pylist()
        manifest = {"shard": shard, "split": split, "count": len(rows), "tar_bytes": len(data),
                    "tar_sha256": hashlib.sha256(data).hexdigest(),
                    "sources": {s["values"]: s["counts"] for s in sources}}
        self.storage.write_atomic(done, json.dumps(manifest, sort_keys=True, indent=1).encode())
        return pa.table([[shard], [split], [len(rows)], ["written"]], schema=SUMMARY_SCHEMA)


def write_manifest(out_dir: str, storage: Storage) -> dict:
    """Collect the per-shard manifests into `manifest.json` (complete shards only)."""
    shards = [json.loads(storage.read_bytes(p)) for p in storage.glob(join(out_dir, "*.manifest.json"))]
    manifest = {"shards": sorted(shards, key=lambda s: s["shard"]),
                "samples": sum(s["count"] for s in shards)}
    storage.write_atomic(join(out_dir, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest
