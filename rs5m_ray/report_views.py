"""The run report's views beyond the accounting (`report.py`): what they compute and how they are shown.

`analyse` reads the run's side outputs, in parallel with Ray when there are many files: the stats
(wall-clock throughput per stage and the timeline), the ledgers of the failing and the dedup
stages (top failing hosts, error kinds, dedup cluster sizes) and the shards' sidecars (caption
lengths, word frequency, image sizes). `write_pages` draws one PNG per view and `report.html`,
which shows them with the tables (the funnel per stage and source as the paper's Table VII, the
source x reason matrix). Other jobs add their own figures and tables to a report through
`report["figures"]` ({"title", "file"} of a PNG in the run directory) and `report["tables"]`
({"title", "columns", "rows"}).
"""
from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m_ray.plots import png_bytes, pyplot
from rs5m_ray.storage import Storage, join, strip_protocol

FAILING_STAGES = ("download", "decode")
DEDUP_STAGES = ("url_dedup", "phash_dedup", "embedding_dedup")
PARALLEL_FILES = 16  # from this many files on, Ray reads them (on a cluster: where the files are)
TOP = 15
# Fig. 3 counts words of the kept captions; these carry no content.
STOPWORDS = set("a an the of in on at and or to with for from by is are was were be this that it its as into "
                "over near some two one three very has have there their his her de".split())


