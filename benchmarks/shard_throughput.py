"""Shard read throughput: our ShardReader against RS5M's own loader, on the same cores.

Generates shards in the RS5M layout (PUB11 image-size distribution, and BigEarthNet
120x120 for the RS3 side), or takes yours with --shards, then times in one run:
  (a) reference: RS5M's dataloader.py — wds.WebDataset(urls).shuffle(N).decode(CLIP
      ViT-B/32 eval preprocess) in a torch DataLoader, one worker per core;
  (b) ours: rs5m_ray.shards.reader.ShardReader in make_loader, same workers, same
      shuffle buffer and batch size, plus normalize() so both end in CLIP tensors;
  (c) ceiling: tar read + full-size decode to RGB with our decoder (libjpeg-turbo via
      simplejpeg), nothing else, same workers.
It also measures how far our tensors are from the reference's (see `fidelity`).

    .venv/bin/python benchmarks/shard_throughput.py            # ~3-4 min on 2 cores
"""
from __future__ import annotations
from figures import record  # benchmarks/figures.py: the figures `rs5m plan` reads

import argparse
import io
import math
import os
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from statistics import NormalDist

import numpy as np
import open_clip
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from rs5m_ray.sample.generate import aerial_image, jpeg, photo_image
from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes
from rs5m_ray.shards.reader import DRAFT_MARGIN, ShardReader, make_loader, normalize, preprocess
from rs5m_ray.storage import Storage, join

# RS5M README: ~1,800 img/s with 16 workers on a 16-core Ryzen 3950X.
REFERENCE_IMG_S, REFERENCE_CORES = 1800, 16
# PUB11 widths and heights (paper App. B12): (low, high, share) per bin; the open
# top bins are capped so that the means come out near the paper's 523 x 403.
WIDTH_BINS = [(48, 128, .0841), (128, 256, .2552), (256, 512, .3129), (512, 1024, .2759), (1024, 2600, .0720)]
HEIGHT_BINS = [(48, 128, .1198), (128, 256, .3226), (256, 512, .3289), (512, 1024, .1898), (1024, 2000, .0388)]
SIDE_CORRELATION = 0.85  # widths and heights of one image go together (aspect ratios near 4:3)


def _from_bins(bins, u: float) -> int:
    total = sum(p for _, _, p in bins)
    for lo, hi, p in bins:
        if u <= p / total:
            return int(lo + (hi - lo) * u / (p / total))
        u -= p / total
    return bins[-1][1]


def pub11_size(rng: random.Random) -> tuple[int, int]:
    """A (w, h) with PUB11's marginal distributions, sides correlated by a Gaussian copula."""
    z1, z2 = rng.gauss(0, 1), rng.gauss(0, 1)
    zh = SIDE_CORRELATION * z1 + math.sqrt(1 - SIDE_CORRELATION ** 2) * z2
    return _from_bins(WIDTH_BINS, NormalDist().cdf(z1)), _from_bins(HEIGHT_BINS, NormalDist().cdf(zh))


def synthetic_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """An aerial scene (or, 1 in 3, a ground photo), JPEG q90: 1-3 bits/pixel like web images."""
    rng = random.Random(seed)
    draw = photo_image if rng.random() < 1 / 3 else aerial_image
    return jpeg(draw(rng, size), 90)


def make_images(sizes: list[tuple[int, int]], seed: int, workers: int) -> list[bytes]:
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(synthetic_jpeg, [seed + i for i in range(len(sizes))], sizes, chunksize=8))


def write_shards(out: str, prefix: str, source: str, images: list[bytes], n_samples: int, per_shard: int,
                 storage: Storage) -> list[str]:
    """`n_samples` samples cycling over the distinct `images` (decode cost does not depend on repeats)."""
    urls = []
    for index, start in enumerate(range(0, n_samples, per_shard)):
        members = []
        for i in range(start, min(start + per_shard, n_samples)):
            sid = f"{source}_{index}_{i}"
            members += sample_members(sid, images[i % len(images)], f"aerial view of scene {i}", {"source": source})
        url = join(out, shard_name(prefix, "train", index))
        storage.write_atomic(url, tar_bytes(members))
        urls.append(url)
    return urls


# ---------------------------------------------------------------- the three pipelines

