"""`rs5m demo`: the PUB11 job end to end on one machine.

Generates PUB11-style metadata and images, serves the images from a loopback
HTTP server (so the real download path runs), trains the demo RS detector head
on generated aerial vs. ground-level images, runs the pipeline on a local Ray
instance with tiny random CLIP weights, prints the funnel, runs the RS3 path on generated
FMoW / BigEarthNet / MillionAID samples in their real layouts (`run_rs3_demo`), then fine-tunes the tiny
CLIP on the shards it wrote with Ray Train (2 DDP workers) and evaluates the checkpoint (`rs5m eval`:
zero-shot, retrieval, contamination; tables printed). Scores and losses of a
random CLIP model mean nothing; the demo shows the machinery, not a dataset.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import ray.data

from rs5m_ray.config import EvalConfig, Rs3Config, TrainConfig, load_config
from rs5m_ray.pipelines import pub11, rs3
from rs5m_ray.report import input_summary
from rs5m_ray.sample.generate import generate
from rs5m_ray.sample.rs3 import generate_rs3
from rs5m_ray.sample.image_server import ImageServer
from rs5m_ray.storage import Storage
from rs5m_ray.train import georsclip
from rs5m_ray.train.detector import ensure_detector


def quiet_ray_data() -> None:
    """A short console: the demo prints its own summary; Ray's logs stay in /tmp/ray."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_demo(out: str, rows_per_source: int = 60, train_epochs: int = 2) -> int:
    out = os.path.abspath(out)
    quiet_ray_data()
    input_dir = os.path.join(out, "input")
    os.makedirs(os.path.join(input_dir, "images"), exist_ok=True)
    with ImageServer(directory=os.path.join(input_dir, "images")) as server:
        sample = generate(input_dir, server.url("img"), rows_per_source=rows_per_source)
        cfg = load_config(overrides={
            "output": os.path.join(out, "run"),
            "ray": {"num_cpus": 2, "object_store_memory": 512 * 1024**2, "shuffle_strategy": "sort_shuffle_pull_based"},
            "ingest": {"sources": sample["sources"]},
            # The images live on this machine's loopback server: loopback is the one non-public range allowed.
            # One fetch actor and one scoring actor share the 2 cores: parts are scored while others download.
            "download": {"allow_hosts": ["127.0.0.0/8"], "max_actors": 1},
            # Random tiny-CLIP embeddings of distinct generated images reach cosine 0.996 (0.95 is meant for
            # trained models): a threshold only near-identical images pass keeps the demo's clusters small.
            # The persistent dedup index: accepted rows enter it once their shard is committed.
            "near_dup": {"cosine_threshold": 0.999, "index_path": os.path.join(out, "dedup-index")},
            "parts": {"num_parts": 8},
            "shards": {"train_shards": 4, "val_shards": 1},
        })
        # The demo's RS detector: a head trained now on generated aerial vs. ground-level images.
        cfg = dataclasses.replace(cfg, scoring=ensure_detector(cfg.scoring, cfg.output, Storage(cfg.storage)))
        report = pub11.run(cfg)
    print_summary(report, cfg.output)
    rs3_report = run_rs3_demo(out)
    if train_epochs:
        shards = os.path.join(cfg.output, "shards")
        result = georsclip.run(load_config(overrides={
            "output": out, "ray": {"num_cpus": 2},
            "train_shards": [os.path.join(shards, "pub11-train-*.tar")],
            "val_shards": [os.path.join(shards, "pub11-val-*.tar")],
            "epochs": train_epochs, "batch_size": 16, "lr": 1e-4, "num_workers": 2, "cpus_per_worker": 1,
            "shuffle_buffer": 100}, cls=TrainConfig))
        m = result["metrics"]
        print(f"\nGeoRSCLIP fine-tuning (Ray Train, 2 workers, tiny random CLIP): {m['epoch']} epochs, "
              f"{m['step']} steps, last step's loss {m['loss']:.3f}, val loss {m.get('val_loss', float('nan')):.3f}")
        print(f"checkpoint: {result['checkpoint']}/model.pt (an open_clip state dict: scoring.clip_pretrained)")
        evaluate_checkpoint(out, os.path.join(result["checkpoint"], "model.pt"), shards)
    return 0 if report["accounting_balanced"] and rs3_report["accounting_balanced"] else 1


