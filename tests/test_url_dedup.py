import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rs5m_ray.config import NearDupConfig, load_config
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.pipelines.harness import CANDIDATES, Staging
from rs5m_ray.pipelines.pub11 import metadata_phase
from rs5m_ray.stages.keep_rule import KeepRule
from rs5m_ray.stages.url_dedup import add_url_bucket, dedup_urls
from rs5m_ray.storage import Storage

RULE = KeepRule.from_config(NearDupConfig())


def marks(rows: list[tuple[str, str, str]], rule: KeepRule = RULE, **extra) -> dict:
    """(sample_id, source, url) rows -> {sample_id: (drop_reason, drop_detail)}."""
    t = pa.table({"sample_id": [r[0] for r in rows], "source": [r[1] for r in rows],
                  "url": [r[2] for r in rows], **extra})
    return {r["sample_id"]: (r["drop_reason"], r["drop_detail"])
            for r in dedup_urls(add_url_bucket(t, 4), rule).to_pylist()}


def test_url_dedup_follows_the_rs5m_keep_rule_not_the_smallest_sample_id():
    # laioncoco_... sorts before wit_...: the old rule kept it; RS5M drops LAION-COCO copies first.
    assert marks([("laioncoco_a", "laioncoco", "u1"), ("wit_b", "wit", "u1")]) == {
        "wit_b": (None, None), "laioncoco_a": ("duplicate_url", "duplicate_of:wit_b")}
    # laion2b > laion400m > coyo700m > unlisted sources > laioncoco
    out = marks([("coyo700m_1", "coyo700m", "u"), ("laion2b_9", "laion2b", "u"), ("cc3m_0", "cc3m", "u"),
                 ("laion400m_5", "laion400m", "u"), ("laioncoco_0", "laioncoco", "u"),
                 ("coyo700m_2", "coyo700m", "v"), ("cc3m_1", "cc3m", "v"), ("x_1", "x", "w")])
    assert {k for k, (reason, _) in out.items() if reason is None} == {"laion2b_9", "coyo700m_2", "x_1"}
    assert out["coyo700m_1"] == ("duplicate_url", "duplicate_of:laion2b_9")
    assert out["cc3m_1"] == ("duplicate_url", "duplicate_of:coyo700m_2")


def test_url_dedup_quality_column_when_configured():
    rows = [("cc3m_1", "cc3m", "u"), ("cc3m_2", "cc3m", "u"), ("laion2b_1", "laion2b", "u2"),
            ("laioncoco_1", "laioncoco", "u2")]
    q = {"score": pa.array([0.1, 0.9, 0.0, 1.0])}
    out = marks(rows, KeepRule.from_config(NearDupConfig(), quality_column="score"), **q)
    assert out["cc3m_1"] == ("duplicate_url", "duplicate_of:cc3m_2")
    assert out["laioncoco_1"] == ("duplicate_url", "duplicate_of:laion2b_1")  # source rank first
    with pytest.raises(ValueError):
        marks(rows, KeepRule.from_config(NearDupConfig(), quality_column="missing"))


def test_url_dedup_pick_among_equal_ranks_depends_on_the_seed_only():
    rows = [(f"cc3m_{i}", "cc3m", "u") for i in range(6)]

    def kept(seed, order):
        rule = KeepRule.from_config(NearDupConfig(seed=seed))
        out = marks([rows[i] for i in order], rule)
        (winner,) = [k for k, (reason, _) in out.items() if reason is None]
        assert all(detail == f"duplicate_of:{winner}" for k, (_, detail) in out.items() if k != winner)
        return winner

    for seed in (0, 1, 2023):
        assert kept(seed, range(6)) == kept(seed, [5, 3, 1, 0, 2, 4]) == kept(seed, range(6))
    assert len({kept(seed, range(6)) for seed in range(12)}) > 1


def test_url_dedup_output_is_sorted_and_independent_of_input_order():
    rows = [("b", "x", "u1"), ("a", "x", "u1"), ("c", "y", "u2"), ("d", "laioncoco", "u1")]
    t = add_url_bucket(pa.table({"sample_id": [r[0] for r in rows], "source": [r[1] for r in rows],
                                 "url": [r[2] for r in rows]}), 4)
    one, two = dedup_urls(t, RULE), dedup_urls(t.take([3, 1, 2, 0]), RULE)
    assert one.equals(two)
    assert one["url"].to_pylist() == sorted(one["url"].to_pylist())
    assert "url_bucket" not in one.column_names
    assert dedup_urls(t.slice(0, 0), RULE).num_rows == 0


def test_global_dedup_across_sources_and_files_with_exact_ledger(tmp_path, sort_shuffle):
    # 3 LAION parquet files and a CC3M tsv, overlapping URLs across all of them.
    urls = [f"http://img.example/{i}.jpg" for i in range(300)]
    for part in range(3):
        chunk = urls[part * 80: part * 80 + 120]  # consecutive files share 40 URLs
        pq.write_table(pa.table({"URL": chunk, "TEXT": ["aerial view"] * len(chunk)}),
                       tmp_path / f"part-{part}.parquet")
    (tmp_path / "cc3m.tsv").write_text("".join(f"satellite image {i}\t{u}\n" for i, u in enumerate(urls[::5])))
    cfg = load_config(overrides={"output": str(tmp_path / "out"), "parts": {"num_parts": 7},
                                 "ingest": {"sources": [{"name": "laion2b", "paths": [str(tmp_path / "*.parquet")]},
                                                        {"name": "cc3m", "paths": [str(tmp_path / "*.tsv")]}]}})
    storage = Storage()
    staging = Staging(cfg.output, storage)
    parts = metadata_phase(cfg, storage, staging)
    assert 1 < len(parts) <= 7 and staging.candidate_parts() == parts
    kept = pa.concat_tables([pq.read_table(p) for p in staging.paths(CANDIDATES, parts)])
    assert metadata_phase(cfg, storage, staging) == parts  # done: a rerun reads it back

    n_in = 3 * 120 + 60
    assert sorted(kept["url"].to_pylist()) == sorted(set(urls[:280]) | set(urls[::5]))
    ledger = read_parquet_dir(storage, f"{cfg.output}/ledger")
    assert len(kept) + len(ledger) == n_in
    dups = ledger.filter(pa.compute.equal(ledger["drop_reason"], "duplicate_url"))
    # Each dropped row points to the kept row of the same URL.
    kept_by_url = dict(zip(kept["url"].to_pylist(), kept["sample_id"].to_pylist()))
    for url, detail in zip(dups["url"].to_pylist(), dups["drop_detail"].to_pylist()):
        assert detail == f"duplicate_of:{kept_by_url[url]}"
    # RS5M's keep rule, not the smallest sample_id (cc3m_... sorts before laion2b_...): every URL
    # with a laion2b copy keeps a laion2b row; the others keep their only (cc3m) row.
    for url in set(urls[:280]) | set(urls[::5]):
        assert kept_by_url[url].startswith("laion2b_" if url in urls[:280] else "cc3m_"), url
