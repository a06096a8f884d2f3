"""Run by test_faults.py in its own process: faults on a 3-node local Ray cluster (a head without
CPUs, two 1-CPU workers), one cluster for all scenarios.

- poisoned: an actor of a pool raises on one batch; the job ends (no hang) and succeeds, and that
  batch's rows are in the ledger as `stage_error`.
- slow_down: S3 (moto behind a loopback fault proxy) answers 503 SlowDown to many requests while
  accounted tasks on the workers write their ledger and stats there and the driver reads them back;
  every request is retried with backoff, nothing is lost and no object is written twice.
- node_lost: `rs5m pub11` with scoring, run clean, then again losing the node of the CLIP actor once
  a part is scored (a replacement node joins, as the autoscaler's would); both runs' outputs compared.
"""
import http.client
import http.server
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.cluster_utils import Cluster

from rs5m_ray.config import StorageConfig, load_config
from rs5m_ray.ledger import Accounted, mark_dropped, read_parquet_dir
from rs5m_ray.pipelines import pub11
from rs5m_ray.sample.generate import generate
from rs5m_ray.sample.image_server import ImageServer
from rs5m_ray.storage import Storage
from tests.conftest import free_port, untrained_detector
from tests.test_resume import outcome, shard_bytes

ROWS, BATCH = 300, 50
POISON = "laion2b_poison_120"
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>")


def rows(prefix: str) -> pa.Table:
    ids = [f"laion2b_{prefix}_{i}" for i in range(ROWS)]
    return pa.table({"sample_id": ids, "source": ["laion2b"] * ROWS, "url": [f"http://x/{i}" for i in range(ROWS)],
                     "caption": ["aerial view"] * ROWS})


def blocks(table: pa.Table) -> list[pa.Table]:
    return [table.slice(i, BATCH) for i in range(0, len(table), BATCH)]


class PoisonedStage:
    """An actor-pool stage (built once per actor) that raises on the batch holding POISON."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        if POISON in batch["sample_id"].to_pylist():
            raise ValueError("cannot score this batch")
        return mark_dropped(batch, np.zeros(len(batch), bool), "unused")


def drop_every_seventh(batch: pa.Table) -> pa.Table:
    n = np.array([int(s.rsplit("_", 1)[1]) for s in batch["sample_id"].to_pylist()])
    return mark_dropped(batch, n % 7 == 0, "seventh")


def run_with_deadline(fn, seconds: float):
    """fn() in a thread; None if it has not returned in `seconds` (a hang)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    return out[0] if out else None


def poisoned(workdir: str) -> dict:
    storage, output = Storage(), f"{workdir}/poisoned"
    table = rows("poison").set_column(0, "sample_id", pa.array(
        [POISON if i == 120 else f"laion2b_poison_{i}" for i in range(ROWS)]))
    ds = ray.data.from_arrow(blocks(table)).map_batches(
        Accounted, fn_constructor_kwargs={"stage_name": "score", "output": output, "storage": storage,
                                          "stage": PoisonedStage},
        batch_size=BATCH, batch_format="pyarrow", num_cpus=0.5, compute=ray.data.ActorPoolStrategy(size=2))
    kept = run_with_deadline(lambda: ds.take_all(), 180)
    if kept is None:
        return {"finished": False}
    ledger = read_parquet_dir(storage, f"{output}/ledger")
    errors = ledger.filter(pc.equal(ledger["drop_reason"], "stage_error"))
    kept_ids = [r["sample_id"] for r in kept]
    return {"finished": True, "kept": len(kept_ids), "ledgered": len(ledger), "stage_errors": len(errors),
            "poison_ledgered": POISON in errors["sample_id"].to_pylist(),
            "detail": errors["drop_detail"][0].as_py() if len(errors) else None,
            "all_once": sorted(kept_ids + ledger["sample_id"].to_pylist()) == sorted(table["sample_id"].to_pylist())}


class FaultProxy(http.server.ThreadingHTTPServer):
    """Forwards to the S3 server, answering 503 SlowDown instead to the first 6 requests and to every
    third one after, until `budget` such answers are spent. Counts forwarded PUTs per path."""

    def __init__(self, upstream: int, budget: int):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.budget = upstream, budget
        self.lock, self.seen, self.refused = threading.Lock(), 0, 0
        self.puts: Counter = Counter()

    def refuse(self) -> bool:
        with self.lock:
            self.seen += 1
            if self.refused < self.budget and (self.seen <= 6 or self.seen % 3 == 0):
                self.refused += 1
                return True
            return False


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.refuse():
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        if self.command == "PUT" and resp.status == 200:
            with self.server.lock:
                self.server.puts[self.path.split("?")[0]] += 1
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", resp.getheader("Content-Length", str(len(data)))
                         if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