def evaluate_checkpoint(out: str, checkpoint: str, shards: str, per_class: int = 12) -> dict:
    """`rs5m eval` of the fine-tuned checkpoint: retrieval on the val shards' images and captions (an RS5M
    retrieval CSV), zero-shot on generated aerial vs ground-level images, and the contamination check of
    both against the train shards (the val split is disjoint from them; the generated images are new)."""
    import csv
    import random

    from rs5m_ray.eval.run import run as run_eval
    from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image
    from rs5m_ray.shards.reader import ShardReader

    sets = os.path.join(out, "input", "eval")
    os.makedirs(os.path.join(sets, "val-images"), exist_ok=True)
    with open(os.path.join(sets, "val.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "title"])
        for sample in ShardReader(os.path.join(shards, "pub11-val-*.tar"), shuffle_buffer=0).samples():
            name = f"{sample['__key__']}.jpg"
            with open(os.path.join(sets, "val-images", name), "wb") as img:
                img.write(sample["img_content"])
            writer.writerow([name, sample["caption"].decode("utf-8")])
    rng = random.Random(7)
    for folder, make in (("aerial_scene", aerial_image), ("ground_level_photo", photo_image)):
        os.makedirs(os.path.join(sets, "scenes", folder), exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(sets, "scenes", folder, f"{i}.jpg"), "wb") as img:
                img.write(jpeg(make(rng, (160, 128))))
    report = run_eval(load_config(overrides={
        "output": os.path.join(out, "eval"), "label": "demo GeoRSCLIP (tiny CLIP fine-tuned on the demo shards)",
        "model": {"clip_model": "rs5m-tiny-vit", "clip_pretrained": checkpoint},
        "sets": [{"name": "generated-scenes", "task": "zero_shot", "path": os.path.join(sets, "scenes")},
                 {"name": "demo-val", "task": "retrieval", "format": "csv", "path": os.path.join(sets, "val.csv"),
                  "images": os.path.join(sets, "val-images")}],
        # pHash only: a random tiny CLIP puts distinct images at cosine > 0.95, embeddings would flag everything
        "contamination": {"train_shards": [os.path.join(shards, "pub11-train-*.tar")], "embeddings": False}},
        cls=EvalConfig))
    print("\nrs5m eval of the fine-tuned checkpoint (tiny model, generated data: the numbers mean nothing)")
    print(report["markdown"])
    print(f"eval outputs: {os.path.join(out, 'eval')} (results.json, report.md, plots/)")
    return report


def run_rs3_demo(out: str) -> dict:
    """RS3 on generated FMoW / BigEarthNet / MillionAID samples in their real layouts (a few files broken):
    readers, validation, captions (tiny random BLIP-2: 20 candidates, ranked by the tiny random CLIPs, so
    the text is noise), meta-captions in front, shards, GPE, geo statistics."""
    cfg = load_config(overrides={
        "output": os.path.join(out, "rs3"), "sources": generate_rs3(os.path.join(out, "input", "rs3")),
        "ray": {"num_cpus": 2}, "parts": {"num_parts": 4}, "read": {"max_actors": 1},
        "shards": {"train_shards": 2, "val_shards": 1}}, cls=Rs3Config)
    report = rs3.run(cfg)
    print_summary(report, cfg.output, "RS3")
    geo, gpe = report.get("geo", {}), report.get("gpe", {})
    print(f"geo: {geo.get('geotagged', 0)} geo-tagged samples in {geo.get('zones', 0)} UTM zones, "
          f"{len(geo.get('countries', {}))} countries ({cfg.output}/geo.png); GPE: {gpe.get('with_gpe', 0)} of "
          f"{gpe.get('captions', 0)} captions name a place ({cfg.output}/gpe/)")
    return report


def print_summary(report: dict, output: str, path: str = "PUB11") -> None:
    print(f"\nrs5m demo: {path} funnel (rows in -> out per stage)")
    for stage, f in report["funnel"].items():
        print(f"  {stage:<16} {f['rows_in']:>6} -> {f['rows_out']:<6}")
    print("drop reasons:")
    for reason, n in report["drop_reasons"].items():
        print(f"  {reason:<40} {n}")
    balance = "balanced" if report["accounting_balanced"] else "NOT BALANCED"
    q = report.get("quantile_filter")
    if q:
        print(f"quantile filter: s_i >= m = {q['m']:.4f} (top {q['clip_quantile_keep']:.0%}), "
              f"c_i >= n = {q['n']:.4f} (top {q['detector_quantile_keep']:.0%}): {q['kept']} of {q['candidates']} "
              "kept; Fig. 13 grid in report.json")
    print(f"accounting (input = kept + dropped, per source): {balance}")
    print("\n".join(input_summary(report)))
    sink = report["sink"]
    print(f"sink: {sink['kept_by_last_stage']} rows kept by {sink['last_stage']} -> "
          f"{sink['samples_in_shards']} samples in shards ({'equal' if sink['balanced'] else 'NOT EQUAL'})")
    t = report.get("timeline", {})
    if "overlap_seconds" in t:
        a, b = t["overlap_of"]
        print(f"timeline: {a} {t['phases'][a]['start']:.1f}-{t['phases'][a]['end']:.1f} s, "
              f"{b} {t['phases'][b]['start']:.1f}-{t['phases'][b]['end']:.1f} s, overlapping {t['overlap_seconds']:.1f} s")
    print(f"shards: {report['shards']['count']} with {report['shards']['samples']} samples in {report['shards']['dir']}")
    print(f"report: {output}/report.json, {output}/report.png; ledger: {output}/ledger/")