def reference_loader(urls: list[str], workers: int, batch_size: int, shuffle: int) -> DataLoader:
    """RS5M dataloader.py's get_wds_loader; open_clip's eval transform is clip.load("ViT-B/32")'s preprocess."""
    preproc = open_clip.image_transform(224, is_train=False)

    def my_decoder(key, value):
        if key.endswith(".img_content"):
            return preproc(Image.open(io.BytesIO(value)))
        if key.endswith(".img_name") or key.endswith(".caption"):
            return value.decode("utf-8")
        return value

    dataset = wds.WebDataset(urls, shardshuffle=False).shuffle(shuffle).decode(my_decoder)
    return DataLoader(dataset, num_workers=workers, batch_size=batch_size)


class DecodeOnly(IterableDataset):
    """The physical ceiling: the same tar reading and JPEG decoder as ours, at full size, nothing else."""

    def __init__(self, urls: list[str], storage: Storage, report_every: int):
        self.reader = ShardReader(urls, storage, shuffle_buffer=0, shuffle_shards=False)
        self.report_every = report_every

    def __iter__(self):
        n = 0
        for sample in self.reader.samples():
            simplejpeg.decode_jpeg(sample["img_content"], "RGB")
            n += 1
            if n == self.report_every:
                yield n
                n = 0
        if n:
            yield n


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the DataLoader workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(loader, count) -> dict[str, float]:
    """img/s of wall time, and img per CPU-second: the per-core rate, unaffected by other
    load on the machine (workers are joined when the loader is exhausted, so counted)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    images = sum(count(batch) for batch in loader)
    return {"wall": images / (time.perf_counter() - wall), "cpu": images / (cpu_seconds() - cpu)}


def run_all(urls: list[str], storage: Storage, workers: int, batch: int, shuffle: int,
            rounds: int) -> dict[str, dict]:
    """The pipelines in turn, `rounds` times; each one's best round (the least disturbed by
    other load on a shared machine)."""
    reader = ShardReader(urls, storage, batch_size=batch, shuffle_buffer=shuffle, seed=0)
    pipelines = {
        "reference": lambda: measure(reference_loader(urls, workers, batch, shuffle), lambda b: len(b["img_name"])),
        # uint8 batches as a GPU trainer takes them (normalize runs there), and normalised
        # here on the CPU: the reference's float output, like for like.
        "ours": lambda: measure(make_loader(reader, num_workers=workers), lambda b: len(b["image"])),
        "ours+norm": lambda: measure(make_loader(reader, num_workers=workers), lambda b: len(normalize(b["image"]))),
        "ceiling": lambda: measure(DataLoader(DecodeOnly(urls, storage, batch), batch_size=None,
                                              num_workers=workers), int),
    }
    runs = [{name: run() for name, run in pipelines.items()} for _ in range(rounds)]
    return {name: {basis: max(r[name][basis] for r in runs) for basis in ("wall", "cpu")} for name in pipelines}


def report(name: str, rates: dict[str, dict], cores: int) -> None:
    record(f"shard_read {name}", {"images_per_cpu_s": round(rates["ours+norm"]["cpu"], 1),
                                  "reference_images_per_cpu_s": round(rates["reference"]["cpu"], 1)})
    print(f"== {name}: {cores} worker processes on {cores} cores, best of rounds"
          f" (load average {os.getloadavg()[0]:.1f})")
    for k, v in rates.items():
        print(f"  {k:9s} {v['wall']:8.1f} img/s wall = {v['wall'] / cores:7.1f} img/s/core;"
              f" {v['cpu']:7.1f} img per CPU-second")
    for basis, label in (("wall", "wall clock"), ("cpu", "CPU time")):
        ref, ceil = rates["reference"][basis], rates["ceiling"][basis]
        for ours in ("ours", "ours+norm"):
            print(f"  by {label:10s}: {ours:9s} / reference {rates[ours][basis] / ref:.2f}x (goal >= 3x per core),"
                  f" / decode-only ceiling {rates[ours][basis] / ceil:.0%} (goal >= 60%)")
    print(f"  context: RS5M README {REFERENCE_IMG_S} img/s on {REFERENCE_CORES} cores ="
          f" {REFERENCE_IMG_S / REFERENCE_CORES:.0f} img/s/core (different CPU and data)")


# ---------------------------------------------------------------- fidelity

def tiny_vit() -> torch.nn.Module:
    """A randomly initialised ViT with ViT-B/32's input geometry: a sensitivity probe, not a model."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=64, vision_cfg=open_clip.model.CLIPVisionCfg(image_size=224, patch_size=32, layers=2, width=128),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=2, layers=1))
    return model.eval()


