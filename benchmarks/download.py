"""Download + decode/validate/re-encode throughput per CPU core, against a naive baseline.

A loopback server (separate process, its CPU not counted) serves ~500x400 JPEGs
with a fixed latency per response on several ports (= several hosts). Both
contenders fetch the same URLs and do the same work per image (fetch, decode,
validate, RGB, JPEG re-encode, sha256):

  rs5m-ray   DownloadStage (asyncio, per-host leases, retries) + DecodeStage
  baseline   img2dataset-style: a thread pool of urllib requests + PIL

The figure is images per CPU-second of the client process (= img/s/core), the
unit of img2dataset's published 1,350 img/s on 16 cores (~85 img/s/core; quoted
as a reference, img2dataset is not installed here). Wall-clock rates are printed
too, but on a shared 2-core box they mostly measure the neighbours.

    python benchmarks/download.py            # N = 20,000
    python benchmarks/download.py --n 2000   # quick
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import cProfile
import hashlib
import io
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from rs5m_ray.config import DecodeConfig, DownloadConfig
from rs5m_ray.stages.decode import DecodeStage
from rs5m_ray.stages.download import DownloadStage, background_loop

IMG2DATASET_PER_CORE = 1350 / 16


def make_images(directory: Path, count: int, seed: int = 0) -> int:
    """Photo-like 500x400 JPEGs (smooth fields plus texture); returns the mean size in bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:400, 0:500].astype(np.float32)
    sizes = []
    for i in range(count):
        base = rng.uniform(40, 200, 3)
        slope = rng.uniform(-0.2, 0.2, (2, 3))
        waves = 25 * np.sin(xx / rng.uniform(8, 40) + rng.uniform(0, 6))[..., None]
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + waves + rng.normal(0, 12, (400, 500, 3))
        data = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(data, "JPEG", quality=85)
        (directory / f"{i}.jpg").write_bytes(data.getvalue())
        sizes.append(len(data.getvalue()))
    return int(np.mean(sizes))


def start_server(directory: Path, latency_ms: float, ports: int) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "rs5m_ray.sample.image_server", str(directory),
                             "--latency-ms", str(latency_ms), "--ports", str(ports)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, [int(p) for p in proc.stdout.readline().split()]


def cpu_seconds_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def urls_for(n: int, ports: list[int], distinct: int) -> list[str]:
    return [f"http://127.0.0.1:{ports[i % len(ports)]}/img/{i % distinct}.jpg?row={i}" for i in range(n)]


def run_rs5m(urls: list[str], batch: int, download: DownloadConfig, decode: DecodeConfig) -> dict:
    fetch, check = DownloadStage(download), DecodeStage(decode)
    kept = 0
    reasons: dict[str, int] = {}
    tables = [pa.table({"sample_id": [str(i) for i in range(start, start + len(urls[start:start + batch]))],
                        "url": urls[start:start + batch]}) for start in range(0, len(urls), batch)]
    cpu, wall = time.process_time(), time.perf_counter()
    # The next batch downloads while this one decodes, as the two stages overlap under Ray.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(fetch, tables[0])
        for following in tables[1:] + [None]:
            downloaded = pending.result()
            if following is not None:
                pending = pool.submit(fetch, following)
            out = check(downloaded)
            for r in out["drop_reason"].to_pylist():
                reasons[r or "kept"] = reasons.get(r or "kept", 0) + 1
            kept += out["drop_reason"].null_count
    result = {"kept": kept, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "outcomes": reasons}
    fetch.close()
    return result


