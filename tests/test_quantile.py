"""Global quantile thresholds, the joint filter with its ledger, and the Fig. 13 grid, checked against numpy."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from rs5m_ray.config import ScoringConfig
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.stages.quantile import (GRID_KEEP, QuantileFilter, apply_quantile_filter, keep_threshold,
                                      quantile_grid)
from rs5m_ray.storage import Storage


def scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = rng.normal(0.2, 0.05, n).astype(np.float32)
    c = rng.beta(2, 1, n).astype(np.float32)
    return s, c


@pytest.mark.parametrize("n", [1, 7, 100, 1001])
@pytest.mark.parametrize("keep", [1.0, 0.95, 0.9, 0.8, 0.6, 0.05])
def test_threshold_keeps_exactly_the_top_share(n, keep):
    s, _ = scores(n, seed=n)
    m = keep_threshold(np.sort(s), keep)
    kept = s >= m
    assert kept.sum() == n - math.floor(round((1 - keep) * n, 6))
    if (~kept).any():
        assert s[kept].min() > s[~kept].max()


def test_grid_matches_numpy_counts():
    s, c = scores(5000)
    grid = quantile_grid(s, c)
    assert grid["s_keep"] == list(GRID_KEEP) and GRID_KEEP[0] == 1.0 and GRID_KEEP[-1] == 0.6 and len(GRID_KEEP) == 9
    for i, qs in enumerate(GRID_KEEP):
        # (1-q)*N is an integer here: the top-q share starts at that order statistic.
        m = np.sort(s)[int(round((1 - qs) * 5000))]
        for j, qc in enumerate(GRID_KEEP):
            n = np.sort(c)[int(round((1 - qc) * 5000))]
            assert grid["remaining"][i][j] == np.count_nonzero((s >= m) & (c >= n))
    assert grid["remaining"][0][0] == 5000
    assert grid["remaining"][2][4] == pytest.approx(5000 * 0.9 * 0.8, rel=0.05)  # independent scores
    assert np.all(np.diff(grid["remaining"], axis=0) <= 0) and np.all(np.diff(grid["remaining"], axis=1) <= 0)


def test_unscored_rows_never_pass_and_do_not_count():
    s = np.array([0.1, np.nan, 0.3, 0.2], np.float32)
    c = np.array([0.9, 0.9, 0.9, 0.9], np.float32)
    grid = quantile_grid(s, c)
    assert grid["remaining"][0][0] == 3


def test_filter_stage_marks_reasons_with_scores():
    table = pa.table({"sample_id": ["a", "b", "c", "d"], "source": ["cc3m"] * 4,
                      "clip_score": pa.array([0.1, 0.3, 0.3, None], pa.float32()),
                      "rs_prob": pa.array([0.9, 0.2, 0.9, 0.9], pa.float32())})
    out = QuantileFilter(m=0.2, n=0.5)(table)
    assert out["drop_reason"].to_pylist() == ["low_clip_score", "not_rs", None, "low_clip_score"]
    assert out["drop_detail"][0].as_py().startswith("clip_score=0.1") and "rs_prob=0.9" in out["drop_detail"][0].as_py()


def test_apply_on_a_distributed_dataset(ray_cluster, tmp_path):
    import ray.data

    s, c = scores(2000, seed=5)
    table = pa.table({"sample_id": [f"laion2b_x_{i}" for i in range(2000)],
                      "source": ["laion2b", "cc3m"] * 1000, "clip_score": s, "rs_prob": c})
    ds = ray.data.from_arrow(table).repartition(8)
    out_dir, storage = str(tmp_path / "run"), Storage()
    cfg = ScoringConfig(clip_quantile_keep=0.9, detector_quantile_keep=0.8)
    kept_ds, report = apply_quantile_filter(ds, cfg, out_dir, storage)
    kept = kept_ds.to_pandas()
    m, n = np.sort(s)[200], np.sort(c)[400]
    expected = (s >= m) & (c >= n)
    assert report["m"] == pytest.approx(float(m)) and report["n"] == pytest.approx(float(n))
    assert len(kept) == report["kept"] == expected.sum()
    assert sorted(kept["sample_id"]) == sorted(table.filter(pa.array(expected))["sample_id"].to_pylist())
    assert report["grid"]["remaining"][2][4] == report["kept"]  # the 90/80 cell is the filter itself
    ledger = read_parquet_dir(storage, f"{out_dir}/ledger/quantile_filter")
    reasons = ledger["drop_reason"].to_pylist()
    assert reasons.count("low_clip_score") == report["dropped"]["low_clip_score"] == 200
    assert reasons.count("not_rs") == report["dropped"]["not_rs"]
    assert len(ledger) + len(kept) == 2000
    assert all(d.startswith("clip_score=") and ";rs_prob=" in d for d in ledger["drop_detail"].to_pylist())
    assert json.loads((tmp_path / "run" / "quantile_filter.json").read_text())["kept"] == report["kept"]
