"""The run report: funnel per stage and source, drop reasons, keyword hits, the
accounting check (input = kept + dropped, per source), throughput per stage.
Written as `report.json` and `report.png`.
"""
from __future__ import annotations

import json
from collections import defaultdict

import pyarrow.compute as pc

from rs5m_ray.geo import geo_report
from rs5m_ray.ledger import ledger_counts
from rs5m_ray.plots import png_bytes, pyplot
from rs5m_ray.report_views import analyse, read_tables, write_pages
from rs5m_ray.storage import Storage, join


def build_report(output: str, storage: Storage, stages: list[str], shards_dir: str,
                 extra: dict | None = None) -> dict:
    stats = read_tables(storage, storage.glob(join(output, "stats", "**", "*.parquet")))
    hits = read_tables(storage, storage.glob(join(output, "keyword_hits", "**", "*.parquet")))
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
    counts = ledger_counts(storage, output)
    for c in counts:
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
        "input_problems": input_problems(errors, drop_reasons, funnel),
        "shards": {"count": len(manifest["shards"]), "samples": manifest["samples"], "dir": shards_dir},
        **(extra or {}),
    }
    geo = geo_report(output, storage, shards_dir)  # UTM zones and countries of the shards' samples, geo.png
    if geo is not None:
        report["geo"] = geo
        report.setdefault("figures", []).append({"title": "Geography: UTM zones and countries", "file": "geo.png"})
    report["views"] = analyse(output, storage, shards_dir, report, counts, stats)
    storage.write_atomic(join(output, "report.png"), _plot(report))
    report["figures"] = write_pages(output, storage, report)  # one PNG per view, and report.html
    storage.write_atomic(join(output, "report.json"), json.dumps(report, indent=1).encode())
    return report


# Rows whose bytes could not be parsed or decoded (not content checks such as empty_caption).
BAD_ROW_REASONS = ("ingest/malformed_row", "ingest/invalid_utf8")


def input_problems(errors: list[dict], drop_reasons: dict[str, int], funnel: dict) -> dict:
    """Unreadable files and bad rows of the run, for the end-of-run summary and its budgets."""
    rows = funnel.get("ingest", {}).get("rows_in", 0)
    bad = sum(drop_reasons.get(r, 0) for r in BAD_ROW_REASONS)
    return {"unreadable_files": len(errors),
            "rows_lost_in_unreadable_files": sum(e.get("rows_lost") or 0 for e in errors),
            "unreadable_files_with_uncounted_rows": sum(e.get("rows_lost") is None for e in errors),
            "bad_rows": bad, "input_rows": rows, "bad_row_fraction": bad / rows if rows else 0.0}


def input_summary(report: dict, max_files_listed: int = 10) -> list[str]:
    """Console lines on unreadable files and bad rows (every run prints them)."""
    p = report["input_problems"]
    lines = [f"input: {p['input_rows']} rows; {p['bad_rows']} bad rows ({p['bad_row_fraction']:.4%}: "
             f"{', '.join(r.split('/')[1] for r in BAD_ROW_REASONS)}); {p['unreadable_files']} unreadable files"
             + (f" holding {p['rows_lost_in_unreadable_files']} countable rows (ingest/unreadable_file)"
                if p["unreadable_files"] else "")
             + (f", {p['unreadable_files_with_uncounted_rows']} of them uncountable"
                if p["unreadable_files_with_uncounted_rows"] else "")]
    for e in report["unreadable_files"][:max_files_listed]:
        lost = "?" if e.get("rows_lost") is None else e["rows_lost"]
        lines.append(f"  unreadable: {e['path']}: {e['error']} (rows read {e['rows_read_before_error']}, lost {lost})")
    if len(report["unreadable_files"]) > max_files_listed:
        lines.append(f"  ... and {len(report['unreadable_files']) - max_files_listed} more in report.json")
    return lines


def over_budget(report: dict, max_unreadable_files: int | None, max_bad_row_fraction: float | None) -> str | None:
    """Why the run's input problems exceed the operator's budget, or None."""
    p = report["input_problems"]
    if max_unreadable_files is not None and p["unreadable_files"] > max_unreadable_files:
        return (f"{p['unreadable_files']} unreadable input files, more than --max-unreadable-files "
                f"{max_unreadable_files} (listed in report.json under unreadable_files)")
    if max_bad_row_fraction is not None and p["bad_row_fraction"] > max_bad_row_fraction:
        return (f"bad rows are {p['bad_row_fraction']:.4%} of the input, more than --max-bad-row-fraction "
                f"{max_bad_row_fraction:.4%} (ledger/ingest, drop reasons {list(BAD_ROW_REASONS)})")
    return None


def _plot(report: dict) -> bytes:
    plt = pyplot()
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
    return png_bytes(fig, dpi=90)
