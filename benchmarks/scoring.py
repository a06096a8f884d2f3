"""Scoring throughput: decode + CLIP score + RS detector vs the bare forward pass.

Same process, same tiny model, same batch size, measured side by side in interleaved
rounds (best round kept: other jobs share the machine):
- bare:     image tower + detector head + score on pre-decoded tensors (the model's ceiling)
- pipeline: the ClipScore stage on pyarrow batches of JPEG bytes (decode thread pool
            overlapping the forward pass), optionally also through Ray Data's actor pool
- decode:   decode + preprocess alone on one thread = images/s per CPU core, at the tiny
            model's input size and at ViT-B/32's (224) and ConvNeXt-XXL's (256), for planning;
            from web-sized JPEGs (320x240 .. 1024x768) and from copies pre-resized to 256 px.

On a CPU-only machine decode and forward share the same cores, so the pipeline can only
reach the bare rate when decoding is much cheaper than the forward pass; on a GPU node
the forward runs on the GPU and decode on the actor's CPU threads, which is what the
per-core decode rate plans for.

Usage: python benchmarks/scoring.py [--images 1024] [--batch-size 256] [--ray]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import open_clip
import pyarrow as pa
import torch

from rs5m_ray.config import ScoringConfig
from rs5m_ray.models.images import open_rgb
from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image
from rs5m_ray.stages.clip_score import ClipScore, score_images
from rs5m_ray.stages.rs_detector import DetectorMeta, build_module, save_detector
from rs5m_ray.storage import Storage

WEB_SIZES = [(320, 240), (500, 375), (640, 480), (800, 600), (1024, 768)]


def web_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [jpeg((aerial_image if i % 2 else photo_image)(rng, rng.choice(WEB_SIZES)), quality=90) for i in range(n)]


def shrunk(data: list[bytes], short_side: int) -> list[bytes]:
    """The same images re-encoded with their short side at `short_side` (decode stage, resize_mode
    shortest_side): what the scoring pass reads when images were resized once upstream."""
    out = []
    for d in data:
        img = open_rgb(d, short_side, draft=False)
        scale = short_side / min(img.size)
        out.append(jpeg(img.resize((round(img.width * scale), round(img.height * scale))), quality=90))
    return out


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def bare_forward(stage: ClipScore, pixels: torch.Tensor, step: int) -> None:
    for i in range(0, len(pixels), step):
        e = stage.clip.encode_images(pixels[i:i + step])
        stage.detector.probs(e)
        (e @ stage.prompt).numpy()


def decode_only(data: list[bytes], transform, size: int, draft: bool) -> None:
    for d in data:
        transform(open_rgb(d, size, draft))


def ray_pipeline(table: pa.Table, cfg: ScoringConfig, out: str) -> float:
    import ray
    import ray.data

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_arrow(table).repartition(max(1, len(table) // cfg.batch_size))
    ds = ds.materialize()
    start = time.perf_counter()
    n = score_images(ds, cfg, out, Storage()).count()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--forward-batch-size", type=int, default=64)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--model", default="rs5m-tiny-vit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ray", action="store_true", help="also time the stage through Ray Data's actor pool")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="rs5m-bench-")
    meta = DetectorMeta("clip_head", {"embed_dim": 64, "hidden": 0},
                        embedder={"clip_model": args.model, "clip_pretrained": None})
    det = save_detector(build_module(meta), meta, tmp, Storage())
    cfg = ScoringConfig(clip_model=args.model, detector_checkpoint=det, batch_size=args.batch_size,
                        forward_batch_size=args.forward_batch_size, decode_threads=args.decode_threads)
    stage = ClipScore(cfg)
    data = web_jpegs(args.images)
    n = len(data)
    table = pa.table({"sample_id": [f"bench_{i}" for i in range(n)], "source": ["laion2b"] * n,
                      "jpg": pa.array(data, pa.binary())})
    batches = [table.slice(i, args.batch_size) for i in range(0, n, args.batch_size)]
    pixels = torch.stack([stage.clip.preprocess(open_rgb(d, stage.decode_size)) for d in data])
    decode_sample = data[: min(n, 256)]
    planning = {size: open_clip.image_transform(size, is_train=False) for size in (224, 256)}
    presized = shrunk(decode_sample, 256)

    load_before = os.getloadavg()
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = max(best.get(name, 0.0), value)

    bare_forward(stage, pixels[: args.forward_batch_size], args.forward_batch_size)  # warm-up
    for _ in range(args.rounds):
        keep("bare_forward", rate(lambda: bare_forward(stage, pixels, args.forward_batch_size), n))
        keep("pipeline", rate(lambda: [stage(b) for b in batches], n))
        keep("decode_per_core_tiny", rate(lambda: decode_only(decode_sample, stage.clip.preprocess,
                                                               stage.decode_size, True), len(decode_sample)))
        for size, transform in planning.items():
            keep(f"decode_per_core_{size}", rate(lambda: decode_only(decode_sample, transform, size, True),
                                                 len(decode_sample)))
            keep(f"decode_per_core_{size}_no_draft", rate(lambda: decode_only(decode_sample, transform, size, False),
                                                          len(decode_sample)))
            keep(f"decode_per_core_{size}_from_256px", rate(lambda: decode_only(presized, transform, size, True),
                                                            len(presized)))
    if args.ray:
        best["ray_data_pipeline"] = ray_pipeline(table, cfg, os.path.join(tmp, "run"))
    result = {
        "images": n, "model": args.model, "batch_size": args.batch_size,
        "forward_batch_size": args.forward_batch_size, "decode_threads": args.decode_threads,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "images_per_s": {k: round(v, 1) for k, v in best.items()},
        "pipeline_over_bare": round(best["pipeline"] / best["bare_forward"], 3),
        # Decode on one core, then forward, one after the other: what the pipeline would do without overlap.
        "no_overlap_estimate": round(1 / (1 / best["bare_forward"] + 1 / best["decode_per_core_tiny"]), 1),
        "goal_pipeline_over_bare": 0.85,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
