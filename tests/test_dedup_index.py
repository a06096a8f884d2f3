"""Persistent incremental dedup index: later runs dedup against earlier ones; restarts keep it."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rs5m_ray.config import NearDupConfig, ShardConfig
from rs5m_ray.dedup_index import DedupIndex, index_for
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.shards.writer import shard_of
from rs5m_ray.stages.embedding_dedup import apply_embedding_dedup
from rs5m_ray.stages.near_dup import apply_phash_dedup
from rs5m_ray.storage import Storage, join
from tests.test_embedding_dedup import planted_embeddings
from tests.test_near_dup import assert_accounting_exact


def flipped(h: int, bits) -> int:
    x = np.int64(h).view(np.uint64)
    for b in bits:
        x ^= np.uint64(1) << np.uint64(b)
    return int(x.view(np.int64))


def hash_rows(ids, sources, hashes) -> pa.Table:
    return pa.table({"sample_id": ids, "source": sources, "url": [f"http://x/{i}" for i in ids],
                     "caption": ["c"] * len(ids), "phash": pa.array(hashes, pa.int64())})


def run(ray, rows: pa.Table, output: str, storage: Storage, index_path: str, apply=apply_phash_dedup,
        stage="phash_dedup"):
    import ray.data

    cfg = NearDupConfig(num_partitions=3, embedding_buckets=4, index_path=index_path)
    index = index_for(cfg, output, storage)
    kept = pa.concat_tables(ray.get(apply(ray.data.from_arrow(rows), cfg, output, storage,
                                          index).to_arrow_refs()))
    ledger = read_parquet_dir(storage, join(output, "ledger", stage))
    stats = read_parquet_dir(storage, join(output, "stats", stage))
    assert_accounting_exact(rows, kept, ledger, stats)
    commit_as_shard_writer(index, kept)
    kind = "phash" if stage == "phash_dedup" else "image_embedding"
    mine = read_parquet_dir(storage, join(index_path, kind, f"run={index.run_id}"))
    assert sorted(mine["sample_id"].to_pylist() if mine else []) == sorted(kept["sample_id"].to_pylist())
    reasons = dict(zip(ledger["sample_id"].to_pylist(), ledger["drop_reason"].to_pylist())) if ledger else {}
    return set(kept["sample_id"].to_pylist() if len(kept) else []), reasons


SHARDS = ShardConfig(train_shards=2, val_shards=1)


def commit_as_shard_writer(index: DedupIndex, kept: pa.Table) -> None:
    """What the shard writer does once each shard is committed: index that shard's rows under its name."""
    shards = pa.array([shard_of(s, SHARDS) for s in kept["sample_id"].to_pylist()], pa.string())
    for shard in sorted(set(shards.to_pylist())):
        index.commit(shard.removesuffix(".tar"), kept.filter(pc.equal(shards, shard)))


def snapshot(storage: Storage, index_path: str) -> dict[str, bytes]:
    return {p: storage.read_bytes(p) for p in storage.glob(join(index_path, "**", "*.parquet"))}


def incremental_runs(ray, base: str, storage: Storage, restart: bool):
    rng = np.random.default_rng(11)
    old = rng.integers(-(2**63), 2**63 - 1, 40, dtype=np.int64).tolist()
    first = hash_rows([f"cc3m_{i}" for i in range(40)], ["cc3m"] * 40, old)
    kept1, _ = run(ray, first, join(base, "run1"), storage, join(base, "index"))
    assert kept1 == set(first["sample_id"].to_pylist())
    after_first = snapshot(storage, join(base, "index"))
    assert len(after_first) >= 1

    fresh = rng.integers(-(2**63), 2**63 - 1, 10, dtype=np.int64).tolist()
    copies = [flipped(old[i], rng.choice(64, 2, replace=False)) for i in range(5)]
    second = hash_rows([f"laion2b_{i}" for i in range(5)] + [f"sbu_{i}" for i in range(10)] + ["sbu_copy"],
                       ["laion2b"] * 5 + ["sbu"] * 11, copies + fresh + [flipped(fresh[0], [3])])
    kept2, reasons2 = run(ray, second, join(base, "run2"), storage, join(base, "index"))
    # old rows win even against a higher-priority source; new-new duplicates still resolve
    internal = {"sbu_copy": "near_dup_of:sbu_0"} if "sbu_0" in kept2 else {"sbu_0": "near_dup_of:sbu_copy"}
    assert reasons2 == {**{f"laion2b_{i}": f"near_dup_of:cc3m_{i}" for i in range(5)}, **internal}
    after_second = snapshot(storage, join(base, "index"))
    assert {p: after_second[p] for p in after_first} == after_first, "earlier parts are never rewritten"
    assert len(after_second) > len(after_first)

    if not restart:
        return
    # a restart of run 2 ignores its own committed parts and rewrites the same ones
    kept2b, reasons2b = run(ray, second, join(base, "run2"), storage, join(base, "index"))
    assert (kept2b, reasons2b) == (kept2, reasons2)
    assert snapshot(storage, join(base, "index")).keys() == after_second.keys()


def test_incremental_runs_on_local_disk(sort_shuffle, tmp_path):
    incremental_runs(sort_shuffle, str(tmp_path), Storage(), restart=True)


def test_incremental_runs_on_s3(sort_shuffle, s3_bucket):
    base, storage = s3_bucket
    incremental_runs(sort_shuffle, base, storage, restart=False)


def test_embedding_index_keeps_old_rows(sort_shuffle, tmp_path):
    emb, base_of = planted_embeddings(30, 1, 32, seed=5)
    vectors = pa.array(list(emb), pa.list_(pa.float32()))

    def rows(ids, take):
        return pa.table({"sample_id": ids, "source": ["laion2b"] * len(ids), "url": ids, "caption": ids,
                         "image_embedding": vectors.take(pa.array(take))})

    index = str(tmp_path / "index")
    kept1, _ = run(sort_shuffle, rows([f"a{i}" for i in range(30)], list(range(30))), str(tmp_path / "r1"),
                   Storage(), index, apply_embedding_dedup, "embedding_dedup")
    assert len(kept1) == 30
    copies = list(range(30, 40))  # copies of bases 0..9
    kept2, reasons = run(sort_shuffle, rows([f"b{i}" for i in copies], copies), str(tmp_path / "r2"), Storage(),
                         index, apply_embedding_dedup, "embedding_dedup")
    assert kept2 == set()
    assert reasons == {f"b{i}": f"near_dup_of:a{base_of[i]}" for i in copies}


def test_index_names_are_validated(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        DedupIndex(str(tmp_path), Storage(), "a/b")
    with pytest.raises(ValueError, match="unknown index kind"):
        DedupIndex(str(tmp_path), Storage(), "r").parts("clip")
    assert index_for(NearDupConfig(), "out", Storage()) is None
    assert index_for(NearDupConfig(index_path="i"), "out", Storage()).run_id == \
        index_for(NearDupConfig(index_path="i"), "out/", Storage()).run_id
