"""RS3 captioning throughput: batched multi-candidate generation vs one generate per candidate.

Same process, same tiny BLIP-2 (`rs5m-tiny-blip2`, random weights), same decoded images, same
decoding (nucleus, top_p 0.95, top_k 50), interleaved rounds (best kept: other jobs share the
machine):
- batched: what the `caption` stage runs: per chunk of `--batch-size` images one `generate` with
  `num_return_sequences = --candidates` (the image tower once per image);
- peer:    one `generate` per image per candidate (the image tower once per candidate), as a
  per-caption loop over an HF captioner does.
Then the ranker's time per image (models A and B, 20 -> 10 -> 5) and, within it, the rotation
pick (12 rotated views: rotate + crop, rotation-model image pass, variances), and with `--ray`
the whole stage through Ray Data (`caption_images`: accounted actor pool, ledger, as `rs5m rs3`
runs it) beside the same stage called in-process.

`--backend vllm` (GPU + vllm only; not runnable on CPU machines): the vLLM path
(`stages.caption.vllm_candidates`, ray.data.llm) on the tiny BLIP-2 saved to disk, beside the HF
batched path on the same GPU. Prints one JSON object.

Usage: python benchmarks/captioning.py [--images 24] [--ray] [--backend hf|vllm]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from rs5m_ray.config import CaptionConfig, CaptionRankConfig
from rs5m_ray.models.images import open_rgb, rotated_views
from rs5m_ray.sample.generate import aerial_image, jpeg
from rs5m_ray.stages.caption import CaptionStage, caption_images, generation_kwargs
from rs5m_ray.storage import Storage

SHARED = Path(os.environ.get("RS5M_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def images(n: int) -> tuple[list[bytes], str]:
    """Real AID scenes (one class after another) when the shared data is there, else generated ones."""
    aid = SHARED / "aid-train"
    if aid.is_dir():
        classes = sorted(p for p in aid.iterdir() if p.is_dir())
        files = [sorted(c.glob("*.jpg"))[i // len(classes)] for i, c in zip(range(n), classes * n)]
        return [f.read_bytes() for f in files], "AID (aid-train, 150x150)"
    rng = random.Random(0)
    return [jpeg(aerial_image(rng, (256, 256)), quality=90) for _ in range(n)], "generated aerial images"


def as_table(data: list[bytes]) -> pa.Table:
    return pa.table({"sample_id": [f"bench_{i}" for i in range(len(data))], "source": ["bench"] * len(data),
                     "jpg": pa.array(data, pa.binary())})


def best_rate(fn, count: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def generation(stage: CaptionStage, imgs: list, candidates: int, batch: int, rounds: int) -> dict:
    cap, kwargs = stage.captioner, generation_kwargs(stage.cfg)

    def batched():
        for s in range(0, len(imgs), batch):
            cap.generate(imgs[s:s + batch], candidates, s, **kwargs)

    def per_candidate():
        for i, img in enumerate(imgs):
            for j in range(candidates):
                cap.generate([img], 1, i * candidates + j, **kwargs)

    rates = {"batched": [], "peer": []}
    for _ in range(rounds):  # interleaved: a load spike hits both
        rates["batched"].append(best_rate(batched, len(imgs) * candidates, 1))
        rates["peer"].append(best_rate(per_candidate, len(imgs) * candidates, 1))
    b, p = max(rates["batched"]), max(rates["peer"])
    return {"candidates_per_s": {"batched": round(b, 1), "peer_one_generate_per_candidate": round(p, 1)},
            "ratio": round(b / p, 2), "images": len(imgs), "candidates_per_image": candidates, "batch_size": batch,
            "max_new_tokens": stage.cfg.max_new_tokens}


def ranking(stage: CaptionStage, imgs: list, rounds: int) -> dict:
    ranker = stage.ranker
    cands = [c for s in range(0, len(imgs), stage.cfg.batch_size)
             for c in stage.captioner.generate(imgs[s:s + stage.cfg.batch_size], stage.cfg.num_candidates, s,
                                               **generation_kwargs(stage.cfg))]
    step = stage.cfg.batch_size

    def rank():
        for s in range(0, len(imgs), step):
            ranker.rank(imgs[s:s + step], cands[s:s + step])

    def rotation():
        for s in range(0, len(imgs), step):
            views = [v for img in imgs[s:s + step] for v in rotated_views(img, ranker.angles, ranker.rotation.image_size)]
            ranker._embed_images(ranker.rotation, views)

    rank_rate, rot_rate = best_rate(rank, len(imgs), rounds), best_rate(rotation, len(imgs), rounds)
    return {"ms_per_image": {"ranking_total": round(1000 / rank_rate, 2), "of_which_rotation_views": round(1000 / rot_rate, 2)},
            "models": [ranker.cfg.model_a, ranker.cfg.model_b], "rotation_model": ranker.cfg.rotation_model,
            "distinct_candidates_per_image": round(sum(len(set(c) - {""}) for c in cands) / len(cands), 1)}


def through_ray(cfg: CaptionConfig, rank: CaptionRankConfig, stage: CaptionStage, data: list[bytes], tmp: str) -> dict:
    import ray
    import ray.data

    table = as_table(data)
    in_process = best_rate(lambda: stage(table), len(data), 1)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_arrow(table).repartition(max(1, len(data) // cfg.batch_size)).materialize()
    start = time.perf_counter()
    rows = caption_images(ds, cfg, rank, os.path.join(tmp, "ray"), Storage()).count()
    seconds = time.perf_counter() - start
    return {"images_per_s": {"ray_data_stage_incl_actor_start": round(rows / seconds, 2),
                             "same_stage_in_process": round(in_process, 2)}, "rows": rows}


def vllm(cfg: CaptionConfig, data: list[bytes]) -> dict:
    """GPU only: the vLLM backend beside the HF batched path, same tiny model and images."""
    import ray
    import ray.data
    import torch

    from rs5m_ray.stages.caption import vllm_candidates

    if not torch.cuda.is_available():
        raise SystemExit("--backend vllm needs a GPU and vllm (pip install vllm)")
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    gpu = CaptionConfig(**{**cfg.__dict__, "backend": "vllm", "device": "cuda", "num_gpus": 1.0})
    ds = ray.data.from_arrow(as_table(data)).materialize()
    start = time.perf_counter()
    got = vllm_candidates(ds, gpu).take_all()
    seconds = time.perf_counter() - start
    found = sum(len(r["caption_candidates"] or ()) for r in got)
    stage = CaptionStage(CaptionConfig(**{**cfg.__dict__, "device": "cuda"}), CaptionRankConfig(enabled=False))
    imgs = [open_rgb(d, stage.decode_size) for d in data]
    hf = generation(stage, imgs, cfg.num_candidates, cfg.batch_size, 2)["candidates_per_s"]["batched"]
    return {"candidates_per_s": {"vllm_incl_engine_start": round(found / seconds, 1), "hf_batched_same_gpu": hf},
            "candidates": found, "expected": len(data) * cfg.num_candidates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also the whole stage through Ray Data's actor pool")
    ap.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    args = ap.parse_args()
    data, origin = images(args.images)
    cfg = CaptionConfig(num_candidates=args.candidates, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    out: dict = {"images": origin, "model": cfg.model, "weights": "random (tiny test model): speed only"}
    if args.backend == "vllm":
        out["vllm"] = vllm(cfg, data)
        print(json.dumps(out, indent=1))
        return
    rank = CaptionRankConfig()
    stage = CaptionStage(CaptionConfig(**{**cfg.__dict__, "device": "cpu"}), rank)
    imgs = [open_rgb(d, stage.decode_size) for d in data]
    out["generation"] = generation(stage, imgs, args.candidates, args.batch_size, args.rounds)
    out["ranking"] = ranking(stage, imgs, args.rounds)
    if args.ray:
        with tempfile.TemporaryDirectory() as tmp:
            out["ray"] = through_ray(cfg, rank, stage, data, tmp)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
