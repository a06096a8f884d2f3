"""The whole PUB11 job then GeoRSCLIP fine-tuning, as `rs5m demo` runs them: loopback HTTP images,
local Ray, tiny models."""
import io
import json

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from rs5m_ray.config import ScoringConfig
from rs5m_ray.models.clip import load_clip
from rs5m_ray.pipelines.demo import run_demo


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
    assert list(report["funnel"]) == ["ingest", "keyword_filter", "url_dedup", "download", "decode", "phash_dedup",
                                      "clip_score", "embedding_dedup", "quantile_filter"]
    reasons = {r.split("/")[1] for r in report["drop_reasons"]}
    assert {"keyword_miss", "duplicate_url", "http_404", "decode_error", "null_url", "near_dup_of",
            "low_clip_score", "not_rs"} <= reasons
    assert report["keyword_hits"]["aerial view"] > 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    misses = pq.read_table(run / "ledger" / "keyword_filter")  # located by sample_id, caption not kept
    assert len(misses) == report["funnel"]["keyword_filter"]["rows_in"] - report["funnel"]["keyword_filter"]["rows_out"]
    assert misses["caption"].null_count == len(misses) and misses["sample_id"].null_count == 0
    assert pq.read_table(run / "ledger" / "quantile_filter")["caption"].null_count == 0

    tars = sorted(str(p) for p in (run / "shards").glob("pub11-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode(rs5m_decoder))
    assert len(samples) == report["shards"]["samples"] > 0
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
    assert {p: open(p, "rb").read() for p in tars} == before
    assert len(list((out / "georsclip").glob("checkpoint_*/model.pt"))) == 2  # training was complete: resumed, no epoch
    printed = capsys.readouterr().out
    assert "accounting (input = kept + dropped, per source): balanced" in printed
    assert "GeoRSCLIP fine-tuning (Ray Train, 2 workers, tiny random CLIP): 2 epochs" in printed