def read_tables(storage: Storage, paths: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """The parquet files `paths` as one table (only `columns` where given), or None when there are none."""
    if not paths:
        return None
    import ray

    if ray.is_initialized() and len(paths) >= PARALLEL_FILES:
        import ray.data

        fs, _ = storage.arrow_fs(paths[0])
        ds = ray.data.read_parquet([strip_protocol(p) for p in paths], filesystem=fs, columns=columns,
                                   override_num_blocks=min(len(paths), 64))
        tables = ray.get(ds.to_arrow_refs())
    else:
        tables = []
        for p in paths:
            with storage.open(p) as f:
                tables.append(pq.read_table(f, columns=columns))
    tables = [t for t in tables if t.num_columns]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _ledger(storage: Storage, output: str, stages: tuple[str, ...], columns: list[str]) -> pa.Table | None:
    paths = [p for s in stages for p in storage.glob(join(output, "ledger", s, "*.parquet"))]
    return read_tables(storage, paths, columns)


def analyse(output: str, storage: Storage, shards_dir: str, report: dict, counts: list[dict],
            stats: pa.Table | None) -> dict:
    """The views of a run whose accounting is `report`; `counts`: the ledger footers' (stage, source,
    reason, n); `stats`: the stats files' rows."""
    views = {"throughput": throughput(stats, report),
             "source_reason": source_reason(counts)}
    failed = _ledger(storage, output, FAILING_STAGES, ["url", "drop_reason"])
    views["failures"] = failures(failed) if failed is not None else {"hosts": [], "kinds": []}
    dups = _ledger(storage, output, DEDUP_STAGES, ["stage", "drop_reason", "drop_detail"])
    views["dedup_clusters"] = dedup_clusters(dups) if dups is not None else {}
    sidecars = [p for p in storage.glob(join(shards_dir, "*.parquet"))]
    if sidecars:
        with storage.open(sidecars[0]) as f:
            names = pq.read_schema(f).names
        kept = read_tables(storage, sidecars, [c for c in ("caption", "width", "height") if c in names])
        views["captions"] = captions(kept["caption"]) if kept is not None and "caption" in names else {}
        views["image_sizes"] = image_sizes(kept) if kept is not None and "width" in names else {}
    return views


def throughput(stats: pa.Table | None, report: dict) -> dict:
    """Per stage: rows, task seconds, wall-clock span and rows per wall second, nodes; the timeline: the
    intervals during which some batch or part of the stage was in progress."""
    if stats is None or "started" not in stats.column_names:
        return {}
    t0 = pc.min(stats["started"]).as_py()
    per_stage, timeline = {}, {}
    for stage in report["funnel"]:
        rows = stats.filter(pc.equal(stats["stage"], stage))
        if not len(rows):
            continue
        start, end = pc.min(rows["started"]).as_py(), pc.max(rows["finished"]).as_py()
        wall = max(end - start, 1e-9)
        rows_in = pc.sum(rows["rows_in"]).as_py()
        per_stage[stage] = {"rows_in": rows_in, "start_s": round(start - t0, 3), "end_s": round(end - t0, 3),
                            "wall_seconds": round(wall, 3), "rows_per_wall_second": round(rows_in / wall, 1),
                            "task_seconds": round(pc.sum(rows["seconds"]).as_py(), 3),
                            "nodes": len(pc.unique(rows["node"]))}
        timeline[stage] = busy(rows["started"].to_numpy() - t0, rows["finished"].to_numpy() - t0)
    return {"stages": per_stage, "intervals": timeline}


def busy(starts: np.ndarray, ends: np.ndarray) -> list[list[float]]:
    """The union of the intervals [starts[i], ends[i]] as sorted disjoint intervals."""
    order = np.argsort(starts)
    starts, ends = starts[order], np.maximum.accumulate(ends[order])
    new = np.r_[True, starts[1:] > ends[:-1]]  # an interval starting after all before it ended
    last = np.r_[np.flatnonzero(new)[1:] - 1, len(starts) - 1]
    return np.stack([starts[new], ends[last]], axis=1).round(3).tolist()


def source_reason(counts: list[dict]) -> dict:
    """Rows dropped per source and stage/reason."""
    matrix: dict[str, dict[str, int]] = defaultdict(dict)
    for c in counts:
        key = f"{c['stage']}/{c['reason']}"
        matrix[c["source"]][key] = matrix[c["source"]].get(key, 0) + c["count_all"]
    return {s: dict(sorted(r.items())) for s, r in sorted(matrix.items())}


def failures(ledger: pa.Table) -> dict:
    hosts: dict[str, Counter] = defaultdict(Counter)
    kinds: Counter = Counter()
    for url, reason in zip(ledger["url"].to_pylist(), ledger["drop_reason"].to_pylist()):
        kinds[reason] += 1
        try:
            host = urlsplit(url or "").hostname or "(no host)"
        except ValueError:
            host = "(invalid url)"
        hosts[host][reason] += 1
    top = sorted(hosts.items(), key=lambda kv: -sum(kv[1].values()))[:TOP]
    return {"hosts": [{"host": h, "failures": sum(c.values()), "reasons": dict(c.most_common(3))} for h, c in top],
            "kinds": [{"kind": k, "rows": n} for k, n in kinds.most_common(TOP)]}


def dedup_clusters(ledger: pa.Table) -> dict:
    """Per dedup stage: how many clusters have each size (a kept row and the copies dropped for it)."""
    out = {}
    for stage in DEDUP_STAGES:
        rows = ledger.filter(pc.equal(ledger["stage"], stage))
        if not len(rows):
            continue
        kept_ids = Counter()  # near_dup_of:<kept id> in the reason; duplicate_of:<kept id> in a URL dup's detail
        for reason, detail in zip(rows["drop_reason"].to_pylist(), rows["drop_detail"].to_pylist()):
            kept_ids[reason.removeprefix("near_dup_of:") if reason.startswith("near_dup_of:")
                     else (detail or "").removeprefix("duplicate_of:")] += 1
        sizes = Counter(n + 1 for n in kept_ids.values())
        out[stage] = {str(k): v for k, v in sorted(sizes.items())}
    return out


def captions(column: pa.ChunkedArray) -> dict:
    texts = [t for t in column.to_pylist() if t]
    lengths = np.array([len(t.split()) for t in texts])
    words = Counter(w for t in texts for w in re.findall(r"[a-z][a-z0-9-]+", t.lower()) if w not in STOPWORDS)
    hist, edges = np.histogram(lengths, bins=np.arange(0, max(int(lengths.max(initial=0)), 1) + 2))
    return {"count": len(texts), "mean_words": round(float(lengths.mean()), 2) if len(texts) else 0.0,
            "length_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
            "top_words": dict(words.most_common(30))}


def image_sizes(table: pa.Table) -> dict:
    """Histograms of the short side (px) and the aspect ratio (long / short side) of the kept images."""
    w = table["width"].to_numpy(zero_copy_only=False).astype(float)
    h = table["height"].to_numpy(zero_copy_only=False).astype(float)
    if not len(w):
        return {}
    short, aspect = np.minimum(w, h), np.maximum(w, h) / np.maximum(np.minimum(w, h), 1)
    s_counts, s_edges = np.histogram(short, bins=min(40, max(5, len(np.unique(short)))))
    a_counts, a_edges = np.histogram(aspect, bins=np.arange(1.0, max(2.0, aspect.max()) + 0.1, 0.1))
    return {"count": int(len(w)), "short_side_quantiles": {q: int(np.percentile(short, q)) for q in (5, 25, 50, 75, 95)},
            "short_side": {"edges": s_edges.round(1).tolist(), "counts": s_counts.tolist()},
            "aspect_ratio": {"edges": a_edges.round(2).tolist(), "counts": a_counts.tolist()}}


# --------------------------------------------------------------------------- drawing

def _figure(draw, size=(9, 4.5)) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=size)
    draw(fig, ax)
    return png_bytes(fig)