def slow_down(workdir: str) -> dict:
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    proxy = FaultProxy(port, budget=40)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        creds = {"key": "testing", "secret": "testing"}
        direct = Storage(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", **creds))
        direct.fs("s3://").mkdir("faults")
        storage = Storage(StorageConfig(endpoint_url=f"http://127.0.0.1:{proxy.server_address[1]}", **creds))
        output = "s3://faults/run"
        ds = ray.data.from_arrow(blocks(rows("s3"))).map_batches(
            Accounted("every_seventh", output, storage, drop_every_seventh), batch_size=BATCH, batch_format="pyarrow")
        kept = run_with_deadline(lambda: ds.count(), 240)
        refused_while_writing = proxy.refused
        stats = read_parquet_dir(storage, f"{output}/stats")  # read back through the faults too
        ledger = read_parquet_dir(storage, f"{output}/ledger")
        objects = direct.glob(f"{output}/**/*.parquet")
        return {"finished": kept is not None, "kept": kept, "refused_503": proxy.refused,
                "refused_while_writing": refused_while_writing, "requests": proxy.seen,
                "rows_in": pc.sum(stats["rows_in"]).as_py(), "ledgered": len(ledger),
                "ledger_ids_unique": len(set(ledger["sample_id"].to_pylist())) == len(ledger),
                "objects": len(objects), "puts_per_object": sorted(set(proxy.puts.values()))}
    finally:
        proxy.shutdown()
        moto.stop()


def scoring_actor_node(cluster: Cluster):
    """The worker node hosting the live CLIP scoring actor, or None."""
    for actor in ray._private.state.actors().values():
        if "ScorePart" in actor["ActorClassName"] + actor["Name"] and actor["State"] == "ALIVE":
            for node in cluster.worker_nodes:
                if node.node_id == actor["Address"]["NodeID"]:
                    return node
    return None


def lose_scoring_node(cluster: Cluster, scores: Path, run: threading.Thread) -> dict:
    """While `run` goes on: once a part is scored, remove the scoring actor's node at once (no graceful
    drain) and add a replacement node (in the main thread: a node's start sets signal handlers).
    Returns how many parts were scored at that moment."""
    while run.is_alive():
        scored = len(list(scores.glob("*.done.json")))
        node = scoring_actor_node(cluster) if scored else None
        if node is not None:
            lost_at = time.monotonic()
            cluster.remove_node(node, allow_graceful=False)
            cluster.add_node(num_cpus=1)
            return {"scored_parts_at_loss": scored, "lost_at": lost_at}
        time.sleep(0.05)
    return {}


def scoring_restarts() -> int:
    return sum(a["NumRestarts"] for a in ray._private.state.actors().values()
               if "ScorePart" in a["ActorClassName"] + a["Name"])


def node_lost(workdir: str, cluster: Cluster) -> dict:
    root = Path(workdir) / "node_lost"
    detector = untrained_detector(str(root / "detector"))
    with ImageServer(directory=root / "images") as server:
        sources = generate(str(root), server.url("img"), rows_per_source=40)["sources"]

        def run(name: str) -> dict:
            return pub11.run(load_config(overrides={
                "output": str(root / name), "ingest": {"sources": sources}, "parts": {"num_parts": 8},
                "download": {"allow_hosts": ["127.0.0.0/8"], "max_actors": 1},
                "scoring": {"detector_checkpoint": detector, "forward_batch_size": 8},
                "near_dup": {"cosine_threshold": 0.999}, "shards": {"train_shards": 2, "val_shards": 1}}))

        started = time.monotonic()
        clean = run("clean")
        restarts_before, clean_done = scoring_restarts(), time.monotonic()
        reports: list = []
        runner = threading.Thread(target=lambda: reports.append(run("faulted")), daemon=True)
        runner.start()
        lost = lose_scoring_node(cluster, root / "faulted" / "staging" / "scores", runner)
        runner.join(400)
        seconds = {"clean": clean_done - started, "faulted": time.monotonic() - clean_done,
                   "after_loss": time.monotonic() - lost.pop("lost_at", clean_done)}
        if not reports:
            return {**lost, "finished": False}
        faulted = reports[0]
    (clean_shards, clean_ledger), (faulted_shards, faulted_ledger) = outcome(root / "clean"), outcome(root / "faulted")
    return {**lost, "finished": True, "parts": 8, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "scoring_restarts": scoring_restarts() - restarts_before,
            "balanced": [clean["accounting_balanced"], faulted["accounting_balanced"]],
            "clean_samples": len(clean_shards), "same_samples": set(clean_shards) == set(faulted_shards),
            "same_drops": sorted(clean_ledger) == sorted(faulted_ledger),
            "each_once": len(faulted_shards) == len(set(faulted_shards))
            and not set(faulted_shards) & set(faulted_ledger),
            "shards_identical": shard_bytes(root / "clean") == shard_bytes(root / "faulted")}


def main(workdir: str) -> None:
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # before the nodes start: they inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        # A file, not stdout: the raylets print warnings there at any time.
        Path(workdir, "outcome.json").write_text(json.dumps({
            "poisoned": poisoned(workdir), "slow_down": slow_down(workdir), "node_lost": node_lost(workdir, cluster)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
