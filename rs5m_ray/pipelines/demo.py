"""`rs5m demo`: the PUB11 job end to end on one machine.

Generates PUB11-style metadata and images, serves the images from a loopback
HTTP server (so the real download path runs), trains the demo RS detector on
generated aerial vs. ground-level images, runs the pipeline on a local Ray
instance with tiny random CLIP weights, and prints the funnel. Scores from a
random CLIP model mean nothing; the demo shows the machinery, not a dataset.
"""
from __future__ import annotations

import os
import random

from rs5m_ray.config import load_config
from rs5m_ray.pipelines import pub11
from rs5m_ray.sample.generate import aerial_image, generate, jpeg, photo_image
from rs5m_ray.sample.image_server import ImageServer


def train_demo_detector(out_dir: str, n: int = 96, seed: int = 7) -> str:
    """A detector head on the tiny CLIP's embedding, trained on generated images."""
    from rs5m_ray.train.detector import train_detector

    rng = random.Random(seed)
    sizes = [(256, 192), (320, 240), (400, 300)]
    positives = [jpeg(aerial_image(rng, rng.choice(sizes))) for _ in range(n)]
    negatives = [jpeg(photo_image(rng, rng.choice(sizes))) for _ in range(n)]
    path = os.path.join(out_dir, "detector")
    train_detector(positives, negatives, out=path, seed=seed)
    return path


def run_demo(out: str, rows_per_source: int = 60) -> int:
    out = os.path.abspath(out)
    input_dir = os.path.join(out, "input")
    os.makedirs(os.path.join(input_dir, "images"), exist_ok=True)
    with ImageServer(directory=os.path.join(input_dir, "images")) as server:
        sample = generate(input_dir, server.url("img"), rows_per_source=rows_per_source)
        detector = train_demo_detector(out)
        cfg = load_config(overrides={
            "output": os.path.join(out, "run"),
            "ray": {"num_cpus": 2, "object_store_memory": 512 * 1024**2, "shuffle_strategy": "sort_shuffle_pull_based"},
            "ingest": {"sources": sample["sources"]},
            # The images live on this machine's loopback server: the one place private addresses are allowed.
            "download": {"allow_private_addresses": True, "max_actors": 2},
            "scoring": {"detector_checkpoint": detector},
            "shards": {"samples_per_shard": 64},
        })
        report = pub11.run(cfg)
    print_summary(report, cfg.output)
    return 0 if report["accounting_balanced"] else 1


def print_summary(report: dict, output: str) -> None:
    print("\nrs5m demo: PUB11 funnel (rows in -> out per stage)")
    for stage, f in report["funnel"].items():
        print(f"  {stage:<16} {f['rows_in']:>6} -> {f['rows_out']:<6}")
    print("drop reasons:")
    for reason, n in report["drop_reasons"].items():
        print(f"  {reason:<40} {n}")
    balance = "balanced" if report["accounting_balanced"] else "NOT BALANCED"
    print(f"accounting (input = kept + dropped, per source): {balance}")
    print(f"shards: {report['shards']['count']} with {report['shards']['samples']} samples in {report['shards']['dir']}")
    print(f"report: {output}/report.json, {output}/report.png; ledger: {output}/ledger/")
