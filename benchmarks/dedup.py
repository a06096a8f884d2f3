"""Dedup benchmarks: pHash throughput and the near-dup join's scaling, each against a baseline in the same run.

1. pHash images/s per core: `compute_phash` vs plain `imagehash.phash` on the same images.
2. Near-dup join on N and 2N random + planted 64-bit hashes: time(2N) / time(N) (goal <= 2.3).
   This runs the *same partition kernel* the Ray path runs (`near_pairs` over the
   `band_keys` hash partitions), in-process, so the figure is not Ray's overhead.
3. Speed-up of the join over brute-force all-pairs at N = 100k (both produce the same clusters).
4. One run of the distributed path through Ray Data (groupby shuffle + resolve task).

Times are CPU seconds of this process (robust to other load on the machine) and wall seconds.
Usage: python benchmarks/dedup.py [--n 1000000] [--brute-n 100000] [--ray-n 100000]
"""
from __future__ import annotations
from figures import record  # benchmarks/figures.py: the figures `rs5m plan` reads

import argparse
import time

import imagehash
import numpy as np
from PIL import Image

from rs5m_ray.config import NearDupConfig
from rs5m_ray.stages.keep_rule import clusters
from rs5m_ray.stages.near_dup import band_keys, combo_masks, near_pairs, partitions_for
from rs5m_ray.stages.phash import compute_phash

RADIUS = 4


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def test_images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)
    return [Image.fromarray(a).resize((size, size), Image.BICUBIC) for a in small]


def bench_phash(count: int = 200) -> None:
    compute_phash(test_images(1, 64)[0])  # import scipy.fftpack outside the timings
    for size in (256, 512, 1024):
        images = test_images(count, size)
        ours, ours_cpu, _ = timed(lambda: np.array([compute_phash(im) for im in images], dtype=np.int64))
        plain, plain_cpu, _ = timed(lambda: [imagehash.phash(im) for im in images])
        plain = np.array([int(np.packbits(p.hash.reshape(-1)).view(">i8")[0]) for p in plain], dtype=np.int64)
        shift = np.bitwise_count((ours ^ plain).view(np.uint64)).mean()
        print(f"phash {size}x{size} RGB (decoded): compute_phash {count / ours_cpu:,.0f} img/s/core, "
              f"baseline imagehash.phash {count / plain_cpu:,.0f} img/s/core (x{plain_cpu / ours_cpu:.2f}); "
              f"mean hash difference {shift:.2f} bits")
        if size == 512:
            record("phash", {"phash_images_per_cpu_s": round(count / ours_cpu)})


