"""Training throughput: `rs5m train-clip` (Ray Train) against open_clip's own trainer, same run.

Both train the same open_clip model (random init) on the same generated shards, with the same
batch size, epochs, precision and loader processes, pinned to the same cores, one after the
other:
  (a) peer: `python -m open_clip_train.main` from the installed open_clip_torch, in a virtualenv
      this benchmark creates (cached) with webdataset 0.2.86 in front: open_clip_train 3.3 fails
      with webdataset 1.0.2 (`KeyError: 'fname'`). One process (its DDP does not run on CPU).
      It reads the same samples re-keyed to its `jpg`/`txt` members (conversion not timed).
  (b) ours: `rs5m train-clip --config <yaml>` as a user runs it: local Ray, one Ray Train worker
      reserving all the cores.
Figures: samples/s over every training step as each trainer times its steps (open_clip's
`Batch (t)` log lines at --log-every-n-steps 1; our metrics.csv), the same without the first
step of each epoch (loader start-up), and the wall time of the whole command.

    .venv/bin/python benchmarks/train_throughput.py              # ~6 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --model RN50 --batch 32    # any model open_clip names
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rs5m_ray.sample.generate import aerial_image, jpeg  # noqa: E402
from rs5m_ray.shards.layout import sample_members, shard_name, tar_bytes  # noqa: E402
from rs5m_ray.shards.writer import manifest_path  # noqa: E402

PEER_WEBDATASET = "webdataset==0.2.86"  # the newest open_clip_train 3.3's loader works with
PEER_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rs5m-benchmarks" / "open_clip_train"
CLASSES = ["farmland", "harbor", "airport", "forest", "river", "residential area", "desert", "stadium"]


def write_shards(out: Path, samples: int, shards: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Our shards (RS5M layout, with manifests) and the same samples keyed jpg/txt for open_clip."""
    rng = random.Random(seed)
    ours, peer = [], []
    per_shard = -(-samples // shards)
    for s in range(shards):
        members, peer_members = [], []
        for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
            size = (rng.randint(256, 640), rng.randint(224, 480))
            data = jpeg(aerial_image(rng, size))
            caption = f"an aerial image of {rng.choice(CLASSES)}, sample {i}"
            members += sample_members(f"bench_{i}", data, caption, {})
            peer_members += [(f"bench_{i:06d}.jpg", data), (f"bench_{i:06d}.txt", caption.encode())]
        name = shard_name("pub11", "train", s)
        (out / name).write_bytes(tar_bytes(members))
        Path(manifest_path(str(out), name)).write_text(json.dumps({"count": len(members) // 4}))
        (out / f"peer-{s:04d}.tar").write_bytes(tar_bytes(peer_members))
        ours.append(str(out / name))
        peer.append(str(out / f"peer-{s:04d}.tar"))
    return ours, peer


def peer_python() -> Path:
    """A virtualenv with webdataset 0.2.86 in front of this project's packages (torch, open_clip)."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        # Our site-packages behind the venv's own: its webdataset wins, torch and open_clip are shared.
        Path(purelib, "rs5m_project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", PEER_WEBDATASET], check=True)
    return python


def timed(cmd: list[str], cores: str, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["taskset", "-c", cores, *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed ({proc.returncode}); log: {log}\n" + log.read_text()[-3000:])
    return wall


def rates(step_seconds: list[tuple[int, float]], batch: int) -> dict:
    """samples/s over all steps, and without each epoch's first step; step_seconds = (epoch, seconds)."""
    steady = [s for i, (e, s) in enumerate(step_seconds) if i and step_seconds[i - 1][0] == e]
    return {"steps": len(step_seconds),
            "samples_per_s": round(batch * len(step_seconds) / sum(s for _, s in step_seconds), 3),
            "steady_samples_per_s": round(batch * len(steady) / sum(steady), 3) if steady else None}


def run_peer(args, shards: list[str], work: Path) -> dict:
    python = peer_python()
    pattern = str(Path(shards[0]).parent / f"peer-{{0000..{len(shards) - 1:04d}}}.tar")
    cmd = [str(python), "-m", "open_clip_train.main", "--train-data", pattern, "--dataset-type", "webdataset",
           "--train-num-samples", str(args.samples), "--model", args.model, "--batch-size", str(args.batch),
           "--epochs", str(args.epochs), "--precision", args.precision, "--workers", str(args.loader_workers),
           "--lr", "1e-4", "--wd", "0.5", "--warmup", "0", "--device", "cpu", "--seed", "0",
           "--log-every-n-steps", "1", "--logs", str(work / "peer-logs"), "--name", "peer"]
    log = work / "peer.log"
    wall = timed(cmd, args.cores, log)
    # "Train Epoch: 0 [ 32/150 (20%)] Data (t): 0.012 Batch (t): 4.401, 3.6/s ..."; with a log every step the
    # average is that step's time. The line for step k is logged after step k; the first holds step 0.
    steps = [(int(m[1]), float(m[2])) for m in re.finditer(r"Train Epoch: (\d+) .*?Batch \(t\): ([\d.]+)",
                                                           log.read_text())]
    return {"wall_s": round(wall, 1), **rates(steps, args.batch)}


def run_ours(args, shards: list[str], work: Path) -> dict:
    ncores = len(expand_cores(args.cores))
    cfg = {"output": str(work / "ours"), "name": "bench", "clip_model": args.model, "train_shards": shards,
           "epochs": args.epochs, "batch_size": args.batch, "lr": 1e-4, "weight_decay": 0.5, "precision":
           args.precision, "num_workers": 1, "cpus_per_worker": ncores, "loader_workers": args.loader_workers,
           "shuffle_buffer": 1000, "keep_checkpoints": 1, "ray": {"num_cpus": ncores}}
    config = work / "ours.yaml"
    config.write_text(json.dumps(cfg))
    wall = timed([str(REPO / ".venv" / "bin" / "rs5m"), "train-clip", "--config", str(config)], args.cores,
                 work / "ours.log")
    with open(work / "ours" / "bench" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [(int(r["epoch"]), float(r["step_seconds"])) for r in rows]
    waits = sum(float(r["data_wait_seconds"]) for r in rows) / sum(s for _, s in steps)
    return {"wall_s": round(wall, 1), **rates(steps, args.batch), "data_wait_fraction": round(waits, 3)}


def expand_cores(spec: str) -> list[int]:
    cores = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--loader-workers", type=int, default=1, help="loader processes of each trainer")
    parser.add_argument("--cores", default=f"0-{len(os.sched_getaffinity(0)) - 1}", help="taskset core list")
    parser.add_argument("--only", choices=["ours", "peer"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        work = Path(tmp)
        (work / "shards").mkdir()
        ours_shards, peer_shards = write_shards(work / "shards", args.samples, args.shards)
        print(f"{args.model}, random init, {args.precision}, batch {args.batch}, {args.epochs} epochs, "
              f"{args.samples} samples in {args.shards} shards, {args.loader_workers} loader process(es), "
              f"cores {args.cores}, load average {os.getloadavg()[0]:.1f}", flush=True)
        results = {}
        if args.only != "ours":
            results["open_clip_train"] = run_peer(args, peer_shards, work)
            print("open_clip_train:", results["open_clip_train"], flush=True)
        if args.only != "peer":
            results["rs5m train-clip"] = run_ours(args, ours_shards, work)
            print("rs5m train-clip:", results["rs5m train-clip"], flush=True)
        if len(results) == 2:
            peer, ours = results["open_clip_train"], results["rs5m train-clip"]
            print(f"ratio (ours / open_clip_train): samples/s {ours['samples_per_s'] / peer['samples_per_s']:.2f}x, "
                  f"steady {ours['steady_samples_per_s'] / peer['steady_samples_per_s']:.2f}x, "
                  f"wall {peer['wall_s'] / ours['wall_s']:.2f}x (end of load average {os.getloadavg()[0]:.1f})")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
