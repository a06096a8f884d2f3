"""GPU check of GeoRSCLIP training: ViT-B/32 (random init), batch 256, bf16, on generated shards.

Prints samples/s (over steps after the first `--warmup` ones), the data-wait fraction and the
peak GPU memory. With Ray installed it runs `rs5m train-clip` (one Ray Train worker, one GPU,
`--cpus` reserved); without Ray it runs the same `Worker.train_step` and data stream in this
process, and says so. Run through benchmarks/gpu_train_check.sh.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes  # noqa: E402

WORDS = ["farmland", "harbor", "airport", "forest", "river", "residential", "desert", "stadium", "bridge", "lake"]


def make_shard(args: tuple[str, int, int]) -> int:
    out, index, count = args
    rng = np.random.default_rng(index)
    members = []
    for i in range(count):
        w, h = int(rng.integers(256, 512)), int(rng.integers(224, 400))
        base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        caption = f"an aerial image of {WORDS[i % len(WORDS)]} number {index * count + i}"
        members += sample_members(f"gpu_{index}_{i}", buf.getvalue(), caption, {})
    name = shard_name("pub11", "train", index)
    Path(out, name).write_bytes(tar_bytes(members))
    Path(out, name.replace(".tar", ".manifest.json")).write_text(json.dumps({"count": count}))
    return count


def summarise(rows: list[dict], warmup: int, batch: int) -> dict:
    steady = [r for r in rows if int(r["step"]) > warmup]
    seconds = sum(float(r["step_seconds"]) for r in steady)
    wait = sum(float(r["data_wait_seconds"]) for r in steady)
    return {"steps": len(rows), "samples_per_s": round(batch * len(steady) / seconds, 1),
            "data_wait_fraction": round(wait / seconds, 4),
            "max_gpu_memory_gb": max(float(r.get("max_memory_gb") or 0) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of samples/s")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--no-ray", action="store_true", help="the fallback even where Ray is installed")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (fallback only)")
    args = parser.parse_args()
    out = Path(args.out)
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    loaders = max(1, args.cpus - 2)
    per_shard = 512
    n_shards = max(2 * loaders, -(-args.batch * args.steps // per_shard))
    start = time.perf_counter()
    with ProcessPoolExecutor(args.cpus) as pool:
        total = sum(pool.map(make_shard, [(str(shards), i, per_shard) for i in range(n_shards)]))
    print(f"generated {total} samples in {n_shards} shards in {time.perf_counter() - start:.0f} s", flush=True)
    cfg = {"output": str(out / "runs"), "name": "gpu-check", "clip_model": args.model,
           "train_shards": [str(shards) + "/"], "epochs": 1, "batch_size": args.batch,
           "samples_per_epoch": args.batch * args.steps, "lr": 1e-5, "weight_decay": 0.5, "warmup_steps": 10,
           "precision": args.precision, "num_workers": 1, "use_gpu": args.device == "cuda", "cpus_per_worker": args.cpus - 1,
           "loader_workers": loaders, "shuffle_buffer": 1000, "keep_checkpoints": 1,
           "ray": {"num_cpus": args.cpus}}
    if importlib.util.find_spec("ray") and not args.no_ray and args.device == "cuda":
        mode = "rs5m train-clip (Ray Train, 1 GPU worker)"
        config = out / "gpu-check.json"
        config.write_text(json.dumps(cfg))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rs5m_ray.cli", "train-clip", "--config", str(config)], check=True,
                       cwd=REPO)
        wall = time.perf_counter() - start
        with open(out / "runs" / "gpu-check" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    else:
        mode = ("WITHOUT RAY (not installed, or --no-ray): the same Worker.train_step and data stream "
                "(rs5m_ray.train.georsclip) in this process; no Ray Train, no checkpoints")
        rows, wall = fallback(cfg, args)
    print(json.dumps({"mode": mode, "model": args.model, "batch": args.batch, "precision": args.precision,
                      "cpus": args.cpus, "loader_workers": loaders, "wall_s": round(wall, 1),
                      **summarise(rows, args.warmup, args.batch)}, indent=1))


def fallback(cfg: dict, args) -> tuple[list[dict], float]:
    import torch

    from rs5m_ray.config import TrainConfig, load_config
    from rs5m_ray.train.georsclip import Worker

    tc = load_config(overrides={k: v for k, v in cfg.items() if k != "ray"}, cls=TrainConfig)
    start = time.perf_counter()
    device = torch.device(args.device)
    worker = Worker(tc, 0, 1, device)
    batches = worker.stream()
    rows, last = [], time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    while worker.step < worker.total_steps:
        result = worker.train_step(batches, generator)
        loss = result["loss"].item()  # waits for the device: step time is the GPU's
        now = time.perf_counter()
        rows.append({"step": worker.step, "loss": loss, "step_seconds": now - last,
                     "data_wait_seconds": result["wait"],
                     "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0})
        last = now
        if worker.step % 10 == 0:
            print(f"step {worker.step}: loss {loss:.3f}, {args.batch / rows[-1]['step_seconds']:.0f} samples/s",
                  flush=True)
    del batches
    return rows, time.perf_counter() - start


if __name__ == "__main__":
    main()
