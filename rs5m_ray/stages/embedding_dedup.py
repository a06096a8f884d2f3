"""Embedding near-duplicates (RS5M's fastdup step): cosine kNN, threshold, connected components.

Partitioning so it scales past one machine: spherical k-means on a sample of the
unit embeddings gives `embedding_buckets` centroids; every row joins the bucket(s)
of its `embedding_assignments` nearest centroids (2 by default, so a pair that
straddles a bucket boundary still meets in one bucket), and the buckets are
hash-partitioned over the cluster with a `groupby` shuffle. Inside a bucket the
search is exact: blocked matrix products (query block x bucket), top-k per row,
edges kept where cosine >= threshold. Each row links to its k nearest above the
threshold within each of its buckets; near duplicates sit close to each other and
hence to the same centroids, so a bucket is where they meet. Cost is
sum(bucket^2) * dim: pick `embedding_buckets` so a bucket holds ~10^5 rows (one
worker's memory: bucket x dim floats); more machines take more buckets.
Rows from the persistent index are targets only, never queries: old rows are not
re-compared among themselves.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from rs5m_ray.config import NearDupConfig
from rs5m_ray.stages.keep_rule import DROPS_SCHEMA, resolve_drops, run_near_dup, seeded_order
from rs5m_ray.storage import Storage

EMBEDDING = "image_embedding"
BUCKET = "emb_bucket"
QUERY_BLOCK = 1024


def unit_rows(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<float> column -> (n, dim) float32 array of unit rows."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != lengths.max() or lengths.min() == 0):
        raise ValueError(f"embeddings must share one non-zero dimension, got {sorted(set(lengths.tolist()))[:5]}")
    dim = int(lengths[0]) if len(lengths) else 0
    flat = np.asarray(pc.list_flatten(values).to_numpy(zero_copy_only=False), dtype=np.float32)
    emb = flat.reshape(len(values), dim)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(x: np.ndarray, clusters: int, iterations: int, seed: int) -> np.ndarray:
    """Unit centroids of `x` (unit rows) by cosine k-means."""
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), size=min(clusters, len(x)), replace=False)]
    for _ in range(iterations):
        nearest = np.argmax(x @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = np.where(norms > 0, sums / np.maximum(norms, 1e-12), centroids)  # empty ones stay
    return centroids


def fit_centroids(keys: ray.data.Dataset, rows: int, cfg: NearDupConfig) -> np.ndarray:
    """Centroids from about `kmeans_sample_rows` of the `rows` member rows, picked and ordered by
    their sample_id (a seeded hash): the same centroids whatever the blocks' layout or order."""
    fraction = min(1.0, cfg.kmeans_sample_rows / rows)
    sample = keys.map_batches(hash_sample, fn_kwargs={"fraction": fraction, "seed": cfg.seed},
                              batch_format="pyarrow")
    tables = [t for t in ray.get(sample.to_arrow_refs()) if len(t)]
    x = unit_rows(pa.concat_tables(tables).sort_by("sample_id")["value"])
    return spherical_kmeans(x, cfg.embedding_buckets, cfg.kmeans_iterations, cfg.seed)


def hash_sample(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    """The rows whose seeded sample_id hash falls in the lowest `fraction` (sample_id, value)."""
    batch = batch.select(["sample_id", "value"])
    if fraction >= 1.0:
        return batch
    picked = seeded_order(batch["sample_id"].to_pylist(), seed) <= np.uint64(fraction * float(2**64 - 1))
    return batch.filter(pa.array(picked))


def assign_buckets(batch: pa.Table, centroids: np.ndarray, assignments: int) -> pa.Table:
    """One row per (row, one of its `assignments` nearest centroids)."""
    a = min(assignments, len(centroids))
    sims = unit_rows(batch["value"]) @ centroids.T
    nearest = np.argpartition(-sims, a - 1, axis=1)[:, :a] if a < len(centroids) else \
        np.tile(np.arange(a), (len(batch), 1))
    row = np.repeat(np.arange(len(batch)), a)
    return batch.take(pa.array(row)).append_column(BUCKET, pa.array(nearest.reshape(-1).astype(np.int32)))


def knn_pairs(emb: np.ndarray, is_old: np.ndarray, k: int, threshold: float,
              block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bucket kernel: (query, neighbour, cosine) for each new row's k nearest with cosine >= threshold."""
    n = len(emb)
    kk = min(k, n - 1)
    queries = np.nonzero(~is_old)[0]
    out_q, out_n, out_s = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.float32)]
    if kk <= 0:
        return out_q[0], out_n[0], out_s[0]
    for start in range(0, len(queries), block):
        q = queries[start:start + block]
        sims = emb[q] @ emb.T
        sims[np.arange(len(q)), q] = -np.inf
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        top_sims = np.take_along_axis(sims, top, axis=1)
        ok = top_sims >= threshold
        out_q.append(np.repeat(q, kk)[ok.reshape(-1)])
        out_n.append(top[ok])
        out_s.append(top_sims[ok])
    return np.concatenate(out_q), np.concatenate(out_n), np.concatenate(out_s)


def embedding_edges(group: pa.Table, k: int, threshold: float) -> pa.Table:
    """Edge rows (both directions) of one bucket's kNN pairs above the threshold."""
    members = group.drop_columns([BUCKET])
    q, nb, sim = knn_pairs(unit_rows(members["value"]), members["from_index"].to_numpy(zero_copy_only=False),
                           k, threshold)
    src, dst = np.concatenate([q, nb]), np.concatenate([nb, q])
    out = members.take(pa.array(src))
    out = out.append_column("peer", members["sample_id"].take(pa.array(dst)))
    return out.append_column("score", pa.array(np.concatenate([sim, sim]).astype(np.float64)))


def embedding_drops(keys: ray.data.Dataset, cfg: NearDupConfig) -> ray.ObjectRef:
    keys = keys.materialize()  # read for the k-means sample and for the join
    rows = keys.count()
    if rows == 0:
        return ray.put(DROPS_SCHEMA.empty_table())
    centroids = fit_centroids(keys, rows, cfg)
    edges = (keys.map_batches(assign_buckets, fn_kwargs={"centroids": centroids,
                                                         "assignments": cfg.embedding_assignments},
                              batch_format="pyarrow")
             .groupby(BUCKET, num_partitions=cfg.num_partitions)
             .map_groups(embedding_edges, fn_kwargs={"k": cfg.k, "threshold": cfg.cosine_threshold},
                         batch_format="pyarrow"))
    return ray.remote(resolve_drops).remote(cfg, cosine_detail, *edges.to_arrow_refs())


def cosine_detail(values: pa.ChunkedArray, who: np.ndarray, kept_by: np.ndarray) -> list[str]:
    emb = unit_rows(values)
    return [f"cosine={s:.4f}" for s in np.einsum("ij,ij->i", emb[who], emb[kept_by])]


def apply_embedding_dedup(ds: ray.data.Dataset, cfg: NearDupConfig, output: str, storage: Storage,
                          index=None, stage_name: str = "embedding_dedup") -> ray.data.Dataset:
    """Kept rows of `ds` (needs sample_id, source, image_embedding); near-dups go to the ledger.

    `index` (a `DedupIndex`) adds the embeddings of earlier runs, which always win.
    """
    return run_near_dup(ds, EMBEDDING, cfg.embedding_quality_column, partial(embedding_drops, cfg=cfg), output,
                        storage, index, stage_name)