def _funnel(report):
    def draw(fig, ax):
        stages = [s for s in report["funnel"]]
        sources = sorted({s for st in report["funnel"].values() for s in st["by_source"]})
        kept = {source: [report["funnel"][st]["by_source"].get(source, {}).get("out", 0) for st in stages]
                for source in sources}
        for source, counts in kept.items():
            ax.plot(stages, [max(n, 0.8) for n in counts], marker="o", label=source)
        if max(max(c) for c in kept.values()) > 100 * max(min(min(c) for c in kept.values()), 1):
            ax.set_yscale("log")  # the funnel spans orders of magnitude (keyword filter: ~1,000x)
        ax.set_ylabel("rows kept after the stage")
        ax.set_title("funnel per stage and source (cf. RS5M Table VII)")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8, ncol=2)
    return _figure(draw, (10, 5))


def _matrix(views):
    matrix = views["source_reason"]
    sources = list(matrix)
    reasons = sorted({r for row in matrix.values() for r in row})
    values = np.array([[matrix[s].get(r, 0) for r in reasons] for s in sources], float)

    def draw(fig, ax):
        im = ax.imshow(np.log10(values + 1), cmap="Oranges", aspect="auto")
        ax.set_xticks(range(len(reasons)), reasons, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(sources)), sources)
        for i in range(len(sources)):
            for j in range(len(reasons)):
                if values[i, j]:
                    ax.text(j, i, f"{int(values[i, j])}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, label="log10(rows + 1)")
        ax.set_title("rows dropped: source x stage/reason")
    return _figure(draw, (max(8, 0.6 * len(reasons) + 3), max(3.5, 0.45 * len(sources) + 2.5)))


def _failures(views):
    f = views["failures"]
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    hosts = f["hosts"][::-1]
    a1.barh([h["host"] for h in hosts], [h["failures"] for h in hosts], color="#c0504d")
    a1.set_title(f"top failing hosts ({FAILING_STAGES[0]} and {FAILING_STAGES[1]})")
    a1.set_xlabel("rows dropped")
    kinds = f["kinds"][::-1]
    a2.barh([k["kind"] for k in kinds], [k["rows"] for k in kinds], color="#8064a2")
    a2.set_title("error kinds")
    a2.set_xlabel("rows dropped")
    return png_bytes(fig)


def _throughput(views):
    t = views["throughput"]
    stages = list(t["stages"])
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 0.45 * len(stages) + 2.5))
    a1.barh(stages[::-1], [t["stages"][s]["rows_per_wall_second"] for s in stages][::-1], color="#4a7ab5")
    a1.set_xscale("log")
    a1.set_xlabel("rows per wall-clock second (rows in / stage's span)")
    a1.set_title("throughput per stage")
    for row, stage in enumerate(stages[::-1]):
        spans = t["intervals"][stage]
        a2.broken_barh([(a, max(b - a, 1e-3)) for a, b in spans], (row - 0.4, 0.8), alpha=0.4, color="#4a7ab5")
    a2.set_yticks(range(len(stages)), stages[::-1])
    a2.set_xlabel("seconds since the first stage started")
    a2.set_title("timeline: batches and parts in progress per stage")
    return png_bytes(fig)


