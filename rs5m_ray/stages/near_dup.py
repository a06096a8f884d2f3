"""Near-duplicate join on 64-bit perceptual hashes within a Hamming radius, on Ray.

Banding by the generalised pigeonhole principle: cut the 64 bits into `m` bands;
two hashes at distance <= r differ in at most r bands, so they agree exactly on at
least m - r of them. Each row is emitted once per (m - r)-subset of bands ("combo")
with the bits of that subset as its key; rows sharing a (combo, key) are candidates
and their exact distance is verified. Chance candidates per row are about
C(m, m-r) * N / 2^(key bits). With the classic m = r + 1 a key has only ~13 bits
(5 keys, ~1,400 chance candidates per row at N = 2M: time(2M)/time(1M) measured 3.2);
the default m = 6 at r = 4 explodes each row into 15 keys of ~21 bits (~11 per row
at 2M, ratio 2.1). For 10^8+ rows raise `phash_bands` (m = 8: 70 keys of 32 bits).
`partition_rows` sizes the shuffle so each partition's sort stays worker-sized.

On Ray: light member rows (sample_id, source, hash, quality) are exploded into
(combo, key) rows, hash-partitioned on the key (a `groupby` shuffle, no driver-side
table), candidate pairs are verified inside each partition with numpy, and each
pair is emitted only from the first combo on which it agrees, so edges are unique.
Identical hashes inside a key run collapse onto one representative (star edges),
so a flood of identical placeholder images stays linear. Pairs of two rows that
both come from the persistent index are never generated: old rows are not
re-compared. Connected components and the keep rule then run on the edges only
(`keep_rule.resolve_drops`).
"""
from __future__ import annotations

from functools import partial
from itertools import combinations

import numpy as np
import pyarrow as pa
import ray
import ray.data

from rs5m_ray.config import NearDupConfig
from rs5m_ray.stages.keep_rule import resolve_drops, run_near_dup
from rs5m_ray.stages.phash import as_unsigned, hamming
from rs5m_ray.storage import Storage