def planted(n: int, seed: int) -> np.ndarray:
    """Random hashes; 1% of rows are copies of another row with 0..radius+1 bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    targets = rng.choice(n, n // 100, replace=False)
    copies = h[rng.integers(0, n, len(targets))]
    flips = rng.integers(0, RADIUS + 2, len(targets))
    for bit in range(RADIUS + 1):
        mask = np.uint64(1) << rng.integers(0, 64, len(targets)).astype(np.uint64)
        copies = np.where(flips > bit, copies ^ mask, copies)
    h[targets] = copies
    return h


def band_join(h: np.ndarray, cfg: NearDupConfig, batch_rows: int = 65_536) -> np.ndarray:
    """The Ray path's data flow in one process: cluster label per hash.

    Map side: explode each input batch and split it by partition (as `explode_bands`
    and the shuffle do); reduce side: run the partition kernel on one partition at a time.
    """
    masks = combo_masks(cfg.phash_bands, cfg.hamming_radius)
    parts = partitions_for(len(h), cfg)
    # Exploded rows carry their hash (as the Ray rows do): the reduce side reads no global table.
    shuffled: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(parts)]
    for lo in range(0, len(h), batch_rows):
        batch = h[lo:lo + batch_rows]
        row, combo, part = band_keys(batch, masks, parts)
        order = np.argsort(part.astype(np.int16), kind="stable")
        bounds = np.searchsorted(part[order], np.arange(parts + 1))
        for p, (b0, b1) in enumerate(zip(bounds[:-1], bounds[1:])):
            take = order[b0:b1]
            shuffled[p].append((row[take] + lo, combo[take], batch[row[take]]))
    a, b = [], []
    for pieces in shuffled:
        row, combo, hashes = (np.concatenate(col) for col in zip(*pieces))
        left, right, _ = near_pairs(combo, hashes, np.zeros(len(row), dtype=bool), masks, cfg.hamming_radius)
        a.append(row[left])
        b.append(row[right])
    return clusters(len(h), np.concatenate(a), np.concatenate(b))


def brute_force(h: np.ndarray, block: int = 2048) -> np.ndarray:
    a, b = [], []
    for lo in range(0, len(h), block):
        d = np.bitwise_count(h[lo:lo + block, None] ^ h[None, lo:])
        i, j = np.nonzero(d <= RADIUS)
        keep = j > i
        a.append(lo + i[keep])
        b.append(lo + j[keep])
    return clusters(len(h), np.concatenate(a), np.concatenate(b))


def same_clusters(x: np.ndarray, y: np.ndarray) -> bool:
    return len(set(zip(x.tolist(), y.tolist()))) == len(set(x.tolist())) == len(set(y.tolist()))


def bench_join(n: int, brute_n: int, cfg: NearDupConfig, repeats: int) -> None:
    masks = combo_masks(cfg.phash_bands, cfg.hamming_radius)
    print(f"join: radius {cfg.hamming_radius}, {cfg.phash_bands} bands -> {len(masks)} keys/row; "
          f"in-process run of the Ray path's partitioning and partition kernel")
    hashes = {size: planted(size, seed=size) for size in (n, 2 * n)}
    cpu_times: dict[int, list[float]] = {n: [], 2 * n: []}
    merged = {}
    for _ in range(repeats):  # interleaved, best of `repeats`: other load on the machine only adds time
        for size, h in hashes.items():
            labels, cpu, _ = timed(band_join, h, cfg)
            cpu_times[size].append(cpu)
            merged[size] = size - len(np.unique(labels))
    for size, times in cpu_times.items():
        print(f"  N={size:,}: {min(times):.1f} s CPU (best of {repeats}: {', '.join(f'{t:.1f}' for t in times)}), "
              f"{partitions_for(size, cfg)} partitions, {merged[size]:,} rows merged into duplicate clusters")
    print(f"  time(2N)/time(N) = {min(cpu_times[2 * n]) / min(cpu_times[n]):.2f} (goal <= 2.3)")
    record("dedup_join", {"phash_join_rows_per_cpu_s": round(2 * n / min(cpu_times[2 * n]))})

    h = planted(brute_n, seed=1)
    fast, fast_cpu, _ = timed(band_join, h, cfg)
    slow, slow_cpu, _ = timed(brute_force, h)
    classic = NearDupConfig(hamming_radius=cfg.hamming_radius, phash_bands=cfg.hamming_radius + 1,
                            num_partitions=cfg.num_partitions)
    pigeon, pigeon_cpu, _ = timed(band_join, h, classic)
    assert same_clusters(fast, slow) and same_clusters(pigeon, slow), "join and brute force disagree"
    print(f"  N={brute_n:,}: brute force all-pairs {slow_cpu:.1f} s CPU, join {fast_cpu:.2f} s CPU "
          f"-> speed-up x{slow_cpu / fast_cpu:.0f} (same clusters); classic r+1 bands: {pigeon_cpu:.2f} s CPU")


def bench_ray(n: int, cfg: NearDupConfig) -> None:
    import pyarrow as pa
    import ray
    import ray.data

    from rs5m_ray.stages.keep_rule import member_rows
    from rs5m_ray.stages.near_dup import phash_drops

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    h = planted(n, seed=3)
    table = pa.table({"sample_id": [f"s{i}" for i in range(n)], "source": ["laion2b"] * n,
                      "phash": h.view(np.int64)})
    keys = ray.data.from_arrow(table).repartition(8).map_batches(
        member_rows, fn_kwargs={"value_column": "phash", "quality_column": None, "from_index": False},
        batch_format="pyarrow")
    start = time.perf_counter()
    drops = ray.get(phash_drops(keys, cfg))
    wall = time.perf_counter() - start
    expected = n - len(np.unique(band_join(h, cfg)))
    print(f"ray: N={n:,} through Ray Data (map_batches -> groupby shuffle -> map_groups -> resolve task): "
          f"{wall:.1f} s wall on a local 2-CPU Ray, {len(drops):,} rows marked near_dup "
          f"(in-process kernel: {expected:,})")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--brute-n", type=int, default=100_000)
    parser.add_argument("--ray-n", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=16, help="minimum partitions")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = NearDupConfig(num_partitions=args.partitions)
    bench_phash()
    bench_join(args.n, args.brute_n, cfg, args.repeats)
    if args.ray_n:
        bench_ray(args.ray_n, cfg)


if __name__ == "__main__":
    main()