def _quantile_grid(q):
    grid = np.array(q["grid"]["remaining"], float)
    s_keep, c_keep = q["grid"]["s_keep"], q["grid"]["c_keep"]

    def draw(fig, ax):
        im = ax.imshow(grid, cmap="viridis", origin="upper")
        ax.set_xticks(range(len(c_keep)), [f"{k:.0%}" for k in c_keep], rotation=45)
        ax.set_yticks(range(len(s_keep)), [f"{k:.0%}" for k in s_keep])
        ax.set_xlabel("top share of c_i kept (RS detector)")
        ax.set_ylabel("top share of s_i kept (CLIP score)")
        for i in range(len(s_keep)):
            for j in range(len(c_keep)):
                chosen = np.isclose(s_keep[i], q["clip_quantile_keep"]) and np.isclose(c_keep[j], q["detector_quantile_keep"])
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=7,
                        color="red" if chosen else "white", fontweight="bold" if chosen else "normal")
        fig.colorbar(im, ax=ax, label="samples remaining")
        ax.set_title("samples remaining per threshold pair (cf. RS5M Fig. 13; red: this run's)")
    return _figure(draw, (9, 7.5))


def _dedup(views):
    clusters = views["dedup_clusters"]

    def draw(fig, ax):
        width = 0.8 / max(len(clusters), 1)
        for k, (stage, sizes) in enumerate(clusters.items()):
            xs = np.array([int(s) for s in sizes]) + (k - (len(clusters) - 1) / 2) * width
            ax.bar(xs, list(sizes.values()), width=width, label=stage)
        ax.set_yscale("log")
        ax.set_xlabel("cluster size (kept row + its dropped copies)")
        ax.set_ylabel("clusters")
        ax.set_title("dedup cluster sizes")
        ax.legend()
    return _figure(draw)


def _captions(views):
    c = views["captions"]
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5.5))
    h = c["length_histogram"]
    a1.bar(h["edges"][:-1], h["counts"], width=1.0, align="edge", color="#6a9f58")
    a1.set_xlabel("caption length (words)")
    a1.set_ylabel("kept samples")
    a1.set_title(f"caption length (mean {c['mean_words']} words)")
    words = list(c["top_words"].items())[::-1]
    a2.barh([w for w, _ in words], [n for _, n in words], color="#6a9f58")
    a2.tick_params(axis="y", labelsize=8)
    a2.set_title("most frequent caption words (cf. RS5M Fig. 3)")
    return png_bytes(fig)


def _image_sizes(views):
    s = views["image_sizes"]
    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((a1, "short_side", "short side (px)"), (a2, "aspect_ratio", "aspect ratio (long / short)")):
        edges, counts = s[key]["edges"], s[key]["counts"]
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a7ab5", edgecolor="white")
        ax.set_xlabel(label)
        ax.set_ylabel("kept samples")
    a1.set_title(f"image size of kept samples (median short side {s['short_side_quantiles'][50]} px; cf. RS5M App. B12)")
    a2.set_title("aspect ratio")
    return png_bytes(fig)


