"""Peak memory of one shard writer, measured in a process of its own (used by tests/test_shards.py).

    python -m tests.shard_memory_probe <run_dir> <chunk_bytes>

The caller stages the shard's images first, in another process (`stage`), so none of them
counts against the writer's process. The probe reads the shard's light rows (no image bytes),
resets its peak RSS and takes its RSS as the baseline, runs the shard writer over them and prints,
as JSON, that baseline (VmRSS) and the peak RSS (VmHWM) before and after, in KiB, with what it wrote.
"""
from __future__ import annotations

import gc
import json
import resource
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from rs5m_ray.config import ShardConfig
from rs5m_ray.shards.writer import PART, SHARD, ShardWriter, layout_rows
from rs5m_ray.storage import Storage, join


def config(chunk_bytes: int) -> ShardConfig:
    """Every sample in one shard, pub11-train-0000."""
    return ShardConfig(train_shards=1, val_shards=1, val_fraction=0.0, chunk_bytes=chunk_bytes)


def image_path(run_dir: str):
    return lambda part: join(run_dir, "staging", "images", f"{part}.parquet")


def stage(run_dir: str, parts: int, per_part: int, image_bytes: int, chunk_bytes: int) -> int:
    """Stage `parts` parts of `per_part` incompressible random payloads (the writer never decodes
    images), all in one shard; returns the shard's image bytes."""
    import numpy as np

    from rs5m_ray.pipelines.parts import write_part

    storage, cfg, path = Storage(), config(chunk_bytes), image_path(run_dir)
    for k in range(parts):
        rng = np.random.default_rng(k)
        ids = [f"laion2b_m_{k}_{i}" for i in range(per_part)]
        rows = pa.table({"sample_id": ids, "source": ["laion2b"] * per_part, "url": [f"http://h/{s}" for s in ids],
                         "caption": [f"aerial view {s}" for s in ids],
                         "jpg": pa.array([rng.bytes(image_bytes) for _ in ids], pa.binary()),
                         PART: [f"part-{k:05d}"] * per_part})
        write_part(storage, path(f"part-{k:05d}"), layout_rows(rows, cfg))
        del rows
    return parts * per_part * image_bytes


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, where the kernel allows it.

    Not `ru_maxrss`: a child process starts with its parent's peak there (a test runner's
    gigabyte would hide everything the writer does)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write(run_dir: str, chunk_bytes: int) -> dict:
    storage, cfg, path = Storage(), config(chunk_bytes), image_path(run_dir)
    files = storage.glob(join(run_dir, "staging", "images", "*.parquet"))
    columns = [c for c in pq.read_schema(files[0]).names if c != "jpg"]
    light = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    row_groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
    writer = ShardWriter(run_dir, storage, cfg, path, None)
    gc.collect()
    reset = reset_peak()
    rss_before, peak_before = status_kib("VmRSS"), status_kib("VmHWM")
    summary = writer(light)
    peak_after = status_kib("VmHWM")
    manifests = [json.loads(m) for m in summary["manifest"].to_pylist()]
    return {"rss_before_kib": rss_before, "peak_before_kib": peak_before, "peak_after_kib": peak_after,
            "peak_reset": reset, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "rows": len(light), "parts": len(files), "row_groups": row_groups,
            "shards": sorted(set(light[SHARD].to_pylist())), "status": summary["status"].to_pylist(),
            "count": sum(m["count"] for m in manifests), "tar_bytes": sum(m["tar_bytes"] for m in manifests)}


if __name__ == "__main__":
    print(json.dumps(write(sys.argv[1], int(sys.argv[2]))))
