"""pHash near-dup join: kernel and Ray path against brute force, keep rule, ledger accounting."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from rs5m_ray.config import NearDupConfig
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.stages.keep_rule import choose_keepers, clusters, member_rows
from rs5m_ray.stages.near_dup import (apply_phash_dedup, band_keys, combo_masks, near_pairs,
                                      partitions_for, phash_edge_rows)
from rs5m_ray.stages.phash import compute_phash
from rs5m_ray.storage import Storage, join
from tests.test_phash import COPIES, generated_image


def planted_hashes(n: int, seed: int, radius: int = 4) -> np.ndarray:
    """Random uint64 hashes where a third are copies of others with 0..radius+1 bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    for t in rng.choice(n, n // 3, replace=False):
        x = h[rng.integers(0, n)]
        for bit in rng.choice(64, rng.integers(0, radius + 2), replace=False):
            x ^= np.uint64(1) << np.uint64(bit)
        h[t] = x
    return h


def brute_force_labels(h: np.ndarray, radius: int, old: np.ndarray | None = None) -> np.ndarray:
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    a, b = np.nonzero(np.triu(d <= radius, 1))
    if old is not None:
        keep = ~(old[a] & old[b])
        a, b = a[keep], b[keep]
    return clusters(len(h), a, b)


def same_partition(x: np.ndarray, y: np.ndarray) -> bool:
    return len(set(zip(x.tolist(), y.tolist()))) == len(set(x.tolist())) == len(set(y.tolist()))


def kernel_labels(h, old, bands, radius, partitions, budget):
    masks = combo_masks(bands, radius)
    row, combo, part = band_keys(h, masks, partitions)
    a, b = [], []
    for p in range(partitions):
        sel = np.nonzero(part == p)[0]
        left, right, dist = near_pairs(combo[sel], h[row[sel]], old[row[sel]], masks, radius, pair_budget=budget)
        assert (dist == np.bitwise_count(h[row[sel][left]] ^ h[row[sel][right]])).all()
        a.append(row[sel][left])
        b.append(row[sel][right])
    a, b = np.concatenate(a), np.concatenate(b)
    assert len(set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))) == len(a), "edges are unique"
    return clusters(len(h), a, b), a, b


def test_combo_masks_follow_the_pigeonhole():
    masks = combo_masks(6, 4)
    assert len(masks) == 15
    assert {int(np.bitwise_count(m)) for m in masks} <= {20, 21, 22}
    assert len(combo_masks(5, 4)) == 5 and len(combo_masks(1, 0)) == 1
    with pytest.raises(ValueError):
        combo_masks(4, 4)
    cfg = NearDupConfig(num_partitions=16, partition_rows=1_000_000)
    assert (partitions_for(1_000, cfg), partitions_for(2_000_000, cfg)) == (16, 30)  # 15 keys per row


@pytest.mark.parametrize("bands,radius,budget", [(5, 4, 1 << 20), (6, 4, 500), (8, 4, 1 << 20), (4, 2, 97),
                                                 (10, 4, 1 << 20)])  # 210 combos
def test_kernel_equals_brute_force(bands, radius, budget):
    h = planted_hashes(2500, seed=bands, radius=radius)
    h[100:160] = h[99]  # a flood of identical placeholder images
    old = np.zeros(len(h), dtype=bool)
    old[1000:1400] = True
    values, counts = np.unique(h[old], return_counts=True)
    alone = ~old | np.isin(h, values[counts > 1], invert=True)
    h, old = h[alone], old[alone]  # identical old rows were resolved by earlier runs
    labels, a, b = kernel_labels(h, old, bands, radius, partitions=7, budget=budget)
    assert same_partition(labels, brute_force_labels(h, radius, old))
    assert not (old[a] & old[b]).any(), "old rows are never compared with each other"


