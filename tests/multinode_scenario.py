"""Run by test_multinode.py in its own process: a 3-node Ray cluster loses a worker mid-run."""
import json
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
from ray.cluster_utils import Cluster

from rs5m_ray.config import load_config
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.pipelines.harness import CANDIDATES, Staging
from rs5m_ray.pipelines.pub11 import ingested, write_candidates
from rs5m_ray.storage import Storage


def main(workdir: str) -> None:
    files = 12
    for f in range(files):
        urls = [f"http://img.example/{(f * 900 + i) % 9000}.jpg" for i in range(1000)]
        captions = ["aerial view of a port" if i % 3 else "a dog" for i in range(1000)]
        pq.write_table(pa.table({"URL": urls, "TEXT": captions}), f"{workdir}/part-{f:03d}.parquet")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(overrides={"output": f"{workdir}/out", "parts": {"num_parts": 4},
                                 "ingest": {"sources": [{"name": "laion2b", "paths": [f"{workdir}/*.parquet"]}]}})
    storage = Storage()
    ds = ingested(cfg, storage)

    def slow(batch):  # keeps tasks in flight long enough for the node to die under them
        time.sleep(0.5)
        return batch

    staging = Staging(cfg.output, storage)
    killed_at = []

    def kill():
        cluster.remove_node(workers[0], allow_graceful=False)
        killed_at.append(time.monotonic())

    killer = threading.Timer(4.0, kill)
    killer.start()
    parts = write_candidates(ds.map_batches(slow, batch_format="pyarrow"), cfg, storage, staging)
    kept = pa.concat_tables([pq.read_table(p) for p in staging.paths(CANDIDATES, parts)])
    finished_at = time.monotonic()
    killer.join()
    cluster.add_node(num_cpus=1)
    ledger = read_parquet_dir(storage, f"{cfg.output}/ledger")
    stats = read_parquet_dir(storage, f"{cfg.output}/stats")
    ingest = stats.filter(pa.compute.equal(stats["stage"], "ingest"))
    Path(workdir, "outcome.json").write_text(json.dumps({  # a file, not stdout: the raylets print there
        "input_rows": files * 1000, "ingest_rows": pa.compute.sum(ingest["rows_in"]).as_py(),
        "kept": len(kept), "dropped": len(ledger),
        "unique_ids": len(set(kept["sample_id"].to_pylist()) | set(ledger["sample_id"].to_pylist())),
        "kept_urls_unique": len(set(kept["url"].to_pylist())) == len(kept),
        "killed_mid_run": killed_at[0] < finished_at,
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
