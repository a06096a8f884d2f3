"""Joining the Ray cluster a job runs on."""
from __future__ import annotations

import os

import ray
import ray.data
from ray.data.context import ShuffleStrategy

from rs5m_ray.config import RayConfig


LOCAL_SHUFFLE = "sort_shuffle_pull_based"


def init_ray(cfg: RayConfig) -> None:
    """Join `address` (or RAY_ADDRESS, as under Ray Jobs); else start a local instance."""
    address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory,
                 include_dashboard=cfg.dashboard, log_to_driver=False)
    # A local instance gets the sort-based shuffle: the hash shuffle's aggregator actors cost
    # more CPU than a one-machine run's joins (measured: 41 CPU-s of 181 fixed at 50k images).
    strategy = cfg.shuffle_strategy or (LOCAL_SHUFFLE if address == "local" else None)
    if strategy:
        ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy(strategy)