COMBO = "nd_combo"
BUCKET = "nd_bucket"
PHASH = "phash"
# Candidate pairs verified per numpy step: bounds memory on large key runs.
PAIR_BUDGET = 1 << 21
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def combo_masks(bands: int, radius: int) -> np.ndarray:
    """One uint64 mask per (bands - radius)-subset of `bands` near-equal bit bands."""
    if not 0 <= radius < bands <= 64:
        raise ValueError(f"need 0 <= hamming_radius < phash_bands <= 64, got radius={radius}, bands={bands}")
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    band = [sum(1 << bit for bit in range(lo, hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    return np.array([sum(band[i] for i in subset) for subset in combinations(range(bands), bands - radius)],
                    dtype=np.uint64)


def band_keys(h: np.ndarray, masks: np.ndarray, num_partitions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explode hashes into (row index, combo, partition) per combo; same (combo, key) -> same partition."""
    n, c = len(h), len(masks)
    row = np.repeat(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64), c)
    combo = np.tile(np.arange(c, dtype=np.int32), n)  # C(bands, bands - radius) ids: 210 at (10, 4)
    key = h[row] & masks[combo]
    mixed = (key ^ (combo.astype(np.uint64) + np.uint64(1)) * _GOLDEN) * _MIX
    return row, combo, ((mixed >> np.uint64(32)) % np.uint64(num_partitions)).astype(np.int32)


def near_pairs(combo: np.ndarray, h: np.ndarray, is_old: np.ndarray, masks: np.ndarray, radius: int,
               pair_budget: int = PAIR_BUDGET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The partition kernel: unique pairs (i, j, distance <= radius) among exploded rows.

    `combo`, `h` (uint64), `is_old` (row comes from the index) describe the rows of
    one partition; every (combo, key) run lies entirely in one partition.
    """
    n = len(h)
    if n == 0:
        return (np.empty(0, np.int64),) * 2 + (np.empty(0, np.int8),)
    combo = combo.astype(np.int64)
    key = h & masks[combo]
    order = np.lexsort((is_old, h, key, combo))
    c, k, hh, old = combo[order], key[order], h[order], is_old[order]
    same_run = np.zeros(n, dtype=bool)
    same_run[1:] = (c[1:] == c[:-1]) & (k[1:] == k[:-1])
    same_hash = same_run.copy()
    same_hash[1:] &= hh[1:] == hh[:-1]
    # Identical hashes: star edges to the group's first row (new rows sort first),
    # emitted in combo 0 only, where every row appears exactly once.
    group_first = np.maximum.accumulate(np.where(same_hash, 0, np.arange(n)))
    star = same_hash & (c == 0) & ~old[group_first]
    lefts, rights, dists = [order[star]], [order[group_first[star]]], [np.zeros(star.sum(), np.int8)]

    rep = np.nonzero(~same_hash)[0]
    run_of_rep = np.cumsum(~same_run)[rep]
    rep = rep[np.lexsort((old[rep], run_of_rep))]  # within a run: representatives with new rows first
    run_of_rep = np.cumsum(~same_run)[rep]
    run_start = np.ones(len(rep), dtype=bool)
    run_start[1:] = run_of_rep[1:] != run_of_rep[:-1]
    starts = np.nonzero(run_start)[0]
    lengths = np.diff(np.append(starts, len(rep)))
    offset = np.arange(len(rep)) - np.repeat(starts, lengths)
    # Each new representative pairs with every later one in its run; old ones start no pair.
    count = np.where(old[rep], 0, np.repeat(lengths, lengths) - 1 - offset).astype(np.int64)
    first_pair = np.cumsum(count) - count
    total = int(count.sum())
    cuts = np.unique(np.concatenate([[0], np.searchsorted(first_pair, np.arange(pair_budget, total, pair_budget)),
                                     [len(rep)]]))
    rows = order[rep]
    rep_hash = h[rows]
    for e0, e1 in zip(cuts[:-1], cuts[1:]):
        cnt = count[e0:e1]
        left = np.repeat(np.arange(e0, e1), cnt)
        right = left + 1 + np.arange(len(left)) - np.repeat(first_pair[e0:e1] - first_pair[e0], cnt)
        x = rep_hash[left] ^ rep_hash[right]
        dist = np.bitwise_count(x)
        ok = dist <= radius
        left, right, x, dist = left[ok], right[ok], x[ok], dist[ok]
        first_combo = np.argmax((x[:, None] & masks[None, :]) == 0, axis=1)
        mine = first_combo == c[rep[left]]
        lefts.append(rows[left[mine]])
        rights.append(rows[right[mine]])
        dists.append(dist[mine].astype(np.int8))
    return np.concatenate(lefts), np.concatenate(rights), np.concatenate(dists)


def explode_bands(batch: pa.Table, masks: np.ndarray, num_partitions: int) -> pa.Table:
    row, combo, bucket = band_keys(as_unsigned(batch["value"].to_numpy()), masks, num_partitions)
    return (batch.take(pa.array(row)).append_column(COMBO, pa.array(combo))
            .append_column(BUCKET, pa.array(bucket)))


def phash_edges(group: pa.Table, masks: np.ndarray, radius: int) -> pa.Table:
    """Edge rows (both directions) of the verified pairs in one partition."""
    left, right, dist = near_pairs(group[COMBO].to_numpy(), as_unsigned(group["value"].to_numpy()),
                                   group["from_index"].to_numpy(zero_copy_only=False), masks, radius)
    members = group.drop_columns([COMBO, BUCKET])
    src, dst = np.concatenate([left, right]), np.concatenate([right, left])
    out = members.take(pa.array(src))
    out = out.append_column("peer", members["sample_id"].take(pa.array(dst)))
    return out.append_column("score", pa.array(np.concatenate([dist, dist]).astype(np.float64)))


def partitions_for(rows: int, cfg: NearDupConfig) -> int:
    """Enough partitions that each holds about `partition_rows` exploded rows: the per-partition
    sort then stays worker-sized, and total work grows linearly with the rows."""
    keys_per_row = len(combo_masks(cfg.phash_bands, cfg.hamming_radius))
    return max(cfg.num_partitions, -(-rows * keys_per_row // cfg.partition_rows))


def phash_edge_rows(keys: ray.data.Dataset, cfg: NearDupConfig) -> ray.data.Dataset:
    """Member rows -> edge rows of all pairs within the radius, by a hash-partitioned shuffle."""
    masks = combo_masks(cfg.phash_bands, cfg.hamming_radius)
    keys = keys.materialize()  # light rows, counted to size the shuffle, then exploded
    parts = partitions_for(keys.count(), cfg)
    return (keys.map_batches(explode_bands, fn_kwargs={"masks": masks, "num_partitions": parts},
                             batch_format="pyarrow")
            .groupby(BUCKET, num_partitions=parts)
            .map_groups(phash_edges, fn_kwargs={"masks": masks, "radius": cfg.hamming_radius},
                        batch_format="pyarrow"))


def phash_drops(keys: ray.data.Dataset, cfg: NearDupConfig) -> ray.ObjectRef:
    """Member rows -> ObjectRef of the drop marks, computed without any driver-side table."""
    return ray.remote(resolve_drops).remote(cfg, hamming_detail, *phash_edge_rows(keys, cfg).to_arrow_refs())


def hamming_detail(values: pa.ChunkedArray, who: np.ndarray, kept_by: np.ndarray) -> list[str]:
    h = values.to_numpy()
    return [f"hamming={d}" for d in hamming(h[who], h[kept_by])]


def apply_phash_dedup(ds: ray.data.Dataset, cfg: NearDupConfig, output: str, storage: Storage,
                      index=None, stage_name: str = "phash_dedup") -> ray.data.Dataset:
    """Kept rows of `ds` (needs sample_id, source, phash); near-dups go to the ledger.

    `index` (a `DedupIndex`) adds the hashes of earlier runs, which always win.
    """
    return run_near_dup(ds, PHASH, cfg.phash_quality_column, partial(phash_drops, cfg=cfg), output, storage,
                        index, stage_name)
