"""Peak memory of one shard writer, measured in a process of its own (used by tests/test_shards.py).

    python -m tests.shard_memory_probe stage <run_dir> <parts> <images_per_part> <image_bytes> <chunk_bytes>
    python -m tests.shard_memory_probe write <run_dir> <chunk_bytes>

`stage` writes the staged image parts of one shard (incompressible random payloads: the writer
never decodes images) in a process of its own, so none of it counts against the writer's process.
`write` reads the shard's light rows (no image bytes), takes its peak RSS as the baseline, runs
the shard writer over them and prints, as JSON, the peak RSS before and after (ru_maxrss, KiB on
Linux) with the shard's and the tar's sizes.
"""
from __future__ import annotations

import gc
import json
import resource
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rs5m_ray.config import ShardConfig
from rs5m_ray.pipelines.parts import write_part
from rs5m_ray.shards.writer import PART, SHARD, ShardWriter, layout_rows
from rs5m_ray.storage import Storage, join


def config(chunk_bytes: int) -> ShardConfig:
    # every sample in one shard, pub11-train-0000
    return ShardConfig(train_shards=1, val_shards=1, val_fraction=0.0, chunk_bytes=chunk_bytes)


def image_path(run_dir: str):
    return lambda part: join(run_dir, "staging", "images", f"{part}.parquet")


def stage(run_dir: str, parts: int, per_part: int, image_bytes: int, chunk_bytes: int) -> None:
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
    print(json.dumps({"staged_parts": parts}))


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def write(run_dir: str, chunk_bytes: int) -> None:
    storage, cfg, path = Storage(), config(chunk_bytes), image_path(run_dir)
    files = storage.glob(join(run_dir, "staging", "images", "*.parquet"))
    columns = [c for c in pq.read_schema(files[0]).names if c != "jpg"]
    light = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    row_groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
    writer = ShardWriter(run_dir, storage, cfg, path, None)
    gc.collect()
    before = peak_kib()
    summary = writer(light)
    after = peak_kib()
    manifests = [json.loads(m) for m in summary["manifest"].to_pylist()]
    print(json.dumps({"peak_before_kib": before, "peak_after_kib": after, "rows": len(light),
                      "shards": sorted(set(light[SHARD].to_pylist())), "row_groups": row_groups,
                      "status": summary["status"].to_pylist(),
                      "count": sum(m["count"] for m in manifests),
                      "tar_bytes": sum(m["tar_bytes"] for m in manifests)}))


if __name__ == "__main__":
    mode, run_dir, *numbers = sys.argv[1:]
    if mode == "stage":
        stage(run_dir, *map(int, numbers))
    else:
        write(run_dir, *map(int, numbers))
