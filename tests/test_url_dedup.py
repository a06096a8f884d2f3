import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from rs5m_ray.config import load_config
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.pipelines.pub11 import metadata_stages
from rs5m_ray.sources.ingest import IngestFiles, list_inputs
from rs5m_ray.stages.url_dedup import add_url_bucket, dedup_urls
from rs5m_ray.storage import Storage


def test_partition_kernel_keeps_smallest_sample_id():
    t = add_url_bucket(pa.table({"sample_id": ["b", "a", "c", "d"], "source": ["x"] * 4,
                                 "url": ["u1", "u1", "u2", "u1"]}), 4)
    out = {r["sample_id"]: (r["drop_reason"], r["drop_detail"]) for r in dedup_urls(t).to_pylist()}
    assert out == {"a": (None, None), "c": (None, None), "b": ("duplicate_url", "duplicate_of:a"),
                   "d": ("duplicate_url", "duplicate_of:a")}


def test_global_dedup_across_sources_and_files_with_exact_ledger(tmp_path, sort_shuffle):
    # 3 LAION parquet files and a CC3M tsv, overlapping URLs across all of them.
    urls = [f"http://img.example/{i}.jpg" for i in range(300)]
    for part in range(3):
        chunk = urls[part * 80: part * 80 + 120]  # consecutive files share 40 URLs
        pq.write_table(pa.table({"URL": chunk, "TEXT": ["aerial view"] * len(chunk)}),
                       tmp_path / f"part-{part}.parquet")
    (tmp_path / "cc3m.tsv").write_text("".join(f"satellite image {i}\t{u}\n" for i, u in enumerate(urls[::5])))
    cfg = load_config(overrides={"output": str(tmp_path / "out"), "url_dedup": {"num_partitions": 7},
                                 "ingest": {"sources": [{"name": "laion2b", "paths": [str(tmp_path / "*.parquet")]},
                                                        {"name": "cc3m", "paths": [str(tmp_path / "*.tsv")]}]}})
    storage = Storage()
    files = list_inputs(cfg.ingest, storage)
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    ds = ds.map_batches(IngestFiles(cfg.ingest, cfg.output, storage), batch_size=1, batch_format="pyarrow")
    kept = pa.Table.from_pandas(metadata_stages(ds, cfg, storage).to_pandas())

    n_in = 3 * 120 + 60
    assert sorted(kept["url"].to_pylist()) == sorted(set(urls[:280]) | set(urls[::5]))
    ledger = read_parquet_dir(storage, f"{cfg.output}/ledger")
    assert len(kept) + len(ledger) == n_in
    dups = ledger.filter(pa.compute.equal(ledger["drop_reason"], "duplicate_url"))
    # Each dropped row points to the kept row of the same URL.
    kept_by_url = dict(zip(kept["url"].to_pylist(), kept["sample_id"].to_pylist()))
    for url, detail in zip(dups["url"].to_pylist(), dups["drop_detail"].to_pylist()):
        assert detail == f"duplicate_of:{kept_by_url[url]}"
    # The kept row is the smallest sample_id: cc3m_... sorts before laion2b_...
    assert kept_by_url[urls[0]] == "cc3m_cc3m_0"
