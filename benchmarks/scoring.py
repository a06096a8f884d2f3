"""Scoring throughput: decode + CLIP score + RS detector vs the bare forward pass.

For each model, same process, same batch sizes, measured side by side in interleaved
rounds (best round kept: other jobs share the machine):
- bare:     image tower + detector head + score on pre-decoded, normalised tensors (the
            model's ceiling)
- pipeline: the ClipScore stage on pyarrow batches of JPEG bytes (fast decode path in a
            thread pool, overlapping the forward pass); with --ray also the CLIP pass as
            `rs5m pub11` runs it (ScorePart actors over staged parts, with the ledger)
Models: the tiny test model (64 px), whose forward costs less than decoding on a CPU, and
random-init open_clip models (`--vit-models`, default ViT-B/32 at 224 px), whose forward is the
expensive part as on a real GPU stage. On a GPU the stage takes one GPU per actor.
- decode:   decode + preprocess alone on one thread (torch threads = 1) = images/s per CPU
            core: the fast path (shards.reader.preprocess_batch) at 64, 224 and 256 px, the
            open_clip PIL transform on fully decoded images at 224 (the reference) and after
            PIL's draft decode (the stage's PIL path, kept for backbone detectors), and the
            fast path from copies pre-resized to 256 px (decode stage resizing once upstream).
Images are web-sized JPEGs (320x240 .. 1024x768).

On a CPU-only machine decode and forward share the same cores, so the pipeline reaches the
bare rate only when decoding is much cheaper than the forward pass; on a GPU node the
forward runs on the GPU and decode on the actor's CPU threads, which is what the per-core
decode rate plans for.

Usage: python benchmarks/scoring.py [--images 1024] [--vit-images 64] [--ray]
"""
from __future__ import annotations
from figures import record  # benchmarks/figures.py: the figures `rs5m plan` reads

import argparse
import dataclasses
import io
import json
import os
import random
import tempfile
import time

import open_clip
import pyarrow as pa
import torch
from PIL import Image

from rs5m_ray.config import ScoringConfig, load_config
from rs5m_ray.models.clip import register_configs
from rs5m_ray.models.images import open_rgb
from rs5m_ray.pipelines import pub11
from rs5m_ray.pipelines.harness import Staging, part_name
from rs5m_ray.pipelines.parts import stage_fetched
from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image
from rs5m_ray.shards.reader import normalize, preprocess_batch
from rs5m_ray.stages.clip_score import ClipScore
from rs5m_ray.stages.rs_detector import DetectorMeta, build_module, save_detector
from rs5m_ray.storage import Storage

WEB_SIZES = [(320, 240), (500, 375), (640, 480), (800, 600), (1024, 768)]


def web_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [jpeg((aerial_image if i % 2 else photo_image)(rng, rng.choice(WEB_SIZES)), quality=90) for i in range(n)]


