"""Live metrics of a run, exported by Ray's metrics agent on every node in Prometheus format
(`ray_rs5m_*`; the dashboard's Grafana and any Prometheus scrape them while the job runs).

The row counters are recorded where the ledger writes its counts (`ledger.write_counts`,
`ledger.write_ledger`), once per batch or part: rows in / out per stage and source, rows dropped
per stage, source and reason, the stage's seconds. Probes in the stages add what the counts
cannot show: download status and latency, host-lease wait, CLIP decode wait against forward
time, shard bytes and seconds. A retried task records again: the report (from the ledger) is
the exact account, these are the live view. Outside a Ray worker or driver nothing is recorded.
"""
from __future__ import annotations

from functools import cache

SECONDS = [0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800]
BYTES = [2**k for k in range(16, 34, 2)]  # 64 KiB .. 8 GiB

# name: (kind, description, tag keys[, boundaries])
METRICS = {
    "rs5m_rows_in": ("counter", "rows into a stage", ("stage", "source")),
    "rs5m_rows_out": ("counter", "rows a stage kept", ("stage", "source")),
    "rs5m_rows_dropped": ("counter", "rows a stage dropped, by reason (the ledger's)", ("stage", "source", "reason")),
    "rs5m_stage_seconds": ("histogram", "seconds a stage spent on one batch or part", ("stage",), SECONDS),
    # Per URL, by outcome (ok or the drop reason): its _count series counts downloads by status.
    "rs5m_download_seconds": ("histogram", "seconds from request to the last byte (or failure)", ("status",), SECONDS),
    "rs5m_host_lease_wait_seconds": ("histogram", "seconds a request waited for a slot of its host (when it had to)",
                                     (), SECONDS),
    "rs5m_clip_seconds": ("histogram", "CLIP pass seconds per batch: decode wait vs forward", ("phase",), SECONDS),
    "rs5m_shard_bytes": ("histogram", "bytes of one written shard", (), BYTES),
    "rs5m_shard_seconds": ("histogram", "seconds to write one shard", (), SECONDS),
}


@cache
def _metric(name: str):
    from ray.util import metrics

    kind, description, tags, *boundaries = METRICS[name]
    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=tags)
    return metrics.Histogram(name, description, boundaries=boundaries[0], tag_keys=tags)


def _live() -> bool:
    import ray

    return ray.is_initialized()


def count(name: str, value: float, **tags: str) -> None:
    if value and _live():
        _metric(name).inc(value, tags=tags or None)


def observe(name: str, value: float, **tags: str) -> None:
    if _live():
        _metric(name).observe(value, tags=tags or None)