def test_distributed_join_equals_brute_force(ray_cluster):
    import ray.data

    h = planted_hashes(3000, seed=7)
    ids = [f"s{i:05d}" for i in range(len(h))]
    table = pa.table({"sample_id": ids, "source": ["laion2b"] * len(h), "phash": h.view(np.int64)})
    keys = ray.data.from_arrow(table).repartition(4).map_batches(
        member_rows, fn_kwargs={"value_column": "phash", "quality_column": None, "from_index": False},
        batch_format="pyarrow")
    edges = pa.concat_tables(ray_cluster.get(phash_edge_rows(keys, NearDupConfig(num_partitions=5)).to_arrow_refs()))
    a = pc.index_in(edges["sample_id"], pa.array(ids)).to_numpy()
    b = pc.index_in(edges["peer"], pa.array(ids)).to_numpy()
    assert (edges["score"].to_numpy() == np.bitwise_count(h[a] ^ h[b])).all()
    assert same_partition(clusters(len(h), a, b), brute_force_labels(h, 4))


def members(sources, quality=None, from_index=None, ids=None):
    n = len(sources)
    return pa.table({"sample_id": ids or [f"id{i}" for i in range(n)], "source": sources,
                     "quality": pa.array(quality if quality is not None else [None] * n, pa.float64()),
                     "from_index": from_index or [False] * n})


def test_keep_rule_follows_rs5m_priority_then_quality_then_seeded_pick():
    cfg = NearDupConfig()
    one = np.zeros(4, dtype=np.int64)
    t = members(["laioncoco", "coyo700m", "laion400m", "cc3m"])
    assert choose_keepers(t, one, cfg)[0] == 2  # laion400m beats coyo700m; laioncoco goes first
    assert choose_keepers(members(["laioncoco", "cc3m", "redcaps", "laioncoco"]), one, cfg)[0] in (1, 2)
    assert choose_keepers(members(["laioncoco", "laioncoco", "laioncoco", "cc12m"]), one, cfg)[0] == 3
    # an index row (already accepted in an earlier run) always wins
    assert choose_keepers(members(["laioncoco", "laion2b", "yfcc15m", "cc3m"], from_index=[1, 0, 0, 0]),
                          one, cfg)[0] == 0
    # quality breaks ties within a source rank
    q = members(["cc3m", "cc3m", "laioncoco", "sbu"], quality=[0.2, 0.9, 1.0, 0.5])
    assert choose_keepers(q, one, NearDupConfig(phash_quality_column="clip_score"))[0] == 1
    # the random pick is a function of the seed and the members only
    t = members(["cc3m"] * 4, ids=["a", "b", "c", "d"])
    picks = {int(choose_keepers(t, one, NearDupConfig(seed=s))[0]) for s in range(12)}
    assert len(picks) > 1
    shuffled = t.take([3, 2, 1, 0])
    seeded = NearDupConfig(seed=5)
    assert t["sample_id"][int(choose_keepers(t, one, seeded)[0])] == \
        shuffled["sample_id"][int(choose_keepers(shuffled, one, seeded)[0])]
    two = np.array([0, 0, 1, 1])
    kept = choose_keepers(members(["laioncoco", "laion2b", "coyo700m", "laioncoco"]), two, cfg)
    assert kept.tolist() == [1, 1, 2, 2]


def image_rows(images: list[tuple[str, str, Image.Image]]) -> pa.Table:
    return pa.table({"sample_id": [i for i, _, _ in images], "source": [s for _, s, _ in images],
                     "url": [f"http://x/{i}.jpg" for i, _, _ in images], "caption": ["an aerial view"] * len(images),
                     "phash": pa.array([compute_phash(im) for _, _, im in images], pa.int64())})


