import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rs5m_ray.config import IngestConfig, SourceConfig
from rs5m_ray.ledger import read_parquet_dir
from rs5m_ray.sources.adapters import ADAPTERS, get_adapter
from rs5m_ray.sources.ingest import IngestFiles, list_inputs
from rs5m_ray.storage import Storage

URL = "https://example.org/a.jpg"
CAPTION = "aerial view of a harbour"


def write_source_file(tmp_path, source):
    """One realistic file per source, in the format and with the columns the dataset ships."""
    d = tmp_path / source
    d.mkdir()
    if source in ("laion2b", "laion400m"):
        p = d / "part-00000-5b54c5d5.snappy.parquet"
        pq.write_table(pa.table({"SAMPLE_ID": [1], "URL": [URL], "TEXT": [CAPTION], "HEIGHT": [400], "WIDTH": [500],
                                 "LICENSE": ["?"], "NSFW": ["UNLIKELY"], "similarity": [0.31]}), p)
    elif source == "laioncoco":
        p = d / "part-00000.parquet"
        pq.write_table(pa.table({"URL": [URL], "TEXT": [CAPTION], "top_caption": ["a harbour"],
                                 "all_captions": [["a harbour"]], "WIDTH": [500], "HEIGHT": [400]}), p)
    elif source == "coyo700m":
        p = d / "part-00000.parquet"
        pq.write_table(pa.table({"id": [5], "url": [URL], "text": [CAPTION], "width": [500], "height": [400],
                                 "image_phash": ["c0f"], "clip_similarity_vitb32": [0.3]}), p)
    elif source == "wit":
        p = d / "wit_v1.train.all-00000-of-00010.tsv.gz"
        with gzip.open(p, "wt") as f:
            f.write("language\tpage_url\timage_url\tpage_title\tcaption_reference_description\t"
                    "caption_attribution_description\toriginal_width\toriginal_height\n")
            f.write(f"en\thttps://en.wikipedia.org/wiki/Port\t{URL}\tPort\t\t{CAPTION}\t500\t400\n")
    elif source == "yfcc15m":
        p = d / "yfcc15m.tsv"
        p.write_text("photoid\tdownloadurl\ttitle\tdescription\tdatetaken\tlatitude\tlongitude\n"
                     f"42\t{URL}\t{CAPTION}\tshot from a plane\t2012-06-01 10:00:00.0\t48.85\t2.35\n")
    elif source == "cc12m":
        p = d / "cc12m.tsv"
        p.write_text(f"{URL}\t{CAPTION}\n")
    elif source == "cc3m":
        p = d / "Train_GCC-training.tsv"
        p.write_text(f"{CAPTION}\t{URL}\n")
    elif source == "redcaps":
        p = d / "earthporn_2020.json"
        p.write_text(json.dumps({"info": {}, "annotations": [
            {"image_id": "g1", "author": "u", "url": URL, "raw_caption": CAPTION.title(), "caption": CAPTION,
             "subreddit": "earthporn", "score": 5, "created_utc": 1577836800, "permalink": "/r/x"}]}))
    elif source == "sbu":
        p = d / "sbu.jsonl"
        p.write_text(json.dumps({"image_url": URL, "user_id": "7", "caption": CAPTION}) + "\n")
    elif source == "vg":
        p = d / "vg.jsonl"
        p.write_text(json.dumps({"image_id": 1, "url": URL, "width": 800, "height": 600, "caption": CAPTION}) + "\n")
    return str(p)


def ingest(tmp_path, source, path, **cfg):
    storage = Storage()
    out = str(tmp_path / "out")
    ingest_cfg = IngestConfig(sources=[SourceConfig(source, [path])], **cfg)
    files = list_inputs(ingest_cfg, storage)
    stage = IngestFiles(ingest_cfg, out, storage)
    batch = pa.table({"source": [f["source"] for f in files], "path": [f["path"] for f in files]})
    kept = list(stage(batch))
    kept = pa.concat_tables(kept) if kept else None
    return kept, read_parquet_dir(storage, f"{out}/ledger"), out


def test_all_eleven_pub11_sources_have_an_adapter():
    assert sorted(ADAPTERS) == sorted(["laion2b", "coyo700m", "laioncoco", "laion400m", "wit", "yfcc15m", "cc12m",
                                       "redcaps", "cc3m", "sbu", "vg"])