def naive_fetch_and_check(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            data = resp.read()
        img = Image.open(io.BytesIO(data))
        img.load()
        out = io.BytesIO()
        img.convert("RGB").save(out, "JPEG", quality=95)
        hashlib.sha256(data).hexdigest()
        return True
    except Exception:
        return False


def run_baseline(urls: list[str], threads: int) -> dict:
    cpu, wall = time.process_time(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        kept = sum(pool.map(naive_fetch_and_check, urls))
    return {"kept": kept, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def profile_rs5m(urls: list[str], batch: int, download: DownloadConfig, decode: DecodeConfig, top: int) -> str:
    """CPU profile (thread CPU time) of both working threads: the download event loop and the caller (decode)."""
    loop_profile, main_profile = cProfile.Profile(time.thread_time), cProfile.Profile(time.thread_time)
    loop = background_loop()
    ready = threading.Event()
    loop.call_soon_threadsafe(lambda: (loop_profile.enable(), ready.set()))
    ready.wait()
    main_profile.enable()
    run_rs5m(urls, batch, download, decode)
    main_profile.disable()
    done = threading.Event()
    loop.call_soon_threadsafe(lambda: (loop_profile.disable(), done.set()))
    done.wait()
    text = io.StringIO()
    stats = pstats.Stats(main_profile, stream=text)
    stats.add(loop_profile)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="images fetched by rs5m-ray")
    parser.add_argument("--baseline-n", type=int, default=None, help="images fetched by the baseline (default n/4)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--hosts", type=int, default=8, help="server ports, i.e. distinct host:port keys")
    parser.add_argument("--distinct-images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1000, help="rows per stage call (a Ray Data batch)")
    parser.add_argument("--concurrency", type=int, default=256, help="in-flight requests per worker")
    parser.add_argument("--baseline-threads", type=int, default=64)
    parser.add_argument("--profile-n", type=int, default=3000, help="images in the profiled run (0: skip)")
    parser.add_argument("--phash", action=argparse.BooleanOptionalAction, default=False,
                        help="also compute the perceptual hash (not part of the baseline's work)")
    args = parser.parse_args()
    baseline_n = args.baseline_n or max(1, args.n // 4)

    download = DownloadConfig(allow_private_addresses=True, concurrency_per_task=args.concurrency)
    decode = DecodeConfig(phash=args.phash)
    with tempfile.TemporaryDirectory() as tmp:
        mean_bytes = make_images(Path(tmp), args.distinct_images)
        server, ports = start_server(Path(tmp), args.latency_ms, args.hosts)
        try:
            run_rs5m(urls_for(200, ports, args.distinct_images), args.batch, download, decode)  # warm-up
            server_cpu = cpu_seconds_of(server.pid)
            ours = run_rs5m(urls_for(args.n, ports, args.distinct_images), args.batch, download, decode)
            server_cpu_ours = cpu_seconds_of(server.pid) - server_cpu
            base = run_baseline(urls_for(baseline_n, ports, args.distinct_images), args.baseline_threads)
            keep_jpeg = run_rs5m(urls_for(baseline_n, ports, args.distinct_images), args.batch, download,
                                 dataclasses.replace(decode, reencode="if_needed"))
            profile = (profile_rs5m(urls_for(args.profile_n, ports, args.distinct_images), args.batch,
                                    download, decode, 25) if args.profile_n else "")
        finally:
            server.stdin.close()
            server.wait(30)

    ours_rate = ours["kept"] / ours["cpu_s"]
    base_rate = base["kept"] / base["cpu_s"]
    print(f"images: 500x400 JPEG, mean {mean_bytes / 1024:.0f} KiB; latency {args.latency_ms:.0f} ms/response; "
          f"{args.hosts} hosts; work per image: fetch, decode, validate, RGB, JPEG q{decode.reencode_quality} "
          f"re-encode, sha256{', pHash' if args.phash else ''}")
    print(f"rs5m-ray : {ours['kept']}/{args.n} kept, {ours['cpu_s']:.1f} CPU-s, {ours['wall_s']:.1f} s wall "
          f"-> {ours_rate:.0f} img/s/core ({ours['kept'] / ours['wall_s']:.0f} img/s wall); outcomes {ours['outcomes']}")
    print(f"baseline : {base['kept']}/{baseline_n} kept, {base['cpu_s']:.1f} CPU-s, {base['wall_s']:.1f} s wall "
          f"-> {base_rate:.0f} img/s/core ({base['kept'] / base['wall_s']:.0f} img/s wall)")
    print(f"ratio rs5m-ray / baseline (per core): {ours_rate / base_rate:.2f}x")
    keep_rate = keep_jpeg["kept"] / keep_jpeg["cpu_s"]
    print(f"rs5m-ray, reencode=if_needed (clean RGB JPEGs kept byte for byte, still fully decoded): "
          f"{keep_jpeg['kept']}/{baseline_n} kept, {keep_jpeg['cpu_s']:.1f} CPU-s -> {keep_rate:.0f} img/s/core "
          f"({keep_rate / base_rate:.2f}x baseline)")
    print(f"vs img2dataset reference {IMG2DATASET_PER_CORE:.0f} img/s/core (1,350 img/s on 16 cores, published, "
          f"not measured here): {ours_rate / IMG2DATASET_PER_CORE:.1f}x")
    print(f"server CPU during the rs5m-ray run (not counted): {server_cpu_ours:.1f} s; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if profile:
        print(f"\ncProfile (thread CPU time) of a {args.profile_n}-image rs5m-ray run, download loop + decode "
              "threads, by own time:")
        print(profile)


if __name__ == "__main__":
    main()