def run_dedup(ray_cluster, rows: pa.Table, output: str, cfg: NearDupConfig | None = None, index=None):
    import ray.data

    ds = ray.data.from_arrow(rows).repartition(3)
    kept = pa.concat_tables(ray_cluster.get(
        apply_phash_dedup(ds, cfg or NearDupConfig(num_partitions=4), output, Storage(), index).to_arrow_refs()))
    ledger = read_parquet_dir(Storage(), join(output, "ledger", "phash_dedup"))
    stats = read_parquet_dir(Storage(), join(output, "stats", "phash_dedup"))
    return kept, ledger, stats


def assert_accounting_exact(rows: pa.Table, kept: pa.Table, ledger: pa.Table | None, stats: pa.Table):
    if len(kept) == 0:  # Ray hands back schema-less empty blocks
        kept = rows.schema.empty_table()
    gone = ledger["sample_id"].to_pylist() if ledger is not None else []
    assert sorted(kept["sample_id"].to_pylist() + gone) == sorted(rows["sample_id"].to_pylist())
    by_source = stats.group_by("source").aggregate([("rows_in", "sum"), ("rows_out", "sum")]).to_pylist()
    for s in by_source:
        assert s["rows_in_sum"] == pc.sum(pc.equal(rows["source"], s["source"])).as_py()
        assert s["rows_out_sum"] == (pc.sum(pc.equal(kept["source"], s["source"])).as_py() or 0)


def test_pipeline_drops_generated_copies_by_priority_with_exact_ledger(sort_shuffle, tmp_path):
    originals = [generated_image(100 + i) for i in range(12)]
    rows = [(f"laion2b_{i}", "laion2b", im) for i, im in enumerate(originals)]
    for i, im in enumerate(originals[:6]):  # copies in lower-priority sources, one kind each
        name, copy = list(COPIES.items())[i]
        rows.append((f"laioncoco_{i}", "laioncoco", copy(im)))
        rows.append((f"cc3m_{i}", "cc3m", im.resize((200, 200))))
    rows.append(("cc12m_nohash", "cc12m", None))
    table = image_rows([r for r in rows if r[2] is not None])
    table = pa.concat_tables([table, pa.table({"sample_id": ["cc12m_nohash"], "source": ["cc12m"],
                                               "url": ["http://x/n.jpg"], "caption": ["c"],
                                               "phash": pa.nulls(1, pa.int64())})])
    kept, ledger, stats = run_dedup(sort_shuffle, table, str(tmp_path / "run"))
    assert_accounting_exact(table, kept, ledger, stats)
    assert set(kept["sample_id"].to_pylist()) >= {f"laion2b_{i}" for i in range(12)} | {"cc12m_nohash"}
    reasons = dict(zip(ledger["sample_id"].to_pylist(), ledger["drop_reason"].to_pylist()))
    details = dict(zip(ledger["sample_id"].to_pylist(), ledger["drop_detail"].to_pylist()))
    assert len(reasons) >= 11  # 12 planted copies; pHash may miss at most one crop/watermark
    for sid, reason in reasons.items():
        assert reason == f"near_dup_of:laion2b_{sid.split('_')[1]}"
        assert 0 <= int(details[sid].removeprefix("hamming=")) <= 4


def test_pipeline_on_real_aid_copies(sort_shuffle, tmp_path, shared_data):
    files = sorted((shared_data / "aid-dev").glob("*/*.jpg"))[::10]  # one per class
    rows = []
    for i, f in enumerate(files):
        im = Image.open(f).convert("RGB")
        rows.append((f"coyo700m_{i}", "coyo700m", im))
        rows.append((f"laioncoco_{i}", "laioncoco", COPIES["reencoded"](im)))
        rows.append((f"laion400m_{i}", "laion400m", COPIES["brighter_10pct"](COPIES["resized_up"](im))))
    table = image_rows(rows)
    kept, ledger, stats = run_dedup(sort_shuffle, table, str(tmp_path / "run"))
    assert_accounting_exact(table, kept, ledger, stats)
    assert sorted(kept["sample_id"].to_pylist()) == sorted(f"laion400m_{i}" for i in range(len(files)))
