"""The run report: funnel per stage and source, drop reasons, keyword hits, the
accounting check (input = kept + dropped, per source), throughput per stage.
Written as `report.json` and `report.png`.
"""
from __future__ import annotations

import json
from collections import defaultdict

import pyarrow.compute as pc

from rs5m_ray.ledger import ledger_counts, read_parquet_dir
from rs5m_ray.storage import Storage, join


def build_report(output: str, storage: Storage, stages: list[str], shards_dir: str,
                 extra: dict | None = None) -> dict:
    stats = read_parquet_dir(storage, join(output, "stats"))
    hits = read_parquet_dir(storage, join(output, "keyword_hits"))
    manifest = json.loads(storage.read_bytes(join(shards_dir, "manifest.json")))

    funnel: dict[str, dict] = {}
    if stats is not None:
        for stage in stages:
            rows = stats.filter(pc.equal(stats["stage"], stage))
            if len(rows) == 0:
                continue
            per_source = rows.group_by("source").aggregate([("rows_in", "sum"), ("rows_out", "sum")])
            seconds = pc.sum(rows["seconds"]).as_py() or 0.0
            rows_in = pc.sum(rows["rows_in"]).as_py()
            funnel[stage] = {
                "rows_in": rows_in, "rows_out": pc.sum(rows["rows_out"]).as_py(),
                "task_seconds": round(seconds, 3),
                "rows_per_task_second": round(rows_in / seconds, 1) if seconds else None,
                "by_source": {r["source"]: {"in": r["rows_in_sum"], "out": r["rows_out_sum"]}
                              for r in per_source.to_pylist()},
            }

    drop_reasons: dict[str, int] = defaultdict(int)
    dropped_by_source: dict[str, int] = defaultdict(int)
    for c in ledger_counts(storage, output):
        drop_reasons[f"{c['stage']}/{c['reason']}"] += c["count_all"]
        dropped_by_source[c["source"]] += c["count_all"]

    kept_by_source: dict[str, int] = defaultdict(int)
    for shard in manifest["shards"]:
        for source, n in shard["sources"].items():
            kept_by_source[source] += n

    input_by_source = {s: v["in"] for s, v in funnel.get("ingest", {}).get("by_source", {}).items()}
    accounting = {}
    for source in sorted(set(input_by_source) | set(kept_by_source) | set(dropped_by_source)):
        n_in, kept, gone = input_by_source.get(source, 0), kept_by_source.get(source, 0), dropped_by_source.get(source, 0)
        accounting[source] = {"input": n_in, "kept": kept, "dropped": gone, "balanced": n_in == kept + gone}

    keyword_counts: dict[str, int] = defaultdict(int)
    if hits is not None:
        for r in hits.group_by("keyword").aggregate([("count", "sum")]).to_pylist():
            keyword_counts[r["keyword"]] = r["count_sum"]

    stages_run = [s for s in funnel if s != "shard_writer"]
    last = stages_run[-1] if stages_run else None
    sink = {"last_stage": last, "kept_by_last_stage": funnel[last]["rows_out"] if last else 0,
            "into_shard_writer": funnel.get("shard_writer", {}).get("rows_in", 0),
            "written_by_shard_writer": funnel.get("shard_writer", {}).get("rows_out", 0),
            "samples_in_shards": manifest["samples"]}
    sink["balanced"] = len({sink["kept_by_last_stage"], sink["into_shard_writer"]}) == 1 and \
        sink["written_by_shard_writer"] == sink["samples_in_shards"]

    errors = [json.loads(storage.read_bytes(p)) for p in storage.glob(join(output, "errors", "**", "*.json"))]
    report = {
        "funnel": funnel,
        "drop_reasons": dict(sorted(drop_reasons.items())),
        "keyword_hits": dict(sorted(keyword_counts.items(), key=lambda kv: -kv[1])),
        "accounting": accounting,
        "accounting_balanced": all(a["balanced"] for a in accounting.values()) and sink["balanced"],
        "sink": sink,
        "unreadable_files": errors,
        "shards": {"count": len(manifest["shards"]), "samples": manifest["samples"], "dir": shards_dir},
        **(extra or {}),
    }
    storage.write_atomic(join(output, "report.json"), json.dumps(report, indent=1).encode())
    storage.write_atomic(join(output, "report.png"), _plot(report))
    return report


def _plot(report: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.5))
    stages = list(report["funnel"])
    ax1.bar(stages, [report["funnel"][s]["rows_out"] for s in stages], color="#4a7ab5")
    ax1.set_yscale("log")
    ax1.set_title("rows kept after each stage")
    ax1.tick_params(axis="x", rotation=45)
    kw = list(report["keyword_hits"].items())[:20]
    ax2.barh([k for k, _ in kw][::-1], [v for _, v in kw][::-1], color="#6a9f58")
    ax2.set_title("keyword hits (cf. RS5M Fig. 3)")
    phases = report.get("timeline", {}).get("phases", {})
    for row, (phase, span) in enumerate(phases.items()):
        ax3.broken_barh([(a, max(b - a, 1e-3)) for a, b in span["intervals"]], (row - 0.4, 0.8), alpha=0.5)
    ax3.set_yticks(range(len(phases)), list(phases))
    ax3.set_xlabel("seconds")
    ax3.set_title("parts in progress per phase (overlap = download and scoring at once)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
