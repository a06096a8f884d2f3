"""Exact URL dedup, global across all sources and files.

Rows are hash-partitioned on their URL (a shuffle on Ray, no driver-side set), so
every copy of a URL lands in the same partition; inside it one row per URL is kept by
RS5M's keep rule (`keep_rule.KeepRule`, the same as for near-dups: source priority,
then quality if configured, then a seeded pick) and the others point to it.
"""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rs5m_ray.ledger import mark_dropped
from rs5m_ray.stages.keep_rule import KeepRule

BUCKET = "url_bucket"


def add_url_bucket(batch: pa.Table, num_partitions: int) -> pa.Table:
    """crc32 is stable across processes (Python's hash() is salted)."""
    buckets = [zlib.crc32(u.encode()) % num_partitions for u in batch["url"].to_pylist()]
    return batch.append_column(BUCKET, pa.array(buckets, pa.int32()))


def dedup_urls(partition: pa.Table, rule: KeepRule) -> pa.Table:
    """Mark every row whose URL is kept on another row (`duplicate_of:<kept sample_id>`).

    Rows come back sorted by (url, sample_id): the output does not depend on the input order.
    """
    rows = partition.sort_by([("url", "ascending"), ("sample_id", "ascending")])
    if BUCKET in rows.column_names:
        rows = rows.drop_columns([BUCKET])
    if rule.quality_column and rule.quality_column not in rows.column_names:
        raise ValueError(f"url dedup: quality column {rule.quality_column!r} not in {rows.column_names}")
    urls = rows["url"].combine_chunks()
    n = len(rows)
    same_as_prev = np.zeros(n, dtype=bool)
    if n > 1:
        same_as_prev[1:] = pc.fill_null(pc.equal(urls[1:], urls[:-1]), False).to_numpy(zero_copy_only=False)
    group = np.cumsum(~same_as_prev) - 1  # one label per URL, in URL order
    copies = np.bincount(group, minlength=group[-1] + 1 if n else 0)[group] > 1
    keeper = np.arange(n)
    dup = np.nonzero(copies)[0]  # the keep rule runs over the rows whose URL has copies only
    if len(dup):
        sub = rows.take(pa.array(dup))
        quality = (pc.cast(sub[rule.quality_column], pa.float64()).to_numpy(zero_copy_only=False)
                   if rule.quality_column else None)
        _, labels = np.unique(group[dup], return_inverse=True)
        kept = rule.keepers(labels.reshape(-1), sub["sample_id"].to_pylist(),
                            sub["source"].to_numpy(zero_copy_only=False), quality=quality)
        keeper[dup] = dup[kept]
    drop = keeper != np.arange(n)
    kept_id = pc.take(rows["sample_id"], pa.array(keeper))
    detail = pc.binary_join_element_wise("duplicate_of:", kept_id, "")
    return mark_dropped(rows, pa.array(drop), "duplicate_url", detail)
