"""Shared fixtures: a real local Ray cluster, a loopback S3 server, the shared real data."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the repo, or RS5M_SHARED_DATA; None where absent."""
    candidates = [os.environ.get("RS5M_SHARED_DATA"), REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data (../shared/data) not present")
    return d


def untrained_detector(directory: str) -> str:
    """A detector checkpoint: an untrained head on rs5m-tiny-vit embeddings, for tests of the machinery
    (scores, staging, faults), never of what the scores mean."""
    import torch

    from rs5m_ray.stages.rs_detector import DetectorMeta, build_module, save_detector
    from rs5m_ray.storage import Storage

    torch.manual_seed(0)
    meta = DetectorMeta("clip_head", {"embed_dim": 64, "hidden": 0},
                        embedder={"clip_model": "rs5m-tiny-vit", "clip_pretrained": None})
    return save_detector(build_module(meta), meta, directory, Storage())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (started once: startup costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a fresh instance, never another cluster running on this machine
            num_cpus=2,
            object_store_memory=400 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
        )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto server mode) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback server; yields (s3://bucket, Storage)."""
    from rs5m_ray.config import StorageConfig
    from rs5m_ray.storage import Storage

    storage = Storage(StorageConfig(endpoint_url=s3_server, key="testing", secret="testing"))
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs = storage.fs("s3://")
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}", storage


@pytest.fixture
def storage_local():
    from rs5m_ray.storage import Storage

    return Storage()


@pytest.fixture
def sort_shuffle(ray_cluster):
    """Ray's sort-based shuffle: same groupby semantics, no ~15 s aggregator-actor start per shuffle
    on a 2-CPU test box (the default hash shuffle is covered by the brute-force comparison)."""
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    before, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    yield ray_cluster
    ctx.shuffle_strategy = before
