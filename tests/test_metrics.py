"""Live metrics: accounted stages on Ray Data export per-stage row counters, scraped from the node's
Prometheus endpoint while the cluster runs, with the same totals as the ledger."""
from __future__ import annotations

import re
import time
import urllib.request
import uuid
from collections import Counter
from functools import partial

import numpy as np
import pyarrow as pa

from rs5m_ray.ledger import Accounted, ledger_counts, mark_dropped
from rs5m_ray.storage import Storage

ROWS = 300
SAMPLE = re.compile(r"^(ray_rs5m_\w+?)(?:_total)?\{(.*)\} ([0-9.e+-]+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def drop_every(batch: pa.Table, k: int, reason: str) -> pa.Table:
    n = np.array([int(s.rsplit("_", 1)[1]) for s in batch["sample_id"].to_pylist()])
    return mark_dropped(batch, n % k == 0, reason)


def scrape(port: int, source: str) -> Counter:
    """(metric, stage, reason) -> value summed over workers, for `source`'s series."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: Counter = Counter()
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(LABEL.findall(m[2]))
            if labels.get("source") == source:
                totals[m[1], labels["stage"], labels.get("reason")] += float(m[3])
    return totals


def test_stage_counters_on_the_metrics_endpoint_match_the_ledger(ray_cluster, tmp_path):
    ray = ray_cluster
    import ray.data

    source = f"probe{uuid.uuid4().hex[:8]}"  # the session's cluster keeps other tests' series
    storage, out = Storage(), str(tmp_path)
    rows = pa.table({"sample_id": [f"{source}_{i}" for i in range(ROWS)], "source": [source] * ROWS,
                     "url": [f"http://x/{i}" for i in range(ROWS)], "caption": ["c"] * ROWS})
    ds = ray.data.from_arrow(rows).repartition(6)
    ds = ds.map_batches(Accounted("every_third", out, storage, partial(drop_every, k=3, reason="third")),
                        batch_format="pyarrow", batch_size=50)
    ds = ds.map_batches(Accounted("every_fifth", out, storage, partial(drop_every, k=5, reason="fifth")),
                        batch_format="pyarrow", batch_size=50)
    kept = ds.count()

    third = len(range(0, ROWS, 3))
    fifth = sum(1 for i in range(ROWS) if i % 3 and i % 5 == 0)
    assert kept == ROWS - third - fifth
    want = {("ray_rs5m_rows_in", "every_third", None): ROWS,
            ("ray_rs5m_rows_out", "every_third", None): ROWS - third,
            ("ray_rs5m_rows_dropped", "every_third", "third"): third,
            ("ray_rs5m_rows_in", "every_fifth", None): ROWS - third,
            ("ray_rs5m_rows_out", "every_fifth", None): kept,
            ("ray_rs5m_rows_dropped", "every_fifth", "fifth"): fifth}
    ledger = Counter()
    for c in ledger_counts(storage, out):
        ledger[c["stage"], c["reason"]] += c["count_all"]
    assert ledger == {("every_third", "third"): third, ("every_fifth", "fifth"): fifth}

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, got = time.monotonic() + 60, Counter()
    while time.monotonic() < deadline:  # workers report every few seconds
        got = scrape(port, source)
        if all(got[k] >= v for k, v in want.items()):
            break
        time.sleep(2)
    assert {k: got[k] for k in want} == want
