"""Embedding near-dup: exact blocked kNN kernel, k-means bucketing, pipeline clusters and ledger."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rs5m_ray.config import NearDupConfig
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.stages.embedding_dedup import (BUCKET, apply_embedding_dedup, assign_buckets, knn_pairs,
                                             spherical_kmeans, unit_rows)
from rs5m_ray.stages.keep_rule import clusters
from rs5m_ray.storage import Storage, join
from tests.test_near_dup import assert_accounting_exact, same_partition


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_embeddings(bases: int, copies_per_base: int, dim: int, seed: int, noise: float = 0.15):
    """Random unit bases (cosine ~0 apart) plus copies with noise of norm `noise` (cosine ~0.98 apart)."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(bases, dim)))
    jitter = noise / np.sqrt(dim) * rng.normal(size=(bases * copies_per_base, dim))
    copies = unit(np.repeat(base, copies_per_base, axis=0) + jitter)
    return np.concatenate([base, copies]), np.concatenate([np.arange(bases), np.repeat(np.arange(bases),
                                                                                      copies_per_base)])


def test_knn_kernel_equals_brute_force():
    emb, _ = planted_embeddings(80, 3, 32, seed=1)
    old = np.zeros(len(emb), dtype=bool)
    old[::7] = True
    q, nb, sim = knn_pairs(emb, old, k=2, threshold=0.9, block=37)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    expected = set()
    for i in np.nonzero(~old)[0]:
        for j in np.argsort(-sims[i])[:2]:
            if sims[i, j] >= 0.9:
                expected.add((int(i), int(j)))
    assert set(zip(q.tolist(), nb.tolist())) == expected
    assert np.allclose(sim, sims[q, nb])


def test_unit_rows_rejects_ragged_embeddings():
    assert np.allclose(np.linalg.norm(unit_rows(pa.array([[3.0, 4.0], [1.0, 0.0]])), axis=1), 1)
    with pytest.raises(ValueError, match="one non-zero dimension"):
        unit_rows(pa.array([[1.0, 2.0], [1.0]]))


def test_kmeans_buckets_each_row_into_its_nearest_centroids():
    emb, _ = planted_embeddings(40, 2, 16, seed=2)
    centroids = spherical_kmeans(emb, 6, 8, seed=0)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    batch = pa.table({"sample_id": [str(i) for i in range(len(emb))], "value": list(emb)})
    out = assign_buckets(batch, centroids, 2)
    assert len(out) == 2 * len(emb)
    buckets = out[BUCKET].to_numpy().reshape(-1, 2)
    assert (buckets[:, 0] != buckets[:, 1]).all()
    nearest = np.argmax(emb @ centroids.T, axis=1)
    assert ((buckets == nearest[:, None]).any(axis=1)).all()


def test_pipeline_clusters_equal_threshold_reference_with_exact_ledger(sort_shuffle, tmp_path):
    import ray.data

    emb, base_of = planted_embeddings(60, 3, 48, seed=3)
    n = len(emb)
    rng = np.random.default_rng(4)
    sources = rng.choice(["laioncoco", "cc3m", "laion2b", "redcaps"], n).tolist()
    score = rng.uniform(0.2, 0.4, n).astype(np.float32)
    rows = pa.table({"sample_id": [f"r{i:04d}" for i in range(n)], "source": sources,
                     "url": [f"http://x/{i}" for i in range(n)], "caption": ["c"] * n,
                     "image_embedding": pa.array(list(emb), pa.list_(pa.float32())), "clip_score": score})
    cfg = NearDupConfig(num_partitions=3, embedding_buckets=8, embedding_quality_column="clip_score")
    output = str(tmp_path / "run")
    kept = pa.concat_tables(sort_shuffle.get(apply_embedding_dedup(
        ray.data.from_arrow(rows).repartition(3), cfg, output, Storage()).to_arrow_refs()))
    ledger = read_parquet_dir(Storage(), join(output, "ledger", "embedding_dedup"))
    stats = read_parquet_dir(Storage(), join(output, "stats", "embedding_dedup"))
    assert_accounting_exact(rows, kept, ledger, stats)

    sims = emb @ emb.T
    a, b = np.nonzero(np.triu(sims >= cfg.cosine_threshold, 1))
    reference = clusters(n, a, b)
    assert same_partition(reference, base_of)  # the planted groups are the true clusters
    assert len(kept) == 60
    kept_ids = kept["sample_id"].to_pylist()
    assert sorted(reference[[int(s[1:]) for s in kept_ids]].tolist()) == sorted(set(reference.tolist()))
    rank = {"laion2b": 0, "cc3m": 1, "redcaps": 1, "laioncoco": 2}
    for s in kept_ids:  # best source rank in its cluster, then the highest clip_score
        i = int(s[1:])
        group = np.nonzero(reference == reference[i])[0]
        best = min(group, key=lambda j: (rank[sources[j]], -score[j]))
        assert best == i
    for sid, reason, detail in zip(*(ledger[c].to_pylist() for c in ("sample_id", "drop_reason", "drop_detail"))):
        i, k = int(sid[1:]), int(reason.removeprefix("near_dup_of:r"))
        assert reference[i] == reference[k]
        assert abs(float(detail.removeprefix("cosine=")) - sims[i, k]) < 1e-3
    assert pc.all(pc.starts_with(ledger["drop_reason"], "near_dup_of:")).as_py()
