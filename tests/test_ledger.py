"""The drop ledger: what each dropped row keeps, footer counts, and its size against the input."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rs5m_ray.config import IngestConfig, SourceConfig
from rs5m_ray.ledger import Accounted, ledger_counts, mark_dropped, read_parquet_dir, take_rows
from rs5m_ray.sources.ingest import IngestFiles, list_inputs
from rs5m_ray.stages.keyword_filter import RS5M_KEYWORDS, KeywordFilter
from rs5m_ray.storage import Storage

WORDS = ("the a of on in with beautiful house garden city river man woman dog cat car red blue old new "
         "wedding dress vintage poster kitchen modern photo print sale black white summer").split()


def laion_style_file(path, n, hit_fraction=0.005, bad_rows=(), seed=0):
    """LAION-style parquet as the datasets ship it: unique ~100-byte URLs, ~60-byte captions, snappy,
    PLAIN pages; RS keywords in `hit_fraction` of the captions."""
    rng = np.random.default_rng(seed)
    hosts = pa.array([f"https://cdn{i}.example-images.com/wp-content/uploads/{rng.bytes(12).hex()}/product-photo-"
                      for i in range(1_000)])
    ids = pc.cast(pa.array(np.arange(n)), pa.string())
    urls = pc.binary_join_element_wise(pc.take(hosts, rng.integers(0, len(hosts), n)), ids, ".jpg?width=800", "")
    pool = [" ".join(rng.choice(WORDS, 10)) for _ in range(5_000)]
    pool += [f"{c} {rng.choice(RS5M_KEYWORDS)}" for c in pool[:50]]
    weights = np.r_[np.full(5_000, (1 - hit_fraction) / 5_000), np.full(50, hit_fraction / 50)]
    captions = pc.take(pa.array(pool), rng.choice(len(pool), n, p=weights))
    urls, captions = urls.to_pylist(), captions.to_pylist()
    for i, (url, caption) in bad_rows:
        urls[i], captions[i] = url, caption
    pq.write_table(pa.table({"URL": urls, "TEXT": captions}), path, compression="snappy", use_dictionary=False)
    return urls, captions


def run_metadata_path(tmp_path, files, batch_rows=65_536):
    """ingest -> keyword filter in process, as the pipeline's operators run them on each batch."""
    storage, out = Storage(), str(tmp_path / "out")
    cfg = IngestConfig(sources=[SourceConfig("laion2b", [str(f) for f in files])], batch_rows=batch_rows)
    items = list_inputs(cfg, storage)
    ingest = IngestFiles(cfg, out, storage)
    keyword = Accounted("keyword_filter", out, storage, KeywordFilter(None, out, storage))
    kept = [keyword(b) for b in ingest(pa.table({"source": [i["source"] for i in items],
                                                 "path": [i["path"] for i in items]}))]
    return pa.concat_tables(kept), out, storage


def test_keyword_misses_keep_only_their_sample_id_other_drops_keep_url_and_caption(tmp_path):
    path = tmp_path / "part-00000.parquet"
    bad = [(3, ("http://e.org/a b.jpg", "aerial view with a space in the url")), (5, ("http://e.org/5.jpg", "  "))]
    urls, captions = laion_style_file(path, 2_000, bad_rows=bad)
    kept, out, storage = run_metadata_path(tmp_path, [path], batch_rows=512)

    misses = pq.read_table(tmp_path / "out" / "ledger" / "keyword_filter")
    assert misses["url"].null_count == misses["caption"].null_count == len(misses) > 1_900
    assert misses["sample_id"].null_count == 0
    assert set(misses["drop_reason"].to_pylist()) == {"keyword_miss"}
    assert set(misses["stage"].to_pylist()) == {"keyword_filter"}
    assert set(misses["source"].to_pylist()) == {"laion2b"}
    assert misses.schema.field("drop_detail").type == pa.string()  # all null, still a string column
    rows = sorted(int(s.rsplit("_", 1)[1]) for s in misses["sample_id"].to_pylist())
    assert all(not any(k in captions[r].lower() for k in RS5M_KEYWORDS) for r in rows)

    ingest = pq.read_table(tmp_path / "out" / "ledger" / "ingest").to_pylist()
    assert {(r["sample_id"], r["drop_reason"], r["url"], r["caption"]) for r in ingest} == {
        ("laion2b_part-00000_3", "invalid_url", urls[3], captions[3]),
        ("laion2b_part-00000_5", "empty_caption", urls[5], None)}

    # Every input row is kept or in exactly one ledger; the footers carry the counts.
    ids = kept["sample_id"].to_pylist() + misses["sample_id"].to_pylist() + [r["sample_id"] for r in ingest]
    assert sorted(ids) == sorted(f"laion2b_part-00000_{i}" for i in range(2_000))
    counts: dict = {}
    for c in ledger_counts(storage, out):
        counts[c["stage"], c["reason"]] = counts.get((c["stage"], c["reason"]), 0) + c["count_all"]
    assert counts == {("keyword_filter", "keyword_miss"): len(misses), ("ingest", "invalid_url"): 1,
                      ("ingest", "empty_caption"): 1}
    assert kept["url"].null_count == kept["caption"].null_count == 0
    ledger = read_parquet_dir(storage, f"{out}/ledger")  # all stages' files concatenate as plain strings
    assert len(ledger) == len(misses) + 2 and all(t == pa.string() for t in ledger.schema.types)


