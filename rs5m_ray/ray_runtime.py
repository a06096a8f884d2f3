"""Joining the Ray cluster a job runs on."""
from __future__ import annotations

import os

import ray
import ray.data
from ray.data.context import ShuffleStrategy

from rs5m_ray.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join `address` (or RAY_ADDRESS, as under Ray Jobs); else start a local instance."""
    if not ray.is_initialized():
        ray.init(address=cfg.address or os.environ.get("RAY_ADDRESS") or "local", num_cpus=cfg.num_cpus,
                 object_store_memory=cfg.object_store_memory, include_dashboard=False, log_to_driver=False)
    if cfg.shuffle_strategy:
        ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy(cfg.shuffle_strategy)
