"""Parts as the unit of resume, end to end through `rs5m pub11` in its own process: a driver
SIGKILLed mid-download, then a rerun after the web changed; a driver SIGKILLed during the CLIP pass,
then a rerun that recomputes no finished part and writes a clean run's bytes; no secrets."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from rs5m_ray.sample.generate import generate
from rs5m_ray.sample.image_server import ImageServer
from tests.conftest import untrained_detector

ROWS_PER_SOURCE = 30
SOURCES = 6
KEY, SECRET = "AKIA-RS5M-TEST-KEY-7781", "s3cr3t-RS5M-do-not-write-9d2f"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Generated PUB11 metadata and its images on a slow loopback server (downloads take seconds)."""
    root = tmp_path_factory.mktemp("upstream")
    with ImageServer(directory=root / "images", latency_s=0.25, ports=2) as server:
        sample = generate(str(root), server.url("img"), rows_per_source=ROWS_PER_SOURCE)
        yield root, sample["sources"]


def config(path: Path, sources: list, out: Path, detector: str | None = None) -> Path:
    """A run's config; with a `detector`, the CLIP pass runs (its near-dup threshold fits random weights)."""
    scoring = {"enabled": True, "detector_checkpoint": detector, "forward_batch_size": 8} if detector else \
        {"enabled": False}
    cfg = {
        "output": str(out),
        "storage": {"key": KEY, "secret": SECRET},  # unused by local paths, and never written anywhere
        "ray": {"num_cpus": 2, "object_store_memory": 256 * 1024**2, "shuffle_strategy": "sort_shuffle_pull_based"},
        "ingest": {"sources": sources},
        "parts": {"num_parts": 8},
        "download": {"allow_hosts": ["127.0.0.0/8"], "max_actors": 1, "concurrency_per_task": 3, "retries": 0},
        "near_dup": {"embedding_enabled": bool(detector), "cosine_threshold": 0.999},
        "scoring": scoring,
        "shards": {"train_shards": 3, "val_shards": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def pub11(cfg: Path, kill_after: tuple[str, int] | None = None) -> subprocess.CompletedProcess | None:
    """`rs5m pub11` in its own session; with `kill_after=(phase, n)`, SIGKILL its whole process group
    (driver and the Ray instance it started) once n parts of that staging phase are done."""
    cmd = [sys.executable, "-m", "rs5m_ray.cli", "pub11", "--config", str(cfg)]
    if kill_after is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    phase, parts = kill_after
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    staged = Path(yaml.safe_load(cfg.read_text())["output"]) / "staging" / phase
    deadline = time.monotonic() + 300
    while len(list(staged.glob("*.done.json"))) < parts:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return None


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def outcome(out: Path) -> tuple[list[str], list[str]]:
    """Sample ids in the shards (read as RS5M's loader reads them) and in the ledger."""
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    in_shards = [s["img_name"].decode().removesuffix(".jpg") for s in wds.WebDataset(tars, shardshuffle=False)]
    in_ledger = pq.read_table(out / "ledger")["sample_id"].to_pylist()
    return in_shards, in_ledger


def test_killed_driver_then_changed_upstream_loses_and_duplicates_nothing(upstream, tmp_path):
    root, sources = upstream
    out = tmp_path / "run"
    cfg = config(tmp_path / "cfg.yaml", sources, out)
    pub11(cfg, kill_after=("images", 2))
    done_before = {p.name: p.read_bytes() for p in (out / "staging" / "images").glob("*.done.json")}
    assert 2 <= len(done_before) < 8, "killed mid-download"
    assert not (out / "report.json").exists()

    # The web changes before the rerun: a third of the images now answer 404.
    images = sorted((root / "images").glob("*.jpg"))
    removed = {p.name: p.read_bytes() for p in images[::3]}
    for name in removed:
        (root / "images" / name).unlink()
    try:
        rerun = pub11(cfg)
    finally:
        for name, data in removed.items():
            (root / "images" / name).write_bytes(data)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    in_shards, in_ledger = outcome(out)
    assert len(in_shards) == len(set(in_shards)) == report["shards"]["samples"] > 0
    assert len(in_ledger) == len(set(in_ledger))
    assert not set(in_shards) & set(in_ledger), "a sample is in a shard and in the ledger"
    assert len(in_shards) + len(in_ledger) == SOURCES * ROWS_PER_SOURCE, "every input row exactly once"
    assert report["accounting_balanced"] and report["sink"]["balanced"]
    assert report["drop_reasons"].get("download/http_404", 0) > 1  # the rerun met the changed web...
    for name, marker in done_before.items():  # ...but parts done before the kill were kept as they were
        assert (out / "staging" / "images" / name).read_bytes() == marker


def finished_parts(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every done-marker (its bytes hold the part's start and end time) and its part file's mtime."""
    staged = {}
    for marker in (out / "staging").glob("*/part-*.done.json"):
        part = marker.with_name(marker.name.replace(".done.json", ".parquet"))
        staged[f"{marker.parent.name}/{marker.name}"] = (
            marker.read_bytes(), part.stat().st_mtime_ns if part.exists() else None)
    return staged


def test_driver_killed_during_the_clip_pass_resumes_without_recomputing_and_writes_a_clean_runs_bytes(
        upstream, tmp_path):
    _, sources = upstream
    detector = untrained_detector(str(tmp_path / "detector"))
    clean = config(tmp_path / "clean.yaml", sources, tmp_path / "clean", detector)
    assert pub11(clean).returncode == 0
    resumed = config(tmp_path / "resumed.yaml", sources, tmp_path / "resumed", detector)
    pub11(resumed, kill_after=("scores", 2))
    before = finished_parts(tmp_path / "resumed")
    scored = [name for name in before if name.startswith("scores/")]
    assert 2 <= len(scored) < 8, "killed during the CLIP pass"
    finished = pub11(resumed)
    assert finished.returncode == 0, finished.stderr[-3000:]

    after = finished_parts(tmp_path / "resumed")
    assert len([name for name in after if name.startswith("scores/")]) == 8
    for name, staged in before.items():  # parts finished before the kill: neither redone nor rewritten
        assert after[name] == staged, name
    reference = shard_bytes(tmp_path / "clean")
    assert len(reference) >= 2 and shard_bytes(tmp_path / "resumed") == reference

    for out in ("clean", "resumed"):
        for path in (tmp_path / out).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert KEY.encode() not in data and SECRET.encode() not in data, f"secret in {path}"
    for text in (finished.stdout, finished.stderr):
        assert KEY not in text and SECRET not in text