def write_pages(output: str, storage: Storage, report: dict) -> list[dict]:
    """Each view's PNG into the run directory, then report.html; the figures written."""
    views = report["views"]
    figures = [("funnel.png", "Funnel per stage and source", _funnel, report)]
    if views["source_reason"]:
        figures.append(("drop_reasons.png", "Drop reasons per source", _matrix, views))
    if views["failures"]["kinds"]:
        figures.append(("failures.png", "Failing hosts and error kinds", _failures, views))
    if views["throughput"]:
        figures.append(("throughput.png", "Throughput and timeline", _throughput, views))
    if report.get("quantile_filter", {}).get("grid"):
        figures.append(("quantile_grid.png", "Quantile filter grid", _quantile_grid, report["quantile_filter"]))
    if views["dedup_clusters"]:
        figures.append(("dedup_clusters.png", "Dedup clusters", _dedup, views))
    if views.get("captions", {}).get("count"):
        figures.append(("captions.png", "Captions", _captions, views))
    if views.get("image_sizes", {}).get("count"):
        figures.append(("image_sizes.png", "Image sizes", _image_sizes, views))
    written = []
    for name, title, draw, data in figures:
        storage.write_atomic(join(output, name), draw(data))
        written.append({"title": title, "file": name})
    written += report.get("figures", [])
    storage.write_atomic(join(output, "report.html"), page(report, written).encode())
    return written


def _table(title: str, columns: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(f'{v:,}' if isinstance(v, int) else str(v))}</td>"
                                    for v in row) + "</tr>" for row in rows)
    return f"<h2>{html.escape(title)}</h2><div class=scroll><table><tr>{head}</tr>{body}</table></div>"


def page(report: dict, figures: list[dict]) -> str:
    funnel = report["funnel"]
    stages = list(funnel)
    sources = sorted({s for st in funnel.values() for s in st["by_source"]})
    first = stages[0] if stages else None
    table7 = [[s, funnel[first]["by_source"].get(s, {}).get("in", 0) if first else 0]
              + [funnel[st]["by_source"].get(s, {}).get("out", 0) for st in stages] for s in sources]
    table7.append(["all", funnel[first]["rows_in"] if first else 0] + [funnel[st]["rows_out"] for st in stages])
    matrix = report["views"]["source_reason"]
    reasons = sorted({r for row in matrix.values() for r in row})
    t = report["views"]["throughput"].get("stages", {})
    tables = [
        _table("Funnel: rows after each stage, per source (cf. RS5M Table VII)", ["source", "input"] + stages, table7),
        _table("Rows dropped: source x stage/reason", ["source"] + reasons,
               [[s] + [matrix[s].get(r, 0) for r in reasons] for s in matrix]),
        _table("Throughput per stage", ["stage", "rows in", "wall s", "rows / wall s", "task s", "nodes"],
               [[s, v["rows_in"], v["wall_seconds"], v["rows_per_wall_second"], v["task_seconds"], v["nodes"]]
                for s, v in t.items()]),
        _table("Top failing hosts", ["host", "rows dropped", "reasons"],
               [[h["host"], h["failures"], ", ".join(f"{k} {v}" for k, v in h["reasons"].items())]
                for h in report["views"]["failures"]["hosts"]]),
    ] + [_table(x["title"], x["columns"], x["rows"]) for x in report.get("tables", [])]
    status = "balanced" if report.get("accounting_balanced") else "NOT BALANCED"
    shards = report.get("shards", {})
    imgs = "".join(f'<figure><img src="{html.escape(f["file"])}" alt="{html.escape(f["title"])}">'
                   f'<figcaption>{html.escape(f["title"])}</figcaption></figure>' for f in figures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rs5m run report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1500px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right;font-size:13px}} td:first-child{{text-align:left}}
.scroll{{overflow-x:auto}} figure{{display:inline-block;margin:1em;vertical-align:top}} img{{max-width:100%;border:1px solid #ddd}}</style>
</head><body>
<h1>rs5m run report</h1>
<p>Accounting (input = kept + dropped, per source, and at the sink): <b>{status}</b>.
{shards.get("samples", 0):,} samples in {shards.get("count", 0)} shards.</p>
{"".join(tables)}
<h2>Figures</h2>
{imgs}
</body></html>
"""