def fidelity(images: list[bytes], draft_margin: float | None = DRAFT_MARGIN) -> dict[str, float]:
    """Ours vs the reference transform: |difference| in 8-bit levels and in normalised units,
    and the cosine similarity of a random tiny ViT's embeddings of the two."""
    ref_t = open_clip.image_transform(224, is_train=False)
    ref = torch.stack([ref_t(Image.open(io.BytesIO(b))) for b in images])
    ours = normalize(torch.stack([preprocess(b, 224, draft_margin) for b in images]))
    diff = (ref - ours).abs()
    levels = diff * torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        model = tiny_vit()
        cos = torch.nn.functional.cosine_similarity(model.encode_image(ref), model.encode_image(ours))
    sample = levels.flatten()[torch.randperm(levels.numel(), generator=torch.Generator().manual_seed(0))[:10**6]]
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "max_levels": levels.max().item(),
            "mean_levels": levels.mean().item(), "p999_levels": sample.quantile(0.999).item(),
            "worst_image_mean_levels": levels.mean(dim=(1, 2, 3)).max().item(),
            "min_cosine": cos.min().item(), "mean_cosine": cos.mean().item()}


def print_fidelity(name: str, images: list[bytes]) -> None:
    for margin in (DRAFT_MARGIN, None):
        f = fidelity(images, margin)
        label = f"draft_margin={margin}" if margin else "full decode"
        print(f"  fidelity {name} ({len(images)} images, {label}): max |d| {f['max_abs']:.4f} mean |d| "
              f"{f['mean_abs']:.5f} (normalised units) = max {f['max_levels']:.1f} / mean {f['mean_levels']:.3f}"
              f" / p99.9 {f['p999_levels']:.1f} 8-bit levels (worst image's mean"
              f" {f['worst_image_mean_levels']:.2f}); tiny random ViT embedding cosine min "
              f"{f['min_cosine']:.5f} mean {f['mean_cosine']:.6f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="existing shards (brace pattern, glob or dir/); skips generation")
    p.add_argument("--out", help="where generated shards go (default: a temporary directory)")
    p.add_argument("--pub11-samples", type=int, default=2500)
    p.add_argument("--ben-samples", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--distinct", type=int, default=500, help="distinct PUB11 images, repeated over samples")
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--fidelity-images", type=int, default=120)
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(1)  # the loaders' workers are the parallelism, one per core
    storage = Storage()
    cores = args.workers

    def scaled(n: int) -> tuple[int, int]:
        """RS5M's batch 400 and shuffle 10,000, shrunk for a sample too small for them."""
        return min(400, max(16, n // (cores * 8))), min(10_000, max(100, n // 4))

    if args.shards:
        urls = ShardReader(args.shards, storage).urls
        report(f"{len(urls)} given shards", run_all(urls, storage, cores, 400, 10_000, args.rounds), cores)
        return
    out = args.out or tempfile.mkdtemp(prefix="rs5m-shards-")
    rng = random.Random(2023)
    sizes = [pub11_size(rng) for _ in range(args.distinct)]
    t = time.perf_counter()
    pub11_images = make_images(sizes, 0, cores)
    ben_images = make_images([(120, 120)] * 200, 10**6, cores)
    w, h = np.mean(sizes, axis=0)
    kb = np.mean([len(b) for b in pub11_images]) / 1024
    print(f"generated {len(pub11_images)} PUB11-sized images (mean {w:.0f}x{h:.0f}, {kb:.0f} KiB) and "
          f"{len(ben_images)} BigEarthNet 120x120 in {time.perf_counter() - t:.0f}s -> {out}")
    datasets = {
        "PUB11 sizes": write_shards(out, "pub11", "laion2b", pub11_images, args.pub11_samples, args.per_shard, storage),
        "BigEarthNet 120x120": write_shards(out, "rs3", "ben", ben_images, args.ben_samples, args.per_shard, storage),
    }
    samples = {"PUB11 sizes": args.pub11_samples, "BigEarthNet 120x120": args.ben_samples}
    for name, urls in datasets.items():
        batch, shuffle = scaled(samples[name])
        print(f"\n{name}: {samples[name]} samples in {len(urls)} shards, batch {batch}, shuffle buffer {shuffle}")
        report(name, run_all(urls, storage, cores, batch, shuffle, args.rounds), cores)
    print()
    print_fidelity("PUB11 sizes", pub11_images[: args.fidelity_images])
    print_fidelity("BigEarthNet", ben_images[: args.fidelity_images])


if __name__ == "__main__":
    main()
