"""Real-data evaluation: a tiny CLIP trained from scratch with `rs5m train-clip` on AID images
(../shared/data/aid-train) captioned with class-matched RSICD captions, then `rs5m eval` on aid-dev:
zero-shot accuracy (30 classes, chance 3.3%) and retrieval on aid-dev images with class-matched
RSICD captions, under RS5M's protocols, with the contamination check against the training shards.

The captions of a training image are those of a random RSICD image of the same class (RSICD's
30 classes are AID's), one picked per sample. A check of the whole loop on real imagery, not a
GeoRSCLIP result.

Usage: python benchmarks/eval_real_aid.py --out /tmp/eval-aid [--per-class 120] [--epochs 6]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

from rs5m_ray.config import EvalConfig, TrainConfig, load_config
from rs5m_ray.eval.datasets import class_matched_captions, read_image_folder
from rs5m_ray.eval.run import run as run_eval
from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes
from rs5m_ray.shards.writer import manifest_path
from rs5m_ray.train import georsclip

SHARED = os.environ.get("RS5M_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def write_training_shards(out: str, per_class: int, shards: int, seed: int) -> int:
    train = read_image_folder(os.path.join(SHARED, "aid-train"))
    groups = class_matched_captions(train.folders, os.path.join(SHARED, "captions", "rsicd"), "train")
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for p, label in zip(train.paths, train.labels):
        by_class.setdefault(int(label), []).append(p)
    samples = []
    for label, paths in sorted(by_class.items()):
        folder = train.folders[label]
        for p in rng.sample(paths, min(per_class, len(paths))):
            samples.append((p, rng.choice(rng.choice(groups[folder]))))
    rng.shuffle(samples)
    os.makedirs(out, exist_ok=True)
    for s in range(shards):
        part = samples[s::shards]
        members = []
        for i, (path, caption) in enumerate(part):
            with open(path, "rb") as f:
                members += sample_members(f"aid_{s}_{i}", f.read(), caption, {"path": path})
        name = shard_name("aid", "train", s)
        with open(os.path.join(out, name), "wb") as f:
            f.write(tar_bytes(members))
        with open(manifest_path(out, name), "w") as f:
            json.dump({"count": len(part)}, f)
    return len(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/eval-aid")
    ap.add_argument("--per-class", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    shards = os.path.join(out, "shards")
    n = write_training_shards(shards, args.per_class, 4, seed=0)
    start = time.time()
    result = georsclip.run(load_config(overrides={
        "output": out, "name": "tiny-aid", "ray": {"num_cpus": 2}, "train_shards": [shards + "/"],
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": 0.1,
        "warmup_steps": 20, "num_workers": 1, "cpus_per_worker": 1, "shuffle_buffer": 1000,
        "augment": True}, cls=TrainConfig))
    trained = time.time() - start
    checkpoint = os.path.join(result["checkpoint"], "model.pt")
    label = f"tiny CLIP (rs5m-tiny-vit) trained from scratch: {n} aid-train images x RSICD captions, {args.epochs} epochs"
    report = run_eval(load_config(overrides={
        "output": os.path.join(out, "eval"), "label": label,
        "model": {"clip_model": "rs5m-tiny-vit", "clip_pretrained": checkpoint},
        "sets": [{"name": "aid-dev", "task": "zero_shot", "path": os.path.join(SHARED, "aid-dev")},
                 {"name": "aid-dev+rsicd", "task": "retrieval", "format": "class_matched",
                  "path": os.path.join(SHARED, "captions", "rsicd"), "split": "train",
                  "images": os.path.join(SHARED, "aid-dev")}],
        "contamination": {"train_shards": [shards + "/"]}}, cls=EvalConfig))
    print(report["markdown"])
    print(json.dumps({"training_samples": n, "train_seconds": round(trained, 1), "train_metrics": result["metrics"],
                      "checkpoint": checkpoint}, indent=1, default=str))


if __name__ == "__main__":
    main()