@pytest.mark.parametrize("source", sorted(ADAPTERS))
def test_adapter_maps_real_columns_to_canonical_rows(tmp_path, source):
    path = write_source_file(tmp_path, source)
    kept, ledger, _ = ingest(tmp_path, source, path)
    assert ledger is None
    row = kept.to_pylist()[0]
    assert row["source"] == source and row["url"] == URL
    assert row["caption"].lower().startswith("aerial view of a harbour")
    assert row["sample_id"].startswith(f"{source}_") and row["sample_id"].endswith("_0")


def test_sample_ids_are_stable_and_unique_across_files(tmp_path):
    d = tmp_path / "laion2b"
    d.mkdir()
    for part in range(2):
        pq.write_table(pa.table({"URL": [f"{URL}?{i}" for i in range(3)], "TEXT": ["x"] * 3}),
                       d / f"part-{part:05d}.parquet")
    kept, _, _ = ingest(tmp_path, "laion2b", str(d / "*.parquet"), batch_rows=2)
    ids = kept["sample_id"].to_pylist()
    assert ids == [f"laion2b_part-0000{p}_{r}" for p in range(2) for r in range(3)]


def test_bad_rows_get_drop_reasons(tmp_path):
    p = tmp_path / "cc3m.tsv"
    p.write_bytes(b"ok aerial view\thttps://e.org/1.jpg\n"
                  b"\thttps://e.org/2.jpg\n"
                  b"   \thttps://e.org/3.jpg\n"
                  b"bad \xff\xfe utf8\thttps://e.org/4.jpg\n"
                  b"no url\t\n"
                  b"nul \x00 byte\thttps://e.org/6.jpg\n"
                  + b"x" * 1_000_000 + b"\thttps://e.org/7.jpg\n"
                  b"fine\thttps://e.org/ a space.jpg\n")
    kept, ledger, _ = ingest(tmp_path, "cc3m", str(p))
    assert kept["sample_id"].to_pylist() == ["cc3m_cc3m_0"]
    reasons = dict(zip(ledger["sample_id"].to_pylist(), ledger["drop_reason"].to_pylist()))
    assert reasons == {"cc3m_cc3m_1": "empty_caption", "cc3m_cc3m_2": "empty_caption",
                       "cc3m_cc3m_3": "invalid_utf8", "cc3m_cc3m_4": "null_url", "cc3m_cc3m_5": "caption_nul_byte",
                       "cc3m_cc3m_6": "caption_too_long", "cc3m_cc3m_7": "invalid_url"}
    giant = ledger.filter(pa.compute.equal(ledger["drop_reason"], "caption_too_long"))["caption"][0].as_py()
    assert len(giant.encode()) <= IngestConfig().max_caption_bytes


def test_null_values_in_parquet_are_drop_reasons(tmp_path):
    p = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"URL": [None, URL, URL], "TEXT": ["aerial", None, "ok"]}), p)
    kept, ledger, _ = ingest(tmp_path, "laion2b", str(p))
    assert len(kept) == 1
    assert sorted(ledger["drop_reason"].to_pylist()) == ["empty_caption", "null_url"]


def test_wit_keeps_english_rows_only(tmp_path):
    p = tmp_path / "wit.tsv"
    p.write_text("language\timage_url\tcaption_reference_description\nen\thttp://a/1.jpg\tx\nde\thttp://a/2.jpg\ty\n")
    kept, ledger, _ = ingest(tmp_path, "wit", str(p))
    assert kept["url"].to_pylist() == ["http://a/1.jpg"]
    assert ledger["drop_reason"].to_pylist() == ["filtered_language"]


@pytest.mark.parametrize("content, why", [
    (b"PAR1 this is not parquet", "malformed parquet"),
    (None, "missing URL column 'URL'"),
])
def test_unreadable_file_is_recorded_with_its_name_and_the_job_goes_on(tmp_path, content, why):
    bad = tmp_path / "part-bad.parquet"
    if content is None:
        pq.write_table(pa.table({"url_wrong": [URL], "TEXT": ["x"]}), bad)
    else:
        bad.write_bytes(content)
    good = tmp_path / "part-good.parquet"
    pq.write_table(pa.table({"URL": [URL], "TEXT": ["aerial"]}), good)
    kept, _, out = ingest(tmp_path, "laion2b", str(tmp_path / "*.parquet"))
    assert len(kept) == 1
    errors = [json.loads(p.read_text()) for p in (tmp_path / "out" / "errors" / "ingest").glob("*.json")]
    assert len(errors) == 1 and errors[0]["path"] == str(bad) and why in errors[0]["error"]


