"""The whole PUB11 job then GeoRSCLIP fine-tuning, as `rs5m demo` runs them: loopback HTTP images,
local Ray, tiny models."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from rs5m_ray.config import ScoringConfig, load_config
from rs5m_ray.models.clip import load_clip
from rs5m_ray.pipelines import pub11
from rs5m_ray.pipelines.demo import run_demo
from tests.conftest import free_port
from tests.report_browser import check_report_page


def rs5m_decoder(key, data):  # as RS5M's dataloader.py decodes a sample
    if key.endswith(".img_content"):
        return Image.open(io.BytesIO(data)).convert("RGB")
    if key.endswith((".img_name", ".caption")):
        return data.decode("utf-8")
    return None


def test_demo_end_to_end_then_resume(tmp_path, sort_shuffle, capsys):
    out = tmp_path / "demo"
    assert run_demo(str(out), rows_per_source=24) == 0
    run = out / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["accounting_balanced"]
    assert list(report["funnel"]) == ["ingest", "keyword_filter", "url_dedup", "download", "decode", "clip_score",
                                      "phash_dedup", "embedding_dedup", "quantile_filter", "shard_writer"]
    assert report["sink"]["balanced"] and report["sink"]["samples_in_shards"] == report["shards"]["samples"]
    assert report["timeline"]["overlap_seconds"] >= 0 and set(report["timeline"]["phases"]) == {"images", "scores"}
    reasons = {r.split("/")[1] for r in report["drop_reasons"]}
    assert {"keyword_miss", "duplicate_url", "http_404", "decode_error", "null_url", "near_dup_of",
            "low_clip_score", "not_rs"} <= reasons
    assert report["keyword_hits"]["aerial view"] > 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    check_report_page(run, tmp_path / "chromium-profile")  # report.html and every figure load in Chromium
    misses = pq.read_table(run / "ledger" / "keyword_filter")  # located by sample_id, caption not kept
    assert len(misses) == report["funnel"]["keyword_filter"]["rows_in"] - report["funnel"]["keyword_filter"]["rows_out"]
    assert misses["caption"].null_count == len(misses) and misses["sample_id"].null_count == 0
    assert pq.read_table(run / "ledger" / "quantile_filter")["caption"].null_count == 0

    tars = sorted(str(p) for p in (run / "shards").glob("pub11-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode(rs5m_decoder))
    assert len(samples) == report["shards"]["samples"] > 0
    # The persistent index holds exactly the rows in shards: none the quantile filter (or anything) dropped.
    indexed = pq.read_table(out / "dedup-index" / "phash")["sample_id"].to_pylist()
    assert sorted(indexed) == sorted(s["img_name"].removesuffix(".jpg") for s in samples)
    assert not set(indexed) & set(pq.read_table(run / "ledger" / "quantile_filter")["sample_id"].to_pylist())
    assert all(s["img_content"].size[0] > 0 and s["caption"] for s in samples)
    side = pq.read_table(tars[0].replace(".tar", ".parquet"))
    assert {"clip_score", "rs_prob", "phash", "sha256", "width", "height", "keywords"} <= set(side.column_names)
    # Then GeoRSCLIP fine-tuning on those shards: a checkpoint per epoch, each an open_clip state dict.
    tuned = sorted((out / "georsclip").glob("checkpoint_*/model.pt"))
    assert len(tuned) == 2
    load_clip(ScoringConfig(clip_pretrained=str(tuned[-1])))  # strict: every key of the architecture

    before = {p: open(p, "rb").read() for p in tars}
    assert run_demo(str(out), rows_per_source=24) == 0
    rerun = json.loads((run / "report.json").read_text())
    assert rerun["shard_run"]["written"] == 0 and rerun["shard_run"]["skipped"] == len(tars)
    counts = lambda r: {s: (f["rows_in"], f["rows_out"]) for s, f in r["funnel"].items()}  # noqa: E731
    assert counts(rerun) == counts(report)  # the resumed run accounts for every row once, as the first did
    assert {p: open(p, "rb").read() for p in tars} == before
    assert len(list((out / "georsclip").glob("checkpoint_*/model.pt"))) == 2  # training was complete: resumed, no epoch
    printed = capsys.readouterr().out
    assert "accounting (input = kept + dropped, per source): balanced" in printed
    assert "GeoRSCLIP fine-tuning (Ray Train, 2 workers, tiny random CLIP): 2 epochs" in printed


def test_a_run_where_nothing_survives_ends_with_zero_shards_and_a_balanced_ledger(tmp_path, sort_shuffle):
    closed = free_port()
    urls = [f"http://127.0.0.1:{closed}/{i}.jpg" for i in range(40)]  # nothing listens there
    pq.write_table(pa.table({"URL": urls, "TEXT": ["aerial view of a harbour"] * 40}), tmp_path / "meta.parquet")
    cfg = load_config(overrides={
        "output": str(tmp_path / "out"), "ingest": {"sources": [{"name": "laion2b", "paths": [str(tmp_path / "*.parquet")]}]},
        "parts": {"num_parts": 3}, "download": {"allow_hosts": ["127.0.0.0/8"], "retries": 0},
        "scoring": {"enabled": False}, "near_dup": {"embedding_enabled": False}})
    report = pub11.run(cfg)
    assert report["shards"] == {"count": 0, "samples": 0, "dir": str(tmp_path / "out" / "shards")}
    assert report["accounting_balanced"] and report["accounting"]["laion2b"]["dropped"] == 40
    assert report["drop_reasons"] == {"download/connection_error": 40}
