"""Exact URL dedup, global across all sources and files.

Rows are hash-partitioned on their URL (a shuffle on Ray, no driver-side set), so
every copy of a URL lands in the same partition; inside it the row with the
smallest sample_id is kept and the others point to it.
"""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rs5m_ray.ledger import mark_dropped

BUCKET = "url_bucket"


def add_url_bucket(batch: pa.Table, num_partitions: int) -> pa.Table:
    """crc32 is stable across processes (Python's hash() is salted)."""
    buckets = [zlib.crc32(u.encode()) % num_partitions for u in batch["url"].to_pylist()]
    return batch.append_column(BUCKET, pa.array(buckets, pa.int32()))


def dedup_urls(partition: pa.Table) -> pa.Table:
    """Mark every row whose URL appeared on a row with a smaller sample_id."""
    rows = partition.sort_by([("url", "ascending"), ("sample_id", "ascending")]).drop_columns([BUCKET])
    urls = rows["url"].combine_chunks()
    n = len(rows)
    same_as_prev = np.zeros(n, dtype=bool)
    if n > 1:
        same_as_prev[1:] = pc.equal(urls[1:], urls[:-1]).to_numpy(zero_copy_only=False)
    first_of_run = np.maximum.accumulate(np.where(same_as_prev, 0, np.arange(n)))
    kept_id = pc.take(rows["sample_id"], pa.array(first_of_run))
    detail = pc.binary_join_element_wise("duplicate_of:", kept_id, "")
    return mark_dropped(rows, pa.array(same_as_prev), "duplicate_url", detail)