def open_full(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def shrunk(data: list[bytes], short_side: int) -> list[bytes]:
    """The same images re-encoded with their short side at `short_side` (decode stage, resize_mode
    shortest_side): what the scoring pass reads when images were resized once upstream."""
    out = []
    for d in data:
        img = open_full(d)
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


def make_stage(model: str, batch_size: int, forward_batch_size: int, decode_threads: int, tmp: str) -> ClipScore:
    """The stage with random CLIP weights and an untrained head on its embeddings."""
    register_configs()
    dim = open_clip.get_model_config(model)["embed_dim"]
    meta = DetectorMeta("clip_head", {"embed_dim": dim, "hidden": 0},
                        embedder={"clip_model": model, "clip_pretrained": None})
    det = save_detector(build_module(meta), meta, os.path.join(tmp, model), Storage())
    cfg = ScoringConfig(clip_model=model, detector_checkpoint=det, batch_size=batch_size,
                        forward_batch_size=forward_batch_size, decode_threads=decode_threads,
                        num_gpus=1.0 if torch.cuda.is_available() else 0.0)
    stage = ClipScore(cfg)
    if not stage.clip.eval_transform:
        raise SystemExit(f"{model}: not the standard eval transform, the stage would not take the fast path")
    return stage


def as_table(data: list[bytes]) -> pa.Table:
    n = len(data)
    return pa.table({"sample_id": [f"bench_{i}" for i in range(n)], "source": ["laion2b"] * n,
                     "jpg": pa.array(data, pa.binary())})


def compare(stage: ClipScore, data: list[bytes], rounds: int) -> dict:
    """Best-of-rounds images/s of the bare forward and of the stage, interleaved."""
    cfg, n = stage.cfg, len(data)
    table = as_table(data)
    batches = [table.slice(i, cfg.batch_size) for i in range(0, n, cfg.batch_size)]
    size, mean, std = stage.clip.eval_transform
    pixels = normalize(preprocess_batch(data, size)[0], stage.clip.device, mean, std, stage.clip.dtype)
    bare_forward(stage, pixels[: cfg.forward_batch_size], cfg.forward_batch_size)  # warm-up
    best = {"bare_forward": 0.0, "pipeline": 0.0}
    for _ in range(rounds):
        best["bare_forward"] = max(best["bare_forward"],
                                   rate(lambda: bare_forward(stage, pixels, cfg.forward_batch_size), n))
        best["pipeline"] = max(best["pipeline"], rate(lambda: [stage(b) for b in batches], n))
    return {"model": cfg.clip_model, "image_size": size, "images": n, "batch_size": cfg.batch_size,
            "forward_batch_size": cfg.forward_batch_size, "decode_threads": cfg.decode_threads,
            "rounds": rounds, "images_per_s": {k: round(v, 1) for k, v in best.items()},
            "pipeline_over_bare": round(best["pipeline"] / best["bare_forward"], 3)}


def decode_per_core(data: list[bytes], rounds: int) -> dict:
    """Single-threaded decode + preprocess images/s (torch's own threads pinned to 1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    presized = shrunk(data, 256)
    reference = open_clip.image_transform(224, is_train=False)
    runs = {
        "fast_64": lambda: preprocess_batch(data, 64),
        "fast_224": lambda: preprocess_batch(data, 224),
        "fast_256": lambda: preprocess_batch(data, 256),
        "fast_224_from_256px": lambda: preprocess_batch(presized, 224),
        "open_clip_pil_224": lambda: [reference(open_full(d)) for d in data],
        "stage_pil_path_224": lambda: [reference(open_rgb(d, 224)) for d in data],
    }
    best = {name: max(rate(fn, len(data)) for _ in range(rounds)) for name, fn in runs.items()}
    torch.set_num_threads(threads)
    return {k: round(v, 1) for k, v in best.items()}


def ray_pipeline(stage: ClipScore, data: list[bytes], out: str, parts: int = 8) -> dict:
    """images/s of the CLIP pass as `rs5m pub11` runs it: ScorePart actors over staged image parts
    (`pub11.parts_phase`, ledger and done-markers included). `wall`: from the phase's start, actor
    pools and model loading included; `scoring`: from the first part's start to the last part's end."""
    import ray
    import ray.data

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # The scoring actor gets the cores the in-process runs use (Ray sizes its torch threads by num_cpus);
    # the fetch actors only skip the staged parts.
    cfg = load_config(overrides={"output": out, "download": {"num_cpus": 0}})
    cfg = dataclasses.replace(cfg, scoring=dataclasses.replace(stage.cfg, num_cpus=float(os.cpu_count())))
    table, storage = as_table(data), Storage()
    step = -(-len(data) // parts)
    staged = {part_name(i): table.slice(i * step, step) for i in range(parts) if i * step < len(data)}
    stage_fetched(out, storage, cfg.shards, staged)
    start = time.perf_counter()
    pub11.parts_phase(cfg, storage, sorted(staged))
    wall = time.perf_counter() - start
    markers = Staging(out, storage).markers("scores")
    n = sum(m["rows"] for m in markers)
    scoring = max(m["finished"] for m in markers) - min(m["started"] for m in markers)
    return {"rs5m_parts_phase_wall": round(n / wall, 1), "rs5m_parts_phase_scoring": round(n / scoring, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024, help="images for the tiny model")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--forward-batch-size", type=int, default=64)
    ap.add_argument("--vit-models", default="ViT-B-32", help="comma-separated open_clip models, random init")
    ap.add_argument("--vit-images", type=int, default=64, help="images per ViT model (a CPU forward is slow)")
    ap.add_argument("--vit-forward-batch-size", type=int, default=16)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vit-rounds", type=int, default=2)
    ap.add_argument("--ray", action="store_true",
                    help="also time the CLIP pass as rs5m pub11 runs it (Ray actor pool over staged parts)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="rs5m-bench-")
    pool = web_jpegs(min(max(args.images, args.vit_images), 1024))  # cycled: decode costs the same
    data = [pool[i % len(pool)] for i in range(max(args.images, args.vit_images))]
    load_before = os.getloadavg()
    runs = [("rs5m-tiny-vit", args.forward_batch_size, args.images, args.rounds)]
    runs += [(m, args.vit_forward_batch_size, args.vit_images, args.vit_rounds) for m in args.vit_models.split(",")]
    results = []
    for model, forward_batch_size, n, rounds in runs:
        stage = make_stage(model, args.batch_size, forward_batch_size, args.decode_threads, tmp)
        results.append(compare(stage, data[:n], rounds))
        if args.ray:
            results[-1]["images_per_s"].update(ray_pipeline(stage, data[:n], os.path.join(tmp, "run", model)))
        print(json.dumps(results[-1]), flush=True)  # each model as it finishes: a cut-short run still reports
        del stage
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "weights": "random init (throughput only; scores mean nothing)",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "goal_pipeline_over_bare": 0.85,
        "models": results,
        "decode_per_core_images_per_s": decode_per_core(data[:256], args.rounds),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=1))
    record("scoring", {"device": report["device"], "decode_224_images_per_cpu_s": report["decode_per_core_images_per_s"],
                       "pipeline_images_per_s": {r["model"]: r["images_per_s"] for r in results}})


if __name__ == "__main__":
    main()
