"""Evaluation embedding pass: images/s through Ray (what `rs5m eval` with `distributed: true` runs:
RayEmbedder, a Ray Data actor pool reading, decoding and embedding image files) against a bare
forward loop of the same model on pre-decoded, normalised tensors (the model's ceiling), same
process, same images, same cores.

The Ray pass is timed on N and 2N images; the difference gives its marginal rate (per image, what
scales) apart from its fixed cost (actor start and model load per pass). Goal: marginal rate >= 0.85
of the bare loop. Model: a random-init ViT-B/32 at 224 px (forward-bound, as a GPU actor is);
images: aid-dev (../shared/data, 150 px JPEGs) if present, else generated 320x240 JPEGs.

Usage: python benchmarks/eval_embedding.py [--images 96] [--model ViT-B-32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

from rs5m_ray.config import ScoringConfig
from rs5m_ray.eval.embed import RayEmbedder
from rs5m_ray.models.clip import load_clip
from rs5m_ray.sample.generate import aerial_image, jpeg
from rs5m_ray.shards.reader import normalize, preprocess_batch

SHARED = os.environ.get("RS5M_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def image_files(n: int, tmp: str) -> list[str]:
    aid = os.path.join(SHARED, "aid-dev")
    if os.path.isdir(aid):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(aid) for f in fs if f.endswith(".jpg"))
        return (files * (n // len(files) + 1))[:n]
    rng = random.Random(0)
    out = []
    for i in range(n):
        path = os.path.join(tmp, f"{i}.jpg")
        with open(path, "wb") as f:
            f.write(jpeg(aerial_image(rng, (320, 240))))
        out.append(path)
    return out


def bare(clip, pixels: torch.Tensor, step: int) -> None:
    for i in range(0, len(pixels), step):
        clip.encode_images(pixels[i:i + step])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import ray

    cpus = os.cpu_count()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # One actor using every core, as one GPU actor would hold its device.
    cfg = ScoringConfig(clip_model=args.model, batch_size=args.batch_size, forward_batch_size=args.batch_size,
                        num_cpus=cpus, decode_threads=2)
    clip = load_clip(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        files = image_files(2 * args.images, tmp)
        size, mean, std = clip.eval_transform
        data = [open(p, "rb").read() for p in files[:args.images]]
        pixels = normalize(preprocess_batch(data, size)[0], clip.device, mean, std, clip.dtype)
        bare(clip, pixels[:args.batch_size], args.batch_size)  # warm-up
        embedder = RayEmbedder(cfg, clip=clip)
        timings = {}
        for _ in range(args.rounds):  # interleaved, best of each kept: other jobs share the machine
            for name, fn in (("bare", lambda: bare(clip, pixels, args.batch_size)),
                             ("ray_n", lambda: embedder.embed_images(files[:args.images])),
                             ("ray_2n", lambda: embedder.embed_images(files))):
                start = time.perf_counter()
                fn()
                timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - start)
    n = args.images
    bare_rate = n / timings["bare"]
    marginal = n / (timings["ray_2n"] - timings["ray_n"])
    fixed = timings["ray_n"] - n / marginal
    print(json.dumps({
        "model": args.model, "image_size": size, "images": [n, 2 * n], "cpus": cpus, "torch_threads": torch.get_num_threads(),
        "bare_forward_images_per_s": round(bare_rate, 1),
        "ray_images_per_s_whole_pass": {"n": round(n / timings["ray_n"], 1), "2n": round(2 * n / timings["ray_2n"], 1)},
        "ray_marginal_images_per_s": round(marginal, 1), "ray_fixed_seconds_per_pass": round(fixed, 1),
        "marginal_over_bare": round(marginal / bare_rate, 3), "rounds": args.rounds,
        "load_average": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
