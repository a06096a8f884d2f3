"""Global quantile thresholds on s_i and c_i, the joint filter, and the paper's Fig. 13 grid.

RS5M keeps a pair when its CLIP score is in the top 90% and its RS probability in the
top 80% of ALL candidates (notes §1.5), so the thresholds need every score before any
row can be judged. Exact, not sketched: only the two float32 columns travel to the
driver (8 bytes a row: 32 MB for the paper's 4,019,225 candidates), so the error is 0.
The scored dataset is materialised once (Ray spills it to disk if it does not fit in
the object store) so that the image pass is not run twice.

Threshold for "keep the top q": with the N scores sorted ascending, m = s[floor((1-q)N)],
and a row is kept when s >= m. Without ties exactly N - floor((1-q)N) rows pass; ties at
m all pass. Rows without a score (NaN/null) never pass and do not count in N.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from rs5m_ray.config import ScoringConfig
from rs5m_ray.ledger import Accounted, mark_dropped
from rs5m_ray.storage import Storage, join

STAGE = "quantile_filter"
GRID_KEEP = tuple(round(1.0 - 0.05 * i, 2) for i in range(9))  # 100% .. 60%, Fig. 13


def keep_threshold(sorted_scores: np.ndarray, keep: float) -> float | None:
    """The smallest score still in the top `keep` share of `sorted_scores` (ascending, no NaN)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep share must be in (0, 1], got {keep}")
    n = len(sorted_scores)
    if n == 0:
        return None
    drop = math.floor(round((1.0 - keep) * n, 6))
    return float(sorted_scores[min(drop, n - 1)])


def passes(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    return np.zeros(len(scores), bool) if threshold is None else scores >= threshold  # NaN >= x is False


def quantile_grid(s: np.ndarray, c: np.ndarray, keeps=GRID_KEEP) -> dict:
    """Remaining counts for every (s keep share, c keep share) pair: remaining[i][j] keeps the top
    keeps[i] of s and the top keeps[j] of c."""
    s_sorted, c_sorted = np.sort(s[~np.isnan(s)]), np.sort(c[~np.isnan(c)])
    c_pass = [passes(c, keep_threshold(c_sorted, q)) for q in keeps]
    remaining = []
    for q in keeps:
        s_pass = passes(s, keep_threshold(s_sorted, q))
        remaining.append([int(np.count_nonzero(s_pass & cp)) for cp in c_pass])
    return {"s_keep": list(keeps), "c_keep": list(keeps), "remaining": remaining}


def thresholds(s: np.ndarray, c: np.ndarray, cfg: ScoringConfig) -> dict:
    m = keep_threshold(np.sort(s[~np.isnan(s)]), cfg.clip_quantile_keep)
    n = keep_threshold(np.sort(c[~np.isnan(c)]), cfg.detector_quantile_keep)
    s_ok, c_ok = passes(s, m), passes(c, n)
    return {"method": "exact", "error_bound": 0.0, "candidates": int(len(s)),
            "clip_quantile_keep": cfg.clip_quantile_keep, "detector_quantile_keep": cfg.detector_quantile_keep,
            "m": m, "n": n, "kept": int(np.count_nonzero(s_ok & c_ok)),
            "dropped": {"low_clip_score": int(np.count_nonzero(~s_ok)),
                        "not_rs": int(np.count_nonzero(s_ok & ~c_ok))}}


class QuantileFilter:
    """Stage: low_clip_score where s_i < m, else not_rs where c_i < n; the scores go in the detail."""

    def __init__(self, m: float | None, n: float | None):
        self.m, self.n = m, n

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = batch["clip_score"].to_numpy(zero_copy_only=False).astype(np.float32)
        c = batch["rs_prob"].to_numpy(zero_copy_only=False).astype(np.float32)
        detail = pc.binary_join_element_wise("clip_score=", pc.cast(batch["clip_score"], pa.string()),
                                             ";rs_prob=", pc.cast(batch["rs_prob"], pa.string()), "")
        batch = mark_dropped(batch, pa.array(~passes(s, self.m)), "low_clip_score", detail)
        return mark_dropped(batch, pa.array(~passes(c, self.n)), "not_rs", detail)


def collect_scores(ds: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Both score columns of the whole dataset as float32 (null -> NaN)."""
    s_parts, c_parts = [], []
    for batch in ds.select_columns(["clip_score", "rs_prob"]).iter_batches(batch_format="pyarrow", batch_size=None):
        s_parts.append(batch["clip_score"].to_numpy(zero_copy_only=False).astype(np.float32))
        c_parts.append(batch["rs_prob"].to_numpy(zero_copy_only=False).astype(np.float32))
    empty = np.zeros(0, np.float32)
    return (np.concatenate(s_parts) if s_parts else empty), (np.concatenate(c_parts) if c_parts else empty)


def apply_quantile_filter(ds: ray.data.Dataset, cfg: ScoringConfig, output: str,
                          storage: Storage) -> tuple[ray.data.Dataset, dict]:
    """Thresholds over all candidates, then the accounted joint filter. The report (thresholds,
    kept/dropped counts, Fig. 13 grid) is returned and written to <output>/quantile_filter.json."""
    ds = ds.materialize()
    s, c = collect_scores(ds)
    report = thresholds(s, c, cfg)
    report["grid"] = quantile_grid(s, c)
    storage.write_atomic(join(output, f"{STAGE}.json"), json.dumps(report, indent=1).encode())
    kept = ds.map_batches(Accounted(STAGE, output, storage, QuantileFilter(report["m"], report["n"])),
                          batch_format="pyarrow")
    return kept, report