def test_unknown_source_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown source 'laion5b'"):
        get_adapter("laion5b")
    with pytest.raises(FileNotFoundError, match="no files match"):
        list_inputs(IngestConfig(sources=[SourceConfig("cc3m", [str(tmp_path / "*.tsv")])]), Storage())


def reference_reasons(urls, captions, max_caption_bytes):
    """The checks as first written (one pyarrow.compute kernel per check, the first failing one wins)."""
    url, caption = pa.array(urls, pa.string()), pa.array(captions, pa.string())
    caption = pa.compute.if_else(pa.compute.equal(pa.compute.utf8_trim_whitespace(caption), ""), None, caption)
    pc_ = pa.compute
    checks = [
        (pc_.or_(pc_.is_null(url), pc_.equal(pc_.utf8_trim_whitespace(pc_.fill_null(url, "")), "")), "null_url", None),
        (pc_.match_substring(pc_.fill_null(url, ""), "\x00"), "invalid_url", "NUL byte"),
        (pc_.invert(pc_.match_substring_regex(pc_.fill_null(url, ""), r"^\S+$")), "invalid_url", "whitespace"),
        (pc_.is_null(caption), "empty_caption", None),
        (pc_.match_substring(pc_.fill_null(caption, ""), "\x00"), "caption_nul_byte", None),
        (pc_.greater(pc_.binary_length(pc_.fill_null(caption, "")), max_caption_bytes), "caption_too_long",
         f"> {max_caption_bytes} bytes"),
    ]
    out = [(None, None)] * len(urls)
    for mask, reason, detail in checks:
        out = [(reason, detail) if m and o[0] is None else o for m, o in zip(mask.to_pylist(), out)]
    return out


def test_vectorised_checks_equal_their_definitions(tmp_path):
    urls = ["http://a/ok.jpg", "http://a/v\x0btab.jpg", "http://a/nb\xa0sp.jpg", "http://a/em\u2003sp.jpg",
            "http://a/b c.jpg", "http://a/b\tc.jpg", "http://a/b\nc.jpg", "http://a/\x0cff", "http://a/\rcr",
            "http://a/\x00nul", "http://a/ \x00both", "  ", "\xa0", "", None, " lead", "trail ", "http://é.jpg"] * 3
    captions = ["aerial view", "\xa0\u2003", " \t", "", None, "x\x00y", "ok", "y" * 65, "\u200b", "é" * 40,
                "fine", " \x00 ", "a", "b", "c", "d", "e", "f"]
    captions = captions + captions[1:] + captions[:1] + captions[2:] + captions[:2]
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"URL": pa.array(urls, pa.string()), "TEXT": pa.array(captions, pa.string())}), path)
    cfg = IngestConfig(sources=[SourceConfig("laion2b", [str(path)])], batch_rows=20, max_caption_bytes=64)
    storage, out = Storage(), str(tmp_path / "out")
    stage = IngestFiles(cfg, out, storage)
    kept = pa.concat_tables(list(stage(pa.table({"source": ["laion2b"], "path": [str(path)]}))))
    ledger = read_parquet_dir(storage, f"{out}/ledger")
    got = {r["sample_id"]: (r["drop_reason"], r["drop_detail"]) for r in ledger.to_pylist()}
    got.update({s: (None, None) for s in kept["sample_id"].to_pylist()})
    expected = reference_reasons(urls, captions, 64)
    assert [got[f"laion2b_part-0_{i}"] for i in range(len(urls))] == expected


def test_invalid_utf8_in_parquet_strings_is_a_drop_reason(tmp_path):
    # Parquet readers do not validate UTF-8: such bytes reach the string column as they are.
    def strings(*values):
        return pa.array(list(values), pa.binary()).view(pa.string())

    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"URL": strings(b"http://a/1.jpg", b"http://a/\xff.jpg", b"http://a/3.jpg"),
                             "TEXT": strings(b"aerial view", b"ok", b"bad \xc3 caption")}), path)
    kept, ledger, _ = ingest(tmp_path, "laion2b", str(path))
    assert kept["sample_id"].to_pylist() == ["laion2b_part-0_0"]
    assert sorted(zip(ledger["sample_id"].to_pylist(), ledger["drop_reason"].to_pylist(),
                      ledger["drop_detail"].to_pylist())) == [
        ("laion2b_part-0_1", "invalid_utf8", "url"), ("laion2b_part-0_2", "invalid_utf8", "caption")]
