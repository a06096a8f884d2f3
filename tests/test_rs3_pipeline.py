"""`rs5m rs3` end to end on a local Ray: real-layout inputs with broken files, accounting, shards, GPE, geo report."""
from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq

from rs5m_ray.config import Rs3Config, load_config
from rs5m_ray.pipelines import rs3
from rs5m_ray.pipelines.harness import Staging
from rs5m_ray.pipelines.parts import ReadLabeledPart
from rs5m_ray.sample.rs3 import generate_rs3
from rs5m_ray.storage import Storage


def test_rs3_run_accounts_for_every_sample_and_resumes(ray_cluster, sort_shuffle, tmp_path):
    sources = generate_rs3(str(tmp_path / "in"), fmow_images=5, ben_patches=5, millionaid_images=3)
    cfg = load_config(overrides={"output": str(tmp_path / "run"), "sources": sources, "parts": {"num_parts": 2},
                                 "read": {"max_actors": 1}, "shards": {"train_shards": 2, "val_shards": 1},
                                 "caption": {"enabled": False}},  # captioning: tests/test_caption.py
                      cls=Rs3Config)
    report = rs3.run(cfg)
    assert report["accounting_balanced"] and report["sink"]["balanced"]
    assert report["accounting"] == {
        "ben": {"input": 5, "kept": 3, "dropped": 2, "balanced": True},
        "fmow": {"input": 10, "kept": 8, "dropped": 2, "balanced": True},
        "millionaid": {"input": 3, "kept": 0, "dropped": 3, "balanced": True}}
    assert report["drop_reasons"] == {"decode/decode_error": 1, "ingest/bad_json": 1, "ingest/missing_band": 1,
                                      "ingest/missing_image": 1, "ingest/unreadable_tiff": 1,
                                      "meta_caption/empty_caption": 2}  # MillionAID: no metadata, no captioner yet
    shards = os.path.join(cfg.output, "shards")
    names = sorted(os.listdir(shards))
    tars = [n for n in names if n.endswith(".tar")]
    assert tars and all(n.startswith(("rs3-train-", "rs3-val-")) for n in tars), names
    sidecar = pq.read_table([os.path.join(shards, n) for n in names if n.endswith(".parquet")][0]).to_pylist()[0]
    assert sidecar["caption"] == sidecar["geometa_cap"] and sidecar["utm_zone"] and sidecar["month"]
    assert sidecar["sample_id"].startswith(("fmow_", "ben_"))
    gpe = pq.read_table(os.path.join(cfg.output, "gpe"))
    assert gpe.column_names == ["img_name", "text", "entity"] and len(gpe) == 11
    assert report["gpe"]["captions"] == 11 and report["gpe"]["with_gpe"] >= 8  # every FMoW text names its city
    assert report["geo"]["geotagged"] == 11 and os.path.getsize(os.path.join(cfg.output, "geo.png")) > 50_000

    # Resume: the listing and every done part are kept; a rerun reads no input again (here: none is left).
    shutil.rmtree(tmp_path / "in")
    staging = Staging(cfg.output, Storage())
    parts = rs3.listing_phase(cfg, Storage(), staging)
    reader = ReadLabeledPart(cfg, Storage())
    assert sum(reader.fetch(p) for p in parts) == 13 == sum(m["rows"] for m in staging.markers("images"))