def test_ledger_is_a_small_fraction_of_the_input(tmp_path):
    files = [tmp_path / f"part-{i:05d}.parquet" for i in range(2)]
    for i, f in enumerate(files):
        laion_style_file(f, 100_000, seed=i)
    kept, _, _ = run_metadata_path(tmp_path, files)
    input_bytes = sum(f.stat().st_size for f in files)
    ledger_bytes = sum(p.stat().st_size for p in (tmp_path / "out" / "ledger").rglob("*.parquet"))
    assert 0 < len(kept) < 2_000
    assert ledger_bytes <= 0.05 * input_bytes, (ledger_bytes, input_bytes)


def test_mixed_reasons_and_sources_are_counted_per_group(tmp_path):
    storage, out = Storage(), str(tmp_path / "out")
    batch = pa.table({"sample_id": [f"s{i}" for i in range(6)], "source": ["a", "a", "b", "b", "b", "a"],
                      "url": [f"http://x/{i}" for i in range(6)], "caption": ["c"] * 6})

    def stage(t):
        t = mark_dropped(t, pa.array([True, False, True, False, False, False]), pa.array(
            ["near_dup_of:s1", None, "near_dup_of:s3", None, None, None]), "hamming=2")
        return mark_dropped(t, pa.array([False, False, False, False, True, True]), "http_404")

    out_rows = Accounted("stage_x", out, storage, stage)(batch)
    assert out_rows["sample_id"].to_pylist() == ["s1", "s3"]
    counts = sorted((c["source"], c["reason"], c["count_all"]) for c in ledger_counts(storage, out))
    assert counts == [("a", "http_404", 1), ("a", "near_dup_of", 1), ("b", "http_404", 1), ("b", "near_dup_of", 1)]
    ledger = read_parquet_dir(storage, f"{out}/ledger").sort_by("sample_id")
    assert ledger["drop_reason"].to_pylist() == ["near_dup_of:s1", "near_dup_of:s3", "http_404", "http_404"]
    assert ledger["url"].to_pylist() == ["http://x/0", "http://x/2", "http://x/4", "http://x/5"]
    assert ledger["drop_detail"].to_pylist() == ["hamming=2", "hamming=2", None, None]


def test_take_rows_is_contiguous_and_equals_filter():
    table = pa.table({"a": list(range(200)), "b": [str(i) for i in range(200)]})
    chunked = pa.concat_tables([table.slice(0, 77), table.slice(77)])
    rng = np.random.default_rng(0)
    masks = [rng.random(200) < p for p in (0.01, 0.3, 0.7, 0.99)] + [np.arange(200) < 50, np.ones(200, bool),
                                                                     np.zeros(200, bool)]
    for t in (table, chunked):
        for m in masks:
            got = take_rows(t, m)
            assert got.to_pylist() == t.filter(pa.array(m)).to_pylist()
            assert m.all() or all(c.num_chunks <= 1 for c in got.columns)


def test_accounted_counts_and_passes_through_an_all_kept_batch(tmp_path):
    storage, out = Storage(), str(tmp_path / "out")
    batch = pa.table({"sample_id": ["a", "b"], "source": ["x", "x"], "caption": ["aerial view", "landsat"]})
    kept = Accounted("keyword_filter", out, storage, KeywordFilter())(batch)
    assert kept["sample_id"].to_pylist() == ["a", "b"] and not (tmp_path / "out" / "ledger").exists()
    stats = read_parquet_dir(storage, f"{out}/stats")
    assert stats.select(["source", "rows_in", "rows_out"]).to_pylist() == [{"source": "x", "rows_in": 2, "rows_out": 2}]
    assert pc.sum(stats["rows_in"]).as_py() == 2
