"""`rs5m rate --summary`: the paper's table (Tables XI-XIV: mean ± std of each score per
source, and n) from a ratings directory or any ratings CSV with RS5M's columns, plus
inter-rater agreement wherever two raters rated the same samples.

A rater's latest answer on a sample counts; skips and empty scores are left out (the
table says how many). std is the sample standard deviation (n - 1). Agreement per score
and pair of raters: exact agreement, agreement within one point, and Cohen's kappa with
quadratic weights (the usual one for ordinal 1-5 scales; 1 = perfect, 0 = chance).
"""
from __future__ import annotations

import itertools
import os
import statistics

import numpy as np

from rs5m_ray.rate.draw import source_of_name
from rs5m_ray.rate.ratings import METRICS, RATINGS, read_rows

LABELS = {"relevance_detail": "relevance & detail", "hallucination": "hallucination", "fluency": "fluency"}
OVERALL = "overall"


def _score(row: dict, metric: str, line: int) -> int | None:
    value = (row.get(metric) or "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 5:
        raise ValueError(f"record {line}: {metric} must be 1-5, got {value!r}")
    return int(value)


def latest_ratings(path: str) -> tuple[list[dict], dict]:
    """The rated samples of a ratings file (latest answer per rater and sample; skips out),
    each as {rater, sample_id, source, <metric>: int | None}, and counts of what was read."""
    rows = read_rows(path)
    latest: dict[tuple[str, str], dict] = {}
    for line, row in enumerate(rows, start=2):
        sample_id = row.get("sample_id") or row["image_path"]
        latest[(row.get("rater", ""), sample_id)] = {
            "rater": row.get("rater", ""), "sample_id": sample_id, "skipped": row.get("skipped") == "1",
            "source": row.get("source") or source_of_name(row["image_path"]),
            **{m: _score(row, m, line) for m in METRICS}}
    kept = [r for r in latest.values() if not r["skipped"]]
    return kept, {"answers": len(rows), "rated": len(kept), "skipped": len(latest) - len(kept)}


def _stats(values: list[int]) -> dict:
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None}


def weighted_kappa(a: list[int], b: list[int]) -> float | None:
    """Cohen's kappa with quadratic weights on the 1-5 scale (None where chance agreement is total)."""
    observed = np.zeros((5, 5))
    np.add.at(observed, (np.array(a) - 1, np.array(b) - 1), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = (np.subtract.outer(np.arange(5), np.arange(5)) / 4.0) ** 2
    chance = float((weights * expected).sum())
    return None if chance == 0 else 1.0 - float((weights * observed).sum()) / chance


def agreement(rated: list[dict]) -> list[dict]:
    """Per pair of raters with samples in common, per score: n, exact, within_1, kappa."""
    by_rater: dict[str, dict[str, dict]] = {}
    for r in rated:
        by_rater.setdefault(r["rater"], {})[r["sample_id"]] = r
    out = []
    for a, b in itertools.combinations(sorted(by_rater), 2):
        common = sorted(set(by_rater[a]) & set(by_rater[b]))
        if not common:
            continue
        for m in METRICS:
            pairs = [(by_rater[a][s][m], by_rater[b][s][m]) for s in common
                     if by_rater[a][s][m] is not None and by_rater[b][s][m] is not None]
            if pairs:
                x, y = zip(*pairs)
                out.append({"raters": [a, b], "metric": m, "n": len(pairs),
                            "exact": sum(i == j for i, j in pairs) / len(pairs),
                            "within_1": sum(abs(i - j) <= 1 for i, j in pairs) / len(pairs),
                            "kappa": weighted_kappa(list(x), list(y))})
    return out


def summarize(path: str) -> dict:
    """The table and the agreement of a ratings directory (its ratings.csv) or a ratings CSV."""
    if os.path.isdir(path):
        path = os.path.join(path, RATINGS)
    if not os.path.exists(path):
        raise ValueError(f"no ratings at {path}")
    rated, counts = latest_ratings(path)
    groups = {s: [r for r in rated if r["source"] == s] for s in sorted({r["source"] for r in rated})}
    groups[OVERALL] = rated
    table = {s: {"n": len(rows), **{m: _stats([r[m] for r in rows if r[m] is not None]) for m in METRICS}}
             for s, rows in groups.items()}
    return {"path": path, **counts, "raters": sorted({r["rater"] for r in rated if r["rater"]}),
            "table": table, "agreement": agreement(rated)}


def _cell(stats: dict, n: int) -> str:
    if stats["mean"] is None:
        return "-"
    cell = f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    return cell if stats["n"] == n else f"{cell} (n={stats['n']})"


def format_summary(summary: dict) -> str:
    lines = [f"{summary['path']}: {summary['rated']} rated samples, {summary['skipped']} skipped "
             f"({summary['answers']} answers; a rater's latest answer on a sample counts)"
             + (f"; raters: {', '.join(summary['raters'])}" if summary["raters"] else "")]
    width = max(len(OVERALL), *(len(s) for s in summary["table"]))
    lines.append(f"{'source':<{width}}  {'n':>6}  " + "  ".join(f"{LABELS[m]:<22}" for m in METRICS))
    for source, row in summary["table"].items():
        lines.append(f"{source:<{width}}  {row['n']:>6}  "
                     + "  ".join(f"{_cell(row[m], row['n']):<22}" for m in METRICS))
    lines.append("mean ± sample std; (n=k): scores left empty on some samples")
    if summary["agreement"]:
        lines.append("inter-rater agreement on the samples both rated:")
        lines.append(f"{'raters':<24}  {'score':<20}  {'n':>5}  {'exact':>6}  {'within 1':>8}  "
                     f"{'kappa (quadratic)':>17}")
        for a in summary["agreement"]:
            kappa = "-" if a["kappa"] is None else f"{a['kappa']:.2f}"
            lines.append(f"{' ~ '.join(a['raters']):<24}  {LABELS[a['metric']]:<20}  {a['n']:>5}  "
                         f"{a['exact']:>6.2f}  {a['within_1']:>8.2f}  {kappa:>17}")
    elif len(summary["raters"]) > 1:
        lines.append("inter-rater agreement: no sample was rated by two raters")
    return "\n".join(lines)
